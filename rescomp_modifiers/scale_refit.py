"""Group scales re-fitted to the layer's output after the column loop.

The clipping range of every group is chosen before the loop (by the observer or
:mod:`rescomp_modifiers.clipping`), from the original weights. The loop then moves each
row's latent weights (that is what compensation does) and rounds them on the grid of
those scales. Once the integer codes ``C`` are fixed, the dequantized row is linear in
its group scales, ``q = s_g(i) C_i``, so the scales that minimize the layer's output
error for those codes have a closed form: a least-squares problem with one unknown per
group.

The objective is GPTQ's layer output error on the quantized stream's inputs
(``E = Q - W0``, ``H = X_q X_q^T`` normalized as the solver's)::

    f(s) = tr(E H E^T)
         = s^T A s - 2 b^T s + const          per row, with
    A_gh = sum_{i in g, j in h} C_i H_ij C_j
    b_g  = sum_{i in g} C_i (W0 H)_i

so ``s* = A^-1 b``. ``A`` is the Gram matrix of the row's group-masked codes under
``H``: ``G`` unknowns per row against thousands of calibration tokens, so the fit is well
determined. The codes, the zero points and so the checkpoint's integer weights stay as
the loop left them; only the scales (and the dequantized weights that read them) change.

The target is GPTQ's ``W0 X_q`` also after a GPTAQ or CAE loop, which fitted the
full-precision output ``W0 X_fp``: fitting that with a few scales per row (``b`` from
``W0 (H + D)``) lowered each layer's error on the calibration tokens and ruined the
model: on SmolLM2-135M at W3 g64 the recommended default's Brown perplexity went from
83.5 to 235 (docs/results/refit-smollm2.md). Our reading, not isolated: a regression of
``W0 X_fp`` on ``X_q`` shrinks its coefficients where the two streams decorrelate
(regression dilution), and the shrinkage compounds over the layers.

A row keeps its old scales where the refit would not lower ``f`` once the new scales are
rounded to the checkpoint's scale dtype, where any new scale is not positive and finite
or where ``A`` is singular. A group whose codes are all zero says nothing about its
scale and keeps it.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy

__all__ = ["REFIT_STRATEGIES", "check_refit_supported", "refit_scales"]

#: integer weights with a scale per row and group (or per row): the dequantized row is
#: linear in its own scales and in nothing else
REFIT_STRATEGIES = (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL)


def check_refit_supported(quant_args: QuantizationArgs) -> None:
    """Refuse a scheme whose scales the refit cannot change alone, or that has no
    stored scales to change (dynamic)."""
    strategy = QuantizationStrategy(quant_args.strategy)
    if quant_args.type != "int" or strategy not in REFIT_STRATEGIES:
        raise ValueError(
            f"refit_scales needs integer weights with group or channel scales; this "
            f"scheme has type {quant_args.type!r} and strategy {strategy.value!r}. Set "
            "refit_scales: false for it (float and block/tensor scales are shared "
            "across rows or sit on a non-uniform grid)."
        )
    if quant_args.dynamic:
        raise ValueError("refit_scales needs static weight scales; set refit_scales: false "
                         "for dynamic ones.")


@torch.no_grad()
def refit_scales(quantized: torch.Tensor, scale: torch.Tensor, original_weights: torch.Tensor,
                 hessians: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares group scales for the loop's codes, and the weights they give.

    :param quantized: the loop's fake-quantized weights ``Q``, ``[batch, rows, columns]``
    :param scale: the scales that quantize them, ``[batch, rows, groups]`` (groups
        contiguous in the original column order; 1 group: channel scales)
    :param original_weights: ``W0``, ``[batch, rows, columns]``
    :param hessians: ``H``, ``[batch, columns, columns]`` (normalized like the solver's)
    :return: ``(quantized, scale)`` in the input dtypes; rows that keep their scales are
        returned unchanged, bit for bit
    """
    batch, rows, columns = quantized.shape
    groups = scale.shape[-1]
    group_size = columns // groups
    new_quantized, new_scale = quantized.clone(), scale.clone()
    for item in range(batch):
        s = scale[item].to(torch.float64)  # [rows, groups]
        per_column = s.repeat_interleave(group_size, dim=1)
        codes = torch.round(quantized[item].to(torch.float64) / per_column)
        H = hessians[item].to(torch.float32)
        W0 = original_weights[item].to(torch.float32)
        target = (W0 @ H).to(torch.float64)
        codes32 = codes.to(torch.float32)
        grouped = codes.view(rows, groups, group_size)
        b = (grouped * target.view(rows, groups, group_size)).sum(-1)  # [rows, groups]
        gram = torch.empty(rows, groups, groups, dtype=torch.float64, device=quantized.device)
        blocks = H.view(groups, group_size, columns)
        for h in range(groups):
            # [rows, columns]: sum_{j in h} C_j H_ji, then summed over each group's i
            reach = codes32[:, h * group_size:(h + 1) * group_size] @ blocks[h]
            gram[:, :, h] = (grouped * reach.to(torch.float64).view(rows, groups,
                                                                     group_size)).sum(-1)
        gram = (gram + gram.transpose(1, 2)) / 2
        # a group whose codes are all 0 says nothing of its scale: it keeps the old one
        # (a unit diagonal, no coupling, right-hand side the old scale)
        silent = (grouped == 0).all(-1)  # [rows, groups]
        gram.masked_fill_(silent.unsqueeze(1) | silent.unsqueeze(2), 0.0)
        torch.diagonal(gram, dim1=1, dim2=2)[silent] = 1.0
        b = torch.where(silent, s, b)
        factor, info = torch.linalg.cholesky_ex(gram)
        solvable = info == 0
        fitted = torch.cholesky_solve(b.unsqueeze(-1), factor).squeeze(-1)
        fitted = fitted.to(scale.dtype).to(torch.float64)  # what the checkpoint stores

        def objective(candidate):  # s^T A s - 2 b^T s
            return ((gram @ candidate.unsqueeze(-1)).squeeze(-1) * candidate).sum(-1) \
                - 2 * (b * candidate).sum(-1)

        better = (solvable & torch.isfinite(fitted).all(-1) & (fitted > 0).all(-1)
                  & (objective(fitted) < objective(s)))
        if not better.any():
            continue
        new_scale[item, better] = fitted[better].to(scale.dtype)
        new_quantized[item, better] = (
            fitted[better].repeat_interleave(group_size, dim=1) * codes[better]
        ).to(quantized.dtype)
    return new_quantized, new_scale
