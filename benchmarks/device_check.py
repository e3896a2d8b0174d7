"""One command for a GPU machine: the solver's tests on the device, the solver on the
device against the CPU, and oneshot cost on 1B- and 8B-class shapes, in one table.

    bash benchmarks/device_check.sh                 # on the GPU machine (installs wheels)
    python benchmarks/device_check.py --device cpu  # tiny sizes anywhere (CI runs this)

Stages (results land in OUT/device_check.md and .json, rewritten after every step so
a run cut short still leaves what it measured):

1. unit tests: ``pytest --solver-device DEVICE`` on the solver's tests (against the slow
   oracles and upstream GPTQ) and the FP-cache-location test;
2. solver on DEVICE vs CPU: ``compensate_weight`` on the same random layer, float64
   (integer codes must all agree) and float32 (at least 99% of the codes and the proxy
   loss within 1e-3 relative: a last-bit difference flips a code that sits on a
   rounding boundary, and the flip moves the rest of its row slightly);
3. oneshot on randomly initialised Llama-architecture models built from a config (no
   downloads), random token ids as calibration: stock GPTQ, GPTAQ, GPTAQ+CAE, GPTQ+CAE,
   and GPTAQ+CAE with the full-precision activation cache on the accelerator; each run
   in its own process; wall time, median time per decoder layer and peak memory, each
   also as a ratio to GPTQ on the same shape. The model starts on the CPU and the
   pipeline onloads one layer at a time, as for a model too big for the accelerator,
   so the peak accelerator memory is the pipeline's own.

Runs that would not fit the time budget (``--budget-s``) are skipped and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["gptq", "gptaq", "gptaq_cae", "gptq_cae"]
UNIT_TESTS = ["tests/test_compensation.py", "tests/test_linalg.py",
              "tests/test_pipeline_memory.py"]


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    samples: int
    seq_len: int
    group_size: int


#: the shapes on an accelerator: Llama-3.2-1B's, and the first layers of Llama-3.1-8B's
DEVICE_SHAPES = [
    Shape("1B-class", 2048, 16, 8192, 32, 8, 32000, 128, 2048, 128),
    Shape("8B-class", 4096, 2, 14336, 32, 8, 32000, 128, 2048, 128),
]
#: tiny stand-ins for --device cpu, so the whole script runs in seconds
CPU_SHAPES = [Shape("tiny", 64, 2, 128, 4, 2, 96, 4, 32, 32)]


@dataclass(frozen=True)
class Run:
    shape: Shape
    method: str
    #: where the full-precision activation cache lives (None: the default, with
    #: llm-compressor's own cache on sequential_offload_device = cpu)
    fp_cache: str | None = None

    @property
    def label(self) -> str:
        return self.method + (f" (FP cache on {self.fp_cache})" if self.fp_cache else "")


# ------------------------------------------------------------------------ oneshot worker


def _tokenizer(vocab: int):
    """A word-level tokenizer built in code: oneshot wants a processor, but the
    calibration data are token ids already, so it never tokenizes anything."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<pad>": 1, **{f"t{i}": i for i in range(2, vocab)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>")),
        unk_token="<unk>", pad_token="<pad>",
    )


def oneshot_worker(run: Run, device: str) -> dict:
    """One oneshot on a fresh random model; returns the measurements."""
    import torch
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot

    import rescomp_modifiers  # noqa: F401  (registers the modifiers and the pipeline)
    from rescomp_modifiers.methods import build_modifier

    shape = run.shape
    on_cuda = device.startswith("cuda")
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=max(shape.seq_len, 128),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.bfloat16 if on_cuda else torch.float32
    )
    # oneshot reads the config back from model.config.name_or_path: a folder with it
    config_dir = tempfile.mkdtemp(prefix="device_check_config_")
    model.config.save_pretrained(config_dir)
    model.config._name_or_path = config_dir
    ids = torch.randint(2, shape.vocab, (shape.samples, shape.seq_len),
                        generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    scheme = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
        "group_size": shape.group_size}}}
    recipe = [build_modifier(run.method, ignore=["lm_head"], config_groups=scheme)]

    def synchronize():
        if on_cuda:
            torch.cuda.synchronize()

    # the first real (not traced) call of each decoder layer starts its calibration
    starts: dict[int, float] = {}

    def layer_started(index):
        def hook(_module, args, kwargs):
            values = [*args, *kwargs.values()]
            if index not in starts and any(type(v) is torch.Tensor for v in values):
                synchronize()
                starts[index] = time.perf_counter()
        return hook

    for index, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(layer_started(index), with_kwargs=True)

    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, processor=_tokenizer(min(shape.vocab, 1000)),
            recipe=recipe, max_seq_length=shape.seq_len,
            num_calibration_samples=shape.samples, shuffle_calibration_samples=False)
    synchronize()
    end = time.perf_counter()
    # layer i runs from its first call to the first call of layer i + 1 (the last one
    # to the end of oneshot, which also finalizes): calibrate, compress, propagate
    bounds = [starts[i] for i in sorted(starts)] + [end]
    layer_seconds = [b - a for a, b in zip(bounds, bounds[1:])]
    return {
        "wall_s": end - start,
        "layer_s_median": statistics.median(layer_seconds) if layer_seconds else None,
        "layers_timed": len(starts),
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None,
        "cuda_before_mib": cuda_before / 2**20 if on_cuda else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mib": rss_before / 1024,
    }


