"""What the per-module contest judges candidates by, and the least-squares candidate's start.

Pure tensor code on the normalized statistics (``H``, ``D``; rescomp_modifiers/
compensation.py has the notation), used by :mod:`rescomp_modifiers.selection`.
"""

from __future__ import annotations

import torch

from rescomp_modifiers.upstream import GPTQ_PRECISION

__all__ = ["excess_output_error", "weights_times_asymmetry", "least_squares_start"]


@torch.no_grad()
def excess_output_error(quantized: torch.Tensor, original_weights: torch.Tensor,
                        hessians: torch.Tensor, asymmetry: torch.Tensor | None = None, *,
                        original_times_asymmetry: torch.Tensor | None = None) -> torch.Tensor:
    """Per batch item, how much ``Q`` raises the layer's output error over keeping ``W0``,
    from the statistics alone.

    With ``E = Q - W0`` and ``X_fp = X_q + Delta`` (``H = X_q X_q^T``, ``D = Delta X_q^T``
    in the statistics' normalization)::

        ||W0 X_fp - Q X_q||^2 - ||W0 X_fp - W0 X_q||^2 = tr(E H E^T) - 2 tr(W0 D E^T)

    Written in ``E`` rather than ``Q``, no large constant cancels (the error of a good
    ``Q`` is a small difference of the full ``tr(Q H Q^T)`` terms), ``W0`` scores exactly
    0, and ``W0 D`` is shared by every candidate: one ``[rows, columns] x [columns,
    columns]`` product per candidate instead of two. Negative where ``Q`` reproduces the
    full-precision output better than ``W0`` does (``D`` lets compensation do that).
    Without the full-precision stream (``asymmetry`` None) it is GPTQ's own objective
    ``||(Q - W0) X_q||^2``.

    :param quantized: ``Q``, ``[batch, rows, columns]``
    :param original_weights: ``W0``, same shape
    :param hessians: ``H`` of the tokens to judge on, ``[batch, columns, columns]``
    :param asymmetry: ``D`` of the same tokens, or None
    :param original_times_asymmetry: ``W0 D`` in float64 when already computed (one
        per batch item, shared by all candidates judged on the same tokens)
    :return: ``[batch]`` in float64
    """
    W0 = original_weights.to(torch.float64)
    E = quantized.to(torch.float64) - W0
    error = (torch.bmm(E, hessians.to(torch.float64)) * E).sum((1, 2))
    if original_times_asymmetry is None and asymmetry is not None:
        original_times_asymmetry = weights_times_asymmetry(W0, asymmetry)
    if original_times_asymmetry is not None:
        error = error - 2 * (original_times_asymmetry * E).sum((1, 2))
    return error


def weights_times_asymmetry(original_weights: torch.Tensor,
                            asymmetry: torch.Tensor) -> torch.Tensor:
    """``W0 D`` in float64, the candidate-independent part of :func:`excess_output_error`."""
    return torch.bmm(original_weights.to(torch.float64), asymmetry.to(torch.float64))


@torch.no_grad()
def least_squares_start(original_weights: torch.Tensor, hessians: torch.Tensor,
                        asymmetry: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """The ridge least-squares fit of the full-precision output from quantized inputs.

    ``W* = argmin_W ||W X_q - W0 X_fp||^2 + lambda ||W||^2 = W0 (H + D) Hd^-1
    = W0 + W0 (D - lambda I) Hd^-1`` with GPTQ's damping ``Hd = H + lambda I``,
    ``lambda = percdamp * mean(diag H)`` (Qronos, arXiv 2505.11695; LoaQ, arXiv
    2509.06297): the latent weights the GPTQ loop then starts from, so that its
    quantization error is measured against the weights that best reproduce ``W0 X_fp``
    rather than against ``W0``. Dead columns (``diag H == 0``) keep ``W0``'s zero.

    :return: ``W*``, ``[batch, rows, columns]`` in GPTQ's precision
    """
    W0 = original_weights.to(GPTQ_PRECISION)
    H = hessians.to(GPTQ_PRECISION)
    diagonal = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diagonal == 0
    damping = percdamp * diagonal.mean(-1, keepdim=True)
    damped = H.clone()
    torch.diagonal(damped, dim1=-2, dim2=-1).add_(damping)
    torch.diagonal(damped, dim1=-2, dim2=-1).masked_fill_(dead, 1.0)
    cross = H + asymmetry.to(GPTQ_PRECISION)
    # W* = W0 (H + D) Hd^-1, i.e. Hd W*^T = (H + D)^T W0^T (Hd is symmetric)
    factor = torch.linalg.cholesky(damped)
    start = torch.cholesky_solve(cross.transpose(1, 2) @ W0.transpose(1, 2), factor)
    return start.transpose(1, 2).masked_fill(dead.unsqueeze(1), 0.0)
