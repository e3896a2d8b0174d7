"""Quantized input activations and KV cache in the dual-stream pipeline (tiny Llama, CPU).

In the quantized stream activations and the KV cache are quantized as at inference; in
the full-precision stream nothing is. llm-compressor's activation and KV-cache observers
see the quantized stream only, and GPTAQ's ``D`` carries the activations' error.
"""

import json

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.utils.hooks import HooksMixin
from transformers import AutoModelForCausalLM

from rescomp_modifiers import CAEModifier, GPTAQModifier

from helpers import (
    TOKEN_INT4,
    UNSHUFFLED_BATCH_SIZE as BATCH_SIZE,
    UNSHUFFLED_SAMPLES as NUM_SAMPLES,
    WEIGHTS_INT4_G32 as WEIGHTS,
    calibration_dataset,
    record_solves,
    run_unshuffled as run,
    track_full_precision_pass,
)

STATIC_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
               "dynamic": False}
IGNORE = ["lm_head"]


def scheme(input_activations=None):
    group = {"targets": ["Linear"], "weights": WEIGHTS}
    if input_activations is not None:
        group["input_activations"] = input_activations
    return {"group_0": group}


@pytest.fixture
def passes(monkeypatch):
    """Which pass is running: 'fp' (the FP stream), 'calibrate' (the quantized stream,
    hooks on, or a true-sequential stage's hooks) or 'propagate' (the quantized stream,
    hooks off)."""
    capturing = track_full_precision_pass(monkeypatch)
    return lambda: ("fp" if capturing[0] else
                    "propagate" if HooksMixin._HOOKS_DISABLED
                    and not HooksMixin._HOOKS_KEEP_ENABLED else "calibrate")


def record_inputs(model, names, current_pass):
    """Each named module's input as it arrives (before any of the pipeline's hooks)."""
    recorded = {}
    for name in names:
        def hook(module, args, name=name):
            if args[0].device.type != "meta":  # tracing
                recorded.setdefault((name, current_pass()), []).append(args[0].detach().clone())
        model.get_submodule(name).register_forward_pre_hook(hook)
    return recorded


