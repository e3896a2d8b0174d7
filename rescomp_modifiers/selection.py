"""Choosing each module's weights among candidate solves, on held-out calibration data.

The compensation terms help on some models and settings and hurt on others (GPTQ+CAE
and FOEM's released rule lose to GPTQ on some models; the papers' coefficient 1
diverges). A per-module choice makes "better than GPTQ" hold by construction where the
layer error says so: every candidate (the method itself, GPTQ, the method with other
coefficients, the least-squares re-solve) is solved on the fitting batches and judged by
the layer's output error against the full-precision model on batches held out from
that fit (:func:`~rescomp_modifiers.compensation.excess_output_error`); the winner is then
solved again on all batches. Judging on the fitting tokens themselves would favour the
candidate that fits them best, which is not the one that generalizes best.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rescomp_modifiers.compensation import (
    CompensationResult,
    CompensationTerms,
    compensate_weight,
    excess_output_error,
    least_squares_start,
    weights_times_asymmetry,
)

__all__ = ["Candidate", "Statistics", "Selection", "solve_candidate", "select_and_solve"]

#: the label of GPTQ's own candidate (the guard's reference)
GPTQ_LABEL = "GPTQ"


@dataclass(frozen=True)
class Candidate:
    """One way to solve a module."""

    label: str
    terms: CompensationTerms
    #: start the loop from the ridge least-squares weights ``W0 (H + D) Hd^-1``
    least_squares_start: bool = False


@dataclass
class Statistics:
    """Normalized H (and D) of a batch of solver items, ``[batch, columns, columns]``."""

    hessians: torch.Tensor
    asymmetry: torch.Tensor | None = None

    def item(self, index: int) -> "Statistics":
        return Statistics(self.hessians[index:index + 1],
                          None if self.asymmetry is None else self.asymmetry[index:index + 1])


@dataclass
class Selection:
    """The chosen weights of every item and why."""

    result: CompensationResult
    #: the winning candidate's label, per item
    winners: list[str]
    #: per item, the winner's held-out excess error over the unquantized weights
    #: divided by GPTQ's (1.0: as good as GPTQ, below 1: better); None without GPTQ
    relative_to_gptq: list[float | None]


def solve_candidate(candidate: Candidate, weights: torch.Tensor, statistics: Statistics,
                    scale: torch.Tensor, zero_point: torch.Tensor,
                    global_scale: torch.Tensor | None, quant_args, *, percdamp: float,
                    **solver_options) -> CompensationResult:
    """:func:`compensate_weight` for one candidate (weights are the originals W0)."""
    latent, original = weights, None
    if candidate.least_squares_start:
        if statistics.asymmetry is None:
            raise ValueError("the least-squares candidate needs the asymmetry statistics D")
        latent = least_squares_start(weights, statistics.hessians, statistics.asymmetry,
                                     percdamp).to(weights.dtype)
        original = weights
    return compensate_weight(
        latent, statistics.hessians, scale, zero_point, global_scale, quant_args,
        asymmetry=statistics.asymmetry, original_weights=original, terms=candidate.terms,
        percdamp=percdamp, **solver_options,
    )


def _concatenate(results: list[CompensationResult]) -> CompensationResult:
    return CompensationResult(
        **{name: torch.cat([getattr(r, name) for r in results])
           for name in ("quantized", "losses", "row_losses", "used_rtn_fallback", "scale",
                        "zero_point")}
    )


def select_and_solve(candidates: list[Candidate], weights: torch.Tensor, fit: Statistics,
                     judge: Statistics, refit: Statistics | None, scale: torch.Tensor,
                     zero_point: torch.Tensor, global_scale: torch.Tensor | None, quant_args,
                     *, percdamp: float, **solver_options) -> Selection:
    """Per batch item: solve every candidate on ``fit``, keep the one with the smallest
    layer output error on ``judge``, and solve it again on ``refit`` (None: keep the
    solve on ``fit``, e.g. when ``judge`` is ``fit`` itself).

    Ties go to the earlier candidate (list the method first, so the guard only replaces
    it where GPTQ is strictly better).
    """
    if not candidates:
        raise ValueError("select_and_solve needs at least one candidate")
    chosen, winners, relative = [], [], []
    for index in range(weights.shape[0]):
        item = slice(index, index + 1)
        qparams = (scale[item], zero_point[item],
                   None if global_scale is None else global_scale[item])
        options = dict(solver_options, percdamp=percdamp)
        item_fit, item_judge = fit.item(index), judge.item(index)
        errors, results = {}, {}
        # W0 D of the judging tokens: the same for every candidate
        shared = (None if item_judge.asymmetry is None else
                  weights_times_asymmetry(weights[item], item_judge.asymmetry))
        for candidate in candidates:
            result = solve_candidate(candidate, weights[item], item_fit, *qparams, quant_args,
                                     **options)
            errors[candidate.label] = float(excess_output_error(
                result.quantized, weights[item], item_judge.hessians,
                original_times_asymmetry=shared))
            results[candidate.label] = result
        winner = min(errors, key=errors.get)  # first of equal errors: dicts keep order
        # the errors are excesses over keeping W0 (which scores 0)
        gptq_excess = errors.get(GPTQ_LABEL, float("nan"))
        relative.append(errors[winner] / gptq_excess
                        if GPTQ_LABEL in errors and gptq_excess > 0 else None)
        winners.append(winner)
        if refit is None:
            chosen.append(results[winner])
        else:
            candidate = next(c for c in candidates if c.label == winner)
            chosen.append(solve_candidate(candidate, weights[item], refit.item(index),
                                          *qparams, quant_args, **options))
    return Selection(_concatenate(chosen), winners, relative)
