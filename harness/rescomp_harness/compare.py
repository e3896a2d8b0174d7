"""Quantize one model with several methods over several calibration seeds and compare.

Every (method, seed) run quantizes a fresh copy of the model on the same calibration
draw for that seed (comparisons are paired by seed), evaluates perplexity on held-out
text with the papers' protocol, measures the per-layer drift between the quantized and
the dense model's decoder-layer outputs, and appends one JSON line to
``results.jsonl``. The summary is a markdown table (mean and spread over seeds, paired
difference to GPTQ) and PNG plots.

A result is either right or refused:

- settings are validated (:func:`validate_config`) and every input is loaded and checked
  (model, documents, token counts) before anything is written;
- ``fingerprint.json`` next to the results holds a digest of the model's files, of the
  calibration and evaluation documents actually used, of each recipe file and every
  setting. An interrupted run resumes from what finished only when all of them are
  unchanged; more methods, recipes or seeds extend it. Anything else is refused with what
  changed, and so is a results file without its fingerprint;
- each record is appended as one whole line, flushed and fsynced; a last line cut by a
  kill is dropped with a warning before appending, a damaged line elsewhere is refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger
from tqdm import tqdm

__all__ = ["CompareConfig", "InvalidComparison", "METHODS", "run_comparison", "summarize",
           "validate_config"]


def _plugin_method_vocabulary():
    """The plugin's ``rescomp_modifiers.methods`` module, without importing the plugin
    package when it is not imported yet.

    ``import rescomp_modifiers.methods`` runs the package's ``__init__`` first, which
    imports llm-compressor and registers the modifiers (about 5 s, and an accelerator
    warning on a CPU machine). ``rescomp --help`` and the tables need only the names and
    labels, and ``methods.py`` imports only the standard library at module level (a test
    checks both), so its file is loaded on its own; quantizing imports the plugin proper
    (:func:`build_recipe`).
    """
    module = sys.modules.get("rescomp_modifiers.methods")
    if module is not None:
        return module
    package = importlib.util.find_spec("rescomp_modifiers")
    if package is None or not package.submodule_search_locations:
        raise ImportError("rescomp-harness needs the rescomp-modifiers plugin installed")
    location = Path(list(package.submodule_search_locations)[0]) / "methods.py"
    spec = importlib.util.spec_from_file_location("rescomp_harness._plugin_methods", location)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up while building classes
    spec.loader.exec_module(module)
    return module


#: method name -> label, from the plugin's one vocabulary; recipe files are added as
#: "recipe:<path>"
_VOCABULARY = _plugin_method_vocabulary()
METHODS = {name: method.label for name, method in _VOCABULARY.METHODS.items()}
#: what a comparison runs when no --methods are named
DEFAULT_METHODS = ["rtn", "gptq", "gptq_mse", "gptq_imatrix", "recommended"]
#: bit widths the integer group quantization is run and compared at
BITS_RANGE = range(2, 9)


class InvalidComparison(ValueError):
    """A comparison that cannot give a trustworthy result; raised before anything is
    computed or written, with one line that says what to change."""


@dataclass
class CompareConfig:
    """What to compare; defaults are scripts/main.sh's setting (docs/usage.md)."""

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
    #: documents specs; a source that is also the calibration source is split by id
    evaluation: list[str] = field(default_factory=lambda: ["brown", "sotu"])
    eval_seq_len: int = 512
    eval_windows: int = 8
    drift_windows: int = 2
    bigbench: list[str] = field(default_factory=list)
    bigbench_limit: int | None = 200
    output: str = "outputs/compare"
    #: ``spinquant``: SpinQuant's R1 + R2 Hadamard rotations before every row's
    #: quantizer (fused into the weights), as the papers' low-bit tables
    rotation: str = "none"
    #: Hadamard block size of the rotation (None: the model's width; 64 for 576-wide
    #: models such as SmolLM2, which have no 576-point Hadamard matrix)
    rotation_block_size: int | None = None
    #: input-activation bits (dynamic, per token, symmetric); 16: weight-only
    activation_bits: int = 16
    #: KV-cache bits (static integer); 16: unquantized
    kv_bits: int = 16
    #: share of each token's activation range kept (the papers' 0.9 at 4 bits; 1: none),
    #: saved as ``input_activations.observer_kwargs.clip_ratio`` (activation_clipping.py)
    activation_clip_ratio: float = 1.0


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_config(config: CompareConfig) -> None:
    """Refuse settings that cannot give a meaningful result, one line each, before any
    model or document is loaded or anything is written."""
    if not isinstance(config.bits, int) or config.bits not in BITS_RANGE:
        raise InvalidComparison(f"--bits must be an integer from {BITS_RANGE.start} to "
                                f"{BITS_RANGE.stop - 1}; got {config.bits!r}")
    minimums = {
        "group_size": (0, "weights per quantization group; 0 for one scale per output channel"),
        "samples": (1, "calibration windows each run draws"),
        "seq_len": (2, "tokens per calibration window"),
        "eval_seq_len": (2, "a window scores its tokens after the first, so 1 scores none"),
        "eval_windows": (1, "windows scored per evaluation source"),
        "drift_windows": (1, "calibration windows the layer drift is measured on"),
    }
    for name, (minimum, why) in minimums.items():
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise InvalidComparison(f"{_flag(name)} must be an integer of at least {minimum}, "
                                    f"got {value!r} ({why})")
    if config.bigbench_limit is not None and (not isinstance(config.bigbench_limit, int)
                                              or config.bigbench_limit < 1):
        raise InvalidComparison(f"--bigbench-limit must be at least 1 (or None for every "
                                f"example); got {config.bigbench_limit!r}")
    if config.rotation not in ("none", "spinquant"):
        raise InvalidComparison(f"--rotation must be 'none' or 'spinquant'; got {config.rotation!r}")
    if config.rotation_block_size is not None and (
            config.rotation_block_size < 2 or config.rotation_block_size & (config.rotation_block_size - 1)):
        raise InvalidComparison(f"--rotation-block-size must be a power of two; got "
                                f"{config.rotation_block_size!r}")
    for name in ("activation_bits", "kv_bits"):
        if getattr(config, name) not in (4, 8, 16):
            raise InvalidComparison(f"{_flag(name)} must be 4, 8 or 16 (16: not quantized); got "
                                    f"{getattr(config, name)!r}")
    ratio = config.activation_clip_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise InvalidComparison(f"--activation-clip-ratio must be in (0, 1] (the share of each "
                                f"token's range kept; 1: no clipping); got {ratio!r}")
    if ratio != 1 and config.activation_bits == 16:
        raise InvalidComparison("--activation-clip-ratio clips quantized input activations: "
                                "give --activation-bits 4 or 8 too")
    if config.semantics not in ("released", "paper"):
        raise InvalidComparison(f"--semantics must be 'released' or 'paper'; got {config.semantics!r}")
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise InvalidComparison(f"unknown --methods {', '.join(map(repr, unknown))}; choose from "
                                f"{', '.join(METHODS)}")
    if not config.seeds and (config.methods or config.recipes):
        raise InvalidComparison("--seeds: name at least one calibration seed")
    for recipe in config.recipes:
        if not Path(recipe).expanduser().is_file():
            raise InvalidComparison(f"--recipes {recipe}: no such file")
    if not config.evaluation:
        raise InvalidComparison("--evaluation: name at least one evaluation source")
    if len(set(config.evaluation)) != len(config.evaluation):
        raise InvalidComparison(f"--evaluation names a source twice: {config.evaluation}")
    if config.model is not None:
        model = Path(config.model).expanduser()
        if model.exists() and not model.is_dir():
            raise InvalidComparison(f"--model {config.model}: not a directory (a local model is a "
                                    "directory with config.json and weights)")
        if model.is_dir() and not (model / "config.json").is_file():
            raise InvalidComparison(f"--model {config.model}: no config.json in that directory")
        if not model.exists() and _looks_like_path(config.model):
            raise InvalidComparison(f"--model {config.model}: no such directory (a Hugging Face "
                                    "model id looks like 'org/name')")
    _check_output(config.output)


