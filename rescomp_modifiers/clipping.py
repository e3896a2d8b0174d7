"""Clipping ranges searched against the layer's output error, with the solver's own H.

llm-compressor's weight observers choose each group's range ``(p min, p max)`` by the
error of the weights themselves: ``memoryless_mse`` by ``sum |q - w|^norm``,
``imatrix_mse`` weighted by each input column's ``E[x^2]`` (the diagonal of ``H``). The
solver holds more than that: the whole ``H`` of the very tokens the layer is fitted to.
Two objectives use it, scored for the same shrink grid as upstream's observers (the
first best ``p`` is kept per row and group, ``e = Q(w0) - w0`` the group's error):

``hessian_block``
    ``e_g H_gg e_g^T``: the output error the group's rounding leaves on its own, cross
    terms between the group's columns included (AWQ's clip search scores the same
    with sampled activations). Group scales only: a per-channel "group" is the whole row
    and its block all of ``H``.

``uncompensable``
    ``sum_c e_c^2 / U_cc^2`` with ``U`` the upper Cholesky factor of ``Hd^-1`` (the
    solver's). GPTQ projects each column's rounding error onto the columns quantized
    after it; what it cannot remove is the part of ``x_c`` that those columns do not
    explain, whose energy is exactly ``1 / U_cc^2`` (the Schur complement of the later
    columns in ``Hd``, in the solver's column order, activation order included). So each
    column's error is weighted by what GPTQ will really pay for it, where ``imatrix``
    weighs it by ``H_cc``, which also counts the part GPTQ compensates. Every group and
    channel strategy.

``1 / U_cc^2`` needs no inverse: ``Hd = V V^T`` with ``V = U^-1`` upper triangular, and
``V`` is the reversed Cholesky factor of the reversed ``Hd``, so one Cholesky
factorization gives the whole diagonal (:func:`uncompensable_column_energy`).
"""

from __future__ import annotations

from enum import Enum

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy

from rescomp_modifiers.upstream import calculate_qparams, calculate_range

__all__ = ["ClippingObjective", "CLIPPING_STRATEGIES", "uncompensable_column_energy",
           "search_clipping", "clipping_errors"]


class ClippingObjective(str, Enum):
    #: the scheme's weight observer decides (min-max, MSE, imatrix_mse): upstream's ranges
    OBSERVER = "observer"
    #: ``e_g H_gg e_g^T`` per row and group
    HESSIAN_BLOCK = "hessian_block"
    #: ``sum_c e_c^2 / U_cc^2``: the error GPTQ's compensation cannot remove
    UNCOMPENSABLE = "uncompensable"


#: the strategies each searching objective supports (integer weights, no global scale)
CLIPPING_STRATEGIES = {
    ClippingObjective.HESSIAN_BLOCK: (QuantizationStrategy.GROUP,),
    ClippingObjective.UNCOMPENSABLE: (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL),
}

#: upstream's observer defaults (imatrix_mse and memoryless_mse): shrink factors
#: 1, 0.95, ..., 0.05 of the min-max range
GRID = 20
MAX_SHRINK = 0.95


