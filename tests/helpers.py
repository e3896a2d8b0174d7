"""Helpers shared by the test directories (``tests``, ``harness/tests``,
``integration_tests``): tiny random models built in code and saved locally (no hub),
calibration data, oneshot runs and recorders of what the modifiers hand the solver.

Test modules import these from here, never from one another (pytest puts this directory
on ``sys.path``: ``pythonpath`` in pyproject.toml); the fixtures are in the repository's
root ``conftest.py``. Heavy imports (transformers, llm-compressor) happen inside the
functions, so the harness's tests can import this module cheaply.
"""

from __future__ import annotations

import contextlib

import torch

VOCAB = 96

#: 4-bit symmetric weights in groups of 32
WEIGHTS_INT4_G32 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                    "group_size": 32}
#: those weights on every Linear
GROUP32 = {"group_0": {"targets": ["Linear"], "weights": dict(WEIGHTS_INT4_G32)}}
#: 4-bit symmetric per-token dynamic activations
TOKEN_INT4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token",
              "dynamic": True}
#: what the modifier tests leave unquantized
IGNORE = ["lm_head", "re:.*mlp.gate$"]  # MoE router stays dense


# -- tiny models and data ----------------------------------------------------------------

def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for i in range(VOCAB - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )


def make_model(kind: str = "llama", seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
    elif kind == "qwen3":
        config = transformers.Qwen3Config(head_dim=16, **common)
    elif kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
            decoder_sparse_step=1, mlp_only_layers=[], **common,
        )
    else:
        raise ValueError(kind)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init is tiny; scale up so quantization error is visible
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.2)
    return model


def calibration_dataset(num_samples: int = 8, seq_len: int = 32, seed: int = 0):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (num_samples, seq_len), generator=generator)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )


# -- oneshot and what it hands the solver --------------------------------------------------

def run_oneshot(model_dir, recipe, **kwargs):
    """Load the model at ``model_dir`` and quantize it with ``recipe`` (8 samples of 32
    tokens unless ``dataset`` says otherwise); returns the quantized model."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    oneshot(
        model=model, dataset=kwargs.pop("dataset", calibration_dataset()), recipe=recipe,
        max_seq_length=32, num_calibration_samples=8, **kwargs,
    )
    return model


#: oneshot settings of :func:`run_unshuffled`
UNSHUFFLED_SAMPLES, UNSHUFFLED_BATCH_SIZE = 8, 4


def run_unshuffled(model, recipe):
    """oneshot on ``model`` in place: 8 samples in batches of 4, in order."""
    from llmcompressor import oneshot

    oneshot(model=model, dataset=calibration_dataset(num_samples=UNSHUFFLED_SAMPLES),
            recipe=recipe, max_seq_length=32, num_calibration_samples=UNSHUFFLED_SAMPLES,
            batch_size=UNSHUFFLED_BATCH_SIZE, shuffle_calibration_samples=False)


def record_solves(monkeypatch, on_item) -> None:
    """Call ``on_item(names, hessian, asymmetry)`` for each solver batch item as it is
    handed over: its modules' names (one module, or modules row-stacked on shared
    statistics), its H and its D (None: no full-precision stream)."""
    from rescomp_modifiers.modifiers import CompensationModifier

    original = CompensationModifier._pop_statistics

    def recording(self, units):
        fit, judge, refit = original(self, units)
        for index, unit in enumerate(units):
            on_item([self._module_names[module] for module in unit],
                    fit.hessians[index].clone(),
                    None if fit.asymmetry is None else fit.asymmetry[index].clone())
        return fit, judge, refit

    monkeypatch.setattr(CompensationModifier, "_pop_statistics", recording)


def targeted_linear_names(model):
    return {
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
        and not name.endswith("mlp.gate")
    }


def track_full_precision_pass(monkeypatch) -> list[bool]:
    """A one-element flag, True while the dual-stream pipeline runs its full-precision
    pass (``FullPrecisionStream.capturing``)."""
    from rescomp_modifiers.full_precision_stream import FullPrecisionStream

    capturing = [False]
    original = FullPrecisionStream.capturing

    @contextlib.contextmanager
    def recording(self, modules):
        capturing[0] = True
        try:
            with original(self, modules):
                yield
        finally:
            capturing[0] = False

    monkeypatch.setattr(FullPrecisionStream, "capturing", recording)
    return capturing


# -- the in-place MSE search against upstream's -------------------------------------------

def upstream_search(*args, **kwargs):
    """llm-compressor's eager search itself (the dispatch's fallback, by name)."""
    from compressed_tensors.utils.impl_backend import ImplBackend

    return ImplBackend.call("_grid_search_mse", *args, **kwargs)


def search_arguments(weights, args, **observer_kwargs):
    """What upstream's MSE observer hands its search for ``weights``."""
    from llmcompressor.observers import Observer
    from llmcompressor.observers.helpers import flatten_for_calibration

    observer = Observer.load_from_registry("memoryless_mse", base_name="weight", args=args)
    options = dict(maxshrink=observer.maxshrink, patience=observer.patience,
                   grid=observer.grid, norm=observer.norm,
                   triton_error_buffer=observer.triton_error_buffer, expand=observer.expand)
    options.update(observer_kwargs)
    observed = flatten_for_calibration(weights, "weight", args)
    return (observed, args, observer._token_args), options