def _check_output(spec: str) -> None:
    """The output directory exists and takes files, or can be created: refused here
    rather than by ``mkdir`` once the model and documents are loaded. Writes nothing."""
    output = Path(spec).expanduser().absolute()
    if output.exists() and not output.is_dir():
        raise InvalidComparison(f"--output {spec}: exists and is not a directory")
    existing = output
    while not existing.exists():
        if os.path.lexists(existing):
            raise InvalidComparison(
                f"--output {spec}: cannot be created: {existing} is a broken symbolic link; "
                "remove it, point it at a directory, or choose another --output")
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidComparison(f"--output {spec}: cannot be created: {existing} is a file, "
                                "not a directory; choose another --output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidComparison(
            f"--output {spec}: {'cannot be created: ' if existing != output else ''}"
            f"{existing} is not writable by this user; choose another --output")


def _looks_like_path(spec: str) -> bool:
    """A spec meant as a local path: a Hugging Face id is 'name' or 'org/name'."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def _scheme(config: CompareConfig) -> dict:
    weights = {"num_bits": config.bits, "type": "int", "symmetric": config.symmetric,
               "strategy": "channel"}
    if config.group_size:  # 0: one scale per output channel
        weights.update(strategy="group", group_size=config.group_size)
    group = {"targets": ["Linear"], "weights": weights}
    if config.activation_bits < 16:
        group["input_activations"] = {"num_bits": config.activation_bits, "type": "int",
                                      "symmetric": True, "strategy": "token", "dynamic": True}
        if config.activation_clip_ratio != 1:
            from rescomp_modifiers.activation_clipping import CLIP_RATIO

            group["input_activations"]["observer_kwargs"] = {
                CLIP_RATIO: config.activation_clip_ratio}
    return {"group_0": group}


def _kv_cache_scheme(config: CompareConfig) -> dict | None:
    if config.kv_bits == 16:
        return None
    if config.kv_bits == 8:
        return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
                "dynamic": False}
    return {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "attn_head",
            "dynamic": False}


#: what ``--rotation spinquant`` applies: SpinQuant's R1 (residual stream) and R2
#: (attention values) Hadamard rotations, which fold into the weights
_SPINQUANT_ROTATIONS = ["R1", "R2"]


def _rotation(config: CompareConfig) -> list:
    if config.rotation == "none":
        return []
    from llmcompressor.modifiers.transform import SpinQuantModifier

    options = {} if config.rotation_block_size is None else {
        "transform_block_size": config.rotation_block_size}
    return [SpinQuantModifier(rotations=_SPINQUANT_ROTATIONS, transform_type="hadamard", **options)]


def _runs_as(method: str, config: CompareConfig):
    """The vocabulary's method that runs for ``method`` in this setting (another one
    where :attr:`Method.after_rotation` says so)."""
    return _VOCABULARY.method_for_setting(method, config.bits, config.rotation != "none")


def method_label(method: str, config: CompareConfig) -> str:
    """A row's label: the method's own, or, where another method runs in its place in
    this setting, that one's, saying whose place it takes."""
    if method not in METHODS:
        return method
    runs = _runs_as(method, config)
    if runs.name == method:
        return METHODS[method]
    return f"{runs.label} (as {method}: W{config.bits} after a rotation)"


