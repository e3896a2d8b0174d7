"""What a compensation modifier gathers during calibration and hands to the solver.

Per module: the Hessian sums ``H``, the asymmetry sums ``D`` (with the full-precision
stream) and the sample count, shared by modules that read the same input
(:class:`~rescomp_modifiers.activation_statistics.GroupedStatistics`). With a guard or
coefficient candidates every ``holdout_every``-th batch of a module goes to a second set
of sums, used only to judge the candidates; :meth:`CalibrationStatistics.pop` hands the
solver the three views it needs: ``fit`` (what the candidates are solved on), ``judge``
(what they are scored on) and ``refit`` (fit plus held-out: the winner's final solve).

Which batches are held out follows the calibration order, so with oneshot's shuffling
(``shuffle_calibration_samples``, its default) that order must be the recipe's, not the
process's: llm-compressor's shuffling sampler draws its permutation from torch's default
CPU generator when the pipeline reads the dataloader, right after calibration starts.
:func:`seed_calibration_order` seeds that generator there with the modifier's
``shuffle_seed`` and :func:`restore_caller_generator` puts the caller's state back when
calibration ends, so the same recipe, model and data give the same checkpoint on every
run. Without shuffling the order is the dataset's, and the seed changes nothing.
"""

from __future__ import annotations

import torch
from loguru import logger

from rescomp_modifiers.activation_statistics import GroupedStatistics, SharedSums
from rescomp_modifiers.selection import Statistics
from rescomp_modifiers.upstream import accumulate_hessian, all_reduce_to, make_empty_hessian

__all__ = ["CalibrationStatistics", "seed_calibration_order", "restore_caller_generator"]

#: the session state's attribute that holds ``(caller's CPU generator state, seed)``
#: while a run's calibration order is seeded (a new oneshot starts with a new state)
_SEEDED_ORDER_ATTRIBUTE = "rescomp_seeded_calibration_order"


def seed_calibration_order(state, seed: int, owner: str) -> None:
    """Seed torch's default CPU generator for this calibration's order, once per
    calibration: modifiers calibrating together share one order, so their seeds must
    agree. The caller's generator state is kept on the session ``state``."""
    held = getattr(state, _SEEDED_ORDER_ATTRIBUTE, None)
    if held is not None:
        if held[1] != seed:
            raise ValueError(
                f"{owner}: shuffle_seed {seed} differs from the {held[1]} of another "
                "guarded modifier calibrating with it; they share one calibration order: "
                "set the same shuffle_seed on both.")
        return
    setattr(state, _SEEDED_ORDER_ATTRIBUTE, (torch.random.get_rng_state(), seed))
    torch.random.default_generator.manual_seed(seed)


def restore_caller_generator(state) -> None:
    """Put back the CPU generator state :func:`seed_calibration_order` found (no-op
    when nothing was seeded, or it is restored already)."""
    held = getattr(state, _SEEDED_ORDER_ATTRIBUTE, None)
    if held is not None:
        torch.random.set_rng_state(held[0])
        setattr(state, _SEEDED_ORDER_ATTRIBUTE, None)


