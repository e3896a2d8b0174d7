"""A rotation modifier followed by our solvers, on tiny random Llamas (CPU).

Rotations are exact: the dual-stream pipeline's full-precision stream must be the
rotated but unquantized model, whose function equals the original model's. SpinQuant's
R1 and R2 are fused into the weights, so the checkpoint is an ordinary quantized one with
the rotation folded in; it reloads in transformers with the same logits.
"""

import json

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier
from loguru import logger
from transformers import AutoModelForCausalLM

from rescomp_modifiers import CAEModifier, FOEMModifier, GPTAQModifier

from helpers import GROUP32, calibration_dataset, targeted_linear_names, track_full_precision_pass

IGNORE = ["lm_head"]
# outputs that no rotation touches: q/k (R2 rotates only v/o heads) and gate/up read the
# R1-rotated residual through weights carrying the inverse rotation
INVARIANT_OUTPUTS = ("q_proj", "k_proj", "gate_proj", "up_proj")


def _rotation(kind: str):
    if kind == "spinquant":
        return SpinQuantModifier(rotations=["R1", "R2"], transform_type="hadamard")
    return QuIPModifier(rotations=["v"], transform_type="hadamard")


@pytest.fixture
def full_precision_outputs(monkeypatch):
    """Outputs of the watched modules recorded in the pipeline's FP pass only."""
    recorded, capturing = {}, track_full_precision_pass(monkeypatch)

    def watch(model, names):
        for name in names:
            def hook(module, args, output, name=name):
                # the traced graph runs lm_head-free; meta tensors come from tracing
                if capturing[0] and output.device.type != "meta":
                    recorded.setdefault(name, []).append(output.detach().clone())
            model.get_submodule(name).register_forward_hook(hook)
        return recorded

    return watch


@pytest.mark.parametrize("rotation", ["spinquant", "quip"])
def test_full_precision_stream_is_the_unrotated_model(tiny_model_dir, full_precision_outputs,
                                                      rotation):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = [name for name, _ in model.named_modules() if name.endswith(INVARIANT_OUTPUTS)]
    recorded = full_precision_outputs(model, names + ["model.norm"])
    dataset = calibration_dataset()
    oneshot(model=model, dataset=dataset, max_seq_length=32, num_calibration_samples=8,
            shuffle_calibration_samples=False, batch_size=8,
            recipe=[_rotation(rotation), GPTAQModifier(ignore=IGNORE, config_groups=GROUP32)])

    # the oracle: the untouched model on the same batch
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if rotation == "spinquant":
        # SpinQuant also centers the embedding rows (a shift, not a rotation; with
        # RMSNorm it changes the function), so the oracle gets the same shift
        with torch.no_grad():
            embedding = reference.model.embed_tokens.weight
            embedding -= embedding.mean(dim=-1, keepdim=True)
    expected = {}
    for name in names:
        reference.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: expected.__setitem__(name, output))
    ids = torch.tensor(dataset["input_ids"])
    with torch.no_grad():
        expected_logits = reference(ids).logits

    assert set(recorded) == set(names) | {"model.norm"}
    for name in names:
        (actual,) = recorded[name]
        torch.testing.assert_close(actual, expected[name], atol=5e-5, rtol=1e-5)
    # lm_head is not quantized (ignored) but carries R1 and the fused final norm
    (final_hidden,) = recorded["model.norm"]
    logits = torch.nn.functional.linear(final_hidden, model.lm_head.weight)
    torch.testing.assert_close(logits, expected_logits, atol=5e-5, rtol=1e-5)
    # the rotation changed the weights the solver saw, and the quantized model differs
    q_proj = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(model.get_submodule(q_proj).weight,
                              reference.get_submodule(q_proj).weight, atol=1e-3)


@pytest.mark.parametrize(
    "modifier",
    [GPTAQModifier, lambda **kw: CAEModifier(statistics="gptaq", **kw),
     lambda **kw: CAEModifier(statistics="gptq", **kw), FOEMModifier],
    ids=["gptaq", "gptaq_cae", "gptq_cae", "foem"],
)
def test_rotated_solver_saves_and_reloads(tiny_model_dir, tmp_path, solver_calls, modifier):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    solver = modifier(ignore=IGNORE, config_groups=GROUP32)
    oneshot(model=model, dataset=calibration_dataset(), max_seq_length=32,
            num_calibration_samples=8, recipe=[_rotation("spinquant"), solver])
    assert set(solver_calls) == targeted_linear_names(model)
    if solver.needs_full_precision_stream:
        assert solver_calls["model.layers.1.self_attn.q_proj"].abs().max() > 0
    else:
        assert all(d is None for d in solver_calls.values())

    ids = torch.randint(4, 90, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    out = tmp_path / "checkpoint"
    model.save_pretrained(out, save_compressed=True)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    # R1 and R2 are fused into the weights: recorded, but nothing to run online
    locations = {apply["location"] for scheme in config["transform_config"]["config_groups"]
                 .values() for apply in scheme["apply"]}
    assert locations == {"weight_input", "weight_output"}
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        actual = reloaded(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def _group(bits: int, observer: str | None = None) -> dict:
    weights = {**GROUP32["group_0"]["weights"], "num_bits": bits}
    if observer:
        weights["observer"] = observer
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


@pytest.mark.parametrize("rotated, solver, warned", [
    # after a rotation at 4+ bits, each of these measured worse than GPTQ (README)
    (True, lambda: GPTAQModifier(ignore=IGNORE, config_groups=_group(4, "memoryless_mse")),
     "MSE clipping measured worse than GPTQ"),
    (True, lambda: CAEModifier(ignore=IGNORE, config_groups=_group(4)),
     "CAE's terms measured worse than GPTQ"),
    (True, lambda: FOEMModifier(ignore=IGNORE, config_groups=_group(3)),
     "FOEM's term measured worse than GPTQ"),
    # plain GPTAQ tied GPTQ there; at 3 bits the recommended default wins by far
    (True, lambda: GPTAQModifier(ignore=IGNORE, config_groups=_group(4)), None),
    (True, lambda: CAEModifier(ignore=IGNORE, config_groups=_group(3, "memoryless_mse")), None),
    # without a rotation, nothing to say
    (False, lambda: CAEModifier(ignore=IGNORE, config_groups=_group(4, "memoryless_mse")), None),
], ids=["gptaq_mse_w4", "cae_w4", "foem_w3", "gptaq_w4", "cae_mse_w3", "unrotated_cae_mse_w4"])
def test_warns_where_measured_worse_after_a_rotation(tiny_model_dir, rotated, solver, warned):
    messages = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        oneshot(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                dataset=calibration_dataset(), max_seq_length=32, num_calibration_samples=8,
                recipe=[_rotation("spinquant")] * rotated + [solver()])
    finally:
        logger.remove(sink)
    rotation_warnings = [m for m in messages if "after a rotation at W" in m]
    if warned is None:
        assert rotation_warnings == []
    else:
        (message,) = rotation_warnings
        assert warned in message and "recipes/recommended/*_rot.yaml" in message