def damped_hessians(hessians: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``H + lambda I`` as the solver damps it (llm-compressor's ``factorize_hessian``): a
    dead column (``H_cc == 0``) gets 1 on the diagonal before ``lambda = percdamp *
    mean(diag)`` is taken."""
    damped = hessians.to(torch.float32).clone()
    diagonal = torch.diagonal(damped, dim1=-2, dim2=-1)
    diagonal.masked_fill_(diagonal == 0, 1.0)
    diagonal.add_(percdamp * diagonal.mean(dim=-1, keepdim=True))
    return damped


def uncompensable_column_energy(hessians: torch.Tensor, percdamp: float,
                                perm: torch.Tensor | None = None) -> torch.Tensor:
    """``1 / U_cc^2`` per column, in the original column order, for columns processed in
    the order ``perm`` (None: natural order).

    :param hessians: ``[batch, columns, columns]``, normalized like the solver's
    :param perm: ``[batch, columns]`` processing order (activation ordering)
    :return: ``[batch, columns]``; a dead column's energy is 0 (the solver zeroes it)
    """
    damped = damped_hessians(hessians, percdamp)
    if perm is not None:
        damped = torch.gather(damped, 1, perm.unsqueeze(-1).expand_as(damped))
        damped = torch.gather(damped, 2, perm.unsqueeze(1).expand_as(damped))
    flipped = damped.flip(-1, -2)
    factor, info = torch.linalg.cholesky_ex(flipped)
    energy = torch.diagonal(factor, dim1=-2, dim2=-1).flip(-1).square()
    # an item whose factorization fails is rounded to nearest by the solver: plain
    # E[x^2] weights are as good as any there
    failed = info != 0
    if failed.any():
        energy[failed] = torch.diagonal(damped[failed], dim1=-2, dim2=-1)
    if perm is not None:
        energy = torch.empty_like(energy).scatter_(1, perm, energy)
    dead = torch.diagonal(hessians, dim1=-2, dim2=-1) == 0
    return energy.masked_fill(dead, 0.0)


def _grouped(tensor: torch.Tensor, group_size: int) -> torch.Tensor:
    batch, rows, columns = tensor.shape
    return tensor.reshape(batch, rows, columns // group_size, group_size)


def clipping_errors(error: torch.Tensor, objective: ClippingObjective, group_size: int,
                    weights: torch.Tensor) -> torch.Tensor:
    """Per row and group, the objective's value for the weight error ``error``
    (``Q - W``, ``[batch, rows, columns]``).

    :param weights: what the objective weighs with: the Hessian blocks
        ``[batch, groups, g, g]`` (``hessian_block``) or the column energies
        ``[batch, columns]`` (``uncompensable``)
    :return: ``[batch, rows, groups]``
    """
    grouped = _grouped(error, group_size)
    if objective == ClippingObjective.HESSIAN_BLOCK:
        projected = torch.einsum("brgi,bgij->brgj", grouped, weights)
        return (projected * grouped).sum(-1)
    if objective == ClippingObjective.UNCOMPENSABLE:
        energy = _grouped(weights.unsqueeze(1), group_size)
        return (grouped.square() * energy).sum(-1)
    raise ValueError(f"no clipping error for {objective}")


@torch.no_grad()
def search_clipping(weights: torch.Tensor, hessians: torch.Tensor, quant_args: QuantizationArgs,
                    objective: ClippingObjective, percdamp: float,
                    perm: torch.Tensor | None = None, grid: int = GRID,
                    max_shrink: float = MAX_SHRINK) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points per row and group, each group's range
    ``(p min, p max)`` chosen among ``p = 1, 1 - 1/grid, ..., 1 - int(max_shrink *
    grid)/grid`` by ``objective`` (the first best ``p`` wins ties).

    :param weights: ``[batch, rows, columns]``, the original weights
    :param hessians: ``[batch, columns, columns]``
    :param perm: the solver's processing order (``uncompensable`` only)
    :return: ``(scale, zero_point)``, ``[batch, rows, groups]`` (one group per row for
        the channel strategy), as compressed-tensors' observers shape them
    """
    objective = ClippingObjective(objective)
    if quant_args.strategy not in CLIPPING_STRATEGIES.get(objective, ()):
        raise ValueError(f"clipping {objective.value!r} does not support the "
                         f"{QuantizationStrategy(quant_args.strategy).value} strategy")
    weights = weights.to(torch.float32)
    batch, rows, columns = weights.shape
    group_size = (quant_args.group_size if quant_args.strategy == QuantizationStrategy.GROUP
                  else columns)
    if columns % group_size:
        raise ValueError(f"group size {group_size} does not divide the {columns} columns")
    if objective == ClippingObjective.HESSIAN_BLOCK:
        groups = columns // group_size
        blocks = hessians.to(torch.float32).reshape(batch, groups, group_size, groups,
                                                    group_size)
        weighting = torch.diagonal(blocks, dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()
    else:
        weighting = uncompensable_column_energy(hessians, percdamp, perm)

    grouped = _grouped(weights, group_size)
    q_min, q_max = (float(bound) for bound in calculate_range(quant_args, weights.device))
    scale = torch.empty(grouped.shape[:-1], dtype=torch.float32, device=weights.device)
    zero_point = None
    # a cache-sized chunk of rows at a time, every candidate range in turn: the chunk and
    # one reused buffer stay in cache through the whole grid (as mse_search.py does)
    chunk_rows = max(1, CHUNK_ELEMENTS // columns)
    for item in range(batch):
        for start in range(0, rows, chunk_rows):
            part = slice(start, min(rows, start + chunk_rows))
            values = grouped[item, part]
            item_weighting = weighting[item:item + 1]
            best = _search_chunk(values, item_weighting, objective, quant_args, q_min, q_max,
                                 grid, max_shrink)
            scale[item, part] = best[0]
            if zero_point is None:
                zero_point = torch.empty(grouped.shape[:-1], dtype=best[1].dtype,
                                         device=weights.device)
            zero_point[item, part] = best[1]
    return scale, zero_point


#: elements of a chunk of rows (1 MiB of float32; measured as mse_search.py's chunks)
CHUNK_ELEMENTS = 262144


def _search_chunk(values: torch.Tensor, weighting: torch.Tensor, objective, quant_args,
                  q_min: float, q_max: float, grid: int, max_shrink: float):
    """The best range of every group of ``values`` (``[rows, groups, g]``)."""
    low, high = values.amin(-1), values.amax(-1)
    buffer = torch.empty_like(values)
    best_error = best_scale = best_zero_point = None
    rows, groups, size = values.shape
    for step in range(int(max_shrink * grid) + 1):
        shrink = 1 - step / grid
        scale, zero_point = calculate_qparams(low * shrink, high * shrink, quant_args)
        # compressed-tensors' fake quantization, operation for operation, minus the weights
        zero = zero_point.to(torch.float32).unsqueeze(-1)
        torch.div(values, scale.unsqueeze(-1), out=buffer)
        buffer.add_(zero).clamp_(q_min, q_max).round_().sub_(zero).mul_(scale.unsqueeze(-1))
        buffer.sub_(values)
        error = clipping_errors(buffer.reshape(1, rows, groups * size), objective, size,
                                weighting)[0]
        if best_error is None:
            best_error, best_scale, best_zero_point = error, scale, zero_point
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero_point = torch.where(better, zero_point, best_zero_point)
    return best_scale, best_zero_point
