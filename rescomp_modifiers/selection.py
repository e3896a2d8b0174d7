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

The contest can run on a sample of the rows (every ``row_stride``-th): the column loop
updates each row from that row, H and D alone, so a candidate's solve of the sampled rows
is exactly those rows of its full solve, and the judge's error is a sum over rows. The
sample estimates which candidate has the smaller error; only the winner is solved on
every row. For the same reason GPTQ's candidate needs no loop of its own: its rows are
stacked under the method's and solved in the method's loop with every coefficient 0
there (``rows_with_terms``), which is GPTQ's update exactly. The column loop's cost is
mostly per column, not per row, so the pair costs about one solve.

Sampling and stacking rows need each row's own scales. Every strategy the solver takes
has them per row or tensor-wide except ``block`` (a scale per ``rows x columns`` tile,
e.g. upstream's ``FP8_BLOCK``): the contest sees a block scale repeated on each row of
its block, as blocks one row tall (:func:`_per_row_view`), which quantizes every row
with the very scale the full solve gives it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from compressed_tensors.quantization import QuantizationStrategy
from loguru import logger

from rescomp_modifiers.compensation import (
    CompensationResult,
    CompensationTerms,
    compensate_weight,
)
from rescomp_modifiers.objectives import (
    excess_output_error,
    least_squares_start,
    weights_times_asymmetry,
)

__all__ = ["Candidate", "Statistics", "Selection", "SelectionLog", "build_candidates",
           "solve_candidate", "select_and_solve"]

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
    #: per item, the winner's held-out output error (its excess over the unquantized
    #: weights' own error) as a fraction of GPTQ's (1.0: as good as GPTQ, below 1:
    #: better); None without GPTQ or where GPTQ's excess is not positive
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


def _per_row_view(qparams: tuple, quant_args, rows: int) -> tuple[tuple, object]:
    """``qparams`` (scale, zero point, global scale of one item) with a scale per row,
    and the quantization arguments that read them so.

    Block scales ``[1, ceil(rows / block_rows), column blocks]`` become
    ``[1, rows, column blocks]``, each block's scale on every row of the block, read as
    blocks of ``1 x block_columns``: row ``r`` keeps block ``r // block_rows``'s scale,
    whichever rows are sampled or stacked. Other strategies are per row (channel, group,
    tensor group) or tensor-wide (tensor, global scales) already and stay as they are.
    """
    if quant_args.strategy != QuantizationStrategy.BLOCK:
        return qparams, quant_args
    block_rows, block_columns = quant_args.block_structure
    scale, zero_point, global_scale = qparams

    def rows_of(tensor):
        return None if tensor is None else tensor.repeat_interleave(block_rows, dim=1)[:, :rows]

    return ((rows_of(scale), rows_of(zero_point), global_scale),
            quant_args.model_copy(update={"block_structure": [1, block_columns]}))


def _per_row(tensor: torch.Tensor | None, rows: int) -> bool:
    """A ``[1, rows, ...]`` tensor (weights, row losses, per-row scales), not a
    tensor-wide scale."""
    return tensor is not None and tensor.dim() > 1 and tensor.shape[1] == rows


def _sample_rows(tensor: torch.Tensor | None, rows: int, stride: int) -> torch.Tensor | None:
    """Every ``stride``-th row of a per-row tensor; anything else is left whole."""
    return tensor[:, ::stride] if _per_row(tensor, rows) else tensor


def _stack_twice(tensor: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    return torch.cat((tensor, tensor), dim=1) if _per_row(tensor, rows) else tensor


def _split_rows(result: CompensationResult, rows: int) -> tuple[CompensationResult, ...]:
    """The two halves of a solve of rows stacked twice (:func:`_stack_twice`)."""
    halves = ({}, {})
    for name in ("quantized", "row_losses", "scale", "zero_point"):
        tensor = getattr(result, name)
        parts = tensor.split(rows, dim=1) if _per_row(tensor, 2 * rows) else (tensor, tensor)
        for half, part in zip(halves, parts):
            half[name] = part
    return tuple(CompensationResult(losses=half["row_losses"].sum(dim=1),
                                    used_rtn_fallback=result.used_rtn_fallback, **half)
                 for half in halves)


def _is_gptq(candidate: Candidate) -> bool:
    return (candidate.label == GPTQ_LABEL and not candidate.least_squares_start
            and candidate.terms.is_plain_gptq(has_asymmetry=True))


def _solve_contest(candidates: list[Candidate], weights: torch.Tensor, statistics: Statistics,
                   qparams: tuple, quant_args, **options) -> dict[str, CompensationResult]:
    """Every candidate's solve of one item; GPTQ's rows ride in the first W0-started
    candidate's loop (module docstring)."""
    results = {}
    gptq = next((c for c in candidates if _is_gptq(c)), None)
    partner = gptq and next((c for c in candidates if c is not gptq
                             and not c.least_squares_start
                             and c.terms.group_scales == gptq.terms.group_scales), None)
    if partner:
        rows = weights.shape[1]
        method_rows = torch.arange(2 * rows, device=weights.device) < rows
        both = solve_candidate(partner, _stack_twice(weights, rows), statistics,
                               *(_stack_twice(tensor, rows) for tensor in qparams),
                               quant_args, rows_with_terms=method_rows, **options)
        results[partner.label], results[gptq.label] = _split_rows(both, rows)
    for candidate in candidates:
        if candidate.label not in results:
            results[candidate.label] = solve_candidate(candidate, weights, statistics,
                                                       *qparams, quant_args, **options)
    return {candidate.label: results[candidate.label] for candidate in candidates}


def _concatenate(results: list[CompensationResult]) -> CompensationResult:
    return CompensationResult(
        **{name: torch.cat([getattr(r, name) for r in results])
           for name in ("quantized", "losses", "row_losses", "used_rtn_fallback", "scale",
                        "zero_point")}
    )


def select_and_solve(candidates: list[Candidate], weights: torch.Tensor, fit: Statistics,
                     judge: Statistics, refit: Statistics | None, scale: torch.Tensor,
                     zero_point: torch.Tensor, global_scale: torch.Tensor | None, quant_args,
                     *, percdamp: float, row_stride: int = 1, **solver_options) -> Selection:
    """Per batch item: solve every candidate on ``fit``, keep the one with the smallest
    layer output error on ``judge``, and solve it again on ``refit`` (None: keep the
    solve on ``fit``, e.g. when ``judge`` is ``fit`` itself).

    :param row_stride: solve and judge the candidates on every ``row_stride``-th row
        only (1: all rows); the winner is then always solved again on all rows, on
        ``refit`` (or ``fit`` when ``refit`` is None)

    Ties go to the earlier candidate (list the method first, so the guard only replaces
    it where GPTQ is strictly better).
    """
    if not candidates:
        raise ValueError("select_and_solve needs at least one candidate")
    if row_stride < 1:
        raise ValueError(f"row_stride must be >= 1, got {row_stride}")
    chosen, winners, relative = [], [], []
    rows = weights.shape[1]
    for index in range(weights.shape[0]):
        item = slice(index, index + 1)
        qparams = (scale[item], zero_point[item],
                   None if global_scale is None else global_scale[item])
        options = dict(solver_options, percdamp=percdamp)
        item_fit, item_judge = fit.item(index), judge.item(index)
        contest_weights = _sample_rows(weights[item], rows, row_stride)
        row_qparams, contest_args = _per_row_view(qparams, quant_args, rows)
        contest_qparams = tuple(_sample_rows(tensor, rows, row_stride) for tensor in row_qparams)
        results = _solve_contest(candidates, contest_weights, item_fit, contest_qparams,
                                 contest_args, **options)
        # W0 D of the judging tokens: the same for every candidate
        shared = (None if item_judge.asymmetry is None else
                  weights_times_asymmetry(contest_weights, item_judge.asymmetry))
        errors = {label: float(excess_output_error(result.quantized, contest_weights,
                                                   item_judge.hessians,
                                                   original_times_asymmetry=shared))
                  for label, result in results.items()}
        winner = min(errors, key=errors.get)  # first of equal errors: dicts keep order
        # the errors are excesses over keeping W0 (which scores 0)
        gptq_excess = errors.get(GPTQ_LABEL, float("nan"))
        # a ratio of excesses only reads as "x% of GPTQ's error" when both are positive
        relative.append(errors[winner] / gptq_excess
                        if GPTQ_LABEL in errors and gptq_excess > 0 and errors[winner] >= 0
                        else None)
        winners.append(winner)
        if refit is None and row_stride == 1:
            # the contest's solve of every row is the result; its scales go back to
            # the observer's layout (a block's static scale is never changed)
            chosen.append(results[winner] if contest_args is quant_args else
                          replace(results[winner], scale=qparams[0], zero_point=qparams[1]))
        else:
            candidate = next(c for c in candidates if c.label == winner)
            final = fit if refit is None else refit
            chosen.append(solve_candidate(candidate, weights[item], final.item(index),
                                          *qparams, quant_args, **options))
    return Selection(_concatenate(chosen), winners, relative)


def build_candidates(label: str, terms: CompensationTerms, variants: dict[str, CompensationTerms],
                     guard: bool, least_squares: bool) -> list[Candidate]:
    """The method first (it keeps ties), then its coefficient ``variants`` (label ->
    terms), GPTQ (with ``guard``) and the least-squares re-solve, as configured; no two
    with the same terms."""
    candidates = [Candidate(label, terms)]
    candidates += [Candidate(variant, variant_terms)
                   for variant, variant_terms in variants.items()]
    if guard:
        candidates.append(Candidate(GPTQ_LABEL, CompensationTerms()))
    if least_squares:
        candidates.append(Candidate("least-squares", CompensationTerms(),
                                    least_squares_start=True))
    unique, seen = [], set()
    for candidate in candidates:
        key = (candidate.terms, candidate.least_squares_start)
        if key not in seen:
            seen.add(key)
            unique.append(candidate)
    return unique


class SelectionLog:
    """Which candidate won for each solved unit, logged as it happens and summed up per
    layer type at the end."""

    def __init__(self, label: str):
        self.label = label
        #: per solved unit: (module names, winning candidate, error relative to GPTQ's)
        self.entries: list[tuple[str, str, float | None]] = []

    def record(self, names: list[str], selection: Selection) -> None:
        for name, winner, relative in zip(names, selection.winners,
                                          selection.relative_to_gptq):
            self.entries.append((name, winner, relative))
            versus = ("" if relative is None else
                      f" (held-out output error {100 * relative:.1f}% of GPTQ's)")
            logger.info(f"{self.label} candidates for {name}: {winner}{versus}")

    def summary(self) -> dict[str, dict[str, int]]:
        """How often each candidate won, per layer type (the module names without
        their layer index, e.g. ``self_attn.q_proj + ...``)."""
        summary: dict[str, dict[str, int]] = {}
        for name, winner, _ in self.entries:
            kind = " + ".join(part.rsplit(".layers.", 1)[-1].split(".", 1)[-1]
                              for part in name.split(" + "))
            counts = summary.setdefault(kind, {})
            counts[winner] = counts.get(winner, 0) + 1
        return summary

    def log_summary(self) -> None:
        summary = self.summary()
        if not summary:
            return
        lines = [f"  {kind}: " + ", ".join(f"{winner} {count}" for winner, count in
                                           sorted(counts.items(), key=lambda kv: -kv[1]))
                 for kind, counts in summary.items()]
        logger.info(f"{self.label}: candidate chosen per layer type (modules):\n"
                    + "\n".join(lines))
