"""The full-size quality protocol (issue: embedded default and honest evaluation).

SmolLM2-135M-Instruct, W3 and W4 (group 64), dense / RTN / GPTQ / GPTQ+CAE / GPTAQ /
GPTAQ+CAE / FOEM, 3 calibration seeds of 128 x 512 tokens of Brown (calibration side),
perplexity on held-out Brown and State of the Union text, and zero-shot BIG-bench
accuracy. Each setting writes results.jsonl (resumable), summary.md and plots under
outputs/full_protocol/. Several hours on 2 CPU cores; minutes on a GPU.

    python benchmarks/full_protocol.py [--samples 128] [--seeds 0 1 2] [--bits 3 4]
"""

import argparse

from rescomp_harness.compare import CompareConfig, run_comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-windows", type=int, default=100)
    parser.add_argument("--semantics", default="released", choices=["released", "paper"])
    parser.add_argument("--bigbench", nargs="*", default=["social_iqa", "strategyqa", "winowhy"])
    parser.add_argument("--bigbench-limit", type=int, default=500)
    parser.add_argument("--output", default="outputs/full_protocol")
    args = parser.parse_args()
    for bits in args.bits:
        out = run_comparison(CompareConfig(
            model=args.model, bits=bits, group_size=64, samples=args.samples,
            seq_len=args.seq_len, seeds=args.seeds, eval_windows=args.eval_windows,
            semantics=args.semantics, bigbench=args.bigbench,
            bigbench_limit=args.bigbench_limit,
            output=f"{args.output}/w{bits}_g64_{args.semantics}",
        ))
        print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
