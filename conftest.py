"""Tiny random models built in code, saved locally (no hub), and calibration data.

``--solver-device cuda`` (or ``RESCOMP_TEST_DEVICE=cuda``) runs the solver entry points that a
test module imports (``compensate_weight``, upstream's ``quantize_weight``, the
factorization) on that device: their tensor arguments go there and the results (and
any in-place changes of the arguments) come back to the CPU, where the tests' oracles
and assertions stay. The default is the CPU.
"""

import dataclasses
import functools
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 96

#: the functions a test module may import that run solver arithmetic
SOLVER_ENTRY_POINTS = ("compensate_weight", "quantize_weight", "inverse_hessian_factor",
                       "upper_triangular_inverse", "factorize_hessian")


def pytest_addoption(parser):
    parser.addoption(
        "--solver-device", default=os.environ.get("RESCOMP_TEST_DEVICE", "cpu"),
        help="device for the solver entry points (cpu, cuda, cuda:1; default: "
             "$RESCOMP_TEST_DEVICE or cpu)",
    )


def pytest_configure(config):
    device = config.getoption("--solver-device")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise pytest.UsageError(f"--solver-device {device!r} is not a torch device; use cpu or cuda")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--solver-device {device}: torch sees no CUDA device here; use cpu")


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{
            f.name: _to_device(getattr(value, f.name), device)
            for f in dataclasses.fields(value) if f.init
        })
    return value


def _run_on(function, device):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        moved_args = [_to_device(arg, device) for arg in args]
        moved_kwargs = {key: _to_device(value, device) for key, value in kwargs.items()}
        result = function(*moved_args, **moved_kwargs)
        # some entry points work in place on their arguments (upstream's do): mirror it
        for original, moved in [*zip(args, moved_args),
                                *((kwargs[k], moved_kwargs[k]) for k in kwargs)]:
            if isinstance(original, torch.Tensor) and moved is not original:
                original.copy_(moved)
        return _to_device(result, "cpu")

    return wrapper


@pytest.fixture(autouse=True)
def solver_device(request, monkeypatch):
    """The device the solver entry points run on (see the module docstring)."""
    device = torch.device(request.config.getoption("--solver-device"))
    if device.type != "cpu" and request.module is not None:
        for name in SOLVER_ENTRY_POINTS:
            function = getattr(request.module, name, None)
            if callable(function):
                monkeypatch.setattr(request.module, name, _run_on(function, device))
    return device


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


@pytest.fixture
def tiny_model_dir(tmp_path_factory, request):
    kind = getattr(request, "param", "llama")
    path = tmp_path_factory.mktemp(f"tiny_{kind}")
    make_model(kind).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def track_full_precision_pass(monkeypatch) -> list[bool]:
    """A one-element flag, True while the dual-stream pipeline runs its full-precision
    pass (``FullPrecisionStream.capturing``)."""
    import contextlib

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