def build_recipe(method: str, config: CompareConfig):
    """The modifier list for a method name, or a recipe path for ``recipe:<path>``."""
    if method.startswith("recipe:"):
        return method[len("recipe:"):]
    from rescomp_modifiers.methods import build_modifier

    runs = _runs_as(method, config)
    if runs.name != method:
        logger.info(f"compare: {method} runs as {runs.name} here ({method_label(method, config)})")
    fields = dict(ignore=["lm_head"], config_groups=_scheme(config), semantics=config.semantics)
    if config.kv_bits < 16:
        fields["kv_cache_scheme"] = _kv_cache_scheme(config)
    return _rotation(config) + [build_modifier(runs.name, **fields)]


def _decoder_layers(model) -> list:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ValueError("cannot find the decoder layers (model.model.layers) for the drift")
    return list(layers)


def layer_drift(dense, quantized, windows) -> list[float]:
    """Per decoder layer, the mean squared difference between the two models' outputs
    on the same inputs: how far the quantized stream has drifted from the dense one."""
    import torch

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

    with torch.no_grad():
        return [float((a - b).square().mean()) for a, b in zip(capture(dense), capture(quantized))]


def _load_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@dataclass
class _Inputs:
    """Everything a comparison computes on, loaded and checked before anything is written."""

    model_path: str
    tokenizer: Any
    dense: Any
    calibration_sets: dict  #: seed -> its calibration windows (a datasets.Dataset)
    evaluation: dict  #: evaluation source -> scored documents
    evaluation_tokens: dict  #: evaluation source -> its tokens as perplexity() scores them
    drift_windows: Any  #: token ids, drift_windows x seq_len
    fingerprint: dict


