"""Solver units: the modules solved together, and one solver call over a batch of them.

A unit is a module, or the modules that share one set of statistics (q/k/v, gate/up)
when their rows can be quantized independently: GPTQ's update of a row depends only on
that row, H and D, so they are solved as one row-stacked weight. Units of the same shape
go to the solver as one batch, as upstream batches same-shape modules.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from compressed_tensors.quantization import QuantizationStrategy

from rescomp_modifiers.clipping import ClippingObjective, search_clipping
from rescomp_modifiers.compensation import CompensationResult
from rescomp_modifiers.scale_refit import refit_scales
from rescomp_modifiers.selection import (
    Candidate,
    Selection,
    Statistics,
    select_and_solve,
    solve_candidate,
)
from rescomp_modifiers.upstream import GPTQ_PRECISION, assign_batches, getattr_chain

__all__ = ["row_stackable", "plan_batches", "SolvedUnits", "solve_units"]


def row_stackable(modules: list[torch.nn.Module]) -> bool:
    """Whether solving ``modules`` (sharing H and D) as one row-stacked weight equals
    solving each alone: per-row scales (channel or group strategy, no module-wide
    global scale) and the same quantization arguments, weight dtype and device."""
    first = modules[0]
    quant_args = getattr_chain(first, "quantization_scheme.weights")
    if quant_args.strategy not in (QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP):
        return False
    return all(
        getattr_chain(module, "quantization_scheme.weights") == quant_args
        and getattr(module, "weight_global_scale", None) is None
        and module.weight.dim() == 2
        and module.weight.dtype == first.weight.dtype
        and module.weight.device == first.weight.device
        for module in modules
    )


def plan_batches(groups: list[list[torch.nn.Module]], batched_quantization,
                 block_size: int) -> list[list[list[torch.nn.Module]]]:
    """Solver batches of units: each row-stackable group alone, the other modules in
    upstream's batches of same-shape modules."""
    stacked, singles = [], []
    for members in groups:
        if len(members) > 1 and row_stackable(members):
            stacked.append([members])
        else:
            singles.extend(members)
    return stacked + [[[module] for module in batch]
                      for batch in assign_batches(singles, batched_quantization, block_size)]


@dataclass
class SolvedUnits:
    modules: list[torch.nn.Module]
    result: CompensationResult
    #: the winners, where candidates competed
    selection: Selection | None
    global_scales: torch.Tensor | None
    #: rows of each module, per unit (to split a stacked item back into its modules)
    rows: list[list[int]]

    def per_module(self, stacked: torch.Tensor) -> list[torch.Tensor]:
        # a one-module item may hold a tensor-wide scale: only stacks are split
        return [part for item, item_rows in zip(stacked, self.rows)
                for part in (item.split(item_rows) if len(item_rows) > 1 else [item])]


def _searched_ranges(weights, fit: Statistics, quant_args, clipping, percdamp, scales,
                     zero_points):
    """The clipping search's scales and zero points in place of the observer's, on the
    fitting statistics, in the solver's column order (activation ordering)."""
    perm = None
    if quant_args.actorder:  # the order upstream's apply_activation_ordering takes
        perm = torch.argsort(torch.diagonal(fit.hessians, dim1=-2, dim2=-1), dim=-1,
                             descending=True)
    scale, zero_point = search_clipping(weights, fit.hessians, quant_args, clipping, percdamp,
                                        perm)
    return (scale.to(scales.dtype).reshape(scales.shape),
            zero_point.to(zero_points.dtype).reshape(zero_points.shape))


def solve_units(units: list[list[torch.nn.Module]], statistics, candidates: list[Candidate],
                selects: bool, *, clipping: ClippingObjective, percdamp: float,
                block_size: int, row_stride: int, refits_scales: bool = False) -> SolvedUnits:
    """One solver call: each unit's modules stacked by rows into one batch item, with the
    observers' qparams (or the clipping search's), solved as ``candidates[0]`` or, when
    ``selects``, by the contest of all ``candidates``.

    :param statistics: ``(fit, judge, refit)`` of the units, stacked
    :param refits_scales: re-fit the group scales to the winner's codes on all the
        calibration tokens (:mod:`rescomp_modifiers.scale_refit`)
    """
    fit, judge, refit = statistics
    modules = [module for unit in units for module in unit]
    quant_args = getattr_chain(modules[0], "quantization_scheme.weights")
    qparams = {module: module.weight_observer.get_qparams() for module in modules}
    weights = torch.stack(
        [torch.cat([module.weight for module in unit]) for unit in units]
    ).to(dtype=GPTQ_PRECISION)
    scales, zero_points = (
        torch.stack([torch.cat([qparams[m][key] for m in unit]) for unit in units])
        for key in ("scale", "zero_point")
    )
    # a global scale is per module: units of one module only (row_stackable)
    global_scales = (
        torch.stack([qparams[m]["global_scale"].reshape(-1)[0] for m in modules])
        if qparams[modules[0]]["global_scale"] is not None
        else None
    )
    if clipping != ClippingObjective.OBSERVER:
        scales, zero_points = _searched_ranges(weights, fit, quant_args, clipping, percdamp,
                                               scales, zero_points)
    options = dict(blocksize=block_size, percdamp=percdamp)
    selection = None
    if selects:
        selection = select_and_solve(candidates, weights, fit, judge, refit, scales,
                                     zero_points, global_scales, quant_args,
                                     row_stride=row_stride, **options)
        result = selection.result
    else:
        result = solve_candidate(candidates[0], weights, fit, scales, zero_points,
                                 global_scales, quant_args, **options)
    if refits_scales:
        final = refit if refit is not None else fit
        quantized, scale = refit_scales(result.quantized, result.scale, weights,
                                        final.hessians)
        result = replace(result, quantized=quantized, scale=scale)
    rows = [[module.weight.shape[0] for module in unit] for unit in units]
    return SolvedUnits(modules, result, selection, global_scales, rows)
