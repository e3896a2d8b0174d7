"""Activation and KV-cache quantization in the quantized stream, as at inference.

llm-compressor calibrates with every quantizer disabled (``DisableQuantization``): the
observers watch unquantized activations and the propagated stream carries only the
weights' error. With quantized input activations (W8A8, W4A8, W4A4) or a quantized KV
cache, the stream the model sees at inference also carries the activations' error, and
GPTAQ's ``D = 2/N sum (x_fp - x_q) x_q^T`` is meant to see it. In the dual-stream
pipeline's quantized passes :class:`QuantizedStreamActivations`

* fake-quantizes each targeted module's input with compressed-tensors' own
  ``forward_quantize``, the call its quantized forward makes at inference, after
  llm-compressor's observer hook has seen the unquantized input and before the
  statistics hooks read it (so ``H`` and ``D`` are formed from the quantized input);
* enables the KV-cache (and attention) quantizers of attention modules.

The full-precision pass runs with all of this off. A dynamic quantizer (per-token
activations, the presets' choice) is exact in both quantized passes; a static one
(observer-calibrated scale, e.g. the KV cache) has its scale only once its subgraph's
calibration pass has ended, so it quantizes from the propagation pass on: the next
subgraphs see its error, the subgraph that calibrates it does not.
"""

from __future__ import annotations

import contextlib

import torch
from compressed_tensors.quantization import DynamicType

from rescomp_modifiers.upstream import (
    forward_quantize,
    getattr_chain,
    is_cached_attention_module,
)

__all__ = ["QuantizedStreamActivations"]


def _is_dynamic(quant_args) -> bool:
    return quant_args.dynamic in (True, DynamicType.LOCAL)


class QuantizedStreamActivations:
    """Quantizes input activations and the KV cache while :meth:`quantizing`."""

    def __init__(self, model: torch.nn.Module):
        self._inputs: list[torch.nn.Module] = []
        self._attention: list[torch.nn.Module] = []
        for module in model.modules():
            if getattr_chain(module, "quantization_scheme.input_activations", None) is None:
                continue
            if is_cached_attention_module(module):
                self._attention.append(module)
            else:
                self._inputs.append(module)
        # modules whose static activation scales the observers have set
        self._calibrated: set[torch.nn.Module] = set()
        self._active = False
        # (input, its version, quantization args, quantized input) of the latest call:
        # q/k/v and gate/up read one tensor, and handing them one quantized tensor keeps
        # their statistics shared and their weights solved row-stacked
        self._latest: tuple | None = None
        # registered after the observers' hooks, so those see the unquantized input
        self._handles = [
            module.register_forward_pre_hook(self._quantize_input) for module in self._inputs
        ]

    def _ready(self, module: torch.nn.Module) -> bool:
        quant_args = module.quantization_scheme.input_activations
        return _is_dynamic(quant_args) or module in self._calibrated

    def _quantize_input(self, module, args):
        if not self._active or not self._ready(module):
            return None
        inp, quant_args = args[0], module.quantization_scheme.input_activations
        latest = self._latest
        if (latest is not None and latest[0] is inp and latest[1] == inp._version
                and latest[2] == quant_args and _is_dynamic(quant_args)):
            return (latest[3], *args[1:])
        quantized = forward_quantize(module, inp, "input", quant_args)
        self._latest = (inp, inp._version, quant_args, quantized)
        return (quantized, *args[1:])

    def mark_calibrated(self, modules) -> None:
        """The subgraph's calibration pass ended: its static scales are set."""
        self._calibrated.update(modules)

    @contextlib.contextmanager
    def quantizing(self):
        """The quantized stream's passes: activations and KV cache as at inference."""
        self._active = True
        for module in self._attention:
            module.quantization_enabled = self._ready(module)
        try:
            yield
        finally:
            self._active = False
            self._latest = None
            for module in self._attention:
                module.quantization_enabled = False

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
