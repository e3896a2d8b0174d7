"""The clipping search against oracles computed from activations (float64, by loops)."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs

from rescomp_modifiers.clipping import (
    ClippingObjective,
    clipping_errors,
    search_clipping,
    uncompensable_column_energy,
)

PERCDAMP = 0.01


def _activations(tokens: int, columns: int, seed: int) -> torch.Tensor:
    """Correlated inputs (a random mixing of independent ones), float64."""
    generator = torch.Generator().manual_seed(seed)
    independent = torch.randn(tokens, columns, generator=generator, dtype=torch.float64)
    mixing = torch.eye(columns, dtype=torch.float64) + 0.4 * torch.randn(
        columns, columns, generator=generator, dtype=torch.float64)
    return independent @ mixing


def _residual_energy(augmented: torch.Tensor, column: int, later: list[int]) -> float:
    """||x_c - X_later beta||^2 minimized over beta: what least squares on the later
    columns cannot remove of column ``column``."""
    target = augmented[:, column]
    if not later:
        return float(target @ target)
    basis = augmented[:, later]
    beta = torch.linalg.lstsq(basis, target.unsqueeze(1)).solution
    residual = target - (basis @ beta).squeeze(1)
    return float(residual @ residual)


@pytest.mark.parametrize("permuted", [False, True])
def test_uncompensable_energy_is_what_later_columns_cannot_explain(permuted):
    columns = 12
    X = _activations(200, columns, seed=1)
    X[:, 5] = 0  # a dead column
    H = X.T @ X
    diagonal = torch.diagonal(H).clone()
    diagonal[diagonal == 0] = 1
    damp = PERCDAMP * float(diagonal.mean())
    # the damped Hessian as activations: X stacked on sqrt(damp) I (and 1 for the dead
    # column, as the solver sets its diagonal)
    extra = torch.eye(columns, dtype=torch.float64) * damp ** 0.5
    extra[5, 5] = (1 + damp) ** 0.5
    augmented = torch.cat([X, extra])
    order = (torch.randperm(columns, generator=torch.Generator().manual_seed(3)) if permuted
             else torch.arange(columns))
    expected = torch.zeros(columns, dtype=torch.float64)
    for position, column in enumerate(order.tolist()):
        if column != 5:
            expected[column] = _residual_energy(augmented, column, order[position + 1:].tolist())
    energy = uncompensable_column_energy(H.unsqueeze(0), PERCDAMP,
                                         order.unsqueeze(0) if permuted else None)[0]
    torch.testing.assert_close(energy.double(), expected, rtol=1e-4, atol=1e-6)


def test_hessian_block_error_is_each_groups_own_output_error():
    rows, columns, group = 5, 16, 4
    X = _activations(100, columns, seed=2).float()
    H = (X.T @ X).unsqueeze(0)
    error = torch.randn(1, rows, columns)
    blocks = torch.stack([H[0, g:g + group, g:g + group] for g in range(0, columns, group)])
    values = clipping_errors(error, ClippingObjective.HESSIAN_BLOCK, group, blocks.unsqueeze(0))
    for row in range(rows):
        for index, start in enumerate(range(0, columns, group)):
            part = slice(start, start + group)
            output = X[:, part].double() @ error[0, row, part].double()
            assert values[0, row, index].item() == pytest.approx(float(output @ output), rel=1e-4)


def _fake_quantize(values, scale, zero_point, low, high):
    return (torch.clamp(torch.round(values / scale) + zero_point, low, high) - zero_point) * scale


@pytest.mark.parametrize("objective,strategy,symmetric", [
    ("hessian_block", "group", True), ("uncompensable", "group", True),
    ("uncompensable", "group", False), ("uncompensable", "channel", True),
])
def test_search_keeps_the_best_range_of_the_grid(objective, strategy, symmetric):
    """Brute force: every shrink factor, every row and group scored from activations by
    a loop; the search's range must be one whose score is the smallest."""
    rows, columns, group, bits = 6, 16, 8, 3
    X = _activations(120, columns, seed=4)
    H = X.T @ X
    W = torch.randn(1, rows, columns, generator=torch.Generator().manual_seed(5))
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy=strategy,
                            group_size=group if strategy == "group" else None)
    scale, zero_point = search_clipping(W, H.float().unsqueeze(0), args, objective, PERCDAMP)
    size = group if strategy == "group" else columns
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    energy = uncompensable_column_energy(H.unsqueeze(0), PERCDAMP)[0].double()
    grid = [1 - step / 20 for step in range(20)]

    def score(row, start, quantized):
        error = quantized - W[0, row, start:start + size].double()
        if objective == "hessian_block":
            output = X[:, start:start + size] @ error
            return float(output @ output)
        return float((error.square() * energy[start:start + size]).sum())

    for row in range(rows):
        for index, start in enumerate(range(0, columns, size)):
            values = W[0, row, start:start + size].double()
            scores = []
            for shrink in grid:
                lo, hi = min(float(values.min()), 0) * shrink, max(float(values.max()), 0) * shrink
                if symmetric:
                    s, z = max(abs(lo), abs(hi)) / ((high - low) / 2), 0.0
                else:
                    s = (hi - lo) / (high - low)
                    z = min(max(round(low - lo / s), low), high)
                scores.append(score(row, start, _fake_quantize(values, s, z, low, high)))
            chosen = _fake_quantize(values, float(scale[0, row, index]),
                                    float(zero_point[0, row, index]), low, high)
            assert score(row, start, chosen) <= min(scores) * (1 + 1e-4) + 1e-9, (row, index)


def test_unsupported_strategy_is_refused():
    args = QuantizationArgs(num_bits=4, strategy="channel")
    with pytest.raises(ValueError, match="hessian_block.*channel"):
        search_clipping(torch.randn(1, 4, 8), torch.eye(8).unsqueeze(0), args,
                        "hessian_block", PERCDAMP)