def run_comparison(config: CompareConfig) -> Path:
    """Run (or resume) every (method, seed) and write the summary; returns the output dir.

    Raises :class:`InvalidComparison` (nothing written) for bad settings, unreadable or
    too short inputs, and an output directory whose results came from other inputs.
    """
    validate_config(config)
    inputs = _load_inputs(config)
    out = Path(config.output).expanduser()
    results_path = out / "results.jsonl"
    scan = _scan_results(results_path)
    fingerprint = _check_resumable(out, inputs.fingerprint, has_results=bool(scan.records))

    # every check passed: from here on the output directory is written
    from llmcompressor import oneshot

    import rescomp_modifiers  # noqa: F401  (our modifiers and pipeline, for recipe files too)
    from rescomp_modifiers.release import releasing_oneshot_models

    from rescomp_harness.evaluation.perplexity import perplexity

    out.mkdir(parents=True, exist_ok=True)
    _repair_results(results_path, scan)
    _write_json_atomically(out / "fingerprint.json", fingerprint)
    done = {(r["method"], r["seed"]) for r in scan.records}
    # the code this process imported (read now: the checkout may move on during the runs)
    revision = code_revision()
    tokenizer, dense = inputs.tokenizer, inputs.dense

    def evaluate(model) -> dict:
        scores = {
            name: perplexity(model, docs, tokenizer, seq_len=config.eval_seq_len,
                             max_windows=config.eval_windows, progress=False,
                             token_ids=inputs.evaluation_tokens[name]).perplexity
            for name, docs in inputs.evaluation.items()
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

    def quantize_and_score(method: str, seed: int) -> dict:
        model = _load_model(inputs.model_path)
        started = time.perf_counter()
        oneshot(model=model, dataset=inputs.calibration_sets[seed],
                recipe=build_recipe(method, config), max_seq_length=config.seq_len,
                num_calibration_samples=config.samples, shuffle_calibration_samples=False)
        quantize_seconds = time.perf_counter() - started
        return {"method": method, "seed": seed, "scores": evaluate(model),
                "drift": layer_drift(dense, model, inputs.drift_windows),
                "seconds": quantize_seconds, "revision": revision}

    methods = list(config.methods) + [f"recipe:{r}" for r in config.recipes]
    runs = [(m, s) for s in config.seeds for m in methods if (m, s) not in done]
    for method, seed in tqdm(runs, desc="compare (method x seed)", unit="run"):
        logger.info(f"compare: {method}, seed {seed}")
        with releasing_oneshot_models():
            record = quantize_and_score(method, seed)
        _append(results_path, record)

    records = _scan_results(results_path).records
    (out / "summary.md").write_text(summarize(records, config))
    plot(records, out, config)
    return out


def code_revision() -> str:
    """The plugin's git commit (``+dirty`` with uncommitted changes), recorded with each
    result so a table generated from the records names the code that produced it;
    ``unknown`` outside a git checkout (an installed wheel)."""
    import subprocess

    import rescomp_modifiers

    root = Path(rescomp_modifiers.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty.strip() else "")


def _load_inputs(config: CompareConfig) -> _Inputs:
    """Load the model, tokenizer and documents, check that they make the windows the
    settings ask for, log what each side got, and fingerprint it all. Writes nothing
    (the embedded default model and corpora are fetched into their cache)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from rescomp_harness.assets import resolve_model
    from rescomp_harness.data import (
        DocumentError,
        calibration_dataset,
        check_calibration_text,
        comparison_documents,
    )
    from rescomp_harness.evaluation.perplexity import tokenize_text

    model_path = resolve_model(config.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InvalidComparison(f"--model {model_path}: cannot load its tokenizer: {first_line}") from error
    model_config = AutoConfig.from_pretrained(model_path)
    _check_rotation(config, model_config)
    positions = getattr(model_config, "max_position_embeddings", None)
    for setting in ("seq_len", "eval_seq_len"):
        if positions is not None and getattr(config, setting) > positions:
            raise InvalidComparison(f"{_flag(setting)} {getattr(config, setting)} exceeds the "
                                    f"model's {positions} positions (max_position_embeddings)")
    try:
        documents = comparison_documents(config.calibration, config.evaluation)
        check_calibration_text(documents.calibration, config.calibration)
    except (DocumentError, FileNotFoundError) as error:
        raise InvalidComparison(str(error)) from error

    _check_recipes(config)

    logger.info(f"calibration {config.calibration!r}: {len(documents.calibration)} documents "
                f"({documents.calibration_rule}); each run draws --samples {config.samples} x --seq-len "
                f"{config.seq_len} = {config.samples * config.seq_len:,} tokens from them")
    try:  # every seed's draw (and the drift windows') now, so too little text fails first
        calibration_sets = {
            seed: calibration_dataset(tokenizer, documents.calibration, config.samples,
                                      config.seq_len, seed=seed, evaluation_fraction=0)
            for seed in config.seeds
        }
        drift_input = calibration_dataset(tokenizer, documents.calibration, config.drift_windows,
                                          config.seq_len, seed=10_000, evaluation_fraction=0)
    except ValueError as error:
        raise InvalidComparison(f"calibration {config.calibration!r}: {error}") from error
    evaluation_tokens = {}
    for name, scored in documents.evaluation.items():
        tokens = evaluation_tokens[name] = tokenize_text(tokenizer, scored)
        windows = len(tokens) // config.eval_seq_len  # perplexity() scores whole windows
        logger.info(f"evaluation {name!r}: {len(scored)} documents, {len(tokens):,} tokens, "
                    f"{windows} windows of {config.eval_seq_len}, {min(windows, config.eval_windows)} "
                    f"scored ({documents.evaluation_rules[name]})")
        if windows == 0:
            raise InvalidComparison(f"evaluation {name!r}: {len(tokens)} tokens make no window of "
                                    f"--eval-seq-len {config.eval_seq_len}")

    dense = _load_model(model_path)
    fingerprint = {
        "format": _FINGERPRINT_FORMAT,
        "settings": {k: v for k, v in asdict(config).items() if k not in _NOT_SETTINGS},
        "model": {"source": config.model or "embedded default", "files": _model_files(model_path)},
        "calibration": {"source": config.calibration, "documents": len(documents.calibration),
                        "digest": _documents_digest(documents.calibration)},
        "evaluation": {name: {"documents": len(scored), "digest": _documents_digest(scored)}
                       for name, scored in documents.evaluation.items()},
        "recipes": {recipe: _file_digest(Path(recipe).expanduser()) for recipe in config.recipes},
        "methods": {method: _method_definition(method, config) for method in config.methods},
    }
    return _Inputs(model_path, tokenizer, dense, calibration_sets, documents.evaluation,
                   evaluation_tokens, torch.tensor(drift_input["input_ids"]), fingerprint)


def _largest_power_of_two_dividing(number: int) -> int:
    return number & -number


def _check_rotation(config: CompareConfig, model_config) -> None:
    """``--rotation spinquant`` needs Hadamard matrices of the orders it rotates, and
    Sylvester's construction (compressed-tensors' ``hadamard`` transform) builds powers
    of two only: R1 rotates the hidden size in blocks of ``--rotation-block-size`` (the
    whole width by default), R2 each attention head's width. Checked from the model's
    config, before anything is loaded or written: SpinQuant itself fails only inside the
    first method's oneshot, after the dense row is written."""
    if config.rotation == "none":
        return
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") \
        else model_config
    hidden = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    block, fits = config.rotation_block_size, _largest_power_of_two_dividing(hidden)
    advice = (f"pass --rotation-block-size {fits} (the largest power of two dividing it)"
              if fits > 1 else "no power of two divides it: use --rotation none")
    if block is None and hidden != fits:
        raise InvalidComparison(
            f"--rotation spinquant: the model's hidden size {hidden} has no Hadamard matrix "
            f"of that order (the hadamard transform builds powers of two only), so R1 "
            f"cannot rotate the whole width; {advice}")
    if block is not None and hidden % block:
        raise InvalidComparison(
            f"--rotation-block-size {block} does not divide the model's hidden size "
            f"{hidden}; {advice}")
    if head_dim & (head_dim - 1):
        raise InvalidComparison(
            f"--rotation spinquant: the model's attention heads are {head_dim} wide, which "
            "has no Hadamard matrix (powers of two only), and R2 rotates whole heads "
            "whatever --rotation-block-size: use --rotation none for this model")


