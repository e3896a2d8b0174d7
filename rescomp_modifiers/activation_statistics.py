"""Per-module calibration statistics: GPTQ's Hessian H and the asymmetry D.

For a Linear with quantized-stream input ``x_q`` and full-precision input ``x_fp`` (one
row per token), summed over calibration batches and normalized later by the number of
samples, exactly like llm-compressor's Hessian::

    H += 2 x_q^T x_q
    D += 2 (x_fp - x_q)^T x_q

Modules that read the same input tensor (q/k/v of an attention block, gate/up of an
MLP) get the same increments, so they are computed once per input (with D, two
``tokens x features^2`` products saved per sharing module: computed per module, H and D
take about a quarter of a GPTAQ+CAE oneshot on SmolLM2) and summed once for the whole
group: :class:`GroupedStatistics`. The modifiers then solve such a group as one
row-stacked weight (GPTQ's update of a row depends only on that row, H and D).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import transformers

from rescomp_modifiers.upstream import GPTQ_PRECISION

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


#: rows per GEMM when H is summed by its upper blocks: with ``k`` blocks the products
#: cost ``(1 + 1/k) / 2`` of the full ``x^T x`` (measured at 256 tokens on 2 cores:
#: 1536 features 6.6 -> 4.4 ms, 576 features 0.85 -> 0.7 ms)
HESSIAN_BLOCK_ROWS = 256


@dataclass
class StatisticsIncrements:
    """What one batch adds to a module's sums."""

    #: ``2 x_q^T x_q`` formed as upstream does (bit-identical to its H), or None when the
    #: sums form it from ``observations`` by upper blocks (:meth:`SharedSums.add`)
    hessian: torch.Tensor | None
    #: ``x_q`` as ``[tokens, features]`` in GPTQ's precision, a copy (the products
    #: formed later must not see in-place changes of the model's tensors); None when
    #: nothing is formed later
    observations: torch.Tensor | None
    #: ``2 (x_fp - x_q)``, ``[tokens, features]``: D's increment is ``difference^T
    #: observations``, formed straight into the sums (one GEMM with beta = 1, no
    #: ``features^2`` temporary, add or scaling pass per batch); None without the FP stream
    difference: torch.Tensor | None
    num_samples: int


def compute_increments(inp: torch.Tensor, fp_inp: torch.Tensor | None,
                       device: torch.device, exact_hessian: bool = True) -> StatisticsIncrements:
    """The batch's increments. NaN or Inf in the activations is not checked here: it
    reaches the sums, which the solver refuses with a clear message before writing.

    :param exact_hessian: form H's increment exactly as upstream's ``accumulate_hessian``
        (needed where the checkpoint must equal stock GPTQModifier's); otherwise the
        sums form only its upper blocks
    """
    if fp_inp is not None and fp_inp.shape != inp.shape:
        raise ValueError(
            f"The full-precision and quantized inputs have different shapes "
            f"{tuple(fp_inp.shape)} vs {tuple(inp.shape)}: the two streams routed "
            "tokens differently (for MoE models keep moe_calibrate_all_experts=True)."
        )
    x_q, num_samples = _observations(inp, device)
    hessian = None
    if exact_hessian:
        # The same operations, in the same order, as upstream's accumulate_hessian.
        scaled = math.sqrt(2) * x_q.t().to(dtype=GPTQ_PRECISION)
        hessian = scaled.matmul(scaled.t())
        if fp_inp is None:
            return StatisticsIncrements(hessian, None, None, num_samples)
    x_q = x_q.to(dtype=GPTQ_PRECISION, copy=True)
    difference = None
    if fp_inp is not None:
        x_fp = _observations(fp_inp, device)[0].to(dtype=GPTQ_PRECISION)
        # doubling is exact in floating point: on tokens x features, not features^2
        difference = (x_fp - x_q).mul_(2.0)
    return StatisticsIncrements(hessian, x_q, difference, num_samples)