def assert_same_search(weights, args, **observer_kwargs):
    """Our in-place MSE search finds upstream's ranges for ``weights``, bit for bit."""
    from rescomp_modifiers.mse_search import grid_search_mse_in_place

    positional, options = search_arguments(weights, args, **observer_kwargs)
    expected = upstream_search(*positional, **options)
    got = grid_search_mse_in_place(*positional, **options)
    for name, ours, theirs in zip(("min", "max"), got, expected):
        assert torch.equal(ours, theirs), name


# -- vLLM serving checks ------------------------------------------------------------------

# (prompt, word the answer must contain): greedy answers the dense model gives right.
# Quantized models are not held to greedy answers: a 4-bit 135M model's argmax flips on
# small rounding differences between machines (CI's CAE checkpoint answered "The capital
# of France is" with " the same as the capital of the United Kingdom."), so they are
# held to the cloze test below instead, which asks for knowledge, not one token's luck.
SANITY = [
    ("The capital of France is", "Paris"),
    ("The capital of Germany is", "Berlin"),
    ("The capital of the United Kingdom is", "London"),
]
# Cloze: every served model must give the right capital the highest log-probability
# among these five; a broken weight layout or zero point scrambles the ranking.
CAPITALS = {"France": "Paris", "Germany": "Berlin", "the United Kingdom": "London",
            "Italy": "Rome", "Spain": "Madrid"}
CLOZE = [(f"The capital of {country} is", [f" {city}" for city in CAPITALS.values()])
         for country in CAPITALS]


def assert_capitals_ranked_first(name: str, scores: list[list[float]]) -> None:
    """Each CLOZE prompt's log-probabilities (``scores``, one row per prompt) rank the
    country's capital above the other capitals."""
    for (prompt, candidates), row in zip(CLOZE, scores, strict=True):
        answer = CAPITALS[prompt.removeprefix("The capital of ").removesuffix(" is")]
        ranked = sorted(zip(row, candidates), reverse=True)
        print(f"{name}: {prompt!r} -> " + ", ".join(f"{c.strip()} {s:.2f}" for s, c in ranked))
        assert ranked[0][1] == f" {answer}", f"{name}: {prompt!r} ranked {ranked}"


# -- `rescomp compare` on a tiny local model (harness tests) ------------------------------

#: the tiny tokenizer's vocabulary as words: one token a word
WORDS = [f"w{i}" for i in range(90)]


def random_texts(count: int, words: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


def write_jsonl(path, texts: list[str]):
    """``texts`` as a JSONL corpus of ``{"id", "text"}`` documents."""
    import json

    path.write_text("".join(json.dumps({"id": f"{path.stem}-{i}", "text": t}) + "\n"
                            for i, t in enumerate(texts)))
    return path


def compare_config(inputs: dict, output, **overrides):
    """A seconds-long comparison: RTN, one seed, the tiny model and corpora of
    ``inputs`` (``model``, ``calibration``, ``evaluation`` paths)."""
    from rescomp_harness.compare import CompareConfig

    settings = dict(
        model=str(inputs["model"]), methods=["rtn"], bits=4, group_size=16, samples=2,
        seq_len=16, seeds=[0], calibration=str(inputs["calibration"]),
        evaluation=[str(inputs["evaluation"])], eval_seq_len=16, eval_windows=4,
        drift_windows=1, output=str(output),
    )
    return CompareConfig(**{**settings, **overrides})