def run_oneshot(run: Run, device: str, isolate: bool, timeout_s: float) -> dict:
    env = dict(os.environ)
    if run.fp_cache:
        env["RESCOMP_FULL_PRECISION_CACHE_DEVICE"] = run.fp_cache
    if not isolate:
        # in this process (quick CI mode): peak RSS is the process's, not the run's
        saved = os.environ.get("RESCOMP_FULL_PRECISION_CACHE_DEVICE")
        os.environ.update(env)
        from rescomp_modifiers.release import releasing_oneshot_models

        try:
            # the earlier runs' models are freed, so cuda_before_mib is this run's own
            with releasing_oneshot_models():
                result = oneshot_worker(run, device)
        finally:
            os.environ.pop("RESCOMP_FULL_PRECISION_CACHE_DEVICE", None)
            if saved is not None:
                os.environ["RESCOMP_FULL_PRECISION_CACHE_DEVICE"] = saved
        return {**result, "peak_rss_mib": None, "rss_before_mib": None}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, __file__, "--device", device, "--worker",
               json.dumps({"shape": asdict(run.shape), "method": run.method,
                           "fp_cache": run.fp_cache})]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stdout[-1500:] + proc.stderr[-2500:]).strip()
        return {"error": f"exit {proc.returncode}", "log_tail": tail}
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------- solver stages


def run_unit_tests(device: str, files: list[str], pytest_k: str | None,
                   timeout_s: float) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "--solver-device", device, *files]
    if pytest_k:
        command += ["-k", pytest_k]
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(command[1:]), "error": f"timed out after {timeout_s:.0f} s"}
    summary = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    counts = {key: int(value) for value, key in
              re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary[-1] if summary else "")}
    result = {"command": "python " + " ".join(command[1:]), "exit_code": proc.returncode,
              "seconds": time.perf_counter() - start, "summary": summary[-1] if summary else "",
              **counts}
    if proc.returncode:
        result["log_tail"] = proc.stdout[-4000:]
    return result