def add_upper_blocks(hessian: torch.Tensor, observations: torch.Tensor) -> None:
    """``hessian += 2 x^T x`` on the blocks on and above the diagonal only.

    H is symmetric: the strictly lower blocks are left alone (zero in the sums) and
    :func:`symmetrize_upper_blocks` fills them once at the end.
    """
    columns = observations.shape[1]
    for start in range(0, columns, HESSIAN_BLOCK_ROWS):
        stop = min(start + HESSIAN_BLOCK_ROWS, columns)
        hessian[start:stop, start:].addmm_(
            observations[:, start:stop].t(), observations[:, start:], alpha=2.0
        )


def symmetrize_upper_blocks(hessian: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from its upper triangle, in place.

    Block by block (:data:`HESSIAN_BLOCK_ROWS`): each strictly lower block is a
    transposed copy of its upper twin and each diagonal block mirrors its own upper
    triangle, so no full-size temporary is made (``triu(H) + triu(H, 1).T`` made three
    and took 0.65 s at 8192 columns on one core).
    """
    columns = hessian.shape[0]
    for start in range(0, columns, HESSIAN_BLOCK_ROWS):
        stop = min(start + HESSIAN_BLOCK_ROWS, columns)
        diagonal = hessian[start:stop, start:stop]
        diagonal.copy_(torch.triu(diagonal) + torch.triu(diagonal, 1).t())
        hessian[stop:, start:stop] = hessian[start:stop, stop:].t()
    return hessian


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
    #: H; while summing by upper blocks (``upper_blocks``) its strictly lower blocks are 0
    hessian: torch.Tensor
    asymmetry: torch.Tensor | None
    num_samples: torch.Tensor
    upper_blocks: bool = False

    @classmethod
    def zeros_like(cls, increments: StatisticsIncrements, members) -> "SharedSums":
        # [features, features] or [tokens, features]: the last size is the width either way
        source = increments.observations if increments.hessian is None else increments.hessian
        device, columns = source.device, source.shape[-1]
        hessian = torch.zeros((columns, columns), device=device, dtype=GPTQ_PRECISION)
        asymmetry = None if increments.difference is None else torch.zeros_like(hessian)
        return cls(list(members), hessian, asymmetry, torch.zeros((), device=device),
                   upper_blocks=increments.hessian is None)

    def copy_for(self, members) -> "SharedSums":
        asymmetry = None if self.asymmetry is None else self.asymmetry.clone()
        return SharedSums(list(members), self.hessian.clone(), asymmetry,
                          self.num_samples.clone(), self.upper_blocks)

    def add(self, increments: StatisticsIncrements, times: int) -> None:
        # one add per call, as upstream's hook does for a module called twice on a batch
        for _ in range(times):
            self.num_samples += increments.num_samples
            if self.upper_blocks:
                add_upper_blocks(self.hessian, increments.observations)
            else:
                self.hessian += increments.hessian
            if self.asymmetry is not None:
                self.asymmetry.addmm_(increments.difference.t(), increments.observations)

    def finished(self) -> "SharedSums":
        """The sums with H whole (its lower blocks filled by symmetry)."""
        if self.upper_blocks:
            self.hessian = symmetrize_upper_blocks(self.hessian)
            self.upper_blocks = False
        return self


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
    per-module accumulation gives (with ``exact_hessian``, upstream's H bit for bit).

    The pending input tensors are held until the flush, so their memory cannot be
    reused by a later batch at the same address.
    """

    def __init__(self, exact_hessian: bool = True):
        #: H's increments as upstream forms them (bit-identical sums); False sums only
        #: its upper blocks (:func:`add_upper_blocks`), about 40% fewer flops for H
        self.exact_hessian = exact_hessian
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
        increments = compute_increments(inp, fp_inp, device, self.exact_hessian)
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
        unique = [sums.finished()
                  for sums in {id(sums): sums for sums in self._sums.values()}.values()]
        self._sums.clear()
        return unique
