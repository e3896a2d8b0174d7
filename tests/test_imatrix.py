"""llm-compressor's imatrix_mse observer under our modifiers and pipeline."""

import pytest
import torch
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.observers.imatrix import IMatrixMSEObserver

from rescomp_modifiers import CAEModifier, GPTAQModifier

from helpers import IGNORE, record_solves, run_oneshot, track_full_precision_pass


def _scheme(strict: bool = True) -> dict:
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": 32, "observer": "imatrix_mse",
               "observer_kwargs": {"strict": strict}}
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}


@pytest.mark.parametrize("modifier", [
    lambda: GPTAQModifier(ignore=IGNORE, asymmetric_coefficient=0.0, **_scheme()),
    lambda: CAEModifier(ignore=IGNORE, asymmetric_coefficient=0.0,
                        compensation_aware_coefficient=0.0, **_scheme()),
], ids=["gptaq", "cae"])
def test_zero_coefficients_with_imatrix_write_stock_gptq_imatrix(tiny_model_dir, modifier):
    """The dual-stream pipeline's full-precision pass must not reach the importance hook:
    with every term off, our checkpoint is stock GPTQ + imatrix_mse's, bit for bit."""
    ours = run_oneshot(tiny_model_dir, [modifier()], shuffle_calibration_samples=False)
    stock = run_oneshot(tiny_model_dir, [GPTQModifier(ignore=IGNORE, **_scheme())],
                        shuffle_calibration_samples=False)
    ours_state, stock_state = ours.state_dict(), stock.state_dict()
    assert ours_state.keys() == stock_state.keys()
    for key in stock_state:
        assert torch.equal(ours_state[key], stock_state[key]), key


@pytest.mark.parametrize("true_sequential", [False, True])
def test_importance_comes_from_the_quantized_stream(tiny_model_dir, monkeypatch,
                                                    true_sequential):
    """The importance the observer used must be the diagonal of the H that our
    statistics summed from the quantized stream (both normalized to mean 1, as the
    observer normalizes), and, from the second layer on where the streams differ, not
    E[x^2] of the full-precision pass's inputs (recorded by a hook of the test's own).
    With true-sequential stage passes too, where each stage's observers must hear
    their own stage (before, they heard nothing and fell back to plain MSE)."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    import helpers

    capturing = track_full_precision_pass(monkeypatch)
    modules_of, used, hessians = {}, {}, {}
    original_attach = IMatrixMSEObserver.attach
    original_importance = IMatrixMSEObserver._get_validated_importance

    def attach(self, module):
        modules_of[id(self)] = module
        return original_attach(self, module)

    def importance(self, observed):
        value = original_importance(self, observed)  # strict: raises without data
        used[modules_of[id(self)]] = value.double() / value.double().mean()
        return value

    monkeypatch.setattr(IMatrixMSEObserver, "attach", attach)
    monkeypatch.setattr(IMatrixMSEObserver, "_get_validated_importance", importance)
    record_solves(monkeypatch, lambda names, hessian, _asymmetry: hessians.update(
        {name: hessian for name in names}))

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fp_sums = {}

    def record_full_precision(module, args):
        if capturing[0]:
            x = args[0].detach().double()
            fp_sums[module] = fp_sums.get(module, 0) + x.square().reshape(-1, x.shape[-1]).sum(0)

    names = {m: n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    for module in names:
        module.register_forward_pre_hook(record_full_precision)
    oneshot(model=model, dataset=helpers.calibration_dataset(),
            recipe=[GPTAQModifier(ignore=IGNORE, true_sequential=true_sequential,
                                  **_scheme())],
            max_seq_length=32, num_calibration_samples=8, shuffle_calibration_samples=False)
    assert set(used) == set(names)
    streams_differ = 0
    for module, name in names.items():
        diagonal = torch.diagonal(hessians[name]).double()
        torch.testing.assert_close(used[module], diagonal / diagonal.mean(), rtol=1e-4,
                                   atol=1e-6)
        full_precision = fp_sums[module] / fp_sums[module].mean()
        streams_differ += not torch.allclose(full_precision, used[module], rtol=1e-3)
    assert streams_differ >= 7  # the second layer's modules: the test tells them apart


def test_dynamic_groups_refuse_imatrix_instead_of_falling_back_to_plain_mse(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from helpers import run_unshuffled

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="group_scales: dynamic cannot use observer imatrix_mse"):
        run_unshuffled(model, [CAEModifier(ignore=IGNORE, group_scales="dynamic",
                                           **_scheme())])