def _check_recipes(config: CompareConfig) -> None:
    """Parse each recipe file as oneshot will, so that a bad one fails before the
    built-in methods have run, not after; and refuse one whose scheme or rotation
    differs from the comparison's setting. A recipe runs as written, while the table
    (and the fingerprint that resumes it) labels every row with the setting: a W4
    recipe in a W3 comparison would be a silently wrong row."""
    if not config.recipes:
        return
    import rescomp_modifiers  # noqa: F401  (registers our modifiers for recipes that name them)
    from llmcompressor.recipe import Recipe

    expected = _setting_of(config)
    for recipe in config.recipes:
        try:
            modifiers = Recipe.create_instance(str(Path(recipe).expanduser())).modifiers
            found = _recipe_setting(modifiers)
        except Exception as error:  # YAML, unknown modifier, pydantic field errors
            detail = " ".join(str(error).split())  # pydantic's message spans lines
            raise InvalidComparison(f"--recipes {recipe}: {type(error).__name__}: {detail}") from error
        if not found["weights"]:
            raise InvalidComparison(f"--recipes {recipe}: quantizes no weights (no modifier with a "
                                    "scheme or config_groups); the comparison is of weight quantizers")
        differences = [
            f"{name} {' + '.join(sorted(values))} (the comparison: {expected[name]})"
            for name, values in found.items() if values and values != {expected[name]}
        ]
        if differences:
            raise InvalidComparison(
                f"--recipes {recipe}: a recipe runs as written, and this one differs from the "
                f"comparison's setting: {'; '.join(differences)}; pass the recipe's setting "
                f"(--bits, --group-size, --activation-bits, --kv-bits, --rotation, "
                f"--rotation-block-size) or change the recipe, so that every row has the "
                f"table's setting")


