"""The least-squares refit of group scales, against a fit computed from activations."""

import pytest
import torch

from rescomp_modifiers import CAEModifier
from rescomp_modifiers.scale_refit import refit_scales

from helpers import IGNORE, record_solves, run_unshuffled

TOKENS, ROWS, COLUMNS = 300, 5, 24


def _streams(seed: int):
    """Inputs with uneven column scales, float64, and their H in the solver's
    normalization (2/N)."""
    generator = torch.Generator().manual_seed(seed)
    x_q = torch.randn(TOKENS, COLUMNS, generator=generator, dtype=torch.float64) * (
        0.2 + 2 * torch.rand(COLUMNS, generator=generator, dtype=torch.float64))
    return x_q, 2.0 / TOKENS * x_q.T @ x_q


def _rounded(weights: torch.Tensor, group_size: int, levels: int = 4):
    """Round-to-nearest codes on min-max symmetric scales: ``(codes, scale)``."""
    scale = weights.abs().reshape(ROWS, -1, group_size).amax(-1) / (levels - 0.5)
    codes = torch.clamp(torch.round(weights / scale.repeat_interleave(group_size, 1)),
                        -levels, levels - 1)
    return codes, scale


def _least_squares_scales(codes, group_size, x_q, target_output):
    """Per row, the scales minimizing ``||target - sum_g s_g (C masked to g) x_q||^2``
    by ``torch.linalg.lstsq`` on the activations themselves."""
    groups = COLUMNS // group_size
    members = torch.arange(COLUMNS) // group_size
    solutions = []
    for row in range(ROWS):
        design = torch.stack([x_q @ (codes[row] * (members == g)) for g in range(groups)], 1)
        solutions.append(torch.linalg.lstsq(design, target_output[:, row:row + 1]).solution[:, 0])
    return torch.stack(solutions)


@pytest.mark.parametrize("group_size", [8, COLUMNS], ids=["group", "channel"])
def test_refit_scales_are_the_least_squares_fit_of_the_output(group_size):
    """The scales that best reproduce GPTQ's target ``W0 x_q`` from the codes."""
    x_q, H = _streams(seed=1)
    W0 = torch.randn(ROWS, COLUMNS, generator=torch.Generator().manual_seed(2),
                     dtype=torch.float64)
    codes, scale = _rounded(W0, group_size)
    quantized = codes * scale.repeat_interleave(group_size, 1)
    expected = _least_squares_scales(codes, group_size, x_q, x_q @ W0.T)

    new_quantized, new_scale = refit_scales(
        quantized[None].float(), scale[None].float(), W0[None].float(), H[None].float())

    torch.testing.assert_close(new_scale[0].double(), expected, rtol=1e-5, atol=1e-6)
    # the codes stay: the new weights are the new scales times the old codes
    torch.testing.assert_close(new_quantized[0].double(),
                               codes * new_scale[0].double().repeat_interleave(group_size, 1))


