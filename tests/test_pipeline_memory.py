"""Where the dual-stream pipeline keeps its full-precision activation cache.

The cache location must change memory and transfers only, never the checkpoint. Two
tests, each claiming only what it compares:

* everywhere: ``RESCOMP_FULL_PRECISION_CACHE_DEVICE`` reaches the FP cache and only it
  (checked with ``cpu:0``, a device on the CPU that the recorder tells apart from the
  default ``cpu``), and a run with the FP cache placed there writes the default run's
  checkpoint bit for bit. Both caches are in CPU memory here: this says nothing about an
  accelerator.
* with CUDA only (skipped otherwise): the FP cache on the accelerator against the FP
  cache on the CPU, the model running on the accelerator in both runs; the quantized
  weights must be bit-identical.
"""

import pytest
import torch
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM

import rescomp_modifiers.pipeline as pipeline_module
from rescomp_modifiers.methods import build_modifier

from helpers import GROUP32, calibration_dataset

ENV = pipeline_module.FULL_PRECISION_CACHE_DEVICE_ENV
CPU = torch.device("cpu")


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


def quantize_with_and_without(model_dir, cache_devices, monkeypatch, fp_cache_device):
    """The checkpoint of a default run and of a run with the FP cache on
    ``fp_cache_device``, each with the devices its caches were built on."""
    monkeypatch.delenv(ENV, raising=False)
    default = quantize(model_dir)
    default_devices = list(cache_devices)
    cache_devices.clear()
    monkeypatch.setenv(ENV, fp_cache_device)
    moved = quantize(model_dir)
    return (default, default_devices), (moved, list(cache_devices))


def assert_same_checkpoint(default, moved):
    assert default.keys() == moved.keys()
    # the run quantized something (packed weights appear), and identically
    assert any(name.endswith("weight_scale") for name in default)
    for name in default:
        assert torch.equal(default[name], moved[name]), name


def test_the_setting_places_only_the_fp_cache_and_leaves_the_checkpoint(
        tiny_model_dir, cache_devices, monkeypatch):
    """CPU memory both times (see the module docstring): the setting's plumbing."""
    (default, default_devices), (moved, moved_devices) = quantize_with_and_without(
        tiny_model_dir, cache_devices, monkeypatch, "cpu:0")
    # the default follows llm-compressor's own cache: both on sequential_offload_device
    assert default_devices == [CPU, CPU]
    # the quantized cache stays there; the FP cache goes where the setting says
    assert moved_devices == [CPU, torch.device("cpu:0")]
    assert_same_checkpoint(default, moved)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: compares the FP cache on the accelerator with the FP "
                           "cache on the CPU")
def test_fp_cache_on_the_accelerator_writes_the_cpu_cache_checkpoint(
        tiny_model_dir, cache_devices, monkeypatch):
    (default, default_devices), (moved, moved_devices) = quantize_with_and_without(
        tiny_model_dir, cache_devices, monkeypatch, "cuda")
    assert default_devices == [CPU, CPU]
    assert moved_devices == [CPU, torch.device("cuda")]
    assert_same_checkpoint(default, moved)


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
