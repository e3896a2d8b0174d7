"""Where the dual-stream pipeline keeps its full-precision activation cache.

The cache location must change memory and transfers only, never the checkpoint. On a
machine with CUDA the FP cache is also put on the accelerator (the model runs there)
and the quantized weights must still be bit-identical.
"""

import pytest
import torch
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM

import rescomp_modifiers.pipeline as pipeline_module
from rescomp_modifiers.methods import build_modifier

from helpers import calibration_dataset

GROUP32 = {
    "group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                    "strategy": "group", "group_size": 32},
    }
}
ENV = pipeline_module.FULL_PRECISION_CACHE_DEVICE_ENV
CACHE_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def cache_devices(monkeypatch):
    """The offload device of every activation cache the pipeline builds, in order."""
    devices = []
    original_init = pipeline_module.IntermediatesCache.__init__

    def recording_init(self, batch_intermediates=None, offload_device="cpu"):
        devices.append(None if offload_device is None else torch.device(offload_device))
        original_init(self, batch_intermediates, offload_device)

    monkeypatch.setattr(pipeline_module.IntermediatesCache, "__init__", recording_init)
    return devices


def quantize(model_dir, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    oneshot(model=model, dataset=calibration_dataset(), max_seq_length=32,
            num_calibration_samples=8,
            recipe=[build_modifier("gptaq_cae", ignore=["lm_head"], config_groups=GROUP32)],
            **kwargs)
    return {name: tensor.cpu() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("fp_cache_device", CACHE_DEVICES)
def test_checkpoint_is_the_same_wherever_the_fp_cache_lives(
    tiny_model_dir, cache_devices, monkeypatch, fp_cache_device
):
    monkeypatch.delenv(ENV, raising=False)
    default = quantize(tiny_model_dir)
    # the default follows llm-compressor's own cache: both on sequential_offload_device
    assert cache_devices == [torch.device("cpu")] * 2
    cache_devices.clear()

    monkeypatch.setenv(ENV, fp_cache_device)
    moved = quantize(tiny_model_dir)
    assert cache_devices == [torch.device("cpu"), torch.device(fp_cache_device)]
    assert default.keys() == moved.keys()
    # the run quantized something (packed weights appear), and identically
    assert any(name.endswith("weight_scale") for name in default)
    for name in default:
        assert torch.equal(default[name], moved[name]), name


@pytest.mark.parametrize("value, message", [
    ("gpu0", "is not a torch device: use cpu, cuda or cuda:N"),
    pytest.param("cuda", "torch sees no CUDA device", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="the error is for machines without CUDA")),
])
def test_bad_cache_device_fails_before_calibrating(tiny_model_dir, cache_devices, monkeypatch,
                                                   value, message):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=message):
        quantize(tiny_model_dir)
    assert cache_devices == []  # nothing was cached, so nothing was computed