class CalibrationStatistics:
    """The sums of one modifier, from the first calibration batch to the solve.

    :param holdout_every: hold out every k-th batch of each module (0: none)
    """

    def __init__(self, holdout_every: int = 0):
        self.holdout_every = holdout_every
        self._summing = GroupedStatistics()
        self._summing_held_out = GroupedStatistics()
        #: batches each module has read so far (which ones are held out)
        self._batches_read: dict[torch.nn.Module, int] = {}
        #: the collected sums per module (members of a group share one object), in the
        #: order upstream would solve them: modules summed by upstream's own Hessian
        #: first (they are entered as they are calibrated), then the grouped ones
        self._sums: dict[torch.nn.Module, SharedSums] = {}
        self._held_out: dict[torch.nn.Module, SharedSums] = {}

    @property
    def exact_hessian(self) -> bool:
        return self._summing.exact_hessian

    @exact_hessian.setter
    def exact_hessian(self, value: bool) -> None:
        """Sum H exactly as upstream (bit-identical) or by its upper blocks."""
        self._summing.exact_hessian = self._summing_held_out.exact_hessian = value

    def _next_batch_is_held_out(self, module: torch.nn.Module) -> bool:
        """Count the batch and say whether it is held out. Modules reading one input
        (q/k/v) count their batches alike, so they stay one group."""
        read = self._batches_read.get(module, 0)
        self._batches_read[module] = read + 1
        return self.holdout_every > 0 and read % self.holdout_every == self.holdout_every - 1

    def add(self, module: torch.nn.Module, inp: torch.Tensor, fp_inp: torch.Tensor | None,
            device: torch.device) -> None:
        """One batch of ``module``'s quantized-stream input (and its FP twin)."""
        held_out = self._next_batch_is_held_out(module)
        (self._summing_held_out if held_out else self._summing).add(module, inp, fp_inp,
                                                                    device)

    def add_unshared(self, module: torch.nn.Module, inp: torch.Tensor,
                     device: torch.device) -> None:
        """A module whose input is not a plain activation (Conv2d): upstream's own
        Hessian accumulation, no D, never held out."""
        sums = self._sums.get(module)
        if sums is None:
            sums = SharedSums([module], make_empty_hessian(module, device=device), None,
                              torch.zeros((), device=device))
            self._sums[module] = sums
        sums.hessian, sums.num_samples = accumulate_hessian(inp, module, sums.hessian,
                                                            sums.num_samples)

    def collect(self) -> None:
        """Finish the sums gathered so far (an epoch's end)."""
        for sums in self._summing.pop_all():
            for module in sums.members:
                self._sums[module] = sums
        for sums in self._summing_held_out.pop_all():
            for module in sums.members:
                self._held_out[module] = sums

    def modules(self) -> list[torch.nn.Module]:
        """The modules whose sums wait for their solve."""
        return list(self._sums)

    def groups(self, modules) -> list[list[torch.nn.Module]]:
        """``modules`` grouped by the sums they share (q/k/v, gate/up)."""
        by_sums: dict[int, list[torch.nn.Module]] = {}
        for module in modules:
            by_sums.setdefault(id(self._sums[module]), []).append(module)
        return list(by_sums.values())

    def width(self, module: torch.nn.Module) -> int:
        return self._sums[module].hessian.shape[0]

    def forget(self, modules) -> None:
        for module in modules:
            self._sums.pop(module, None)
            self._held_out.pop(module, None)

    def pop(self, units, selects: bool, label: str
            ) -> tuple[Statistics, Statistics, Statistics | None]:
        """Each unit's normalized statistics, stacked, as ``(fit, judge, refit)``.
        Without held-out batches (or without a selection) all three are the fit sums
        (refit None: nothing to redo). The units' sums are forgotten."""
        fit_sums, held_out_sums = [], []
        for unit in units:
            sums = self._sums[unit[0]]
            fit_sums.append((sums.hessian, sums.asymmetry, sums.num_samples))
            held_out = {id(self._held_out.get(module)) for module in unit}
            held_out_sums.append(self._held_out.get(unit[0]) if len(held_out) == 1 else None)
            self.forget(unit)
        fit = _stacked(fit_sums)
        if not selects or any(sums is None for sums in held_out_sums):
            if selects and self.holdout_every:
                logger.warning(
                    f"{label}: no held-out batches for some modules (fewer than "
                    f"{self.holdout_every} calibration batches?); judging the candidates on "
                    "the fitting tokens")
            return fit, fit, None
        judge = _stacked([(s.hessian, s.asymmetry, s.num_samples) for s in held_out_sums])
        refit = _stacked([
            (h + held.hessian.to(h.device),
             None if d is None else d + held.asymmetry.to(d.device),
             n + held.num_samples.to(n.device))
            for (h, d, n), held in zip(fit_sums, held_out_sums)
        ])
        return fit, judge, refit

    def reduce_to_ranks(self, groups, group_to_rank, rank: int) -> None:
        """Sum every group's H, count and D (held-out ones too) over the ranks onto the
        rank that solves the group; the other ranks forget the group."""
        tensors = {}
        for group in groups:
            parts = [self._sums[group[0]]]
            if group[0] in self._held_out:
                parts.append(self._held_out[group[0]])
            tensors[group] = [t for sums in parts
                              for t in (sums.hessian, sums.num_samples, sums.asymmetry)
                              if t is not None]
        all_reduce_to(tensors, group_to_rank)
        for group in groups:
            if rank != group_to_rank[group]:
                self.forget(group)


def _stacked(parts) -> Statistics:
    hessians = [h / n.to(h.device) for h, _, n in parts]
    asymmetry = [d / n.to(d.device) for _, d, n in parts if d is not None]
    if len(asymmetry) not in (0, len(parts)):
        raise RuntimeError("some modules of one solver batch lack the asymmetry D")
    return Statistics(torch.stack(hessians),
                      torch.stack(asymmetry).to(hessians[0].device) if asymmetry else None)