@pytest.mark.parametrize("true_sequential", [False, True])
def test_observers_see_only_the_quantized_stream(tiny_model_dir, passes, monkeypatch,
                                                  tmp_path, true_sequential):
    import compressed_tensors.modeling.kvcache as kvcache
    import llmcompressor.modifiers.quantization.quantization.mixin as mixin

    observed = []  # (module, base name, pass, tensor)
    for base_name in ("input", "key", "value"):
        original = getattr(mixin, f"calibrate_{base_name}_hook")

        def observing(module, value, original=original, base_name=base_name):
            tensor = value[0] if isinstance(value, tuple) else value
            observed.append((module, base_name, passes(), tensor.detach().clone()))
            return original(module, value)

        monkeypatch.setattr(mixin, f"calibrate_{base_name}_hook", observing)
    kv_quantized = []  # (attention module, pass) for every K/V fake-quantization
    original_quantize = kvcache.forward_quantize
    monkeypatch.setattr(kvcache, "forward_quantize", lambda module, value, *args: (
        kv_quantized.append((module, passes())) or original_quantize(module, value, *args)))

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    linears = [name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name != "lm_head"]
    attention = [name for name, _ in model.named_modules() if name.endswith("self_attn")]
    inputs = record_inputs(model, linears, passes)
    modifier = GPTAQModifier(ignore=IGNORE, config_groups=scheme(STATIC_INT8),
                             kv_cache_scheme=STATIC_INT8, true_sequential=true_sequential)
    run(model, [modifier])

    num_batches = NUM_SAMPLES // BATCH_SIZE
    names = {module: name for name, module in model.named_modules()}
    assert {entry[2] for entry in observed} == {"calibrate"}
    calls = {}
    for module, base_name, _, _ in observed:
        calls[(names[module], base_name)] = calls.get((names[module], base_name), 0) + 1
    # once per batch, also where true-sequential stage passes run a module again
    expected = {(name, "input"): num_batches for name in linears}
    expected |= {(name, kind): num_batches for name in attention for kind in ("key", "value")}
    assert calls == expected
    # what layer 1's observer saw is the quantized stream's input, not the FP stream's
    # (its first passes: the layer's single pass, or its q/k/v stage)
    q_proj = "model.layers.1.self_attn.q_proj"
    seen = [tensor for module, base_name, _, tensor in observed
            if names[module] == q_proj and base_name == "input"]
    for got, quantized, full in zip(seen, inputs[(q_proj, "calibrate")], inputs[(q_proj, "fp")]):
        torch.testing.assert_close(got, quantized, rtol=0, atol=0)
        assert not torch.allclose(got, full)
    # the static KV quantizers work once their scales are set: in the propagation pass
    # of their layer, never in the FP stream
    kv_calls = {}
    for module, current in kv_quantized:
        kv_calls[(names[module], current)] = kv_calls.get((names[module], current), 0) + 1
    # one call for K, one for V, per batch
    assert kv_calls == {(name, "propagate"): 2 * num_batches for name in attention}

    # the checkpoint carries the activation and KV-cache scales and reloads
    ids = torch.randint(4, 90, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_logits = model(ids).logits
    model.save_pretrained(tmp_path / "checkpoint", save_compressed=True)
    config = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    config = config["quantization_config"]
    assert config["kv_cache_scheme"]["num_bits"] == 8
    assert config["config_groups"]["group_0"]["input_activations"]["num_bits"] == 8
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    assert reloaded.model.layers[1].self_attn.q_proj.input_scale.item() > 0
    with torch.no_grad():
        actual = reloaded(ids).logits
    torch.testing.assert_close(actual, expected_logits, atol=1e-4, rtol=1e-4)


def fake_quantize_per_token_int4(x: torch.Tensor, clip_ratio: float = 1.0) -> torch.Tensor:
    """The oracle: symmetric per-token int4, levels -8..7, scale r * max|x| / 7.5 (the
    papers' clipping ratio r; 1: none)."""
    scale = clip_ratio * x.abs().amax(dim=-1, keepdim=True) / 7.5
    return torch.clamp(torch.round(x / scale), -8, 7) * scale


@pytest.mark.parametrize("modifier, clip_ratio", [
    (GPTAQModifier, None), (CAEModifier, None), (GPTAQModifier, 0.9),
], ids=["gptaq", "gptaq_cae", "gptaq_clip0.9"])
def test_asymmetry_carries_the_activation_quantization_error(tiny_model_dir, passes,
                                                             solver_calls, modifier, clip_ratio):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
             "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inputs = record_inputs(model, names, passes)
    activations = TOKEN_INT4 if clip_ratio is None else {
        **TOKEN_INT4, "observer_kwargs": {"clip_ratio": clip_ratio}}
    run(model, [modifier(ignore=IGNORE, config_groups=scheme(activations))])

    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dense_inputs = record_inputs(dense, names, lambda: "dense")
    with torch.no_grad():
        dense(torch.tensor(calibration_dataset(num_samples=NUM_SAMPLES)["input_ids"]))
    for name in names:
        full = torch.cat(inputs[(name, "fp")]).double()
        # in the input's float32, as the model quantizes: each token's largest entry
        # sits exactly on a rounding tie (max|x| / scale = 7.5), decided by the last bit
        quantized = fake_quantize_per_token_int4(torch.cat(inputs[(name, "calibrate")]),
                                                 clip_ratio or 1.0)
        quantized = quantized.double()
        # nothing is quantized in the FP stream: it is the dense model's
        torch.testing.assert_close(full, dense_inputs[(name, "dense")][0].double(),
                                   atol=1e-5, rtol=1e-5)
        # D = 2/N sum (x_fp - Q(x_q))^T Q(x_q), N sequences, from the hooked inputs
        flat_full, flat_q = full.reshape(-1, full.shape[-1]), quantized.reshape(-1, full.shape[-1])
        expected = 2 * (flat_full - flat_q).T @ flat_q / NUM_SAMPLES
        actual = solver_calls[name].double()
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    # weight-only, layer 0 reads the same embeddings in both streams and D is zero;
    # with quantized activations it is the activations' error alone
    assert solver_calls["model.layers.0.self_attn.q_proj"].abs().max() > 0


def test_weight_only_asymmetry_differs(tiny_model_dir, solver_calls):
    """The same data without activation quantization: layer 0's D is exactly zero."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    run(model, [GPTAQModifier(ignore=IGNORE, config_groups=scheme())])
    assert torch.count_nonzero(solver_calls["model.layers.0.self_attn.q_proj"]) == 0
    assert solver_calls["model.layers.1.self_attn.q_proj"].abs().max() > 0


def test_modules_reading_one_input_still_share_statistics(tiny_model_dir, monkeypatch):
    """q/k/v (and gate/up) get one quantized tensor, so they are still solved as one
    row-stacked weight, 4 solves per layer."""
    solved = []
    record_solves(monkeypatch, lambda names, _hessian, _asymmetry: solved.append(" + ".join(names)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    run(model, [GPTAQModifier(ignore=IGNORE, config_groups=scheme(TOKEN_INT4))])
    layer = "model.layers.1."
    assert f"{layer}self_attn.q_proj + {layer}self_attn.k_proj + {layer}self_attn.v_proj" in solved
    assert f"{layer}mlp.gate_proj + {layer}mlp.up_proj" in solved
    assert len(solved) == 4 * len(model.model.layers)


TOKEN_INT8 = {**TOKEN_INT4, "num_bits": 8}
HEAD_INT4 = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "attn_head",
             "dynamic": False}
W2 = {**WEIGHTS, "num_bits": 2, "symmetric": False}


@pytest.mark.parametrize(
    "weights, activations, kv_cache, rotated, true_sequential",
    [
        ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
         TOKEN_INT8, STATIC_INT8, False, False),                # W8A8 KV8
        (WEIGHTS, TOKEN_INT8, None, False, False),               # W4A8
        (WEIGHTS, TOKEN_INT4, HEAD_INT4, True, False),           # W4A4 KV4 + rotation
        (W2, TOKEN_INT4, HEAD_INT4, True, False),                # W2A4 KV4 + rotation
        (WEIGHTS, TOKEN_INT4, HEAD_INT4, True, True),            # the same, true-sequential
    ],
    ids=["w8a8_kv8", "w4a8", "w4a4_kv4_rot", "w2a4_kv4_rot", "w4a4_kv4_rot_true_sequential"],
)
def test_each_combination_saves_and_reloads(tiny_model_dir, tmp_path, solver_calls, weights,
                                            activations, kv_cache, rotated, true_sequential):
    from llmcompressor.modifiers.transform import SpinQuantModifier

    recipe = [CAEModifier(ignore=IGNORE, kv_cache_scheme=kv_cache, true_sequential=true_sequential,
                          config_groups={"group_0": {"targets": ["Linear"], "weights": weights,
                                                     "input_activations": activations}})]
    if rotated:
        recipe.insert(0, SpinQuantModifier(rotations=["R1", "R2"], transform_type="hadamard"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    run(model, recipe)
    # every Linear solved, with D carrying the activations' error from layer 0 on
    assert all(d.abs().max() > 0 for d in solver_calls.values())
    assert len(solver_calls) == 7 * len(model.model.layers)

    ids = torch.randint(4, 90, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "checkpoint", save_compressed=True)
    config = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    config = config["quantization_config"]
    saved = config["config_groups"]["group_0"]
    assert saved["weights"]["num_bits"] == weights["num_bits"]
    assert saved["input_activations"]["num_bits"] == activations["num_bits"]
    assert saved["input_activations"]["dynamic"] is True
    assert (config["kv_cache_scheme"] or {}).get("num_bits") == (kv_cache or {}).get("num_bits")
    assert bool(config.get("transform_config")) == rotated
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    with torch.no_grad():
        actual = reloaded(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_solvers_without_fp_stream_see_quantized_activations_under_dual_stream(
        tiny_model_dir, passes, monkeypatch):
    """GPTQ+CAE needs no FP stream and runs upstream's pipeline by default (activations
    unquantized during calibration); pipeline='dual_stream' calibrates it on the
    quantized stream as at inference."""
    from rescomp_modifiers.quantized_stream import QuantizedStreamActivations

    quantized = []  # (pass, whether the input was fake-quantized)
    original = QuantizedStreamActivations._quantize_input
    monkeypatch.setattr(QuantizedStreamActivations, "_quantize_input",
                        lambda self, module, args: quantized.append(
                            (passes(), (result := original(self, module, args)) is not None))
                        or result)
    recipe = [CAEModifier(statistics="gptq", ignore=IGNORE, config_groups=scheme(TOKEN_INT8))]
    run(AutoModelForCausalLM.from_pretrained(tiny_model_dir), recipe)
    assert quantized == []  # upstream's sequential pipeline
    recipe = [CAEModifier(statistics="gptq", ignore=IGNORE, config_groups=scheme(TOKEN_INT8))]
    oneshot(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            dataset=calibration_dataset(num_samples=NUM_SAMPLES), recipe=recipe,
            max_seq_length=32, num_calibration_samples=NUM_SAMPLES, batch_size=BATCH_SIZE,
            pipeline="dual_stream")
    by_pass = {}
    for current, done in quantized:
        by_pass.setdefault(current, set()).add(done)
    assert by_pass == {"fp": {False}, "calibrate": {True}, "propagate": {True}}
