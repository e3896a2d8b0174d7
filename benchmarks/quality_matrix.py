"""Quality of solver variants against GPTQ over settings, seeds and both data directions.

For every setting (bits, group size or per-channel, calibration corpus) it runs
``rescomp compare`` with stock GPTQ and each variant (a recipe written from the options
below, so GPTQ with the MSE observer is compared too), on the same calibration draw per
seed, and evaluates held-out Brown and SOTU perplexity. Then one table: per variant and
setting, the share of the same-seed GPTQ gap to dense that the variant closes, paired
by seed (mean ± std over seeds; negative = worse than GPTQ), on each held-out corpus,
and the worst case per variant over everything run.

    python benchmarks/quality_matrix.py --variants gptaq_cae gptaq_cae_guard \\
        --bits 3 --groups 64 --calibration brown sotu --seeds 0 1 2

Results are resumable (each setting is a ``rescomp compare`` output directory). Several
minutes per (variant, seed) on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

#: variant name -> (modifier, settings); the observer is part of the variant
VARIANTS = {
    # the vocabulary's methods (rescomp_modifiers.methods) run by name; these are the
    # variants around them
    "gptaq": ("GPTAQModifier", {}),
    "gptaq_cae": ("CAEModifier", {}),
    "gptaq_cae_mse": ("CAEModifier", {"observer": "memoryless_mse"}),
    "gptaq_cae_guard": ("CAEModifier", {"guard": "gptq"}),
    "gptaq_cae_guard_insample": ("CAEModifier", {"guard": "gptq", "holdout_every": 0}),
    "gptaq_cae_mse_guard": ("CAEModifier", {"guard": "gptq", "observer": "memoryless_mse"}),
    "recommended_insample": ("CAEModifier", {"guard": "gptq", "holdout_every": 0,
                                             "observer": "memoryless_mse"}),
    "recommended_search": ("CAEModifier", {"guard": "gptq", "observer": "memoryless_mse",
                                           "coefficient_candidates": [0.125, 0.5]}),
    "recommended_lsq": ("CAEModifier", {"guard": "gptq", "observer": "memoryless_mse",
                                        "least_squares_candidate": True}),
    # the recommended default's contest on every row (its default before
    # candidate_row_stride 4), and on every 4th row (the default's own settings, under
    # the name its measurements were taken)
    "recommended_every_row": ("CAEModifier", {"guard": "gptq", "observer": "memoryless_mse",
                                              "candidate_row_stride": 1}),
    "recommended_rows4": ("CAEModifier", {"guard": "gptq", "observer": "memoryless_mse",
                                          "candidate_row_stride": 4}),
    # the default with a coarser MSE range search (10 shrink steps of 2% instead of 20 of
    # 1%): the search is 0.21x GPTQ's time on a fast CPU (docs/design.md)
    "recommended_mse_grid50": ("CAEModifier", {"guard": "gptq", "observer": "memoryless_mse",
                                               "observer_kwargs": {"grid": 50},
                                               "candidate_row_stride": 4}),
    "foem_mse": ("FOEMModifier", {"observer": "memoryless_mse"}),
    "gptaq_cae_search": ("CAEModifier", {"guard": "gptq",
                                         "coefficient_candidates": [0.125, 0.5]}),
    "gptaq_cae_lsq": ("CAEModifier", {"guard": "gptq", "least_squares_candidate": True}),
    "gptq_cae": ("CAEModifier", {"statistics": "gptq"}),
    "gptq_cae_guard": ("CAEModifier", {"statistics": "gptq", "guard": "gptq"}),
    "foem": ("FOEMModifier", {}),
    "foem_guard": ("FOEMModifier", {"guard": "gptq"}),
    # FOEM's released pull (f = 0.2) halved and quartered: does a smaller fixed pull stop
    # the loss where FOEM is worse than GPTQ (the overshoot hypothesis, docs/usage.md)?
    "foem_f0.1": ("FOEMModifier", {"first_order_coefficient": 0.1}),
    "foem_f0.05": ("FOEMModifier", {"first_order_coefficient": 0.05}),
    "gptaq_guard": ("GPTAQModifier", {"guard": "gptq"}),
    # clipping (issue: beat the best stock observer): llm-compressor's imatrix_mse under
    # our modifiers, and the solver's own searches (rescomp_modifiers/clipping.py) with
    # plain GPTQ terms (CAE on GPTQ statistics with b = 0 is GPTQ) and with the default's
    "gptaq_cae_imatrix": ("CAEModifier", {"observer": "imatrix_mse"}),
    "recommended_imatrix": ("CAEModifier", {"guard": "gptq", "observer": "imatrix_mse",
                                            "candidate_row_stride": 4}),
    "gptq_clip_uncompensable": ("CAEModifier", {"statistics": "gptq",
                                                "compensation_aware_coefficient": 0.0,
                                                "clipping": "uncompensable"}),
    "gptq_clip_hessian_block": ("CAEModifier", {"statistics": "gptq",
                                                "compensation_aware_coefficient": 0.0,
                                                "clipping": "hessian_block"}),
    "gptaq_cae_clip_uncompensable": ("CAEModifier", {"clipping": "uncompensable"}),
    "recommended_clip_uncompensable": ("CAEModifier", {"guard": "gptq",
                                                       "clipping": "uncompensable",
                                                       "candidate_row_stride": 4}),
    "recommended_clip_hessian_block": ("CAEModifier", {"guard": "gptq",
                                                       "clipping": "hessian_block",
                                                       "candidate_row_stride": 4}),
    # the group scales re-fitted by least squares to the loop's codes
    # (rescomp_modifiers/scale_refit.py), on stock GPTQ's solve (imatrix ranges) and on
    # the recommended default's
    "gptq_imatrix_refit": ("CAEModifier", {"statistics": "gptq",
                                           "compensation_aware_coefficient": 0.0,
                                           "observer": "imatrix_mse", "refit_scales": True}),
    "recommended_refit": ("CAEModifier", {"guard": "gptq", "observer": "imatrix_mse",
                                          "candidate_row_stride": 4, "refit_scales": True}),
}


def recipe_text(variant: str, bits: int, group: int | None) -> str:
    modifier, settings = VARIANTS[variant]
    settings = dict(settings)
    observer = settings.pop("observer", None)
    observer_kwargs = settings.pop("observer_kwargs", None)
    weights = {"num_bits": bits, "type": "int", "symmetric": True,
               "strategy": "group" if group else "channel"}
    if group:
        weights["group_size"] = group
    if observer:
        weights["observer"] = observer
    if observer_kwargs:
        weights["observer_kwargs"] = observer_kwargs
    fields = {"ignore": ["lm_head"], **settings,
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    return json.dumps({"quant_stage": {"quant_modifiers": {modifier: fields}}}, indent=2)


def setting_dir(root: Path, bits: int, group: int | None, calibration: str) -> Path:
    return root / f"w{bits}_{'g' + str(group) if group else 'channel'}_{calibration}"


def run_setting(args, bits: int, group: int | None, calibration: str) -> Path:
    from rescomp_harness.compare import CompareConfig, run_comparison

    out = setting_dir(Path(args.output), bits, group, calibration)
    recipes = out.parent / "recipes" / out.name
    recipes.mkdir(parents=True, exist_ok=True)
    from rescomp_harness.compare import METHODS

    paths = []
    for variant in args.variants:
        if variant in METHODS:
            continue
        path = recipes / f"{variant}.yaml"  # JSON is YAML
        path.write_text(recipe_text(variant, bits, group))
        paths.append(str(path))
    run_comparison(CompareConfig(
        # exactly the methods named: a baseline already recorded in another run of the
        # same setting need not be computed again (benchmarks/report.py merges runs)
        model=args.model, methods=[v for v in args.variants if v in METHODS],
        recipes=paths, bits=bits,
        group_size=group or 0, calibration=calibration, samples=args.samples,
        seq_len=args.seq_len, seeds=args.seeds, evaluation=["brown", "sotu"],
        eval_windows=args.eval_windows, drift_windows=1, output=str(out),
    ))
    return out


def variant_of(method: str) -> str:
    return Path(method.split(":", 1)[1]).stem if method.startswith("recipe:") else method


def gap_closed(records: list[dict], baseline: str = "gptq") -> dict[tuple[str, str], list[float]]:
    """(variant, corpus) -> per seed, (baseline - variant) / (baseline - dense) perplexity,
    the baseline of the same seed (same calibration draw)."""
    dense = next(r["scores"] for r in records if r["method"] == "dense")
    gptq = {r["seed"]: r["scores"] for r in records if variant_of(r["method"]) == baseline}
    closed: dict[tuple[str, str], list[float]] = {}
    for record in records:
        if record["method"] == "dense" or record["seed"] not in gptq:
            continue
        for corpus, value in record["scores"].items():
            base = gptq[record["seed"]][corpus]
            closed.setdefault((variant_of(record["method"]), corpus), []).append(
                (base - value) / (base - dense[corpus]))
    return closed


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:+.0f}%"
    return f"{100 * statistics.mean(values):+.0f}% ± {100 * statistics.stdev(values):.0f}"


def table(root: Path) -> str:
    from rescomp_harness.compare import _scan_results

    lines = ["| setting | variant | seeds | ppl Brown | ppl SOTU | GPTQ gap closed Brown | "
             "GPTQ gap closed SOTU | worst seed | GPTQ+MSE gap closed Brown | "
             "GPTQ+MSE gap closed SOTU |", "|---|---|---|---|---|---|---|---|---|---|"]
    worst: dict[str, float] = {}
    for results in sorted(root.glob("*/results.jsonl")):
        records = _scan_results(results).records
        closed = gap_closed(records)
        versus_mse = gap_closed(records, "gptq_mse")
        perplexities: dict[str, dict[str, list[float]]] = {}
        for record in records:
            for corpus, value in record["scores"].items():
                perplexities.setdefault(variant_of(record["method"]), {}).setdefault(
                    corpus, []).append(value)
        for variant, scores in perplexities.items():
            brown = closed.get((variant, "brown"), [])
            sotu = closed.get((variant, "sotu"), [])
            low = min(brown + sotu) if brown + sotu else float("nan")
            if variant not in ("dense", "gptq") and brown:
                worst[variant] = min(worst.get(variant, low), low)
            ppl = {c: f"{statistics.mean(v):.2f}" for c, v in scores.items()}
            lines.append(
                f"| {results.parent.name} | {variant} | {len(scores.get('brown', []))} | "
                f"{ppl.get('brown', '-')} | {ppl.get('sotu', '-')} | "
                f"{_spread(brown) if brown else '-'} | {_spread(sotu) if sotu else '-'} | "
                f"{'-' if variant in ('dense', 'gptq') else f'{100 * low:+.0f}%'} | "
                + " | ".join(_spread(versus_mse[(variant, corpus)])
                             if versus_mse.get((variant, corpus)) and variant != "gptq_mse"
                             else "-" for corpus in ("brown", "sotu")) + " |")
    lines += ["", "Worst single (seed, corpus, setting) per variant, share of GPTQ's gap "
              "closed: " + ", ".join(f"{v} {100 * w:+.0f}%" for v, w in sorted(worst.items()))]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="as rescomp compare's: default SmolLM2-135M-Instruct; "
                             "Qwen2.5-Coder-0.5B-Instruct is the second model")
    parser.add_argument("--variants", nargs="+", default=["gptq", "gptq_mse", "recommended"],
                        help=f"method names of rescomp compare, or {sorted(VARIANTS)}")
    parser.add_argument("--bits", type=int, nargs="+", default=[3])
    parser.add_argument("--groups", type=int, nargs="+", default=[64],
                        help="group sizes; 0 = per output channel")
    parser.add_argument("--calibration", nargs="+", default=["brown"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--output", default="outputs/quality_matrix")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        for calibration in args.calibration:
            for bits in args.bits:
                for group in args.groups:
                    run_setting(args, bits, group or None, calibration)
    print(table(Path(args.output)))


if __name__ == "__main__":
    main()