def test_a_group_of_zero_codes_keeps_its_scale_and_the_rest_is_fitted():
    x_q, H = _streams(seed=3)
    W0 = torch.randn(ROWS, COLUMNS, generator=torch.Generator().manual_seed(4),
                     dtype=torch.float64)
    codes, scale = _rounded(W0, 8)
    codes[0, :8] = 0  # row 0's first group says nothing about its scale
    quantized = codes * scale.repeat_interleave(8, 1)
    _, new_scale = refit_scales(quantized[None].float(), scale[None].float(),
                                W0[None].float(), H[None].float())
    assert new_scale[0, 0, 0] == scale[0, 0].float()
    # the other groups of that row: the least-squares fit with the silent group held
    residual = x_q @ W0[0] - x_q[:, :8] @ (codes[0, :8] * scale[0, 0])
    design = torch.stack([x_q @ (codes[0] * (torch.arange(COLUMNS) // 8 == g))
                          for g in (1, 2)], 1)
    expected = torch.linalg.lstsq(design, residual[:, None]).solution[:, 0]
    torch.testing.assert_close(new_scale[0, 0, 1:].double(), expected, rtol=1e-5, atol=1e-6)


def test_a_row_whose_fit_is_not_a_positive_scale_keeps_its_weights_bit_for_bit():
    """Codes anti-correlated with the target would want negative scales: the row keeps
    what the loop gave it; the other rows are refitted."""
    x_q, H = _streams(seed=5)
    W0 = torch.randn(ROWS, COLUMNS, generator=torch.Generator().manual_seed(6),
                     dtype=torch.float64)
    codes, scale = _rounded(W0, 8)
    codes[2] = -codes[2]
    quantized = (codes * scale.repeat_interleave(8, 1)).float()
    new_quantized, new_scale = refit_scales(quantized[None], scale[None].float(),
                                            W0[None].float(), H[None].float())
    assert torch.equal(new_quantized[0, 2], quantized[2])
    assert torch.equal(new_scale[0, 2], scale[2].float())
    assert not torch.equal(new_scale[0, 0], scale[0].float())


def _first_layer_errors(tiny_model_dir, monkeypatch, refit: bool) -> dict:
    """Each first-layer module's GPTQ output error ``tr(E H E^T)`` (float64, from the H
    its solve received) and its integer codes."""
    from transformers import AutoModelForCausalLM

    statistics = {}
    record_solves(monkeypatch, lambda names, hessian, _asymmetry: statistics.update(
        {name: hessian for name in names}))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    originals = {name: module.weight.detach().clone().double()
                 for name, module in model.named_modules() if name.startswith("model.layers.0.")
                 and isinstance(module, torch.nn.Linear)}
    run_unshuffled(model, [CAEModifier(ignore=IGNORE, refit_scales=refit, config_groups={
        "group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 3, "type": "int", "symmetric": True, "strategy": "group",
            "group_size": 16}}})])
    modules = dict(model.named_modules())
    outcome = {}
    for name, W0 in originals.items():
        module = modules[name]
        # a row-stacked unit's H is each member's: the module's rows alone
        E = module.weight.detach().double() - W0
        error = float((E @ statistics[name].double() * E).sum())
        codes = torch.round(module.weight.detach().double() / module.weight_scale.double().repeat_interleave(16, 1))
        outcome[name] = (error, codes)
    return outcome


def test_oneshot_with_refit_keeps_the_codes_and_lowers_each_modules_output_error(
        tiny_model_dir, monkeypatch):
    """The first decoder layer sees the same inputs with and without the refit, so its
    solves are the same up to the scales: the checkpoint's integer codes must match and
    each module's layer-output error (computed here from the statistics) must not rise."""
    plain = _first_layer_errors(tiny_model_dir, monkeypatch, refit=False)
    monkeypatch.undo()
    refitted = _first_layer_errors(tiny_model_dir, monkeypatch, refit=True)
    assert plain.keys() == refitted.keys() and plain
    lowered = 0
    for name, (error, codes) in plain.items():
        refit_error, refit_codes = refitted[name]
        assert torch.equal(codes, refit_codes), name
        assert refit_error <= error * (1 + 1e-6) + 1e-9, (name, refit_error, error)
        lowered += refit_error < error * (1 - 1e-4)
    assert lowered >= len(plain) // 2


def test_refit_is_refused_for_a_float_scheme(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="refit_scales needs integer weights"):
        run_unshuffled(model, [CAEModifier(ignore=IGNORE, refit_scales=True,
                                           scheme="FP8_DYNAMIC", targets=["Linear"])])


def test_refit_is_refused_for_dynamic_weight_scales():
    from compressed_tensors.quantization import QuantizationArgs

    from rescomp_modifiers.scale_refit import check_refit_supported

    check_refit_supported(QuantizationArgs(num_bits=4, type="int", strategy="group",
                                           group_size=32))
    with pytest.raises(ValueError, match="refit_scales needs static weight scales"):
        check_refit_supported(QuantizationArgs(num_bits=4, type="int", strategy="group",
                                               group_size=32, dynamic=True))
