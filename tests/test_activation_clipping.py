"""The papers' activation clipping ratio (``observer_kwargs: {clip_ratio: r}``) on
compressed-tensors' dynamic quantizers: checked against hand-written per-token
quantizers, carried through calibration, the checkpoint and its reload."""

import json

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus
from compressed_tensors.quantization.lifecycle.forward import fake_quantize, forward_quantize
from transformers import AutoModelForCausalLM

import rescomp_modifiers  # noqa: F401  (installs the clipping)
from rescomp_modifiers import GPTAQModifier
from rescomp_modifiers.activation_clipping import _upstream_dynamic_qparams, activation_clip_ratio

from helpers import TOKEN_INT4, WEIGHTS_INT4_G32 as WEIGHTS, run_unshuffled as run

IGNORE = ["lm_head"]


def token_args(clip_ratio=None, **overrides) -> QuantizationArgs:
    fields = {**TOKEN_INT4, **overrides}
    if clip_ratio is not None:
        fields["observer_kwargs"] = {"clip_ratio": clip_ratio}
    return QuantizationArgs(**fields)


def linear() -> torch.nn.Module:
    module = torch.nn.Linear(1, 1)
    module.quantization_status = QuantizationStatus.FROZEN
    return module


def quantize(x: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    return forward_quantize(linear(), x, "input", args)


def activations(seed=0) -> torch.Tensor:
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(seed))
    x[..., 5] *= 8  # an outlier channel, as activations have
    return x


def symmetric_oracle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """QuaRot's symmetric per-token int4 with clipping: scale r * max|x| / 7.5, levels
    -8..7, everything beyond clamped."""
    scale = ratio * x.abs().amax(dim=-1, keepdim=True) / 7.5
    return torch.clamp(torch.round(x / scale), -8, 7) * scale


def asymmetric_oracle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """The same with a zero point, in float64: range (r * min, r * max), widened to
    hold zero."""
    x = x.double()
    low = torch.clamp(ratio * x.amin(dim=-1, keepdim=True), max=0)
    high = torch.clamp(ratio * x.amax(dim=-1, keepdim=True), min=0)
    scale = (high - low) / 15
    zero = torch.clamp(torch.round(-8 - low / scale), -8, 7)
    return (torch.clamp(torch.round(x / scale + zero), -8, 7) - zero) * scale


@pytest.mark.parametrize("ratio", [0.9, 0.75])
def test_symmetric_per_token_matches_the_oracle(ratio):
    x = activations()
    clipped = quantize(x, token_args(ratio))
    torch.testing.assert_close(clipped, symmetric_oracle(x, ratio))
    # the ratio acts: each token's largest entry is clamped to 7 steps, below itself
    largest = x.abs().amax(dim=-1)
    assert (clipped.abs().amax(dim=-1) < largest).all()
    assert not torch.equal(clipped, quantize(x, token_args()))


def test_asymmetric_per_token_matches_the_oracle():
    x = activations(1)
    clipped = quantize(x, token_args(0.9, symmetric=False)).double()
    expected = asymmetric_oracle(x, 0.9)
    step = (expected.amax(dim=-1, keepdim=True) - expected.amin(dim=-1, keepdim=True)) / 14
    # float32 against float64: a value on a rounding tie may land one step apart
    assert ((clipped - expected).abs() <= step * 1.001).all()
    assert (clipped - expected).abs().gt(1e-5).float().mean() < 1e-3


def test_without_a_ratio_upstream_is_unchanged():
    """No ``clip_ratio`` (or 1): compressed-tensors' own dynamic scales, bit for bit."""
    x = activations(2)
    for args in (token_args(), token_args(1.0), token_args(symmetric=False)):
        module = linear()
        ours = forward_quantize(module, x, "input", args)
        scale, zero = _upstream_dynamic_qparams(value=x, args=args, module=module)
        assert torch.equal(ours, fake_quantize(x, scale, zero, args))


@pytest.mark.parametrize("ratio, message", [
    (0.0, "in \\(0, 1\\]"), (1.5, "in \\(0, 1\\]"), ("0.9", "in \\(0, 1\\]"),
    (float("nan"), "in \\(0, 1\\]"),
])
def test_a_meaningless_ratio_is_refused(ratio, message):
    with pytest.raises(ValueError, match=message):
        activation_clip_ratio(token_args(ratio))


def test_a_ratio_on_a_static_quantizer_is_refused():
    static = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor",
                              dynamic=False, observer_kwargs={"clip_ratio": 0.9})
    with pytest.raises(ValueError, match="dynamic activation quantization"):
        activation_clip_ratio(static)


def test_the_modifier_refuses_it_before_calibrating(tiny_model_dir):
    kv_cache = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
                "dynamic": False, "observer_kwargs": {"clip_ratio": 0.9}}
    modifier = GPTAQModifier(ignore=IGNORE, kv_cache_scheme=kv_cache, config_groups={
        "group_0": {"targets": ["Linear"], "weights": WEIGHTS, "input_activations": TOKEN_INT4}})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="kv_cache_scheme: .*dynamic activation quantization"):
        run(model, [modifier])


def test_calibration_checkpoint_and_reload_clip(tiny_model_dir, tmp_path, monkeypatch):
    """The quantized stream quantizes with the ratio, the checkpoint keeps it, and the
    reloaded model clips as the calibrated one did (and differs from it unclipped)."""
    import rescomp_modifiers.activation_clipping as clipping

    seen = []  # the ratios the quantized stream's dynamic scales were computed with
    upstream = clipping._upstream_dynamic_qparams

    def recording(value, args, module, global_scale=None):
        seen.append(clipping.activation_clip_ratio(args))
        return upstream(value=value, args=args, module=module, global_scale=global_scale)

    monkeypatch.setattr(clipping, "_upstream_dynamic_qparams", recording)
    activations_args = {**TOKEN_INT4, "observer_kwargs": {"clip_ratio": 0.9}}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    run(model, [GPTAQModifier(ignore=IGNORE, config_groups={
        "group_0": {"targets": ["Linear"], "weights": WEIGHTS,
                    "input_activations": activations_args}})])
    assert seen and set(seen) == {0.9}

    ids = torch.randint(4, 90, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint, save_compressed=True)
    config = json.loads((checkpoint / "config.json").read_text())
    saved = config["quantization_config"]["config_groups"]["group_0"]["input_activations"]
    assert saved["observer_kwargs"] == {"clip_ratio": 0.9}
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)(ids).logits
    torch.testing.assert_close(reloaded, expected, atol=1e-4, rtol=1e-4)

    # the same checkpoint without the ratio: the reload would quantize differently
    saved["observer_kwargs"] = {}
    (checkpoint / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        unclipped = AutoModelForCausalLM.from_pretrained(checkpoint)(ids).logits
    assert (unclipped - expected).abs().max() > 1e-3
