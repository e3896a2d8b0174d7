"""Per-module calibration statistics: GPTQ's Hessian H and the asymmetry D.

For a Linear with quantized-stream input ``x_q`` and full-precision input ``x_fp`` (one
row per token), summed over calibration batches and normalized later by the number of
samples, exactly like llm-compressor's Hessian::

    H += 2 x_q^T x_q
    D += 2 (x_fp - x_q)^T x_q

Modules that read the same input tensor (q/k/v of an attention block, gate/up of an
MLP) get the same increments, so they are computed once per input and added to each
module's sums: with D that is two ``tokens x features^2`` products saved per sharing
module (measured on SmolLM2 before this: H and D accumulation were 26% of a GPTAQ+CAE
oneshot, q/k/v and gate/up are 5 of the 7 Linears of a layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import transformers
from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION

__all__ = ["StatisticsIncrements", "SharedInputIncrements", "supports_shared_statistics"]


def supports_shared_statistics(module: torch.nn.Module) -> bool:
    """Modules whose input is a ``[..., features]`` activation (no unfolding)."""
    return isinstance(module, (torch.nn.Linear, transformers.Conv1D))


def _observations(inp: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
    """``[tokens, features]`` in GPTQ's precision and the number of samples, shaped
    the way llm-compressor's ``accumulate_hessian`` shapes a Linear input."""
    inp = inp.to(device=device)
    if inp.dim() == 2:
        inp = inp.unsqueeze(0)
    elif inp.dim() > 3:
        inp = inp.reshape(inp.shape[0], -1, inp.shape[-1])
    return inp.reshape(-1, inp.shape[-1]), inp.shape[0]


@dataclass
class StatisticsIncrements:
    """What one batch adds to a module's sums."""

    hessian: torch.Tensor  #: ``2 x_q^T x_q``
    asymmetry: torch.Tensor | None  #: ``2 (x_fp - x_q)^T x_q``, None without the FP stream
    num_samples: int


def compute_increments(inp: torch.Tensor, fp_inp: torch.Tensor | None,
                       device: torch.device) -> StatisticsIncrements:
    x_q, num_samples = _observations(inp, device)
    # The same operations, in the same order, as upstream's accumulate_hessian, so H is
    # bit-identical to stock GPTQModifier's (the a = 0 GPTAQ test compares checkpoints).
    scaled = math.sqrt(2) * x_q.t().to(dtype=GPTQ_PRECISION)
    hessian = scaled.matmul(scaled.t())
    asymmetry = None
    if fp_inp is not None:
        if fp_inp.shape != inp.shape:
            raise ValueError(
                f"The full-precision and quantized inputs have different shapes "
                f"{tuple(fp_inp.shape)} vs {tuple(inp.shape)}: the two streams routed "
                "tokens differently (for MoE models keep moe_calibrate_all_experts=True)."
            )
        x_q = x_q.to(dtype=GPTQ_PRECISION)
        x_fp = _observations(fp_inp, device)[0].to(dtype=GPTQ_PRECISION)
        asymmetry = (x_fp - x_q).t().matmul(x_q).mul_(2.0)
        if not _all_finite(hessian, asymmetry):
            raise ValueError(
                "NaN or Inf in the calibration activations: check the model dtype "
                "(fp16 overflow) and the calibration data."
            )
    return StatisticsIncrements(hessian, asymmetry, num_samples)


def _all_finite(*tensors: torch.Tensor) -> bool:
    """Whether the tensors hold no NaN or Inf; an input's NaN or Inf reaches its products.

    A non-finite entry makes the sum non-finite, so one reduction per tensor settles
    the usual case; only a sum that overflows from finite entries needs the elementwise
    check. (The elementwise check on every batch was 8% of a GPTAQ+CAE oneshot on
    SmolLM2, py-spy: a boolean features^2 tensor per product.)
    """
    total = sum(tensor.sum() for tensor in tensors)
    if bool(torch.isfinite(total)):
        return True
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


class SharedInputIncrements:
    """Increments of the most recent input, reused while the next module reads the same
    tensors (the same memory, shape, strides and in-place version).

    It holds the inputs themselves while cached, so their memory cannot be reused by a
    later batch at the same address; :meth:`clear` releases them (at the end of
    calibration of a subgraph).
    """

    def __init__(self):
        self._key = None
        self._increments: StatisticsIncrements | None = None

    def clear(self) -> None:
        self._key = None
        self._increments = None

    def get(self, inp: torch.Tensor, fp_inp: torch.Tensor | None,
            device: torch.device) -> StatisticsIncrements:
        if self._key is not None:
            cached_inp, cached_fp, versions, cached_device = self._key
            if (cached_device == device and _same_tensor(cached_inp, inp)
                    and _same_tensor(cached_fp, fp_inp)
                    and versions == (inp._version, None if fp_inp is None else fp_inp._version)):
                return self._increments
        self.clear()  # release the old increments before computing new ones
        self._increments = compute_increments(inp, fp_inp, device)
        self._key = (inp, fp_inp, (inp._version, None if fp_inp is None else fp_inp._version),
                     device)
        return self._increments
