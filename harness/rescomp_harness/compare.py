"""Quantize one model with several methods over several calibration seeds and compare.

Every (method, seed) run quantizes a fresh copy of the model on the same calibration
draw for that seed (comparisons are paired by seed), evaluates perplexity on held-out
text with the papers' protocol, measures the per-layer drift between the quantized and
the dense model's decoder-layer outputs, and appends one JSON line to
``results.jsonl``: an interrupted run keeps what finished and resumes from there. The
summary is a markdown table (mean and spread over seeds, paired difference to GPTQ) and
PNG plots.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

from rescomp_modifiers.methods import METHODS as PLUGIN_METHODS, build_modifier

__all__ = ["CompareConfig", "METHODS", "run_comparison", "summarize"]

#: method name -> label, from the plugin's one vocabulary; recipe files are added as
#: "recipe:<path>"
METHODS = {name: method.label for name, method in PLUGIN_METHODS.items()}
#: what a comparison runs when no --methods are named
DEFAULT_METHODS = ["rtn", "gptq", "gptq_cae", "gptaq", "gptaq_cae", "foem"]


@dataclass
class CompareConfig:
    """What to compare; defaults are the README's quick setting."""

    model: str | None = None  #: HF id or local dir; None: embedded SmolLM2-135M
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    recipes: list[str] = field(default_factory=list)  #: extra recipe files to compare
    bits: int = 3
    group_size: int = 64
    symmetric: bool = True
    semantics: str = "released"
    calibration: str = "brown"  #: documents spec (see data.load_documents)
    samples: int = 16
    seq_len: int = 512
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    evaluation: list[str] = field(default_factory=lambda: ["brown", "sotu"])
    eval_seq_len: int = 512
    eval_windows: int = 8
    drift_windows: int = 2
    bigbench: list[str] = field(default_factory=list)
    bigbench_limit: int | None = 200
    output: str = "outputs/compare"


def _scheme(config: CompareConfig) -> dict:
    return {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": config.bits, "type": "int", "symmetric": config.symmetric,
                "strategy": "group", "group_size": config.group_size,
            },
        }
    }


def build_recipe(method: str, config: CompareConfig):
    """The modifier list for a method name, or a recipe path for ``recipe:<path>``."""
    if method.startswith("recipe:"):
        return method[len("recipe:"):]
    return [build_modifier(method, ignore=["lm_head"], config_groups=_scheme(config),
                           semantics=config.semantics)]


def _decoder_layers(model) -> list[torch.nn.Module]:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ValueError("cannot find the decoder layers (model.model.layers) for the drift")
    return list(layers)


@torch.no_grad()
def layer_drift(dense, quantized, windows: torch.Tensor) -> list[float]:
    """Per decoder layer, the mean squared difference between the two models' outputs
    on the same inputs: how far the quantized stream has drifted from the dense one."""

    def capture(model):
        outputs, handles = [], []
        for layer in _decoder_layers(model):
            handles.append(layer.register_forward_hook(
                lambda _m, _a, out: outputs.append((out[0] if isinstance(out, tuple) else out).float())
            ))
        try:
            model(input_ids=windows)
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    return [float((a - b).square().mean()) for a, b in zip(capture(dense), capture(quantized))]


