"""The compensation solver against llm-compressor's GPTQ and against slow oracles.

Reference points, none of them the solver itself:

* llm-compressor's own ``quantize_weight`` (plain GPTQ must be reproduced bit for bit);
* ``oracle``: float64, one column at a time, the residual each column leaves is formed
  explicitly from the calibration activations X_q / X_fp and projected onto the
  remaining columns by a ridge least-squares solve (no Cholesky factor, no P/R);
* ``released_transcription``: the released-code rules of docs/design.md written out
  literally (explicit block loop, explicit P and R matrices).

Precision. The solver works in ``GPTQ_PRECISION`` (float32, as upstream). For the
comparisons with the oracles the ``float64_solver`` fixture switches that constant to
float64 for the solver module only: the code path is unchanged, and the oracle and the
solver then agree to ~1e-12. That matters because the two compute the latent weights
through different algebra: in float32 they differ by ~1e-7 relative, and a quantization
decision flips wherever a latent value lies that close to a rounding boundary (rare;
none on the float32 problems below, but it depends on the BLAS build), after which the
rest of that row differs. In float64 a flip needs a latent value within ~1e-12 of a
boundary: with ~4k entries per problem the chance is ~1e-8, so the tests can demand
identical integer codes. The float32 production path is covered by the exact
upstream-equality tests and by float32 comparisons whose criteria tolerate a few flips.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

try:
    import rescomp_modifiers  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.utils import calculate_qparams
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

import rescomp_modifiers.compensation as compensation
from rescomp_modifiers.compensation import (
    CompensationTerms,
    GroupScales,
    LazyUpdate,
    compensate_weight,
)

PERCDAMP = 0.01
SEQUENCES = 4  # N in the 2/N normalization of H and D


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The problems are tiny; one thread avoids OpenMP spin-waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, params=[compensation.IN_BLOCK_WINDOW, 3],
                ids=lambda window: f"window{window}")
def in_block_window(request, monkeypatch):
    """Every test also runs with 3-column in-block windows.

    The problems here use blocks of 8-64 columns; windows of 3 put window ends at
    every position relative to blocks, groups, the FOEM pull and dynamic group starts.
    """
    monkeypatch.setattr(compensation, "IN_BLOCK_WINDOW", request.param)


@pytest.fixture
def float64_solver(monkeypatch):
    """Run the solver's working tensors in float64 (see the module docstring)."""
    monkeypatch.setattr(compensation, "GPTQ_PRECISION", torch.float64)


def int_args(bits, strategy, group_size=None, symmetric=True, actorder=None):
    return QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        strategy=strategy,
        group_size=group_size,
        actorder=actorder,
    )


def column_groups(quant_args, columns):
    """The scale column each weight column uses (in the original column order)."""
    if quant_args.strategy == "group":
        return torch.arange(columns) // quant_args.group_size
    return torch.zeros(columns, dtype=torch.long)


