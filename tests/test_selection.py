"""Per-module candidate selection (guard, coefficient search, least-squares re-solve),
each piece against an independent oracle computed from explicit activations."""

from dataclasses import replace

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.utils import calculate_qparams

import rescomp_modifiers.compensation as compensation
from rescomp_modifiers import CAEModifier, FOEMModifier, GPTAQModifier
from rescomp_modifiers.compensation import (
    CompensationTerms,
    GroupScales,
    compensate_weight,
)
from rescomp_modifiers.objectives import excess_output_error, least_squares_start
from rescomp_modifiers.selection import (
    GPTQ_LABEL,
    Candidate,
    Statistics,
    select_and_solve,
    solve_candidate,
)

from helpers import GROUP32, IGNORE, calibration_dataset, run_oneshot, targeted_linear_names

ARGS = QuantizationArgs(num_bits=3, type="int", symmetric=True, strategy="group", group_size=8)


def activations(rows=12, columns=16, tokens=400, drift=0.3, seed=0, sign=1.0):
    """W0, X_q and X_fp (``[columns, tokens]``) with the statistics as the pipeline
    normalizes them (2/N, N = number of sequences; here every token is one). The
    full-precision inputs differ from the quantized ones by a fixed linear distortion
    of them (as upstream quantization error is), scaled by ``sign * drift``."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator, dtype=torch.float64)
    x_q = mixing @ torch.randn(columns, tokens, generator=generator, dtype=torch.float64)
    distortion = torch.randn(columns, columns, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(100)) / columns ** 0.5
    x_fp = x_q + sign * drift * distortion @ x_q
    w0 = torch.randn(rows, columns, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(200))
    return w0, x_q, x_fp


def statistics_of(x_q, x_fp):
    tokens = x_q.shape[1]
    hessian = 2 / tokens * x_q @ x_q.T
    asymmetry = 2 / tokens * (x_fp - x_q) @ x_q.T
    return Statistics(hessian[None].float(), asymmetry[None].float())


def qparams(w0):
    groups = w0.float().reshape(w0.shape[0], -1, ARGS.group_size)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), ARGS)
    return scale[None], zero_point[None]


def test_excess_output_error_equals_the_error_computed_from_activations():
    w0, x_q, x_fp = activations()
    stats = statistics_of(x_q, x_fp)
    tokens = x_q.shape[1]
    generator = torch.Generator().manual_seed(1)
    candidates = [w0 + 0.1 * torch.randn(w0.shape, generator=generator, dtype=torch.float64)
                  for _ in range(3)]

    def from_activations(q):
        return 2 / tokens * float((w0 @ x_fp - q @ x_q).square().sum())

    # the increase over keeping W0, computed directly from the activations
    truth = [from_activations(q) - from_activations(w0) for q in candidates]
    from_statistics = [float(excess_output_error(q[None], w0[None], stats.hessians,
                                                 stats.asymmetry)) for q in candidates]
    assert from_statistics == pytest.approx(truth, rel=1e-5)
    shared = torch.bmm(w0[None], stats.asymmetry.double())
    assert [float(excess_output_error(q[None], w0[None], stats.hessians,
                                      original_times_asymmetry=shared))
            for q in candidates] == pytest.approx(truth, rel=1e-5)
    assert float(excess_output_error(w0[None], w0[None], stats.hessians, stats.asymmetry)) == 0
    # and without D, GPTQ's own objective ||(W0 - Q) X_q||^2
    plain = [float(excess_output_error(q[None], w0[None], stats.hessians)) for q in candidates]
    assert plain == pytest.approx([2 / tokens * float(((w0 - q) @ x_q).square().sum())
                                   for q in candidates], rel=1e-5)


def test_least_squares_start_equals_a_brute_force_ridge_solve():
    w0, x_q, x_fp = activations(drift=0.5)
    stats = statistics_of(x_q, x_fp)
    percdamp = 0.05
    start = least_squares_start(w0[None].float(), stats.hessians, stats.asymmetry, percdamp)
    # ridge: min ||W X_q - W0 X_fp||^2 * 2/N + lambda ||W||^2, by lstsq on the stacked system
    tokens, columns = x_q.shape[1], x_q.shape[0]
    hessian = 2 / tokens * x_q @ x_q.T
    damping = percdamp * torch.diagonal(hessian).mean()
    design = torch.cat([(2 / tokens) ** 0.5 * x_q.T, damping.sqrt() * torch.eye(columns,
                                                                             dtype=torch.float64)])
    target = torch.cat([(2 / tokens) ** 0.5 * (w0 @ x_fp).T,
                        torch.zeros(columns, w0.shape[0], dtype=torch.float64)])
    ridge = torch.linalg.lstsq(design, target).solution.T
    torch.testing.assert_close(start[0].double(), ridge, rtol=1e-4, atol=1e-4)
    # it fits the full-precision output better than W0 does on the same tokens
    assert (start[0].double() @ x_q - w0 @ x_fp).norm() < (w0 @ x_q - w0 @ x_fp).norm()


# --------------------------------------------------------------- selection vs an oracle
#
# The oracle: each candidate's output error on the held-out tokens, ||W0 X_fp - Q X_q||^2
# with the explicit activations (X: [columns, tokens]) in float64, and its argmin. The
# code under test judges from normalized float32 H and D (excess_output_error) on the
# contest's own solves; only the candidates' solves (solve_candidate on the fitting
# statistics, the solver's tests' business) are shared.

CANDIDATES = {
    "GPTAQ": Candidate("GPTAQ", CompensationTerms(asymmetric_coefficient=1.0)),
    GPTQ_LABEL: Candidate(GPTQ_LABEL, CompensationTerms()),
    "least-squares": Candidate("least-squares", CompensationTerms(), least_squares_start=True),
}
CONTESTS = {"GPTAQ, GPTQ": ["GPTAQ", GPTQ_LABEL],
            "GPTAQ, GPTQ, least-squares": ["GPTAQ", GPTQ_LABEL, "least-squares"]}
SOLVER = dict(percdamp=0.01, blocksize=8)


def contest_data(judge_drift_sign, rows=12):
    """W0, the fit/judge/refit statistics and the held-out activations: fit on data
    whose full-precision inputs drift one way, judge on data that drifts the same way
    (GPTAQ's fit generalizes) or the opposite way (it hurts)."""
    w0, x_q, x_fp = activations(rows=rows, drift=0.3, seed=3)
    _, x_q_judge, x_fp_judge = activations(rows=rows, drift=0.3, seed=4, sign=judge_drift_sign)
    return dict(
        w0=w0, x_q_judge=x_q_judge, x_fp_judge=x_fp_judge,
        fit=statistics_of(x_q, x_fp), judge=statistics_of(x_q_judge, x_fp_judge),
        refit=statistics_of(torch.cat([x_q, x_q_judge], 1), torch.cat([x_fp, x_fp_judge], 1)))


def solve(candidate, w0, statistics):
    scale, zero_point = qparams(w0)
    return solve_candidate(candidate, w0[None].float(), statistics, scale, zero_point, None,
                           ARGS, **SOLVER).quantized[0]


def output_error(q, w0, x_q, x_fp) -> float:
    """||W0 X_fp - Q X_q||^2 on the given tokens, float64, from the activations."""
    return float((w0.double() @ x_fp - q.double() @ x_q).square().sum())


def oracle_winner(errors: dict[str, float]) -> str:
    """The candidate with the smallest error, where the contest is decisive: the runner-up's
    error exceeds it by over 1% (the float32 statistics move errors by ~1e-6 relative)."""
    best, runner_up = sorted(errors, key=errors.get)[:2]
    assert errors[runner_up] > 1.01 * errors[best], errors
    return best


def assert_all_different(solves: dict[str, torch.Tensor]) -> None:
    """The candidates' weights differ pairwise, so which one won and which one was
    written are observable."""
    labels = list(solves)
    for i, first in enumerate(labels):
        for second in labels[i + 1:]:
            assert not torch.equal(solves[first], solves[second]), (first, second)


def oracle_case(contest, judge_drift_sign):
    """The oracle's errors (with W0's own, for the ratio) and winner for one case."""
    data = contest_data(judge_drift_sign)
    w0 = data["w0"]
    solved = {label: solve(CANDIDATES[label], w0, data["fit"]) for label in CONTESTS[contest]}
    assert_all_different(solved)
    held_out = (data["x_q_judge"], data["x_fp_judge"])
    errors = {label: output_error(q, w0, *held_out) for label, q in solved.items()}
    return data, errors, output_error(w0, w0, *held_out), oracle_winner(errors)


@pytest.mark.parametrize("judge_drift_sign", [1.0, -1.0])
@pytest.mark.parametrize("contest", sorted(CONTESTS))
def test_selection_keeps_the_candidate_with_the_smaller_held_out_error(contest,
                                                                       judge_drift_sign):
    """The winner is the oracle's, the weights written are the winner's solve on the
    refit statistics (no other candidate's), and the reported ratio to GPTQ is the
    oracle's ratio of excess errors over W0's."""
    data, errors, w0_error, expected = oracle_case(contest, judge_drift_sign)
    w0 = data["w0"]
    candidates = [CANDIDATES[label] for label in CONTESTS[contest]]
    scale, zero_point = qparams(w0)
    selection = select_and_solve(candidates, w0[None].float(), data["fit"], data["judge"],
                                 data["refit"], scale, zero_point, None, ARGS, **SOLVER)
    assert selection.winners == [expected]
    refits = {c.label: solve(c, w0, data["refit"]) for c in candidates}
    assert_all_different(refits)
    written = selection.result.quantized[0]
    assert [label for label, q in refits.items() if torch.equal(written, q)] == [expected]
    excess = {label: error - w0_error for label, error in errors.items()}
    assert excess[GPTQ_LABEL] > 0 and excess[expected] > 0  # a ratio is defined
    assert selection.relative_to_gptq == [
        pytest.approx(excess[expected] / excess[GPTQ_LABEL], rel=1e-5)]


def test_the_cases_above_have_every_outcome():
    """The test above is a real test only if its cases pick differently: the judging
    data's drift flips the winner in each contest, and every candidate wins a case."""
    winners = {(contest, sign): oracle_case(contest, sign)[3]
               for contest in CONTESTS for sign in (1.0, -1.0)}
    for contest in CONTESTS:
        assert winners[contest, 1.0] != winners[contest, -1.0]
    assert set(winners.values()) == set(CANDIDATES)


ROW_TERMS = {
    "GPTQ": CompensationTerms(),
    "GPTAQ": CompensationTerms(asymmetric_coefficient=0.25),
    "CAE": CompensationTerms(asymmetric_coefficient=0.25, compensation_aware_coefficient=0.25),
    "FOEM": CompensationTerms(first_order_coefficient=0.2),
}


@pytest.mark.parametrize("label", sorted(ROW_TERMS))
def test_solving_every_kth_row_gives_those_rows_of_the_full_solve(label):
    """What row-sampled contests rest on: each row's solve depends only on that row,
    H and D, so solving the sampled rows alone reproduces them exactly."""
    w0, x_q, x_fp = activations(rows=24, drift=0.3, seed=5)
    stats = statistics_of(x_q, x_fp)
    scale, zero_point = qparams(w0)
    candidate = Candidate(label, ROW_TERMS[label])
    options = dict(percdamp=0.01, blocksize=8)
    full = solve_candidate(candidate, w0[None].float(), stats, scale, zero_point, None, ARGS,
                           **options)
    sampled = solve_candidate(candidate, w0[None, ::4].float(), stats, scale[:, ::4],
                              zero_point[:, ::4], None, ARGS, **options)
    torch.testing.assert_close(sampled.quantized, full.quantized[:, ::4], rtol=0, atol=1e-6)


SIDE_BY_SIDE_TERMS = {
    "gptaq (released)": CompensationTerms.for_method("gptaq", "released", 3),
    "gptaq_cae (released, 3 bits)": CompensationTerms.for_method("gptaq_cae", "released", 3),
    "gptaq_cae (released, 2 bits)": CompensationTerms.for_method("gptaq_cae", "released", 2),
    "gptaq_cae (paper)": CompensationTerms.for_method("gptaq_cae", "paper", 3),
    "gptq_cae (released)": CompensationTerms.for_method("gptq_cae", "released", 3),
    "foem (released)": CompensationTerms.for_method("foem", "released", 3),
    "foem_gptaq (released)": CompensationTerms.for_method("foem_gptaq", "released", 3),
    "gptaq_cae, a != b": CompensationTerms(asymmetric_coefficient=0.5,
                                           compensation_aware_coefficient=0.125),
}


@pytest.fixture
def float64_solver(monkeypatch):
    """The solver's working precision (``GPTQ_PRECISION``, float32 in production) set to
    float64, as in test_compensation's oracle tests: the code path is the same, and two
    summation orders (a batch of 24 rows against one of 12) then move a latent value by
    ~1e-16 relative instead of ~1e-7, too little to cross a rounding boundary unless the
    value sits on one."""
    monkeypatch.setattr(compensation, "GPTQ_PRECISION", torch.float64)


def side_by_side(terms, seed, gptq_terms=CompensationTerms()):
    """Float64 W0, H, D and min-max scales (12 rows, 32 columns): the method alone, GPTQ
    alone (``gptq_terms``: plain GPTQ is upstream's own loop and factorization) and one
    loop over [W0; W0] with the terms on the first half only (the guard's contest)."""
    w0, x_q, x_fp = activations(rows=12, columns=32, drift=0.3, seed=seed)
    tokens = x_q.shape[1]
    hessians = (2 / tokens * x_q @ x_q.T)[None]
    asymmetry = (2 / tokens * (x_fp - x_q) @ x_q.T)[None]
    groups = w0.reshape(12, -1, ARGS.group_size)
    scale, zero_point = (t[None] for t in calculate_qparams(groups.amin(-1), groups.amax(-1),
                                                            ARGS))
    assert w0.dtype == hessians.dtype == scale.dtype == torch.float64
    options = dict(percdamp=0.01, blocksize=16, asymmetry=asymmetry)
    method = compensate_weight(w0[None], hessians, scale, zero_point, None, ARGS,
                               terms=terms, **options)
    gptq = compensate_weight(w0[None], hessians, scale, zero_point, None, ARGS,
                             terms=gptq_terms, **options)
    both = compensate_weight(torch.cat([w0, w0])[None], hessians, torch.cat([scale] * 2, 1),
                             torch.cat([zero_point] * 2, 1), None, ARGS, terms=terms,
                             rows_with_terms=torch.arange(24) < 12, **options)
    assert both.quantized.dtype == torch.float64
    return method, gptq, both


def codes(result):
    """The integer codes of a symmetric solve: weights over their group's scale."""
    group = torch.arange(result.quantized.shape[-1]) // ARGS.group_size
    return torch.round(result.quantized / result.scale[..., group])


@pytest.mark.parametrize("label", sorted(SIDE_BY_SIDE_TERMS))
def test_method_and_gptq_rows_solved_side_by_side_equal_their_own_solves(float64_solver,
                                                                         label):
    """In float64 the shared loop gives exactly the method's solve on the first half and
    exactly GPTQ's on the second (weights and row losses, bit for bit): GPTQ's rows get
    GPTQ's update with every term multiplied by 0."""
    method, gptq, both = side_by_side(SIDE_BY_SIDE_TERMS[label], seed=6)
    for name in ("quantized", "row_losses"):
        assert torch.equal(getattr(both, name)[:, :12], getattr(method, name)), name
        assert torch.equal(getattr(both, name)[:, 12:], getattr(gptq, name)), name
    # and the method really differs from GPTQ here (7-43% of the weights)
    assert (codes(method) != codes(gptq)).float().mean() > 0.05


def test_dynamic_group_scales_side_by_side_with_gptq_rows(float64_solver):
    """With dynamic group scales the halves equal the solo solves up to ties that float64
    cannot remove. Min-max symmetric scales are s = max|w| / 3.5 over a group's latent
    values (3 bits: codes -4..3), so the group's largest-magnitude value sits on the
    grid's edge, w / s = +-3.5, by construction. +3.5 rounds to 4 and clamps to 3, as
    3.5 - 1 ulp rounds to 3; but -3.5 rounds (half to even) to -4 and -3.5 + 1 ulp to -3.
    Which one a summation order gives is a coin toss, and after it the row differs
    rightly (the error propagates to its later columns and later groups' scales). So each
    row's codes must equal the solo solve's, with its scales and weights equal to 1e-12
    relative (ulps, as the scales follow the latent values), up to its first differing
    code, and that code must be such a tie: -4 in one solve, -3 in the other."""
    terms = replace(CompensationTerms.for_method("gptaq_cae", "released", 3),
                    group_scales=GroupScales.DYNAMIC)
    gptq_terms = CompensationTerms(group_scales=GroupScales.DYNAMIC)
    method, gptq, both = side_by_side(terms, seed=7, gptq_terms=gptq_terms)
    halves = [(both.quantized[:, rows], both.scale[:, rows], codes(both)[:, rows])
              for rows in (slice(0, 12), slice(12, 24))]
    group = torch.arange(32) // ARGS.group_size
    for (quantized, scale, half_codes), alone in zip(halves, (method, gptq)):
        alone_codes = codes(alone)
        for row in range(12):
            differing = (half_codes[0, row] != alone_codes[0, row]).nonzero().flatten()
            end = int(differing[0]) if len(differing) else 32
            # the groups that started before the first differing code (its own included)
            started = int(group[min(end, 31)]) + 1
            torch.testing.assert_close(scale[0, row, :started], alone.scale[0, row, :started],
                                       rtol=1e-12, atol=0)
            torch.testing.assert_close(quantized[0, row, :end],
                                       alone.quantized[0, row, :end], rtol=1e-12, atol=0)
            if end < 32:
                tie = {float(half_codes[0, row, end]), float(alone_codes[0, row, end])}
                assert tie == {-4.0, -3.0}, (row, end, tie)
    assert (codes(method) != codes(gptq)).float().mean() > 0.05


def test_rows_with_terms_must_match_the_rows():
    w0, x_q, x_fp = activations()
    stats = statistics_of(x_q, x_fp)
    scale, zero_point = qparams(w0)
    with pytest.raises(ValueError, match="rows_with_terms"):
        compensate_weight(w0[None].float(), stats.hessians, scale, zero_point, None, ARGS,
                          terms=SIDE_BY_SIDE_TERMS["gptaq (released)"],
                          asymmetry=stats.asymmetry, rows_with_terms=torch.ones(5).bool())


@pytest.mark.parametrize("judge_drift_sign", [1.0, -1.0])
def test_row_sampled_selection_judges_the_sampled_rows_and_solves_the_winner_on_all(
        judge_drift_sign):
    """With row_stride 3 the winner is the oracle's on rows 0, 3, 6, ... alone, and the
    weights written are the winner's full solve (every row, not only the sampled ones)
    on the refit statistics, or on the fitting ones without a refit."""
    data = contest_data(judge_drift_sign, rows=24)
    w0 = data["w0"]
    candidates = [CANDIDATES["GPTAQ"], CANDIDATES[GPTQ_LABEL]]
    solved = {c.label: solve(c, w0, data["fit"])[::3] for c in candidates}
    assert_all_different(solved)
    expected = oracle_winner({label: output_error(q, w0[::3], data["x_q_judge"],
                                                  data["x_fp_judge"])
                              for label, q in solved.items()})
    scale, zero_point = qparams(w0)
    for refit, final in ((data["refit"], data["refit"]), (None, data["fit"])):
        selection = select_and_solve(candidates, w0[None].float(), data["fit"], data["judge"],
                                     refit, scale, zero_point, None, ARGS, row_stride=3,
                                     **SOLVER)
        assert selection.winners == [expected]
        full = {c.label: solve(c, w0, final) for c in candidates}
        assert_all_different(full)
        assert selection.result.quantized.shape == (1, *w0.shape)
        assert [label for label, q in full.items()
                if torch.equal(selection.result.quantized[0], q)] == [expected]


@pytest.fixture
def candidate_solves(monkeypatch):
    """Each solver batch item's candidate solves, in the order the items are solved: a
    list per item of (label, rows_with_terms, quantized [rows, columns], in_contest).
    A solve with rows_with_terms holds two candidates stacked by rows: the partner's on
    the True rows, GPTQ's on the False rows (the contest's shared loop)."""
    import rescomp_modifiers.selection as selection

    items, in_contest = [], [False]
    original_contest, original_solve = selection._solve_contest, selection.solve_candidate

    def contest(*args, **kwargs):
        items.append([])
        in_contest[0] = True
        try:
            return original_contest(*args, **kwargs)
        finally:
            in_contest[0] = False

    def solve(candidate, *args, rows_with_terms=None, **kwargs):
        result = original_solve(candidate, *args, rows_with_terms=rows_with_terms, **kwargs)
        assert result.quantized.shape[0] == 1  # select_and_solve solves item by item
        items[-1].append((candidate.label, rows_with_terms, result.quantized[0].clone(),
                          in_contest[0]))
        return result

    monkeypatch.setattr(selection, "_solve_contest", contest)
    monkeypatch.setattr(selection, "solve_candidate", solve)
    return items


def winner_weights(solves, winner: str) -> torch.Tensor:
    """The winner's weights among one item's recorded solves: its solve after the
    contest (on the refit statistics or on every row), else its solve in the contest."""
    final = [(label, q) for label, _, q, in_contest in solves if not in_contest]
    if final:
        (label, q), = final
        assert label == winner, (label, winner)
        return q
    for label, rows_with_terms, q, _ in solves:
        if rows_with_terms is None and label == winner:
            return q
        if rows_with_terms is not None:
            if label == winner:
                return q[rows_with_terms]
            if winner == GPTQ_LABEL:
                return q[~rows_with_terms]
    raise AssertionError(f"no solve of the winner {winner} recorded")


def logged_winners(messages: list[str]) -> list[tuple[str, str]]:
    """(unit name, winner) from the log lines ``... candidates for NAME: WINNER ...``."""
    import re

    found = [re.search(r"candidates for (.+?): (\S+)(?: \(.*\))?$", m) for m in messages]
    return [(match[1], match[2]) for match in found if match]


@pytest.mark.parametrize("holdout_every, row_stride", [(0, 1), (4, 1), (4, 3)])
def test_guarded_oneshot_writes_the_logged_winners_weights(tiny_model_dir, candidate_solves,
                                                           holdout_every, row_stride):
    """Every solved unit gets a logged choice, and each module's weights in the quantized
    model are exactly the weights of the candidate the log says won (its solve on the
    refit statistics, on every row, or the contest's solve where nothing is redone)."""
    from loguru import logger

    messages = []
    sink = logger.add(lambda message: messages.append(message.record["message"]),
                      level="INFO")
    try:
        modifier = CAEModifier(ignore=IGNORE, config_groups=GROUP32, guard="gptq",
                               coefficient_candidates=[0.5], least_squares_candidate=True,
                               holdout_every=holdout_every, candidate_row_stride=row_stride)
        model = run_oneshot(tiny_model_dir, [modifier])
    finally:
        logger.remove(sink)
    summary = modifier.selection_summary()
    layers = len(model.model.layers)
    # q/k/v and gate/up are row-stacked: 4 solved units per layer
    assert sum(sum(counts.values()) for counts in summary.values()) == 4 * layers
    assert set(summary) == {"self_attn.q_proj + self_attn.k_proj + self_attn.v_proj",
                            "self_attn.o_proj", "mlp.gate_proj + mlp.up_proj", "mlp.down_proj"}
    for counts in summary.values():
        assert set(counts) <= {"CAE", "CAE@0.5", GPTQ_LABEL, "least-squares"}
    winners = logged_winners(messages)
    assert len(winners) == len(candidate_solves) == 4 * layers
    assert {name for unit, _ in winners for name in unit.split(" + ")} == \
        targeted_linear_names(model)
    for (unit, winner), solves in zip(winners, candidate_solves):
        written = torch.cat([model.get_submodule(name).weight for name in unit.split(" + ")])
        expected = winner_weights(solves, winner).to(written.dtype)
        assert written.shape == expected.shape, (unit, winner)
        differing = int((written != expected).sum())
        assert differing == 0, f"{unit}: {differing} weights differ from the winner {winner}'s"
    # somewhere another candidate than the method won: writing the method's weights
    # regardless of the winner would fail above
    assert any(winner != "CAE" for _, winner in winners), winners


def test_holdout_batches_are_kept_out_of_the_fit(tiny_model_dir, monkeypatch):
    """With holdout_every=4 and 8 batches, 2 of each module's batches are held out: the
    fit sees 6 samples, the refit all 8."""
    import rescomp_modifiers.selection as selection

    seen = []
    original = selection.select_and_solve
    monkeypatch.setattr("rescomp_modifiers.units.select_and_solve",
                        lambda *a, **k: seen.append(a) or original(*a, **k))
    run_oneshot(tiny_model_dir, [GPTAQModifier(ignore=IGNORE, config_groups=GROUP32,
                                               guard="gptq", holdout_every=4)])
    assert seen
    for _, _, fit, judge, refit, *_ in seen:
        assert refit is not None
        # normalized sums: refit = (6 fit + 2 held-out samples) / 8
        torch.testing.assert_close(refit.hessians, (6 * fit.hessians + 2 * judge.hessians) / 8,
                                   rtol=1e-4, atol=1e-5)
        assert not torch.allclose(fit.hessians, judge.hessians)


@pytest.mark.parametrize("field, value", [
    ("block_size", -8), ("block_size", 0), ("holdout_every", 1),
    ("candidate_row_stride", 0),
])
def test_invalid_solver_settings_fail_when_the_recipe_is_parsed(field, value):
    from llmcompressor.recipe import Recipe

    recipe = f"""
quant_stage:
  quant_modifiers:
    CAEModifier:
      scheme: W4A16
      {field}: {value}
"""
    with pytest.raises(Exception, match=field):
        Recipe.create_instance(recipe)


@pytest.mark.parametrize("cls, field, value", [
    (GPTAQModifier, "asymmetric_coefficient", -0.5),
    (CAEModifier, "compensation_aware_coefficient", 5),
    (FOEMModifier, "first_order_coefficient", 3),
    (CAEModifier, "coefficient_candidates", [0.25, 2.0]),
])
def test_coefficients_outside_their_range_are_refused(cls, field, value):
    with pytest.raises(ValueError, match=r"must lie in \[0.0, 1.0\]"):
        cls(scheme="W4A16", **{field: value})


def test_least_squares_candidate_needs_the_full_precision_stream(tiny_model_dir):
    with pytest.raises(ValueError, match="least_squares_candidate .* needs the full-precision"):
        run_oneshot(tiny_model_dir, [CAEModifier(ignore=IGNORE, config_groups=GROUP32,
                                                 statistics="gptq",
                                                 least_squares_candidate=True)])


@pytest.mark.parametrize("module", ["model.layers.0.self_attn.q_proj",
                                    "model.layers.1.mlp.down_proj"])
def test_non_finite_weights_are_refused_before_calibration_naming_the_module(
        tiny_model_dir, monkeypatch, module):
    from transformers import AutoModelForCausalLM
    from llmcompressor import oneshot

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_submodule(module).weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"weights of {module} contain NaN or Inf"):
        oneshot(model=model, dataset=calibration_dataset(),
                recipe=[CAEModifier(ignore=IGNORE, config_groups=GROUP32)],
                max_seq_length=32, num_calibration_samples=8)


