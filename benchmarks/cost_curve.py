"""How GPTAQ+CAE's cost relative to stock GPTQ changes as the model grows (CPU).

Random-init Llama-architecture models of growing width (FFN 4x width, a few layers,
built from a config: no downloads), the same random-token calibration for each. The
extra cost of GPTAQ+CAE is per token (the FP stream's forward pass, the D statistics),
the solver's share grows with the width squared: the ratio should fall toward the
solver's own ratio (about 1.0x) as the width grows. Each run is its own process (peak
RSS only grows within one); a round runs both methods back to back, alternating the
order, and the table gives the paired ratios of every round and their median.

    OMP_NUM_THREADS=1 python benchmarks/cost_curve.py                # 576, 1024, 2048
    python benchmarks/cost_curve.py --widths 576 1024 --rounds 3 --samples 16 --seq-len 256

Target (issue 13): GPTAQ+CAE at most 1.15x GPTQ's wall time at width 2048.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_check import Run, Shape, run_oneshot  # noqa: E402  (the same oneshot worker)

METHODS = ("gptq", "gptaq_cae")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", nargs="+", type=int, default=[576, 1024, 2048])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    for width in args.widths:
        if width % 64 or width % args.group_size:
            parser.error(f"--widths: {width} must be a multiple of 64 (heads of 64) and of "
                         f"--group-size {args.group_size}")

    results = {}
    for width in args.widths:
        heads = width // 64
        # grouped-query attention as in the Llama family (SmolLM2-135M 9/3, Llama-1B 32/8)
        kv_heads = heads // 3 if heads % 3 == 0 else heads // 4 if heads % 4 == 0 else heads
        shape = Shape(f"w{width}", width, args.layers, 4 * width, heads, kv_heads, 1000,
                      args.samples, args.seq_len, args.group_size)
        for round_index in range(args.rounds):
            order = METHODS if round_index % 2 == 0 else METHODS[::-1]
            for method in order:
                result = run_oneshot(Run(shape, method), "cpu", isolate=True, timeout_s=3600)
                if "error" in result:
                    sys.stderr.write(result.get("log_tail", "") + "\n")
                    raise SystemExit(f"width {width} {method}: {result['error']}")
                results.setdefault((width, method), []).append(result)
                print(f"width {width} round {round_index + 1}: {method} "
                      f"{result['wall_s']:.1f} s", file=sys.stderr, flush=True)

    print(f"\nGPTAQ+CAE vs GPTQ, {args.layers} layers, FFN 4x width, "
          f"{args.samples} x {args.seq_len} tokens, W4 g{args.group_size}\n")
    print("| width | GPTQ s | GPTAQ+CAE s | wall x GPTQ, per round | median | "
          "s/layer x GPTQ | GPTQ peak RSS MiB | RSS x GPTQ | RSS added x GPTQ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for width in args.widths:
        gptq, ours = results[(width, "gptq")], results[(width, "gptaq_cae")]
        ratios = [o["wall_s"] / g["wall_s"] for o, g in zip(ours, gptq)]
        layer = [o["layer_s_median"] / g["layer_s_median"] for o, g in zip(ours, gptq)]

        def median(runs, key):
            return statistics.median(r[key] for r in runs)

        # at tiny sizes GPTQ's oneshot may not raise the peak RSS at all: no ratio then
        added = [(o["peak_rss_mib"] - o["rss_before_mib"]) / base if base > 0 else float("nan")
                 for o, g in zip(ours, gptq)
                 for base in [g["peak_rss_mib"] - g["rss_before_mib"]]]
        print(f"| {width} | {median(gptq, 'wall_s'):.1f} | {median(ours, 'wall_s'):.1f} | "
              f"{', '.join(f'{r:.2f}' for r in ratios)} | {statistics.median(ratios):.2f} | "
              f"{statistics.median(layer):.2f} | {median(gptq, 'peak_rss_mib'):.0f} | "
              f"{median(ours, 'peak_rss_mib') / median(gptq, 'peak_rss_mib'):.2f} | "
              f"{statistics.median(added):.2f} |")
    if args.json:
        args.json.write_text(json.dumps(
            {f"{w}/{m}": runs for (w, m), runs in results.items()}, indent=2))
    print("\nTarget: <= 1.15x GPTQ's wall time at width 2048.")


if __name__ == "__main__":
    main()
