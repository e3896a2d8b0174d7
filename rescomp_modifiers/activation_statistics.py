"""Per-module calibration statistics: GPTQ's Hessian H and the asymmetry D.

For a Linear with quantized-stream input ``x_q`` and full-precision input ``x_fp`` (one
row per token), summed over calibration batches and normalized later by the number of
samples, exactly like llm-compressor's Hessian::

    H += 2 x_q^T x_q
    D += 2 (x_fp - x_q)^T x_q

Modules that read the same input tensor (q/k/v of an attention block, gate/up of an
MLP) get the same increments, so they are computed once per input (with D that is two
``tokens x features^2`` products saved per sharing module; before this, H and D
accumulation were 26% of a GPTAQ+CAE oneshot on SmolLM2) and summed once for the whole
group: :class:`GroupedStatistics`. The modifiers then solve such a group as one
row-stacked weight (GPTQ's update of a row depends only on that row, H and D).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import transformers
from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION

__all__ = [
    "GroupedStatistics", "SharedSums", "StatisticsIncrements", "supports_shared_statistics",
]


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
    #: ``(2 (x_fp - x_q), x_q)``, ``[tokens, features]`` each, whose product ``left^T
    #: right`` is D's increment; None without the FP stream. The product is formed by
    #: :meth:`SharedSums.add` straight into the sums (one GEMM with beta = 1, no
    #: ``features^2`` temporary, add and scaling pass per batch).
    asymmetry_factors: tuple[torch.Tensor, torch.Tensor] | None
    num_samples: int

    @property
    def asymmetry(self) -> torch.Tensor | None:
        """``2 (x_fp - x_q)^T x_q``, formed on demand."""
        if self.asymmetry_factors is None:
            return None
        left, right = self.asymmetry_factors
        return left.t().matmul(right)


def compute_increments(inp: torch.Tensor, fp_inp: torch.Tensor | None,
                       device: torch.device) -> StatisticsIncrements:
    """The batch's increments. NaN or Inf in the activations is not checked here: it
    reaches the sums, which the solver refuses with a clear message before writing."""
    x_q, num_samples = _observations(inp, device)
    # The same operations, in the same order, as upstream's accumulate_hessian, so H is
    # bit-identical to stock GPTQModifier's (the a = 0 GPTAQ test compares checkpoints).
    scaled = math.sqrt(2) * x_q.t().to(dtype=GPTQ_PRECISION)
    hessian = scaled.matmul(scaled.t())
    factors = None
    if fp_inp is not None:
        if fp_inp.shape != inp.shape:
            raise ValueError(
                f"The full-precision and quantized inputs have different shapes "
                f"{tuple(fp_inp.shape)} vs {tuple(inp.shape)}: the two streams routed "
                "tokens differently (for MoE models keep moe_calibrate_all_experts=True)."
            )
        # copies: D's product is formed later (when the readers are known), and the
        # model may change its input in place meanwhile
        x_q = x_q.to(dtype=GPTQ_PRECISION, copy=True)
        x_fp = _observations(fp_inp, device)[0].to(dtype=GPTQ_PRECISION)
        # doubling is exact in floating point: on tokens x features, not features^2
        factors = ((x_fp - x_q).mul_(2.0), x_q)
    return StatisticsIncrements(hessian, factors, num_samples)


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


@dataclass
class SharedSums:
    """H, D and sample-count sums of the modules that read the same input in every
    batch so far (q/k/v, gate/up): one set of sums, one solve for all of them."""

    members: list[torch.nn.Module]
    hessian: torch.Tensor
    asymmetry: torch.Tensor | None
    num_samples: torch.Tensor

    @classmethod
    def zeros_like(cls, increments: StatisticsIncrements, members) -> "SharedSums":
        hessian = torch.zeros_like(increments.hessian)
        asymmetry = None if increments.asymmetry_factors is None else torch.zeros_like(hessian)
        return cls(list(members), hessian, asymmetry, torch.zeros((), device=hessian.device))

    def copy_for(self, members) -> "SharedSums":
        asymmetry = None if self.asymmetry is None else self.asymmetry.clone()
        return SharedSums(list(members), self.hessian.clone(), asymmetry,
                          self.num_samples.clone())

    def add(self, increments: StatisticsIncrements, times: int) -> None:
        # one add per call, as upstream's hook does for a module called twice on a batch
        for _ in range(times):
            self.num_samples += increments.num_samples
            self.hessian += increments.hessian
            if self.asymmetry is not None:
                left, right = increments.asymmetry_factors
                self.asymmetry.addmm_(left.t(), right)


@dataclass
class _Pending:
    """The increments of the most recent input and the modules that have read it."""

    key: tuple
    increments: StatisticsIncrements
    consumers: list[torch.nn.Module]

    def matches(self, inp, fp_inp, device) -> bool:
        cached_inp, cached_fp, versions, cached_device = self.key
        return (cached_device == device and _same_tensor(cached_inp, inp)
                and _same_tensor(cached_fp, fp_inp)
                and versions == _versions(inp, fp_inp))


def _versions(inp, fp_inp) -> tuple:
    return inp._version, None if fp_inp is None else fp_inp._version


class GroupedStatistics:
    """Per-module H, D and sample counts, shared by modules that read the same input.

    The increments of an input are computed once and added once per group of readers
    (measured on SmolLM2: q/k/v and gate/up are 5 of a layer's 7 Linears). The add is
    deferred until the next input arrives (or :meth:`flush`), when it is known which
    modules read this one: modules that read the same input in every batch keep one set
    of :class:`SharedSums`; a module that ever reads something else than its group
    leaves it with a copy of the sums so far, so every module's sums are exactly what
    upstream's per-module accumulation gives.

    The pending input tensors are held until the flush, so their memory cannot be
    reused by a later batch at the same address.
    """

    def __init__(self):
        self._sums: dict[torch.nn.Module, SharedSums] = {}
        self._pending: _Pending | None = None

    def add(self, module: torch.nn.Module, inp: torch.Tensor, fp_inp: torch.Tensor | None,
            device: torch.device) -> None:
        """Account ``module`` reading ``inp`` (and its full-precision twin ``fp_inp``)."""
        pending = self._pending
        if pending is not None and pending.matches(inp, fp_inp, device):
            pending.consumers.append(module)
            return
        self.flush()  # releases the old inputs before computing new increments
        increments = compute_increments(inp, fp_inp, device)
        self._pending = _Pending((inp, fp_inp, _versions(inp, fp_inp), device), increments,
                                 [module])

    def flush(self) -> None:
        """Add the pending increments to the sums of the modules that read them."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        times = Counter(pending.consumers)
        parts: dict[tuple, list[torch.nn.Module]] = {}
        for module, count in times.items():
            sums = self._sums.get(module)
            parts.setdefault((None if sums is None else id(sums), count), []).append(module)
        for members in parts.values():
            sums = self._sums.get(members[0])
            if sums is None:
                sums = SharedSums.zeros_like(pending.increments, members)
            elif len(members) < len(sums.members):
                # part of the group read another input: it leaves with the sums so far
                # (copied before this input is added to the rest of the group)
                leaving = set(members)
                sums.members = [m for m in sums.members if m not in leaving]
                sums = sums.copy_for(members)
            for module in members:
                self._sums[module] = sums
            sums.add(pending.increments, times[members[0]])

    def pop_all(self) -> list[SharedSums]:
        """Every module's sums, each shared set once; the store is empty afterwards."""
        self.flush()
        unique = list({id(sums): sums for sums in self._sums.values()}.values())
        self._sums.clear()
        return unique

    def clear(self) -> None:
        self._pending = None
        self._sums.clear()