@pytest.mark.parametrize("observer", ["memoryless_mse", "memoryless_minmax"])
def test_dynamic_group_scales_clip_like_the_observer_on_the_same_weights(observer):
    """With a diagonal H no column's error reaches another column, so the latent
    weights stay the originals and the dynamic scales must be exactly what
    llm-compressor's observer computes on those weights (static scales)."""
    from llmcompressor.observers import Observer

    from rescomp_modifiers.compensation import GroupScales, compensate_weight

    args = QuantizationArgs(num_bits=3, type="int", symmetric=True, strategy="group",
                            group_size=8, observer=observer)
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(1, 6, 16, generator=generator)
    weights[0, :, 3] *= 6  # an outlier column: MSE clips it, min-max does not
    hessians = torch.diag(torch.rand(16, generator=generator) + 0.5)[None]
    static = Observer.load_from_registry(observer, base_name="weight", args=args)
    expected = static(weights[0]).get_qparams()
    result = compensate_weight(
        weights, hessians, torch.ones_like(expected["scale"])[None],
        torch.zeros_like(expected["zero_point"])[None], None, args,
        terms=CompensationTerms(group_scales=GroupScales.DYNAMIC), blocksize=8)
    torch.testing.assert_close(result.scale[0], expected["scale"])
    minmax = weights[0].reshape(6, 2, 8).abs().amax(-1) / 3.5  # int3 symmetric range
    clipped = not torch.allclose(result.scale[0], minmax.to(result.scale.dtype), rtol=1e-3)
    assert clipped == (observer == "memoryless_mse")