def _setting_of(config: CompareConfig) -> dict[str, str]:
    """The comparison's setting in the words :func:`_recipe_setting` uses."""
    return {
        "weights": (f"W{config.bits} {'g' + str(config.group_size) if config.group_size else 'per channel'} "
                    f"{'symmetric' if config.symmetric else 'asymmetric'}"),
        "input activations": ("unquantized" if config.activation_bits == 16
                              else _activation_words(config.activation_bits,
                                                     config.activation_clip_ratio)),
        "KV cache": "unquantized" if config.kv_bits == 16 else f"{config.kv_bits} bits",
        "rotation": "none" if config.rotation == "none" else _rotation_words(
            "SpinQuantModifier", _SPINQUANT_ROTATIONS, config.rotation_block_size),
    }


def _activation_words(bits: int, clip_ratio: float | None) -> str:
    return f"{bits} bits" + ("" if clip_ratio in (None, 1) else f", clipped to {clip_ratio:g}")


def _rotation_words(modifier: str, rotations: list[str] | None, block_size: int | None) -> str:
    which = f" {'+'.join(rotations)}" if rotations else ""
    return (f"{modifier}{which} "
            f"({'the full width' if block_size is None else f'blocks of {block_size}'})")


def _recipe_setting(modifiers) -> dict[str, set[str]]:
    """What a parsed recipe's modifiers do, in :func:`_setting_of`'s words: the set of
    weight schemes (empty if it quantizes nothing), input-activation and KV-cache bits,
    and its rotation modifiers ("none" if it has none)."""
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier

    from rescomp_modifiers.activation_clipping import activation_clip_ratio

    found = {"weights": set(), "input activations": set(), "KV cache": set(), "rotation": set()}
    for modifier in modifiers:
        if isinstance(modifier, (SpinQuantModifier, QuIPModifier)):
            found["rotation"].add(_rotation_words(
                type(modifier).__name__, [str(getattr(r, "value", r)) for r in
                                          getattr(modifier, "rotations", None) or ()],
                modifier.transform_block_size))
        if not hasattr(modifier, "resolve_quantization_config"):
            continue
        resolved = modifier.resolve_quantization_config()
        for scheme in resolved.config_groups.values():
            weights = scheme.weights
            if weights is not None:
                grouping = (f"g{weights.group_size}" if weights.strategy == "group"
                            else "per channel" if weights.strategy == "channel"
                            else str(weights.strategy))
                found["weights"].add(f"W{weights.num_bits} {grouping} "
                                     f"{'symmetric' if weights.symmetric else 'asymmetric'}")
            activations = scheme.input_activations
            found["input activations"].add(
                "unquantized" if activations is None
                else _activation_words(activations.num_bits, activation_clip_ratio(activations)))
        kv_cache = resolved.kv_cache_scheme
        found["KV cache"].add("unquantized" if kv_cache is None else f"{kv_cache.num_bits} bits")
    found["rotation"] = found["rotation"] or {"none"}
    return found


# ----------------------------------------------------------------------- fingerprint

#: bump when what a fingerprint covers changes: older output directories are refused.
#: 2: the definition each method name ran as (format 1 did not record it, and the
#: recommended default has since changed, e.g. after a rotation at 4 bits)
_FINGERPRINT_FORMAT = 2
#: config fields that are not settings of a result: the methods, recipes and seeds only
#: add runs, the output is where they go, and the inputs are fingerprinted by content
_NOT_SETTINGS = {"methods", "recipes", "seeds", "output", "model", "calibration", "evaluation"}


def _method_definition(method: str, config: CompareConfig) -> dict:
    """What a method name ran as in this setting: a changed default (new settings, or
    another method in its place) must not be averaged with the rows of the old one."""
    runs = _runs_as(method, config)
    return {"runs": runs.name, "modifier": runs.modifier, "settings": runs.settings,
            "weight_observer": runs.weight_observer, "terms": runs.terms_name}