def _load_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run_comparison(config: CompareConfig) -> Path:
    """Run (or resume) every (method, seed) and write the summary; returns the output dir."""
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    from rescomp_harness.assets import resolve_model
    from rescomp_harness.data import calibration_dataset, load_documents, split_documents
    from rescomp_harness.evaluation.perplexity import perplexity

    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    _check_resumable(out, config)
    (out / "config.json").write_text(json.dumps(config.__dict__, indent=2))
    results_path = out / "results.jsonl"
    done = {(r["method"], r["seed"]) for r in _read_results(results_path)}

    model_path = resolve_model(config.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    calibration_documents = load_documents(config.calibration)
    held_out = {name: split_documents(load_documents(name)).evaluation for name in config.evaluation}
    drift_input = calibration_dataset(
        tokenizer, calibration_documents, config.drift_windows, config.seq_len, seed=10_000
    )
    drift_windows = torch.tensor(drift_input["input_ids"])
    dense = _load_model(model_path)

    def evaluate(model) -> dict:
        scores = {
            name: perplexity(model, docs, tokenizer, seq_len=config.eval_seq_len,
                             max_windows=config.eval_windows, progress=False).perplexity
            for name, docs in held_out.items()
        }
        if config.bigbench:
            from rescomp_harness.evaluation.lm_eval_tasks import bigbench_accuracy

            scores.update(bigbench_accuracy(model, tokenizer, config.bigbench,
                                            limit=config.bigbench_limit))
        return scores

    if ("dense", -1) not in done:
        started = time.perf_counter()
        _append(results_path, {"method": "dense", "seed": -1, "scores": evaluate(dense),
                               "drift": [], "seconds": time.perf_counter() - started})

    methods = list(config.methods) + [f"recipe:{r}" for r in config.recipes]
    runs = [(m, s) for s in config.seeds for m in methods if (m, s) not in done]
    for method, seed in tqdm(runs, desc="compare (method x seed)", unit="run"):
        logger.info(f"compare: {method}, seed {seed}")
        dataset = calibration_dataset(tokenizer, calibration_documents, config.samples,
                                      config.seq_len, seed=seed)
        model = _load_model(model_path)
        started = time.perf_counter()
        oneshot(model=model, dataset=dataset, recipe=build_recipe(method, config),
                max_seq_length=config.seq_len, num_calibration_samples=config.samples,
                shuffle_calibration_samples=False)
        quantize_seconds = time.perf_counter() - started
        record = {
            "method": method, "seed": seed, "scores": evaluate(model),
            "drift": layer_drift(dense, model, drift_windows),
            "seconds": quantize_seconds,
        }
        _append(results_path, record)
        del model
        gc.collect()

    summary = summarize(_read_results(results_path), config)
    (out / "summary.md").write_text(summary)
    plot(_read_results(results_path), out)
    return out


#: settings that may change between runs into one output directory: they only add runs
_EXTENDABLE = {"methods", "recipes", "seeds", "output"}


def _check_resumable(out: Path, config: CompareConfig) -> None:
    """Refuse to mix results of different settings in one ``results.jsonl``: runs are
    resumed by (method, seed) alone, so a changed setting would be silently skipped."""
    previous_path = out / "config.json"
    if not (out / "results.jsonl").exists() or not previous_path.exists():
        return
    previous = json.loads(previous_path.read_text())
    changed = sorted(k for k, v in config.__dict__.items()
                     if k not in _EXTENDABLE and k in previous and previous[k] != v)
    if changed:
        details = ", ".join(f"{k}: {previous[k]!r} -> {getattr(config, k)!r}" for k in changed)
        raise ValueError(
            f"{out} holds results of a different setting ({details}); pass another "
            "--output, or delete that directory to start over."
        )


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def _read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interruption
            continue
    return records


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def summarize(records: list[dict], config: CompareConfig) -> str:
    """Markdown table: per metric, mean ± std over seeds and the paired difference to GPTQ."""
    by_method: dict[str, dict[int, dict]] = {}
    for record in records:
        by_method.setdefault(record["method"], {})[record["seed"]] = record["scores"]
    metrics = sorted({k for r in records for k in r["scores"]})
    gptq = by_method.get("gptq", {})
    header = ["method", "seeds"]
    for metric in metrics:
        header += [metric, f"{metric} - GPTQ"]
    lines = [
        f"W{config.bits} g{config.group_size} {'sym' if config.symmetric else 'asym'}, "
        f"{config.samples} x {config.seq_len} calibration tokens, semantics {config.semantics}; "
        "perplexity (lower is better) and accuracy, mean ± std over seeds; the difference "
        "to GPTQ is paired by seed (same calibration draw).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    order = ["dense"] + [m for m in list(METHODS) if m in by_method] + sorted(
        m for m in by_method if m not in METHODS and m != "dense")
    for method in order:
        if method not in by_method:
            continue
        seeds = by_method[method]
        row = [METHODS.get(method, method), str(len(seeds)) if method != "dense" else "-"]
        for metric in metrics:
            values = [s[metric] for s in seeds.values() if metric in s]
            paired = [seeds[k][metric] - gptq[k][metric] for k in seeds
                      if k in gptq and metric in seeds[k] and metric in gptq[k]]
            row += [_spread(values), _spread(paired) if method not in ("gptq", "dense") else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], out: Path) -> None:
    """perplexity.png (per method, one point per seed, mean bar) and drift.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install rescomp-modifiers[eval])")
        return
    methods = [m for m in ["dense", *METHODS] if any(r["method"] == m for r in records)]
    methods += sorted({r["method"] for r in records} - set(methods))
    metrics = sorted({k for r in records for k in r["scores"] if not k.startswith("bigbench")})

    figure, axes = plt.subplots(1, max(1, len(metrics)), figsize=(5 * max(1, len(metrics)), 4),
                                squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for x, method in enumerate(methods):
            values = [r["scores"][metric] for r in records if r["method"] == method and metric in r["scores"]]
            axis.scatter([x] * len(values), values, color="tab:blue", alpha=0.7)
            if values:
                axis.hlines(statistics.fmean(values), x - 0.3, x + 0.3, color="tab:red")
        axis.set_xticks(range(len(methods)), [METHODS.get(m, m).split(" (")[0] for m in methods],
                        rotation=30, ha="right")
        axis.set_title(f"{metric} (points: seeds, bar: mean)")
        axis.set_ylabel("perplexity")
    figure.tight_layout()
    figure.savefig(out / "perplexity.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4))
    for method in methods:
        drifts = [r["drift"] for r in records if r["method"] == method and r["drift"]]
        if drifts:
            mean = [statistics.fmean(values) for values in zip(*drifts)]
            axis.plot(range(len(mean)), mean, marker=".", label=METHODS.get(method, method))
    axis.set_yscale("log")
    axis.set_xlabel("decoder layer")
    axis.set_ylabel("MSE vs dense layer output")
    axis.set_title("drift between quantized and dense models (mean over seeds)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "drift.png", dpi=120)
    plt.close(figure)
