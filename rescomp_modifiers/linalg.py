"""The compensation loop's factorization of the Hessian, in about 60% of upstream's time.

The loop needs the upper triangular ``U`` with ``U^T U = (H + damp I)^-1``, which
llm-compressor's ``factorize_hessian`` obtains with three factorizations: a Cholesky of
``Hd``, ``cholesky_inverse`` and a Cholesky of the inverse (``4n^3/3`` flops, three
LAPACK passes). With the exchange matrix ``J`` (reversed order) there is a direct way:

    J Hd J = L L^T   (lower L)  =>  Hd = R R^T  with  R = J L J  upper triangular
    Hd^-1 = R^-T R^-1            =>  U = R^-1   (upper, positive diagonal)

and the Cholesky factor is unique, so this is upstream's ``U`` up to rounding (measured
relative difference ~5e-7 in float32). One Cholesky plus one triangular inverse; on one
CPU core for n = 2048: 150 ms against 250 ms. Plain GPTQ keeps upstream's own
factorization (its results must match upstream bit for bit).
"""

from __future__ import annotations

import torch

__all__ = ["inverse_hessian_factor", "upper_triangular_inverse"]

#: below this size the triangular inverse is one triangular solve against the identity;
#: above, it splits in two (measured on one CPU core: 64 is fastest, within 10% of 256)
_DIRECT_INVERSE_SIZE = 64


def upper_triangular_inverse(upper: torch.Tensor) -> torch.Tensor:
    """``upper^-1`` for (batched) upper triangular matrices, by recursive halving.

    ``[[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]]``: the work is matrix
    products, which run near the machine's peak, where a triangular solve against the
    identity costs three times the flops (and LAPACK's trtri is not exposed by torch).
    """
    n = upper.shape[-1]
    if n <= _DIRECT_INVERSE_SIZE:
        identity = torch.eye(n, dtype=upper.dtype, device=upper.device)
        return torch.linalg.solve_triangular(upper, identity.expand_as(upper), upper=True)
    half = max(n // 2 // 32 * 32, 1)  # aligned splits keep the products' shapes regular
    inverse = torch.zeros_like(upper)
    top = upper_triangular_inverse(upper[..., :half, :half])
    bottom = upper_triangular_inverse(upper[..., half:, half:])
    inverse[..., :half, :half] = top
    inverse[..., half:, half:] = bottom
    inverse[..., :half, half:] = -(top @ upper[..., :half, half:]) @ bottom
    return inverse


def inverse_hessian_factor(
    weights: torch.Tensor,
    hessians: torch.Tensor,
    percdamp: float,
    used_rtn_fallback: torch.Tensor,
) -> torch.Tensor:
    """``U`` with ``U^T U = (H + damp I)^-1`` per item, with upstream's conventions.

    The contract of llm-compressor's ``factorize_hessian``: ``damp = percdamp *
    mean(diag H)`` per item; dead columns (zero diagonal) get diagonal 1 and are zeroed
    in ``weights`` (in place); an item whose Cholesky fails gets the identity factor and
    its ``used_rtn_fallback`` flag set. ``hessians`` is consumed (modified in place).

    :param weights: ``[batch, rows, columns]``
    :param hessians: ``[batch, columns, columns]``
    """
    diagonal = torch.diagonal(hessians, dim1=-2, dim2=-1)
    dead = diagonal == 0
    if dead.any():
        diagonal.masked_fill_(dead, 1.0)
        weights.masked_fill_(dead.unsqueeze(1), 0)
    diagonal.add_(percdamp * diagonal.mean(dim=-1, keepdim=True))

    reversed_lower, info = torch.linalg.cholesky_ex(hessians.flip(-2, -1))
    factor = upper_triangular_inverse(reversed_lower.flip(-2, -1))
    failed = info != 0
    if failed.any():
        identity = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
        factor[failed] = identity
        used_rtn_fallback |= failed.to(used_rtn_fallback.device)
    return factor
