"""The compensation loop's Hessian factorization against float64 definitions and upstream."""

from __future__ import annotations

import pytest
import torch
from llmcompressor.modifiers.gptq.helpers import factorize_hessian

from rescomp_modifiers.linalg import inverse_hessian_factor, upper_triangular_inverse


def spd(n, seed, batch=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, n + 16, generator=g, dtype=dtype)
    return x @ x.transpose(1, 2) / n


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 97, 200, 333])
def test_triangular_inverse_is_the_inverse(n):
    """Sizes on both sides of the direct/recursive switch and of odd splits."""
    # a Cholesky factor: well conditioned, unlike a triangle of random entries
    upper = torch.linalg.cholesky(spd(n, seed=n, batch=2)).transpose(1, 2)
    inverse = upper_triangular_inverse(upper)
    identity = torch.eye(n, dtype=torch.float64).expand(2, n, n)
    torch.testing.assert_close(upper @ inverse, identity, rtol=0, atol=1e-10)
    assert torch.equal(inverse, inverse.triu())


@pytest.mark.parametrize("n", [16, 130])
def test_factor_inverts_the_damped_hessian(n):
    """U upper with positive diagonal and U^T U = (H + damp I)^-1, per batch item."""
    H = spd(n, seed=1, batch=3)
    percdamp = 0.05
    damped = H + percdamp * torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)[:, None, None] \
        * torch.eye(n, dtype=H.dtype)
    weights = torch.randn(3, 4, n, dtype=H.dtype)
    flags = torch.zeros(3, dtype=torch.bool)
    U = inverse_hessian_factor(weights, H.clone(), percdamp, flags)
    assert not flags.any()
    assert torch.equal(U, U.triu())
    assert (torch.diagonal(U, dim1=-2, dim2=-1) > 0).all()
    torch.testing.assert_close(U.transpose(1, 2) @ U, torch.linalg.inv(damped),
                               rtol=1e-9, atol=1e-9)


def test_factor_matches_upstream_float32():
    """Same U as llm-compressor's factorize_hessian, up to float32 rounding."""
    H = spd(256, seed=2, batch=2, dtype=torch.float32)
    ours = inverse_hessian_factor(torch.zeros(2, 3, 256), H.clone(), 0.01,
                                  torch.zeros(2, dtype=torch.bool))
    upstream = factorize_hessian(torch.zeros(2, 3, 256), H.clone(), 0.01,
                                 torch.zeros(2, dtype=torch.bool))
    assert (ours - upstream).abs().max() <= 1e-5 * upstream.abs().max()


def test_dead_columns_and_failed_items_follow_upstream():
    """Dead columns: diagonal 1, weights zeroed. A non-PD item: identity and flagged."""
    n = 40
    H = spd(n, seed=3, batch=2)
    H[0, 5, :] = 0
    H[0, :, 5] = 0  # column 5 of item 0 is dead
    H[1] = -torch.eye(n, dtype=H.dtype)  # item 1 cannot be factorized
    weights = torch.ones(2, 3, n, dtype=H.dtype)
    flags = torch.zeros(2, dtype=torch.bool)
    expected_weights = weights.clone()
    expected_flags = flags.clone()
    expected = factorize_hessian(expected_weights, H.clone(), 0.01, expected_flags)
    U = inverse_hessian_factor(weights, H.clone(), 0.01, flags)
    assert flags.tolist() == [False, True] == expected_flags.tolist()
    assert torch.equal(weights, expected_weights)
    assert (weights[0, :, 5] == 0).all() and (weights[0, :, 4] == 1).all()
    assert torch.equal(U[1], torch.eye(n, dtype=H.dtype))
    torch.testing.assert_close(U, expected, rtol=1e-9, atol=1e-9)
