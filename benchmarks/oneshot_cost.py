"""Wall time and peak memory of oneshot: stock GPTQModifier vs ours, side by side.

Each run is its own subprocess (peak RSS only grows within a process), the methods are
interleaved round by round so machine noise hits all alike, and the table reports the
median over rounds and the ratio to GPTQ measured in the same run.

    python benchmarks/oneshot_cost.py                      # embedded default model
    python benchmarks/oneshot_cost.py --model DIR --samples 64 --seq-len 512 --rounds 3
    python benchmarks/oneshot_cost.py --rotation spinquant --rotation-block-size 64 \
        --methods gptq gptaq gptaq_cae        # rotated runs (the rotation timed in both)

Targets: GPTAQ+CAE at most 1.3x GPTQ's wall time and 1.6x its peak memory; the recommended
default (GPTAQ+CAE with MSE clipping and the GPTQ guard), everything included, at most 1.5x.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

METHODS = ["gptq", "gptq_mse", "gptq_imatrix", "gptaq", "gptaq_cae", "gptq_cae", "foem", "recommended",
           "recommended_true_sequential"]
# the quantization setting, as `rescomp compare` names it (CompareConfig fields)
SETTINGS = ("bits", "group_size", "rotation", "rotation_block_size", "activation_bits",
            "kv_bits")


def worker(args) -> None:
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rescomp_harness.assets import brown_documents, resolve_model
    from rescomp_harness.compare import CompareConfig, build_recipe
    from rescomp_harness.data import calibration_dataset

    torch.manual_seed(0)
    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # calibration_dataset keeps to the calibration side of the document split
    dataset = calibration_dataset(tokenizer, brown_documents(), args.samples, args.seq_len, seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    # the same modifiers `rescomp compare` builds for these method names
    recipe = build_recipe(args.worker, CompareConfig(**{name: getattr(args, name) for name in SETTINGS}))
    if torch.cuda.is_available():
        model.cuda()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=args.seq_len,
            num_calibration_samples=args.samples, shuffle_calibration_samples=False,
            sequential_targets=args.sequential_targets)
    wall = time.perf_counter() - start
    result = {
        "method": args.worker,
        "wall_s": wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mib": rss_before / 1024,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF id or local dir (default: embedded SmolLM2)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rotation", choices=["none", "spinquant"], default="none")
    parser.add_argument("--rotation-block-size", type=int, default=None,
                        help="Hadamard block size (64 for 576-wide models such as SmolLM2)")
    parser.add_argument("--activation-bits", type=int, default=16)
    parser.add_argument("--kv-bits", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=METHODS[:-1], choices=METHODS)
    parser.add_argument("--sequential-targets", nargs="+", default=None,
                        help='e.g. Linear for "true sequential" (default: decoder layers)')
    parser.add_argument("--record", default=None,
                        help="append every run (method, round, wall time, memory, code "
                             "revision) to this JSONL file, for benchmarks/report.py")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    passthrough = ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    for name in SETTINGS:
        if getattr(args, name) is not None:
            passthrough += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.model:
        passthrough += ["--model", args.model]
    if args.sequential_targets:
        passthrough += ["--sequential-targets", *args.sequential_targets]
    for round_index in range(args.rounds):
        order = args.methods if round_index % 2 == 0 else list(reversed(args.methods))
        for method in order:
            proc = subprocess.run([sys.executable, __file__, "--worker", method, *passthrough],
                                  capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                raise SystemExit(f"{method} failed (exit {proc.returncode})")
            results[method].append(json.loads(lines[-1][len("RESULT "):]))
            if args.record:
                from rescomp_harness.compare import code_revision

                with open(args.record, "a") as handle:
                    handle.write(json.dumps({**results[method][-1], "round": round_index,
                                             "revision": code_revision()}) + "\n")
            print(f"round {round_index + 1}: {method} {results[method][-1]['wall_s']:.1f}s", file=sys.stderr)

    def median(method, key):
        values = [r[key] for r in results[method] if r[key] is not None]
        return statistics.median(values) if values else None

    base_wall, base_rss = median("gptq", "wall_s"), median("gptq", "peak_rss_mib")
    base_added = base_rss - median("gptq", "rss_before_mib")
    setting = (f"W{args.bits}" + (f"A{args.activation_bits}" if args.activation_bits < 16 else "")
               + (f"KV{args.kv_bits}" if args.kv_bits < 16 else "") + f" g{args.group_size}"
               + (f", rotated ({args.rotation})" if args.rotation != "none" else ""))
    print(f"\noneshot cost, {args.samples} x {args.seq_len} tokens, {setting}, "
          f"median of {args.rounds} rounds\n")
    print("| method | wall s | x GPTQ | peak RSS MiB | x GPTQ | RSS added by oneshot MiB | x GPTQ | CUDA peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        wall, rss = median(method, "wall_s"), median(method, "peak_rss_mib")
        added = rss - median(method, "rss_before_mib")
        cuda = median(method, "cuda_peak_mib")
        print(f"| {method} | {wall:.1f} | {wall / base_wall:.2f} | {rss:.0f} | {rss / base_rss:.2f} | "
              f"{added:.0f} | {added / base_added:.2f} | {'-' if cuda is None else f'{cuda:.0f}'} |")
    # The machine's speed drifts between runs (on a shared 2-core VM GPTQ alone took
    # 59-77 s); a round runs every method back to back, so its ratios are paired.
    print("\nPaired wall-time ratios to GPTQ, per round (order alternates by round):\n")
    print("| method | per round | median |")
    print("|---|---|---|")
    for method in args.methods:
        ratios = [r["wall_s"] / g["wall_s"] for r, g in zip(results[method], results["gptq"])]
        print(f"| {method} | {', '.join(f'{x:.2f}' for x in ratios)} | "
              f"{statistics.median(ratios):.2f} |")
    print("\nTargets: gptaq_cae <= 1.3x GPTQ wall time, <= 1.6x peak memory; recommended "
          "<= 1.5x wall time, everything included.")


if __name__ == "__main__":
    main()
