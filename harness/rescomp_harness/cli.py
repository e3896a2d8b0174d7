"""The ``rescomp`` command: ``rescomp compare`` and ``rescomp fetch``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from rescomp_harness.compare import METHODS, CompareConfig


def _compare_parser(sub) -> None:
    defaults = CompareConfig()
    parser = sub.add_parser(
        "compare",
        help="quantize with several methods over several seeds, evaluate, tabulate, plot",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=None,
                        help="HF model id or local dir (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--methods", nargs="+", default=defaults.methods, choices=list(METHODS))
    parser.add_argument("--recipes", nargs="*", default=[], help="extra recipe files to compare")
    parser.add_argument("--bits", type=int, default=defaults.bits)
    parser.add_argument("--group-size", type=int, default=defaults.group_size)
    parser.add_argument("--asymmetric", action="store_true", help="zero-point quantization")
    parser.add_argument("--semantics", choices=["released", "paper"], default=defaults.semantics)
    parser.add_argument("--calibration", default=defaults.calibration,
                        help="'brown', 'sotu', a .txt/.jsonl file or dir, or a HF dataset id")
    parser.add_argument("--samples", type=int, default=defaults.samples)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--seeds", type=int, nargs="+", default=defaults.seeds)
    parser.add_argument("--evaluation", nargs="+", default=defaults.evaluation,
                        help="held-out text: 'brown', 'sotu', files, or HF dataset ids")
    parser.add_argument("--eval-seq-len", type=int, default=defaults.eval_seq_len)
    parser.add_argument("--eval-windows", type=int, default=defaults.eval_windows)
    parser.add_argument("--bigbench", nargs="*", default=[],
                        help="BIG-bench multiple-choice tasks, e.g. social_iqa strategyqa winowhy")
    parser.add_argument("--bigbench-limit", type=int, default=defaults.bigbench_limit)
    parser.add_argument("--output", default=defaults.output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rescomp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _compare_parser(sub)
    sub.add_parser("fetch", help="download and convert the embedded default model and corpora")
    args = parser.parse_args(argv)

    if args.command == "fetch":
        from rescomp_harness import assets

        print(assets.default_model_path())
        for name in ("brown_documents", "sotu_documents"):
            print(name, len(getattr(assets, name)()))
        return 0

    from rescomp_harness.compare import run_comparison

    values = {f.name: getattr(args, f.name) for f in fields(CompareConfig) if hasattr(args, f.name)}
    values["symmetric"] = not args.asymmetric
    out = run_comparison(CompareConfig(**values))
    print((out / "summary.md").read_text())
    print(f"results, table and plots in {out}/ (results.jsonl, summary.md, perplexity.png, drift.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
