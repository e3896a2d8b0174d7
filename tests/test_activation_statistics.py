"""H and D increments, and their reuse across modules that read the same input."""

import pytest
import torch
from llmcompressor.modifiers.gptq.helpers import accumulate_hessian

from rescomp_modifiers.activation_statistics import SharedInputIncrements, compute_increments


def _inputs(seed=0, shape=(2, 5, 8)):
    generator = torch.Generator().manual_seed(seed)
    x_q = torch.randn(shape, generator=generator)
    return x_q, x_q + 0.1 * torch.randn(shape, generator=generator)


def test_increments_match_the_definitions_in_float64():
    x_q, x_fp = _inputs()
    got = compute_increments(x_q, x_fp, torch.device("cpu"))
    q, fp = x_q.reshape(-1, 8).double(), x_fp.reshape(-1, 8).double()
    torch.testing.assert_close(got.hessian.double(), 2 * q.T @ q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.asymmetry.double(), 2 * (fp - q).T @ q, rtol=1e-4, atol=1e-5)
    assert got.num_samples == 2


def test_hessian_increment_is_bit_identical_to_upstream():
    x_q, _ = _inputs(shape=(3, 7, 16))
    linear = torch.nn.Linear(16, 4)
    upstream, count = accumulate_hessian(x_q, linear, torch.zeros(16, 16), torch.zeros(()))
    ours = compute_increments(x_q, None, torch.device("cpu"))
    assert torch.equal(upstream, ours.hessian) and ours.num_samples == int(count) == 3


@pytest.mark.parametrize("stream", ["quantized", "full_precision"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations_are_refused(stream, bad):
    x_q, x_fp = _inputs()
    (x_q if stream == "quantized" else x_fp)[1, 2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf in the calibration activations"):
        compute_increments(x_q, x_fp, torch.device("cpu"))


def test_large_finite_activations_are_accepted():
    """Products whose sum overflows float32 are still finite entries: no error."""
    x_q, x_fp = _inputs()
    x_q, x_fp = 1e18 + x_q.abs() * 1e17, 1e18 + x_fp.abs() * 1e17  # entries ~2e37
    got = compute_increments(x_q, x_fp, torch.device("cpu"))
    assert not torch.isfinite(got.hessian.sum())  # the shortcut alone would refuse it
    assert torch.isfinite(got.hessian).all() and torch.isfinite(got.asymmetry).all()


def test_shared_input_is_computed_once_and_changed_input_again():
    shared = SharedInputIncrements()
    cpu = torch.device("cpu")
    x_q, x_fp = _inputs()
    first = shared.get(x_q, x_fp.detach(), cpu)
    # q/k/v: the same x_q object; the FP stash holds a fresh detach() view per module
    assert shared.get(x_q, x_fp.detach(), cpu) is first
    x_q.mul_(2)  # in place: same memory, new version, other values
    second = shared.get(x_q, x_fp, cpu)
    assert second is not first
    torch.testing.assert_close(second.hessian, 4 * first.hessian)
    other_q, other_fp = _inputs(seed=1)
    third = shared.get(other_q, other_fp, cpu)
    assert not torch.equal(third.hessian, second.hessian)
    assert shared.get(other_q, None, cpu) is not third  # H only: no D in the reused entry
    shared.clear()
    assert shared.get(other_q, other_fp, cpu) is not third