def _file_digest(path: Path) -> str:
    """blake2b of a file's bytes, streamed (a 540 MB safetensors file takes about 1 s;
    3x faster than sha256 on our CPUs, measured)."""
    digest = hashlib.blake2b()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _model_files(model_path: str) -> dict[str, str]:
    """relative path -> digest of the model's config, weight and tokenizer files. For a
    hub id, the snapshot that from_pretrained has just downloaded into the HF cache."""
    directory = Path(model_path).expanduser()
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(model_path, local_files_only=True))
        except Exception as error:  # no local snapshot: its content cannot be verified
            raise InvalidComparison(
                f"--model {model_path}: cannot find its downloaded files to fingerprint them "
                f"({type(error).__name__}); download it into a directory and pass that") from error
    files = sorted(p for p in directory.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts)
                   and p.suffix != ".md")
    return {str(p.relative_to(directory)): _file_digest(p) for p in files}


def _documents_digest(documents) -> str:
    digest = hashlib.blake2b()
    for document in documents:  # length-prefixed, so no two lists hash alike by accident
        for part in (document.id, document.text):
            data = part.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


# settings added to CompareConfig after fingerprint format 1, with the value every run
# before them had (rotation and activation/KV quantization did not exist)
_SETTINGS_ADDED_LATER = {"rotation": "none", "rotation_block_size": None,
                         "activation_bits": 16, "kv_bits": 16, "activation_clip_ratio": 1.0}


def _fingerprint_changes(previous: dict, current: dict) -> list[str]:
    """What differs between two fingerprints, one phrase each; recipes present in only
    one of them are not a change (a new recipe adds runs)."""
    if previous.get("format") != current["format"]:
        return [f"fingerprint format {previous.get('format')!r} -> {current['format']!r} "
                "(written by another version of rescomp)"]
    changes = []
    # a fingerprint written before a setting existed was run at that setting's default
    old_settings = {**_SETTINGS_ADDED_LATER, **previous.get("settings", {})}
    new_settings = current["settings"]
    for key in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(key) != new_settings.get(key):
            changes.append(f"setting {_flag(key)}: {old_settings.get(key)!r} -> "
                           f"{new_settings.get(key)!r}")
    old_files, new_files = previous.get("model", {}).get("files", {}), current["model"]["files"]
    changed_files = sorted(f for f in set(old_files) | set(new_files)
                           if old_files.get(f) != new_files.get(f))
    if changed_files:
        changes.append(f"model {current['model']['source']!r} (files {', '.join(changed_files)})")
    if previous.get("calibration", {}).get("digest") != current["calibration"]["digest"]:
        changes.append(f"calibration documents ({previous.get('calibration', {}).get('source')!r}"
                       f" -> {current['calibration']['source']!r})")
    old_evaluation, new_evaluation = previous.get("evaluation", {}), current["evaluation"]
    if list(old_evaluation) != list(new_evaluation):
        changes.append(f"evaluation sources {list(old_evaluation)} -> {list(new_evaluation)}")
    else:
        changes += [f"evaluation {name!r} (its documents)" for name in new_evaluation
                    if old_evaluation[name].get("digest") != new_evaluation[name]["digest"]]
    old_recipes = previous.get("recipes", {})
    changes += [f"recipe {recipe} (its content)" for recipe, digest in current["recipes"].items()
                if recipe in old_recipes and old_recipes[recipe] != digest]
    old_methods = previous.get("methods", {})
    changes += [f"method {method} (its definition: {old_methods[method]} -> {definition})"
                for method, definition in current["methods"].items()
                if method in old_methods and old_methods[method] != definition]
    return changes