def static_qparams(weights, quant_args, shrink=1.0):
    """Min-max qparams per group/channel, as an observer computes them before GPTQ.

    ``shrink < 1`` narrows the range so that some entries clip (exercises the clamp).
    """
    columns = weights.shape[-1]
    groups = column_groups(quant_args, columns)
    num_groups = int(groups.max()) + 1
    grouped = weights.reshape(*weights.shape[:-1], num_groups, columns // num_groups)
    return calculate_qparams(
        grouped.amin(-1) * shrink, grouped.amax(-1) * shrink, quant_args
    )


def code_range(bits):
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_to_grid(w, scale, zero_point, bits):
    """Round-to-nearest with clamp, written out: ``(clamp(round(w/s + z)) - z) * s``."""
    lo, hi = code_range(bits)
    z = zero_point.to(w.dtype)
    codes = torch.clamp(torch.round(w / scale + z), lo, hi)
    return (codes - z) * scale


def rtn(weights, scale, zero_point, quant_args):
    """Round-to-nearest of a whole ``[rows, columns]`` weight with static qparams."""
    groups = column_groups(quant_args, weights.shape[-1])
    s = scale[..., groups].to(weights.dtype)
    return round_to_grid(weights, s, zero_point[..., groups], quant_args.num_bits)


def codes_of(q, scale, zero_point, quant_args):
    groups = column_groups(quant_args, q.shape[-1])
    s = scale[..., groups].to(torch.float64)
    z = zero_point[..., groups].to(torch.float64)
    return q.to(torch.float64) / s + z


def make_activations(seed, columns, tokens=256, drift=0.4, dtype=torch.float64):
    """Correlated calibration inputs of the FP flow and a drifted quantized flow."""
    g = torch.Generator().manual_seed(seed)
    col_scale = torch.exp(0.5 * torch.randn(columns, 1, generator=g, dtype=dtype))
    mix = torch.eye(columns, dtype=dtype) + 0.4 * torch.randn(
        columns, columns, generator=g, dtype=dtype
    ) / math.sqrt(columns)
    x_fp = col_scale * (mix @ torch.randn(columns, tokens, generator=g, dtype=dtype))
    noise = mix @ torch.randn(columns, tokens, generator=g, dtype=dtype)
    x_q = x_fp + drift * col_scale * noise
    return x_q, x_fp


def statistics(x_q, x_fp, sequences=SEQUENCES):
    """``H = 2/N X_q X_q^T`` and ``D = 2/N (X_fp - X_q) X_q^T``."""
    H = 2.0 / sequences * x_q @ x_q.T
    D = 2.0 / sequences * (x_fp - x_q) @ x_q.T
    return H, D


def make_layer(seed, rows, columns, quant_args, shrink=0.9, w0_differs=False):
    """A random layer: activations, H, D, W (handed in), W0 (original), static qparams."""
    x_q, x_fp = make_activations(seed, columns)
    H, D = statistics(x_q, x_fp)
    g = torch.Generator().manual_seed(10_000 + seed)
    W0 = torch.randn(rows, columns, generator=g, dtype=torch.float64)
    W = W0.clone()
    if w0_differs:
        W = W0 + 0.1 * torch.randn(rows, columns, generator=g, dtype=torch.float64)
    scale, zero_point = static_qparams(W0, quant_args, shrink)
    return dict(x_q=x_q, x_fp=x_fp, H=H, D=D, W=W, W0=W0, scale=scale, zp=zero_point)


def run_solver(layer, quant_args, terms, *, use_d=True, blocksize=128, dtype=None):
    """Call the solver on a single-item batch (clones: nothing of ``layer`` leaks)."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    result = compensate_weight(
        cast(layer["W"]).unsqueeze(0).clone(),
        cast(layer["H"]).unsqueeze(0).clone(),
        cast(layer["scale"]).unsqueeze(0).clone(),
        layer["zp"].unsqueeze(0).clone(),
        None,
        quant_args,
        asymmetry=cast(layer["D"]).unsqueeze(0).clone() if use_d else None,
        original_weights=cast(layer["W0"]).unsqueeze(0).clone(),
        terms=terms,
        blocksize=blocksize,
        percdamp=PERCDAMP,
    )
    return result


# ----------------------------------------------------------------------------- oracles


def oracle(
    x_q,
    x_fp,
    W,
    W0,
    scale,
    zero_point,
    quant_args,
    *,
    a=0.0,
    b=0.0,
    f=0.0,
    order=None,
    dynamic=False,
    percdamp=PERCDAMP,
    sequences=SEQUENCES,
):
    """Greedy column-by-column compensation, from the activations, in float64.

    At processing position ``p`` (column ``c = order[p]``) with latent ``w``, original
    ``w0`` and quantized ``q``, the output residual this column leaves behind is::

        r = (w - q) x_q,c                       GPTQ
          + a * w (x_fp,c - x_q,c)              GPTAQ (asymmetric)
          + b * (w0 - w) x_fp,c                 CAE (compensation-aware)
          - f * (w - w0) x_q,c                  FOEM (first order)

    and the remaining columns absorb it by ridge least squares,
    ``dW_rest = r X_rest^T (X_rest X_rest^T + lambda' I)^-1``, written with the same
    2/N normalization and damping ``lambda = percdamp * mean(diag H)`` as the solver.
    ``dynamic``: each group's qparams are min-max of its columns' latent values when its
    first column is reached. Returns quantized weights (original column order), the
    GPTQ proxy loss ``sum (w - q)^2 / [(Hd[p:, p:])^-1]_00 / 2`` and the qparams.
    """
    x_q, x_fp, W, W0 = (t.to(torch.float64) for t in (x_q, x_fp, W, W0))
    columns = W.shape[1]
    order = torch.arange(columns) if order is None else order
    groups = column_groups(quant_args, columns)[order]
    xq, xfp = x_q[order], x_fp[order]
    W, W0 = W[:, order].clone(), W0[:, order]
    scale = scale.to(torch.float64).clone()
    zero_point = zero_point.clone()

    norm = 2.0 / sequences
    H = norm * xq @ xq.T
    damp = percdamp * H.diagonal().mean()
    Q = torch.zeros_like(W)
    loss = 0.0
    started = set()
    for p in range(columns):
        group = int(groups[p])
        if dynamic and group not in started:
            started.add(group)
            members = [m for m in range(p, columns) if int(groups[m]) == group]
            latent = W[:, members]
            s, z = calculate_qparams(latent.amin(-1), latent.amax(-1), quant_args)
            scale[:, group], zero_point[:, group] = s, z
        w, w0 = W[:, p].clone(), W0[:, p]
        q = round_to_grid(w, scale[:, group], zero_point[:, group], quant_args.num_bits)
        residual = (
            torch.outer(w - q, xq[p])
            + a * torch.outer(w, xfp[p] - xq[p])
            + b * torch.outer(w0 - w, xfp[p])
            - f * torch.outer(w - w0, xq[p])
        )
        # [(Hd[p:, p:])^-1]_00 = 1 / Schur complement of Hd[p+1:, p+1:] (= U_pp^2)
        schur = norm * xq[p] @ xq[p] + damp
        if p + 1 < columns:
            rest = xq[p + 1 :]
            gram = norm * rest @ rest.T + damp * torch.eye(columns - p - 1, dtype=W.dtype)
            cross = norm * rest @ xq[p]
            solved = torch.linalg.solve(
                gram, torch.cat((norm * rest @ residual.T, cross[:, None]), dim=1)
            )
            W[:, p + 1 :] += solved[:, :-1].T
            schur = schur - cross @ solved[:, -1]
        loss += float(((w - q) ** 2).sum() * schur / 2)
        Q[:, p] = q
    inverse = torch.argsort(order)
    return Q[:, inverse], loss, scale, zero_point


def released_transcription(
    H, D, W, W0, scale, zero_point, quant_args, terms, blocksize, percdamp=PERCDAMP
):
    """docs/design.md's update rules written out literally (released-code semantics).

    ``P = a triu(D U^T, 1) U`` and ``R = b triu((H + D) U^T, 1) U`` as explicit
    matrices; inside a block every processed column updates the later columns of the
    block with its latent value; between blocks the stored block is applied to all
    later columns, the GPTAQ/CAE terms driven by the ``lazy_update`` value (latent,
    latent clamped to the group's range, or quantized). FOEM: the error is
    ``((w - q) - f (w - w0)) / U_cc`` and, with the pull, the next in-block column moves
    toward W0 by ``f``. Static qparams, no activation ordering, float64.
    """
    H, D, W, W0 = (t.to(torch.float64) for t in (H, D, W, W0))
    a = terms.asymmetric_coefficient
    b = terms.compensation_aware_coefficient
    f = terms.first_order_coefficient
    rows, columns = W.shape
    groups = column_groups(quant_args, columns)
    lo, hi = code_range(quant_args.num_bits)
    scale = scale.to(torch.float64)
    zp = zero_point.to(torch.float64)

    Hd = H + percdamp * H.diagonal().mean() * torch.eye(columns, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    P = a * torch.triu(D @ U.T, 1) @ U
    R = b * torch.triu((H + D) @ U.T, 1) @ U

    W = W.clone()
    Q = torch.zeros_like(W)
    loss = 0.0
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        E = torch.zeros_like(W1)  # block errors
        L = torch.zeros_like(W1)  # values driving the lazy GPTAQ/CAE terms
        for i in range(i2 - i1):
            c = i1 + i
            s, z = scale[:, groups[c]], zp[:, groups[c]]
            w, w0 = W1[:, i].clone(), W0[:, c]
            q = round_to_grid(w, s, z, quant_args.num_bits)
            e = ((w - q) - f * (w - w0)) / U[c, c]
            W1[:, i + 1 :] += (
                -torch.outer(e, U[c, c + 1 : i2])
                + torch.outer(w, P[c, c + 1 : i2])
                + torch.outer(w0 - w, R[c, c + 1 : i2])
            )
            if terms.first_order_next_column_pull and i + 1 < i2 - i1:
                W1[:, i + 1] -= f * (W1[:, i + 1] - W0[:, c + 1])
            if terms.lazy_update == LazyUpdate.LATENT:
                L[:, i] = w
            elif terms.lazy_update == LazyUpdate.CLAMPED_LATENT:
                L[:, i] = torch.clamp(w, min=(lo - z) * s, max=(hi - z) * s)
            else:
                L[:, i] = q
            E[:, i] = e
            Q[:, c] = q
            loss += float((((w - q) / U[c, c]) ** 2).sum() / 2)
        W[:, i2:] += (
            -E @ U[i1:i2, i2:]
            + L @ P[i1:i2, i2:]
            + (W0[:, i1:i2] - L) @ R[i1:i2, i2:]
        )
    return Q, loss


def assert_same_codes(q_solver, q_reference, scale, zero_point, quant_args):
    """Identical integer codes (hence identical dequantized values) everywhere."""
    codes_s = codes_of(q_solver, scale, zero_point, quant_args)
    codes_r = codes_of(q_reference, scale, zero_point, quant_args)
    # both sides lie on the grid
    assert torch.allclose(codes_s, codes_s.round(), atol=1e-6)
    assert torch.allclose(codes_r, codes_r.round(), atol=1e-6)
    mismatched = (codes_s.round() != codes_r.round()).sum().item()
    assert mismatched == 0, f"{mismatched} of {codes_s.numel()} codes differ"
    torch.testing.assert_close(
        q_solver.to(torch.float64), q_reference.to(torch.float64), rtol=0, atol=1e-12
    )


# ------------------------------------------------- 1. plain GPTQ equals llm-compressor


GPTQ_SCHEMES = {
    "int4_g128_sym": (dict(bits=4, strategy="group", group_size=128), 256),
    "int3_g64_asym": (dict(bits=3, strategy="group", group_size=64, symmetric=False), 192),
    "int8_channel": (dict(bits=8, strategy="channel"), 128),
}


@pytest.mark.parametrize("actorder", [None, "weight", "static"])
@pytest.mark.parametrize("scheme", sorted(GPTQ_SCHEMES))
def test_plain_gptq_equals_llmcompressor_exactly(scheme, actorder):
    spec, columns = GPTQ_SCHEMES[scheme]
    quant_args = int_args(**spec, actorder=actorder)
    batch, rows = 2, 48
    torch.manual_seed(0)
    x = [make_activations(s, columns, tokens=384, dtype=torch.float32)[0] for s in (1, 2)]
    H = torch.stack([2.0 / SEQUENCES * xi @ xi.T for xi in x])
    W = torch.randn(batch, rows, columns)
    scale, zero_point = static_qparams(W, quant_args)

    inputs = (W.clone(), H.clone(), scale.clone(), zero_point.clone())
    # quantize_weight works in place on its arguments: hand it clones
    expected, expected_losses, expected_fallback = quantize_weight(
        W.clone(), H.clone(), scale.clone(), zero_point.clone(), None, quant_args,
        blocksize=64, percdamp=PERCDAMP,
    )
    result = compensate_weight(
        W, H, scale, zero_point, None, quant_args, blocksize=64, percdamp=PERCDAMP
    )
    assert torch.equal(result.quantized, expected)
    assert torch.equal(result.losses, expected_losses)
    assert torch.equal(result.used_rtn_fallback, expected_fallback)
    assert not expected_fallback.any()
    assert torch.equal(result.scale, scale) and torch.equal(result.zero_point, zero_point)
    # the solver leaves its arguments alone
    for before, after in zip(inputs, (W, H, scale, zero_point)):
        assert torch.equal(before, after)
    # and actually quantized (GPTQ differs from round-to-nearest)
    assert not torch.equal(result.quantized, rtn(W, scale, zero_point, quant_args))


@pytest.mark.parametrize("actorder", [None, "weight"])
def test_general_loop_with_vanishing_terms_is_gptq(float64_solver, monkeypatch, actorder):
    """D = 0 with a = 1 forces the rank-2 loop (P = 0): it must reduce to GPTQ.

    Both run in float64 (upstream's module constant patched too) so the differing
    summation order of the fused between-block matmul cannot flip a decision.
    """
    import llmcompressor.modifiers.gptq.gptq_quantize as upstream

    monkeypatch.setattr(upstream, "GPTQ_PRECISION", torch.float64)
    quant_args = int_args(4, "group", 32, symmetric=False, actorder=actorder)
    layer = make_layer(3, 32, 128, quant_args)
    layer["D"] = torch.zeros_like(layer["D"])
    terms = CompensationTerms(asymmetric_coefficient=1.0)
    result = run_solver(layer, quant_args, terms, blocksize=32)
    expected, _, _ = quantize_weight(
        layer["W"].unsqueeze(0).clone(), layer["H"].unsqueeze(0).clone(),
        layer["scale"].unsqueeze(0).clone(), layer["zp"].unsqueeze(0).clone(),
        None, quant_args, blocksize=32, percdamp=PERCDAMP,
    )
    assert_same_codes(result.quantized[0], expected[0], layer["scale"], layer["zp"],
                      quant_args)


# -------------------------------------------------------- 2. papers' semantics vs oracle


PAPER_CASES = {
    # name: (coefficients a, b, f; whether the solver gets D)
    "gptq": (0.0, 0.0, 0.0, True),
    "gptaq": (1.0, 0.0, 0.0, True),
    "gptq_cae": (0.0, 1.0, 0.0, False),  # plain GPTQ statistics: the oracle's x_fp = x_q
    "gptaq_cae": (1.0, 1.0, 0.0, True),
    "gptaq_cae_unequal": (0.7, 0.3, 0.0, True),
    "gptaq_cae_unequal_reversed": (0.3, 1.3, 0.0, True),
    "cae_only_with_d": (0.0, 0.6, 0.0, True),
    "foem": (0.0, 0.0, 1.0, False),
    "foem_partial": (0.0, 0.0, 0.4, False),
    "foem_gptaq": (1.0, 0.0, 1.0, True),
    "everything": (0.8, 0.5, 0.3, True),
}

ORACLE_SCHEMES = {
    "int4_g16_asym": dict(bits=4, strategy="group", group_size=16, symmetric=False),
    "int3_channel_sym": dict(bits=3, strategy="channel"),
}


def paper_terms(a, b, f, **overrides):
    return CompensationTerms(
        asymmetric_coefficient=a,
        compensation_aware_coefficient=b,
        first_order_coefficient=f,
        lazy_update=LazyUpdate.LATENT,
        **overrides,
    )


def oracle_for(layer, quant_args, a, b, f, use_d, **kwargs):
    x_fp = layer["x_fp"] if use_d else layer["x_q"]
    return oracle(layer["x_q"], x_fp, layer["W"], layer["W0"], layer["scale"],
                  layer["zp"], quant_args, a=a, b=b, f=f, **kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scheme", sorted(ORACLE_SCHEMES))
@pytest.mark.parametrize("case", sorted(PAPER_CASES))
def test_paper_semantics_match_oracle(float64_solver, case, scheme, seed):
    a, b, f, use_d = PAPER_CASES[case]
    quant_args = int_args(**ORACLE_SCHEMES[scheme])
    # seed 2 hands in weights that differ from W0 (W0 enters CAE and FOEM separately)
    layer = make_layer(seed, 24, 64, quant_args, w0_differs=seed == 2)
    expected, expected_loss, _, _ = oracle_for(layer, quant_args, a, b, f, use_d)
    result = run_solver(layer, quant_args, paper_terms(a, b, f), use_d=use_d, blocksize=16)
    assert_same_codes(result.quantized[0], expected, layer["scale"], layer["zp"],
                      quant_args)
    # the proxy loss depends continuously on the latent trajectory (accumulated in
    # float32 by the solver, hence the tolerance)
    assert result.losses[0].item() == pytest.approx(expected_loss, rel=1e-5)


def test_oracle_terms_are_not_vacuous(float64_solver):
    """Each term changes the result: the matches above are not all plain GPTQ."""
    quant_args = int_args(**ORACLE_SCHEMES["int4_g16_asym"])
    layer = make_layer(0, 24, 64, quant_args)
    results = {
        case: oracle_for(layer, quant_args, a, b, f, use_d)[0]
        for case, (a, b, f, use_d) in PAPER_CASES.items()
    }
    # With plain GPTQ statistics (x_fp = x_q) the CAE and FOEM residuals coincide,
    # b (w0 - w) x_q = -f (w - w0) x_q: GPTQ+CAE(b=1) is FOEM(f=1) in the papers' form.
    assert torch.equal(results["gptq_cae"], results["foem"])
    names = sorted(results)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            if {first, second} != {"gptq_cae", "foem"}:
                assert not torch.equal(results[first], results[second]), (first, second)


@pytest.mark.parametrize("case", ["gptaq", "gptaq_cae_unequal", "foem"])
def test_production_float32_close_to_oracle(case):
    """The float32 path, unpatched: a decision may flip on a near-tie (module docstring)
    and then the rest of its row differs, so the criterion tolerates a row or so:
    >= 99% of codes identical, no difference beyond two grid steps, loss within 1e-3.
    (Measured: all codes identical, loss within 2e-7.)"""
    a, b, f, use_d = PAPER_CASES[case]
    quant_args = int_args(**ORACLE_SCHEMES["int4_g16_asym"])
    layer = make_layer(5, 96, 64, quant_args)
    expected, expected_loss, _, _ = oracle_for(layer, quant_args, a, b, f, use_d)
    result = run_solver(layer, quant_args, paper_terms(a, b, f), use_d=use_d,
                        blocksize=16, dtype=torch.float32)
    codes_s = codes_of(result.quantized[0], layer["scale"], layer["zp"], quant_args).round()
    codes_r = codes_of(expected, layer["scale"], layer["zp"], quant_args).round()
    assert (codes_s == codes_r).double().mean() >= 0.99
    assert (codes_s - codes_r).abs().max() <= 2
    assert result.losses[0].item() == pytest.approx(expected_loss, rel=1e-3)


# ---------------------------------- 3. released semantics vs docs/design.md transcription


RELEASED_METHODS = ["gptaq", "gptaq_cae", "gptq_cae", "foem", "foem_gptaq"]


@pytest.mark.parametrize("blocksize", [16, 64])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("method", RELEASED_METHODS)
def test_released_semantics_match_transcription(float64_solver, method, bits, blocksize):
    quant_args = int_args(bits, "group", 16, symmetric=False)
    terms = CompensationTerms.for_method(method, "released", bits)
    use_d = method in ("gptaq", "gptaq_cae", "foem_gptaq")
    for seed in (0, 1):
        layer = make_layer(seed, 24, 64, quant_args, shrink=0.8, w0_differs=seed == 1)
        D = layer["D"] if use_d else torch.zeros_like(layer["D"])
        expected, expected_loss = released_transcription(
            layer["H"], D, layer["W"], layer["W0"], layer["scale"], layer["zp"],
            quant_args, terms, blocksize,
        )
        result = run_solver(layer, quant_args, terms, use_d=use_d, blocksize=blocksize)
        assert_same_codes(result.quantized[0], expected, layer["scale"], layer["zp"],
                          quant_args)
        assert result.losses[0].item() == pytest.approx(expected_loss, rel=1e-5)


def test_released_presets_are_what_design_says():
    """Coefficients and lazy modes of the presets (docs/design.md, 'Semantics: papers vs released code')."""
    gptaq = CompensationTerms.for_method("gptaq", "released", 4)
    assert (gptaq.asymmetric_coefficient, gptaq.lazy_update) == (0.25, LazyUpdate.QUANTIZED)
    cae4 = CompensationTerms.for_method("gptaq_cae", "released", 4)
    assert cae4.asymmetric_coefficient == cae4.compensation_aware_coefficient == 0.25
    assert cae4.lazy_update == LazyUpdate.CLAMPED_LATENT
    assert CompensationTerms.for_method("gptaq_cae", "released", 2).lazy_update == LazyUpdate.QUANTIZED
    foem = CompensationTerms.for_method("foem", "released", 4)
    assert foem.first_order_coefficient == 0.2 and foem.first_order_next_column_pull
    for method in RELEASED_METHODS:
        paper = CompensationTerms.for_method(method, "paper", 4)
        assert paper.lazy_update == LazyUpdate.LATENT
        assert not paper.first_order_next_column_pull
        coefficients = {paper.asymmetric_coefficient, paper.compensation_aware_coefficient,
                        paper.first_order_coefficient}
        assert coefficients <= {0.0, 1.0} and 1.0 in coefficients
    with pytest.raises(ValueError, match="Unknown method"):
        CompensationTerms.for_method("gptq2")


def test_released_clamp_and_quantized_lazy_modes_differ_from_latent(float64_solver):
    """The transcription's lazy modes matter on this problem (the match is not vacuous)."""
    quant_args = int_args(4, "group", 16, symmetric=False)
    layer = make_layer(0, 24, 64, quant_args, shrink=0.8)
    outputs = []
    for lazy in LazyUpdate:
        terms = CompensationTerms(asymmetric_coefficient=0.25,
                                  compensation_aware_coefficient=0.25, lazy_update=lazy)
        outputs.append(run_solver(layer, quant_args, terms, blocksize=16).quantized)
    assert not torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])
    assert not torch.equal(outputs[1], outputs[2])


# ------------------------------------------------------------------ 4. block size


@pytest.mark.parametrize(
    "terms",
    [
        paper_terms(1.0, 0.0, 0.0),
        paper_terms(1.0, 1.0, 0.0),
        paper_terms(0.7, 0.3, 0.0),
        paper_terms(1.0, 0.0, 1.0),
        paper_terms(0.5, 0.5, 0.0, group_scales=GroupScales.DYNAMIC),
    ],
    ids=["gptaq", "gptaq_cae", "cae_unequal", "foem_gptaq", "cae_dynamic"],
)
def test_paper_semantics_are_block_size_invariant(float64_solver, terms):
    quant_args = int_args(4, "group", 16, symmetric=False, actorder="weight")
    layer = make_layer(7, 32, 128, quant_args)
    results = [run_solver(layer, quant_args, terms, blocksize=bs) for bs in (8, 16, 128)]
    for other in results[1:]:
        assert_same_codes(other.quantized[0], results[0].quantized[0],
                          results[0].scale[0], results[0].zero_point[0], quant_args)
        torch.testing.assert_close(other.losses, results[0].losses, rtol=1e-5, atol=0)
        torch.testing.assert_close(other.scale, results[0].scale, rtol=1e-9, atol=0)
        assert torch.equal(other.zero_point, results[0].zero_point)


def test_paper_semantics_block_size_float32():
    """Same in the float32 production path, up to near-tie flips (see the docstring;
    measured: all codes identical, losses within 2e-7)."""
    quant_args = int_args(4, "group", 16, symmetric=False, actorder="weight")
    layer = make_layer(7, 128, 128, quant_args)
    terms = paper_terms(1.0, 1.0, 0.0)
    outs = [run_solver(layer, quant_args, terms, blocksize=bs, dtype=torch.float32)
            for bs in (8, 16, 128)]
    reference = codes_of(outs[0].quantized[0], layer["scale"], layer["zp"], quant_args).round()
    for other in outs[1:]:
        codes = codes_of(other.quantized[0], layer["scale"], layer["zp"], quant_args).round()
        assert (codes == reference).double().mean() >= 0.99
        torch.testing.assert_close(other.losses, outs[0].losses, rtol=1e-3, atol=0)


def test_released_quantized_lazy_update_depends_on_block_size():
    """Documented: the 2-bit released CAE ('org', lazy update with q) is block-size
    dependent."""
    quant_args = int_args(2, "group", 16, symmetric=False)
    layer = make_layer(7, 32, 128, quant_args)
    terms = CompensationTerms.for_method("gptaq_cae", "released", 2)
    assert terms.lazy_update == LazyUpdate.QUANTIZED
    a, b, c = (run_solver(layer, quant_args, terms, blocksize=bs, dtype=torch.float32)
               for bs in (8, 16, 128))
    for first, second in ((a, b), (a, c), (b, c)):
        differing = (first.quantized != second.quantized).double().mean()
        assert differing > 0.01  # not a near-tie flip: a systematic difference


# ------------------------------------------------------------- 5. activation ordering


def permute_layer(layer, perm):
    """Relabel the input columns consistently: W, W0 by columns, H and D on both axes."""
    out = dict(layer)
    out["W"], out["W0"] = layer["W"][:, perm], layer["W0"][:, perm]
    out["H"] = layer["H"][perm][:, perm]
    out["D"] = layer["D"][perm][:, perm]
    out["x_q"], out["x_fp"] = layer["x_q"][perm], layer["x_fp"][perm]
    return out


TERMS_FOR_ORDERING = {
    "gptaq_cae_unequal": paper_terms(0.7, 0.3, 0.0),
    "foem_gptaq": paper_terms(1.0, 0.0, 1.0),
    "released_cae": CompensationTerms.for_method("gptaq_cae", "released", 4),
    "released_foem_gptaq": CompensationTerms.for_method("foem_gptaq", "released", 4),
}


@pytest.mark.parametrize("name", sorted(TERMS_FOR_ORDERING))
def test_actorder_equals_manual_prepermutation(float64_solver, name):
    """Channel strategy: actorder 'weight' == sorting the columns of W, W0, H and D by
    diag H descending by hand, running without actorder, and un-permuting."""
    terms = TERMS_FOR_ORDERING[name]
    ordered = int_args(4, "channel", actorder="weight")
    plain = int_args(4, "channel")
    layer = make_layer(11, 24, 64, ordered, w0_differs=True)
    perm = torch.argsort(layer["H"].diagonal(), descending=True)
    assert not torch.equal(perm, torch.arange(64))
    with_actorder = run_solver(layer, ordered, terms, blocksize=16)
    by_hand = run_solver(permute_layer(layer, perm), plain, terms, blocksize=16)
    unpermuted = by_hand.quantized[0][:, torch.argsort(perm)]
    assert_same_codes(with_actorder.quantized[0], unpermuted, layer["scale"], layer["zp"],
                      ordered)
    torch.testing.assert_close(with_actorder.losses, by_hand.losses, rtol=1e-6, atol=0)
    # and the ordering matters here
    without = run_solver(layer, plain, terms, blocksize=16)
    assert not torch.equal(without.quantized, with_actorder.quantized)


@pytest.mark.parametrize("name", sorted(TERMS_FOR_ORDERING))
def test_actorder_is_permutation_equivariant(float64_solver, name):
    """With actorder the processing order follows diag H, so permuting the inputs
    consistently permutes the output. (Without actorder the processing order is the
    column order and the greedy result legitimately changes, so there is no such
    property to test.)"""
    terms = TERMS_FOR_ORDERING[name]
    quant_args = int_args(4, "channel", actorder="weight")
    layer = make_layer(12, 24, 64, quant_args, w0_differs=True)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    direct = run_solver(layer, quant_args, terms, blocksize=16)
    permuted = run_solver(permute_layer(layer, perm), quant_args, terms, blocksize=16)
    assert_same_codes(permuted.quantized[0], direct.quantized[0][:, perm],
                      layer["scale"], layer["zp"], quant_args)


@pytest.mark.parametrize("case", ["gptaq_cae_unequal", "everything"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_group_actorder_matches_oracle(float64_solver, case, dynamic):
    """Group strategy with actorder: columns keep their own group's qparams while being
    processed in diag-H order; D and W0 must follow the permutation. Checked against the
    oracle run in that order (and, dynamic, with min-max group scales taken from the
    latent weights when a group's first column in processing order is reached)."""
    a, b, f, use_d = PAPER_CASES[case]
    quant_args = int_args(4, "group", 16, symmetric=False, actorder="weight")
    layer = make_layer(13, 24, 64, quant_args, w0_differs=True)
    order = torch.argsort(layer["H"].diagonal(), descending=True)
    expected, expected_loss, exp_scale, exp_zp = oracle_for(
        layer, quant_args, a, b, f, use_d, order=order, dynamic=dynamic
    )
    group_scales = GroupScales.DYNAMIC if dynamic else GroupScales.STATIC
    result = run_solver(layer, quant_args, paper_terms(a, b, f, group_scales=group_scales),
                        use_d=use_d, blocksize=16)
    torch.testing.assert_close(result.scale[0].double(), exp_scale, rtol=1e-9, atol=0)
    assert torch.equal(result.zero_point[0], exp_zp)
    assert_same_codes(result.quantized[0], expected, exp_scale, exp_zp, quant_args)
    assert result.losses[0].item() == pytest.approx(expected_loss, rel=1e-5)


# ---------------------------------------------------------------------- 6. dead columns


DEAD = [3, 17, 40]


def layer_with_dead_columns(quant_args, seed=21):
    layer = make_layer(seed, 24, 64, quant_args, w0_differs=True)
    x_q = layer["x_q"].clone()
    x_q[DEAD] = 0.0
    H, _ = statistics(x_q, layer["x_fp"])
    # D nonzero in the dead columns too (rows and columns): the solver must mask it
    g = torch.Generator().manual_seed(seed)
    D = layer["D"] + 0.05 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    assert (H.diagonal()[DEAD] == 0).all() and (D[:, DEAD] != 0).all()
    assert (layer["W0"][:, DEAD] != 0).all() and (layer["W"][:, DEAD] != 0).all()
    return dict(layer, x_q=x_q, H=H, D=D)


@pytest.mark.parametrize("semantics", ["paper", "released"])
@pytest.mark.parametrize("method", ["gptq"] + RELEASED_METHODS)
@pytest.mark.parametrize("actorder", [None, "weight"])
def test_dead_columns_are_zero_and_finite(method, semantics, actorder):
    quant_args = int_args(4, "group", 16, symmetric=False, actorder=actorder)
    layer = layer_with_dead_columns(quant_args)
    terms = CompensationTerms.for_method(method, semantics, 4)
    result = run_solver(layer, quant_args, terms, blocksize=16, dtype=torch.float32)
    quantized = result.quantized[0]
    assert torch.isfinite(quantized).all() and torch.isfinite(result.losses).all()
    assert (quantized[:, DEAD] == 0).all()
    live = [c for c in range(64) if c not in DEAD]
    assert (quantized[:, live] != 0).any(dim=0).all()


@pytest.mark.parametrize("method", ["gptaq_cae", "gptq_cae", "foem", "foem_gptaq"])
@pytest.mark.parametrize("actorder", [None, "weight"])
def test_original_weights_default_to_the_weights(method, actorder):
    """No ``original_weights`` (what the modifiers pass) means W0 = the weights handed in.

    The solver then copies W0 from its own permuted, dead-column-zeroed W instead of
    preparing a second tensor; the result must be the same to the bit.
    """
    quant_args = int_args(4, "group", 16, symmetric=False, actorder=actorder)
    layer = layer_with_dead_columns(quant_args)
    layer = dict(layer, W0=layer["W"].clone())
    terms = CompensationTerms.for_method(method, "released", 4)
    explicit = run_solver(layer, quant_args, terms, blocksize=16, dtype=torch.float32)
    implicit = compensate_weight(
        layer["W"].float()[None].clone(), layer["H"].float()[None].clone(),
        layer["scale"].float()[None].clone(), layer["zp"][None].clone(), None,
        quant_args, asymmetry=layer["D"].float()[None].clone(), terms=terms,
        blocksize=16, percdamp=PERCDAMP,
    )
    assert torch.equal(implicit.quantized, explicit.quantized)
    assert torch.equal(implicit.losses, explicit.losses)


@pytest.mark.parametrize("case", ["gptaq_cae_unequal", "everything"])
def test_dead_columns_do_not_disturb_live_ones(float64_solver, case):
    """Papers' semantics: the live columns come out as if the dead columns were not
    there (same damping lambda; upstream counts a dead column's diagonal as 1 in it)."""
    a, b, f, use_d = PAPER_CASES[case]
    quant_args = int_args(3, "channel")
    layer = layer_with_dead_columns(quant_args)
    full = run_solver(layer, quant_args, paper_terms(a, b, f), use_d=use_d, blocksize=16)
    live = torch.tensor([c for c in range(64) if c not in DEAD])
    diag = layer["H"].diagonal().clone()
    diag[DEAD] = 1.0
    damp = PERCDAMP * diag.mean()
    reduced = dict(layer, W=layer["W"][:, live], W0=layer["W0"][:, live],
                   H=layer["H"][live][:, live], D=layer["D"][live][:, live])
    percdamp = float(damp / reduced["H"].diagonal().mean())
    small = compensate_weight(
        reduced["W"][None].clone(), reduced["H"][None].clone(), layer["scale"][None],
        layer["zp"][None], None, quant_args,
        asymmetry=reduced["D"][None].clone() if use_d else None,
        original_weights=reduced["W0"][None].clone(),
        terms=paper_terms(a, b, f), blocksize=16, percdamp=percdamp,
    )
    assert_same_codes(full.quantized[0][:, live], small.quantized[0], layer["scale"],
                      layer["zp"], quant_args)


# ------------------------------------------------------------------ 7. Cholesky fallback


@pytest.mark.parametrize("method", ["gptaq_cae", "foem_gptaq", "gptq_cae", "foem"])
@pytest.mark.parametrize("semantics", ["paper", "released"])
def test_cholesky_failure_falls_back_to_rtn_for_that_item_only(method, semantics):
    from loguru import logger

    quant_args = int_args(4, "group", 16, symmetric=False)
    layers = [make_layer(30 + i, 24, 64, quant_args, w0_differs=True) for i in range(3)]
    layers[1]["H"] = layers[1]["H"].clone()
    layers[1]["H"][5, 5] = -10.0 * layers[1]["H"].diagonal().mean()  # not PD after damping
    stack = lambda key: torch.stack([lay[key] for lay in layers]).to(torch.float32)  # noqa: E731
    terms = CompensationTerms.for_method(method, semantics, 4)

    messages = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        result = compensate_weight(
            stack("W"), stack("H"), stack("scale"), torch.stack([lay["zp"] for lay in layers]),
            None, quant_args, asymmetry=stack("D"), original_weights=stack("W0"),
            terms=terms, blocksize=16, percdamp=PERCDAMP,
        )
    finally:
        logger.remove(sink)

    assert result.used_rtn_fallback.tolist() == [False, True, False]
    failed = layers[1]
    expected = rtn(failed["W"].float(), failed["scale"].float(), failed["zp"], quant_args)
    assert torch.equal(result.quantized[1], expected)
    # the solver only flags the item; the modifier names the module once (test_modifiers)
    assert messages == []
    for index in (0, 2):
        lay = layers[index]
        alone = run_solver(lay, quant_args, terms, blocksize=16, dtype=torch.float32)
        assert not alone.used_rtn_fallback.any()
        torch.testing.assert_close(result.quantized[index], alone.quantized[0],
                                   rtol=0, atol=1e-6)


# ----------------------------------------------------------- 8. batched equals one by one


@pytest.mark.parametrize(
    "terms",
    [
        CompensationTerms(),
        CompensationTerms.for_method("gptaq_cae", "paper", 4),
        CompensationTerms.for_method("gptaq_cae", "released", 4),
        CompensationTerms.for_method("gptaq", "released", 4),
        CompensationTerms.for_method("foem_gptaq", "released", 4),
        paper_terms(0.7, 0.3, 0.2, group_scales=GroupScales.DYNAMIC),
    ],
    ids=["gptq", "cae_paper", "cae_released", "gptaq_released", "foem_gptaq_released",
         "dynamic"],
)
def test_batched_equals_one_by_one(terms):
    quant_args = int_args(4, "group", 16, symmetric=False, actorder="weight")
    layers = [make_layer(40 + i, 24, 64, quant_args, w0_differs=True) for i in range(3)]
    stack = lambda key: torch.stack([lay[key] for lay in layers]).to(torch.float32)  # noqa: E731
    batched = compensate_weight(
        stack("W"), stack("H"), stack("scale"), torch.stack([lay["zp"] for lay in layers]),
        None, quant_args, asymmetry=stack("D"), original_weights=stack("W0"),
        terms=terms, blocksize=16, percdamp=PERCDAMP,
    )
    for index, lay in enumerate(layers):
        alone = run_solver(lay, quant_args, terms, blocksize=16, dtype=torch.float32)
        torch.testing.assert_close(batched.quantized[index], alone.quantized[0],
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(batched.losses[index], alone.losses[0], rtol=1e-5, atol=0)
        assert torch.equal(batched.scale[index], alone.scale[0])
        assert torch.equal(batched.zero_point[index], alone.zero_point[0])


# ------------------------------------------------------------------------ 9. statistics


def layer_objective(Q, W0, x_q, x_fp):
    return float(((Q @ x_q - W0 @ x_fp) ** 2).sum())


def test_gptaq_lowers_the_layer_objective_on_average():
    """Objective ||Q X_q - W0 X_fp||^2 on synthetic layers whose quantized-flow inputs
    drifted from the FP flow. GPTAQ targets W0 X_fp, GPTQ only W0 X_q, so GPTAQ should
    win on average; the margin is two standard errors of the paired improvement over
    all 20 seeds (every seed counted, none chosen). Measured: relative improvement
    8.3% +- 0.2% (papers') and 3.7% +- 0.1% (released), standard errors."""
    quant_args = int_args(3, "group", 32, symmetric=False, actorder="weight")
    methods = {
        "gptq": CompensationTerms(),
        "gptaq_paper": CompensationTerms.for_method("gptaq", "paper", 3),
        "gptaq_released": CompensationTerms.for_method("gptaq", "released", 3),
    }
    objective = {name: [] for name in methods}
    for seed in range(20):
        x_q, x_fp = make_activations(100 + seed, 64, tokens=512, drift=0.3,
                                     dtype=torch.float32)
        H, D = statistics(x_q, x_fp)
        g = torch.Generator().manual_seed(200 + seed)
        W0 = torch.randn(48, 64, generator=g)
        scale, zero_point = static_qparams(W0, quant_args)
        for name, terms in methods.items():
            result = compensate_weight(
                W0[None].clone(), H[None].clone(), scale[None], zero_point[None], None,
                quant_args, asymmetry=D[None].clone(), terms=terms, blocksize=32,
            )
            objective[name].append(layer_objective(result.quantized[0], W0, x_q, x_fp))
    gptq = torch.tensor(objective["gptq"], dtype=torch.float64)
    for name in ("gptaq_paper", "gptaq_released"):
        improvement = (gptq - torch.tensor(objective[name], dtype=torch.float64)) / gptq
        standard_error = improvement.std() / math.sqrt(len(improvement))
        assert improvement.mean() > 2 * standard_error, (
            f"{name}: mean relative improvement {improvement.mean():.4f}, "
            f"standard error {standard_error:.4f}"
        )


# ----------------------------------------------------------------------- 10. bad input


def _with_entry(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


def _call(**overrides):
    quant_args = overrides.pop("quant_args", int_args(4, "group", 16))
    W = torch.randn(1, 8, 32)
    H = torch.eye(32)[None] * 2.0
    scale, zero_point = static_qparams(W, quant_args) if quant_args.strategy in (
        "group", "channel") else (torch.ones(1, 8, 1), torch.zeros(1, 8, 1))
    kwargs = dict(weights=W, hessians=H, scale=scale, zero_point=zero_point,
                  global_scale=None, quant_args=quant_args)
    kwargs.update(overrides)
    return compensate_weight(**kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hessians=torch.eye(16)[None]), "hessians must have shape"),
        (dict(hessians=torch.eye(32).repeat(2, 1, 1)), "hessians must have shape"),
        (dict(hessians=torch.ones(1, 32, 16)), "square"),
        (dict(weights=torch.randn(8, 32)), r"weights must be \[batch, rows, columns\]"),
        (dict(hessians=_with_entry(torch.eye(32)[None], (0, 3, 3), math.nan)),
         "H contains NaN or Inf"),
        (dict(asymmetry=torch.full((1, 32, 32), math.inf)), "D contain NaN or Inf"),
        # +Inf and -Inf, whose sum is NaN, and a lone -Inf
        (dict(hessians=_with_entry(_with_entry(torch.eye(32)[None], (0, 1, 2), math.inf),
                                   (0, 2, 1), -math.inf)), "H contains NaN or Inf"),
        (dict(asymmetry=_with_entry(torch.zeros(1, 32, 32), (0, 5, 9), -math.inf)),
         "D contain NaN or Inf"),
        (dict(asymmetry=torch.zeros(1, 16, 16)), "asymmetry statistics D must have"),
        (dict(original_weights=torch.randn(1, 8, 16)), "original_weights must have"),
        (dict(quant_args=int_args(4, "group", 24)), "does not divide"),
        (dict(quant_args=QuantizationArgs(num_bits=8, strategy="token", dynamic=True)),
         "not supported"),
        (dict(quant_args=int_args(4, "channel"),
              terms=CompensationTerms(group_scales="dynamic")), "strategy 'group'"),
    ],
    ids=["columns_mismatch", "batch_mismatch", "non_square_h", "weights_2d", "nan_h",
         "inf_d", "opposite_infs_h", "negative_inf_d", "d_shape", "w0_shape", "group_size", "token_strategy",
         "dynamic_channel"],
)
def test_bad_input_raises_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


def test_non_finite_coefficient_is_rejected():
    with pytest.raises(ValueError, match="must be finite"):
        CompensationTerms(asymmetric_coefficient=math.nan)


# --------------------------------------------------------------- 11. dynamic group scales


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["gptaq", "gptaq_cae", "foem_gptaq"])
def test_dynamic_group_scales_are_returned_and_used(method, symmetric):
    quant_args = int_args(4, "group", 16, symmetric=symmetric)
    layer = make_layer(50, 24, 64, quant_args)
    static_scale, static_zp = static_qparams(layer["W0"].float(), quant_args)
    layer = dict(layer, scale=static_scale.double(), zp=static_zp)
    terms = CompensationTerms.for_method(method, "released", 4).with_overrides(
        group_scales="dynamic")
    result = run_solver(layer, quant_args, terms, blocksize=32, dtype=torch.float32)
    scale, zero_point = result.scale[0], result.zero_point[0]
    # the first group starts before any compensation touched it: min-max of W itself
    assert torch.equal(scale[:, 0], static_scale[:, 0].float())
    # later groups were measured on compensated weights
    for group in range(1, 4):
        assert not torch.equal(scale[:, group], static_scale[:, group].float())
    # every quantized value lies exactly on the grid of the returned qparams
    codes = codes_of(result.quantized[0], scale, zero_point, quant_args)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    lo, hi = code_range(4)
    assert codes.round().min() >= lo and codes.round().max() <= hi
    # and round-to-nearest with the returned qparams reproduces them
    assert torch.equal(rtn(result.quantized[0], scale, zero_point, quant_args),
                       result.quantized[0])
    # the caller's qparams are not modified in place
    assert torch.equal(layer["scale"], static_scale.double())


@pytest.mark.parametrize("bits,symmetric", [(2, True), (3, False), (4, True), (4, False),
                                            (8, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_column_quantization_is_compressed_tensors_fake_quantize(bits, symmetric, dtype):
    """The loop quantizes integer columns itself: the same bits as fake_quantize,
    including values exactly on rounding boundaries and far outside the range."""
    from compressed_tensors.quantization import fake_quantize

    from rescomp_modifiers.compensation import _ColumnQuantizer

    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group",
                            group_size=4)
    generator = torch.Generator().manual_seed(bits)
    batch, rows = 3, 257
    scale = (torch.rand(batch, rows, 2, generator=generator) + 0.05).to(dtype)
    levels = 2 ** bits
    zero_point = (None if symmetric else
                  torch.randint(0, levels, (batch, rows, 2), generator=generator).to(torch.int8))
    quantizer = _ColumnQuantizer(scale, zero_point, None, torch.zeros(batch, 8, dtype=torch.long),
                                 args, rows)
    column_scale, column_zero = scale[..., 0], None if symmetric else zero_point[..., 0]
    values = torch.randn(batch, rows, generator=generator, dtype=dtype) * levels * column_scale
    # half-way between two levels (round half to even decides) and beyond the range
    values[:, :40] = (torch.arange(40, dtype=dtype) - 20.5) * column_scale[:, :40]
    values[:, 40] = 1e6
    expected = fake_quantize(values.t(), column_scale.t(),
                             None if symmetric else column_zero.t(),
                             quantizer.column_args).t()
    got = quantizer.quantize(values, column_scale, column_zero)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)