def solver_device_vs_cpu(device: str, rows: int, columns: int) -> list[dict]:
    """``compensate_weight`` on CPU and on ``device``, same inputs, per method and precision."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    import rescomp_modifiers.compensation as compensation
    from rescomp_modifiers.compensation import CompensationTerms, compensate_weight

    generator = torch.Generator().manual_seed(0)
    tokens = 4 * columns
    x_fp = torch.randn(columns, tokens, generator=generator, dtype=torch.float64)
    mix = torch.eye(columns, dtype=torch.float64) + 0.3 * torch.randn(
        columns, columns, generator=generator, dtype=torch.float64) / columns ** 0.5
    x_fp = mix @ x_fp
    x_q = x_fp + 0.3 * torch.randn(columns, tokens, generator=generator, dtype=torch.float64)
    hessian = 2.0 / 8 * x_q @ x_q.T
    asymmetry = 2.0 / 8 * (x_fp - x_q) @ x_q.T
    weights = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    group_size = min(128, columns // 2)
    quant_args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                                  group_size=group_size)
    grouped = weights.reshape(rows, columns // group_size, group_size)
    scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), quant_args)

    def solve(method, precision, on):
        compensation.GPTQ_PRECISION = precision
        uses_d = method != "gptq"
        result = compensate_weight(
            weights.to(on, precision)[None], hessian.to(on, precision)[None],
            scale.to(on, precision)[None], zero_point.to(on)[None], None, quant_args,
            asymmetry=asymmetry.to(on, precision)[None] if uses_d else None,
            terms=CompensationTerms.for_method(method), blocksize=128, percdamp=0.01)
        codes = torch.round(result.quantized[0].double().cpu()
                            / scale.double().repeat_interleave(group_size, dim=1))
        return codes, float(result.losses[0])

    rows_out = []
    original_precision = compensation.GPTQ_PRECISION
    try:
        for precision, min_agreement, max_loss_diff in ((torch.float64, 1.0, 1e-9),
                                                        (torch.float32, 0.99, 1e-3)):
            for method in ("gptq", "gptaq", "gptaq_cae"):
                row = {"method": method, "precision": str(precision).replace("torch.", ""),
                       "shape": f"{rows}x{columns}",
                       "tolerance": f"codes >= {min_agreement:.0%}, loss <= {max_loss_diff:g}"}
                try:
                    start = time.perf_counter()
                    cpu_codes, cpu_loss = solve(method, precision, "cpu")
                    cpu_s = time.perf_counter() - start
                    solve(method, precision, device)  # warm-up (kernels, allocator)
                    start = time.perf_counter()
                    dev_codes, dev_loss = solve(method, precision, device)
                    dev_s = time.perf_counter() - start
                except Exception as error:  # reported in the table, the check goes on
                    rows_out.append({**row, "ok": False, "error": f"{type(error).__name__}: {error}"[:300]})
                    continue
                agreement = float((cpu_codes == dev_codes).double().mean())
                loss_diff = abs(dev_loss - cpu_loss) / abs(cpu_loss)
                rows_out.append({
                    **row, "codes_equal": agreement, "loss_rel_diff": loss_diff,
                    "cpu_s": cpu_s, "device_s": dev_s,
                    "ok": agreement >= min_agreement and loss_diff <= max_loss_diff,
                })
    finally:
        compensation.GPTQ_PRECISION = original_precision
    return rows_out


# ------------------------------------------------------------------------------- report


def environment(device: str) -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device}
    try:
        import compressed_tensors
        import llmcompressor

        info["llmcompressor"] = llmcompressor.__version__
        info["compressed_tensors"] = compressed_tensors.__version__
    except ImportError as error:
        info["import_error"] = str(error)
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _ratio(value, base):
    return None if value is None or base in (None, 0) else value / base


def _fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Device check ({report['environment'].get('gpu', report['environment']['device'])})",
             "", "Environment: " + ", ".join(f"{k} {v}" for k, v in report["environment"].items()),
             ""]
    tests = report.get("unit_tests")
    if tests:
        lines += ["## Unit tests on the device", "", f"`{tests['command']}`: "
                  f"{tests.get('summary') or tests.get('error')} "
                  f"({_fmt(tests.get('seconds'), '.0f')} s)", ""]
    if report.get("solver"):
        lines += ["## Solver on the device vs CPU (same inputs)", "",
                  "| method | precision | shape | codes equal | loss rel. diff | tolerance | ok | CPU s | device s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in report["solver"]:
            if "error" in row:
                lines.append(f"| {row['method']} | {row['precision']} | {row['shape']} | "
                             f"error: {row['error']} | | {row['tolerance']} | **no** | | |")
                continue
            lines.append(f"| {row['method']} | {row['precision']} | {row['shape']} | "
                         f"{row['codes_equal']:.4%} | {row['loss_rel_diff']:.1e} | "
                         f"{row['tolerance']} | {'yes' if row['ok'] else '**no**'} | "
                         f"{row['cpu_s']:.2f} | {row['device_s']:.2f} |")
        lines.append("")
    if report.get("oneshot"):
        lines += ["## oneshot, random-init Llama shapes, W4 group quantization", "",
                  "Ratios are to stock GPTQ on the same shape in the same run. Peak memory: "
                  "CUDA allocated on an accelerator, process RSS on the CPU.", "",
                  "| shape | method | wall s | x GPTQ | s/layer | x GPTQ | peak MiB | x GPTQ | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in report["oneshot"]:
            lines.append(
                f"| {row['shape']} | {row['label']} | {_fmt(row.get('wall_s'))} | "
                f"{_fmt(row.get('wall_x'), '.2f')} | {_fmt(row.get('layer_s_median'), '.2f')} | "
                f"{_fmt(row.get('layer_x'), '.2f')} | {_fmt(row.get('peak_mib'), '.0f')} | "
                f"{_fmt(row.get('peak_x'), '.2f')} | {row.get('error', '')} |")
        lines.append("")
    (out / "device_check.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda",
                        help="cuda (default), cuda:N, or cpu for the tiny CI sizes")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ["OUT"]) / "device_check" if os.environ.get("OUT") else Path("outputs/device_check"),
                        help="output folder (default: $OUT/device_check, else outputs/device_check)")
    parser.add_argument("--budget-s", type=float, default=480,
                        help="time for everything; runs that would not fit are skipped")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--unit-tests", nargs="+", default=UNIT_TESTS,
                        help="test files run with --solver-device (default: %(default)s)")
    parser.add_argument("--pytest-k", default=None, help="only the unit tests matching this")
    parser.add_argument("--skip-unit-tests", action="store_true")
    parser.add_argument("--in-process", action="store_true",
                        help="oneshot runs in this process (quick; no per-run peak RSS)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    try:
        torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device; use cuda, cuda:N or cpu")
    on_cuda = args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; "
                     "use --device cpu for the tiny CPU run")
    if args.worker:
        spec = json.loads(args.worker)
        run = Run(Shape(**spec["shape"]), spec["method"], spec["fp_cache"])
        print("RESULT " + json.dumps(oneshot_worker(run, args.device)), flush=True)
        return 0
    if "gptq" not in args.methods:
        parser.error("--methods must include gptq: every ratio is to GPTQ")

    deadline = time.monotonic() + args.budget_s
    report: dict = {"environment": environment(args.device), "budget_s": args.budget_s}
    write_report(args.out, report)

    if not args.skip_unit_tests:
        print("unit tests ...", file=sys.stderr, flush=True)
        report["unit_tests"] = run_unit_tests(args.device, args.unit_tests, args.pytest_k,
                                              timeout_s=max(30.0, 0.35 * args.budget_s))
        write_report(args.out, report)

    print("solver, device vs CPU ...", file=sys.stderr, flush=True)
    rows, columns = (1024, 2048) if on_cuda else (16, 64)
    report["solver"] = solver_device_vs_cpu(args.device, rows, columns)
    write_report(args.out, report)

    shapes = DEVICE_SHAPES if on_cuda else CPU_SHAPES
    first = [Run(s, m) for s in shapes for m in ("gptq", "gptaq_cae") if m in args.methods]
    if on_cuda and "gptaq_cae" in args.methods:
        first += [Run(s, "gptaq_cae", fp_cache=args.device) for s in shapes]
    rest = [Run(s, m) for s in shapes for m in args.methods if Run(s, m) not in first]
    results: dict[Run, dict] = {}
    for run in first + rest:
        left = deadline - time.monotonic()
        base = results.get(Run(run.shape, "gptq"), {})
        # a run takes about as long as GPTQ's on its shape, plus a quarter (and imports)
        estimate = 1.25 * base["wall_s"] + 20 if "wall_s" in base else 0.0
        if left < max(estimate, 10.0):
            results[run] = {"error": f"skipped: {left:.0f} s left of the budget"}
        else:
            print(f"oneshot {run.shape.name} {run.label} ...", file=sys.stderr, flush=True)
            results[run] = run_oneshot(run, args.device, not args.in_process, timeout_s=left)
        rows_out = []
        for r in [r for r in first + rest if r in results]:
            result, gptq = results[r], results.get(Run(r.shape, "gptq"), {})
            peak_key = "cuda_peak_mib" if on_cuda else "peak_rss_mib"
            rows_out.append({
                "shape": r.shape.name, "shape_spec": asdict(r.shape), "method": r.method,
                "fp_cache": r.fp_cache, "label": r.label, **result,
                "peak_mib": result.get(peak_key),
                "wall_x": _ratio(result.get("wall_s"), gptq.get("wall_s")),
                "layer_x": _ratio(result.get("layer_s_median"), gptq.get("layer_s_median")),
                "peak_x": _ratio(result.get(peak_key), gptq.get(peak_key)),
            })
        report["oneshot"] = rows_out
        write_report(args.out, report)

    print((args.out / "device_check.md").read_text())
    failed = (report.get("unit_tests", {}).get("exit_code", 0) != 0
              or not all(row["ok"] for row in report["solver"])
              or any("error" in row and not row["error"].startswith("skipped")
                     for row in report["oneshot"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
