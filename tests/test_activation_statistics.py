"""H and D increments, and their reuse across modules that read the same input."""

import pytest
import torch
from llmcompressor.modifiers.gptq.helpers import accumulate_hessian

from rescomp_modifiers.activation_statistics import GroupedStatistics, compute_increments


def _inputs(seed=0, shape=(2, 5, 8)):
    generator = torch.Generator().manual_seed(seed)
    x_q = torch.randn(shape, generator=generator)
    return x_q, x_q + 0.1 * torch.randn(shape, generator=generator)


def test_increments_match_the_definitions_in_float64():
    x_q, x_fp = _inputs()
    got = compute_increments(x_q, x_fp, torch.device("cpu"))
    q, fp = x_q.reshape(-1, 8).double(), x_fp.reshape(-1, 8).double()
    torch.testing.assert_close(got.hessian.double(), 2 * q.T @ q, rtol=1e-5, atol=1e-5)
    asymmetry = got.difference.T @ got.observations  # D's increment, as the sums form it
    torch.testing.assert_close(asymmetry.double(), 2 * (fp - q).T @ q, rtol=1e-4, atol=1e-5)
    assert got.num_samples == 2


def test_hessian_increment_is_bit_identical_to_upstream():
    x_q, _ = _inputs(shape=(3, 7, 16))
    linear = torch.nn.Linear(16, 4)
    upstream, count = accumulate_hessian(x_q, linear, torch.zeros(16, 16), torch.zeros(()))
    ours = compute_increments(x_q, None, torch.device("cpu"))
    assert torch.equal(upstream, ours.hessian) and ours.num_samples == int(count) == 3


@pytest.mark.parametrize("stream", ["quantized", "full_precision"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations_reach_the_sums_the_solver_checks(stream, bad):
    x_q, x_fp = _inputs()
    (x_q if stream == "quantized" else x_fp)[1, 2, 3] = bad
    store = GroupedStatistics()
    store.add(torch.nn.Linear(8, 2), x_q, x_fp, torch.device("cpu"))
    (sums,) = store.pop_all()
    assert not (torch.isfinite(sums.hessian).all() and torch.isfinite(sums.asymmetry).all())


def test_asymmetry_is_formed_from_inputs_copied_at_the_hook():
    """D's product is deferred: an in-place change of the input afterwards must not
    reach it."""
    x_q, x_fp = _inputs()
    q, fp = x_q.reshape(-1, 8).double(), x_fp.reshape(-1, 8).double()
    expected = 2 * (fp - q).T @ q
    store = GroupedStatistics()
    store.add(torch.nn.Linear(8, 2), x_q, x_fp, torch.device("cpu"))
    x_q.mul_(3)
    x_fp.mul_(5)
    (sums,) = store.pop_all()
    torch.testing.assert_close(sums.asymmetry.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("exact_hessian", [True, False])
def test_grouped_statistics_equal_per_module_sums_and_share_only_common_inputs(
        monkeypatch, exact_hessian):
    """Oracle: upstream's own per-module accumulate_hessian (H: bit for bit when exact,
    else by upper blocks of 3 rows, so 8 features make a partial last block) and D
    summed per module from its definition, over batches in which groups form, split
    (another input, an in-place change) and a module reads its input twice."""
    import rescomp_modifiers.activation_statistics as statistics

    monkeypatch.setattr(statistics, "HESSIAN_BLOCK_ROWS", 3)

    computed = []
    monkeypatch.setattr(statistics, "compute_increments",
                        lambda *args: computed.append(args) or compute_increments(*args))
    cpu = torch.device("cpu")
    modules = {name: torch.nn.Linear(8, 3) for name in "abcdefg"}
    calls = []  # (module name, x_q, x_fp) in hook order

    def batch(seed, reads):
        x = {key: _inputs(seed * 10 + index) for index, key in enumerate("xyz")}
        for name, key in reads:
            if name == "mutate":
                x["x"][0].mul_(2)  # same memory, new version
                continue
            x_q, x_fp = x[key]
            calls.append((name, x_q.clone(), x_fp.clone()))
            store.add(modules[name], x_q, x_fp.detach(), cpu)  # the FP stash: fresh views

    store = statistics.GroupedStatistics(exact_hessian=exact_hessian)
    batch(1, [("a", "x"), ("b", "x"), ("c", "x"), ("d", "y"), ("f", "z"), ("g", "z")])
    batch(2, [("a", "x"), ("b", "x"), ("c", "y"), ("d", "z"), ("d", "z"),
              ("f", "z"), ("g", "z")])
    batch(3, [("a", "x"), ("mutate", None), ("b", "x"), ("c", "y"), ("e", "y"),
              ("f", "z"), ("g", "z")])
    assert len(computed) == 3 + 3 + 4  # once per distinct input (and version)

    groups = store.pop_all()
    names = {id(module): name for name, module in modules.items()}
    membership = sorted("".join(sorted(names[id(m)] for m in g.members)) for g in groups)
    assert membership == ["a", "b", "c", "d", "e", "fg"]
    for sums in groups:
        for module in sums.members:
            name = names[id(module)]
            hessian, count = torch.zeros(8, 8), torch.zeros(())
            asymmetry = torch.zeros(8, 8, dtype=torch.float64)
            for called, x_q, x_fp in calls:
                if called == name:
                    hessian, count = accumulate_hessian(x_q, module, hessian, count)
                    q, fp = x_q.reshape(-1, 8).double(), x_fp.reshape(-1, 8).double()
                    asymmetry += 2 * (fp - q).T @ q
            if exact_hessian:
                assert torch.equal(sums.hessian, hessian), name
            else:
                torch.testing.assert_close(sums.hessian, hessian, rtol=1e-5, atol=1e-5)
                assert torch.equal(sums.hessian, sums.hessian.t())
            assert sums.num_samples == count, name
            torch.testing.assert_close(sums.asymmetry.double(), asymmetry, rtol=1e-4, atol=1e-5)
    assert store.pop_all() == []


def test_grouped_statistics_without_the_fp_stream_hold_no_asymmetry():
    store = GroupedStatistics()
    x_q, _ = _inputs()
    store.add(torch.nn.Linear(8, 2), x_q, None, torch.device("cpu"))
    (sums,) = store.pop_all()
    assert sums.asymmetry is None and sums.num_samples == 2