def _check_resumable(out: Path, fingerprint: dict, has_results: bool) -> dict:
    """The fingerprint to store: ``fingerprint`` with the recipes of earlier runs kept.

    Runs are resumed by (method, seed), so results of other inputs in the same file would
    be silently mixed into the averages: refuse them, and refuse results whose inputs
    cannot be verified (no fingerprint).
    """
    previous_path = out / "fingerprint.json"
    if not has_results:
        return fingerprint
    if not previous_path.is_file():
        raise InvalidComparison(
            f"{out / 'results.jsonl'} has no fingerprint.json (written by an older rescomp, or "
            "deleted), so the inputs of its results cannot be checked; pass another --output, "
            f"or delete {out} to start over")
    try:
        previous = json.loads(previous_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidComparison(f"{previous_path}: unreadable ({error}); pass another --output, "
                                f"or delete {out} to start over") from error
    changes = _fingerprint_changes(previous, fingerprint)
    if changes:
        raise InvalidComparison(
            f"{out} holds results computed on other inputs: {'; '.join(changes)}. Pass another "
            f"--output, or delete {out} to start over")
    return {**fingerprint, "recipes": {**previous.get("recipes", {}), **fingerprint["recipes"]},
            "methods": {**previous.get("methods", {}), **fingerprint["methods"]}}


def _write_json_atomically(path: Path, value: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w") as handle:
        handle.write(json.dumps(value, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


# ------------------------------------------------------------------------ results file


@dataclass(frozen=True)
class _ResultsScan:
    records: list[dict]
    #: byte offset to truncate the file at (a torn last line), else None
    torn_at: int | None = None
    #: the last record is whole but its newline was not written
    needs_newline: bool = False


def _scan_results(path: Path) -> _ResultsScan:
    """The records of a results file. Raises :class:`InvalidComparison` for a damaged line
    that is not the last one (something else wrote to the file); a last line without its
    newline is the write a kill interrupted, reported for :func:`_repair_results`."""
    if not path.exists():
        return _ResultsScan([])
    data = path.read_bytes()
    records, offset = [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        is_last = number == len(lines)
        if is_last and not line:  # the file ends with a newline
            break
        try:
            record = json.loads(line)
            if not (isinstance(record, dict) and {"method", "seed", "scores"} <= set(record)):
                raise ValueError("not a result record")
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError too
            if is_last:
                logger.warning(f"{path}:{number}: the last line was cut off by an interrupted "
                               f"write ({len(line)} bytes, no newline); dropping it, its run is "
                               "computed again")
                return _ResultsScan(records, torn_at=offset)
            raise InvalidComparison(f"{path}:{number}: damaged results line ({error}); pass "
                                    f"another --output, or delete {path.parent} to start over") from error
        records.append(record)
        offset += len(line) + 1
    return _ResultsScan(records, needs_newline=bool(data) and not data.endswith(b"\n"))


def _repair_results(path: Path, scan: _ResultsScan) -> None:
    if scan.torn_at is not None:
        with open(path, "r+b") as handle:
            handle.truncate(scan.torn_at)
            os.fsync(handle.fileno())
    elif scan.needs_newline:
        with open(path, "ab") as handle:
            handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())


def _append(path: Path, record: dict) -> None:
    """One whole line per write, on disk before the next run starts."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


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
        f"W{config.bits}"
        f"{f'A{config.activation_bits}' if config.activation_bits < 16 else ''}"
        f"{f'KV{config.kv_bits}' if config.kv_bits < 16 else ''}"
        f"{f' (activations clipped to {config.activation_clip_ratio:g})' if config.activation_clip_ratio != 1 else ''}"
        f"{' rotated (SpinQuant R1+R2)' if config.rotation != 'none' else ''} "
        f"{f'g{config.group_size}' if config.group_size else 'per-channel'} "
        f"{'sym' if config.symmetric else 'asym'}, "
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
        row = [method_label(method, config), str(len(seeds)) if method != "dense" else "-"]
        for metric in metrics:
            values = [s[metric] for s in seeds.values() if metric in s]
            paired = [seeds[k][metric] - gptq[k][metric] for k in seeds
                      if k in gptq and metric in seeds[k] and metric in gptq[k]]
            row += [_spread(values), _spread(paired) if method not in ("gptq", "dense") else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _short_name(method: str) -> str:
    """A row's name on a plot axis: the method name, or a recipe file's stem."""
    return Path(method.split(":", 1)[1]).stem if method.startswith("recipe:") else method


def plot(records: list[dict], out: Path, config: CompareConfig) -> None:
    """perplexity.png (per method, one point per seed, mean bar) and drift.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install matplotlib, or the harness: pip install -e ./harness)")
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
        # the method names, not the labels' first words: three rows are "GPTQ (...)"
        axis.set_xticks(range(len(methods)), [_short_name(m) for m in methods],
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
            axis.plot(range(len(mean)), mean, marker=".", label=method_label(method, config))
    axis.set_yscale("log")
    axis.set_xlabel("decoder layer")
    axis.set_ylabel("MSE vs dense layer output")
    axis.set_title("drift between quantized and dense models (mean over seeds)")
    if axis.get_lines():  # the dense row alone has no drift
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "drift.png", dpi=120)
    plt.close(figure)
