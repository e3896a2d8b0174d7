"""The in-place MSE clipping search against llm-compressor's own eager search."""

import itertools
from unittest import mock

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.utils.impl_backend import ImplBackend
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.observers import Observer

import rescomp_modifiers.mse_search as mse_search
from rescomp_modifiers import GPTAQModifier
from rescomp_modifiers.mse_search import grid_search_mse_in_place, in_place_mse_search

from helpers import IGNORE, assert_same_search, run_oneshot, upstream_search

SETTINGS = list(itertools.product([2, 3, 4, 8], [True, False], [("group", 16), ("group", 64),
                                                                  ("channel", None)]))


@pytest.mark.parametrize("bits,symmetric,strategy", SETTINGS)
@pytest.mark.parametrize("chunk_elements", [mse_search.CHUNK_ELEMENTS, 1000])
def test_same_ranges_as_upstream_on_random_weights(bits, symmetric, strategy, chunk_elements,
                                                   monkeypatch):
    """One chunk of rows, and several with a ragged last one."""
    monkeypatch.setattr(mse_search, "CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(bits)
    weights = torch.randn(48, 128, generator=generator)
    weights[:, 5] *= 8  # outliers, so that clipping pays
    weights[3] = 0.0  # a dead row: every candidate ties
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy=strategy[0],
                            group_size=strategy[1], observer="memoryless_mse")
    assert_same_search(weights, args)


@pytest.mark.parametrize("observer_kwargs", [dict(grid=50.0), dict(patience=1),
                                             dict(norm=2.0), dict(expand=1.3),
                                             dict(maxshrink=0.5)])
def test_same_ranges_as_upstream_with_other_observer_options(observer_kwargs):
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(64, 96, generator=generator) * torch.rand(1, 96, generator=generator)
    args = QuantizationArgs(num_bits=3, symmetric=False, strategy="group", group_size=32,
                            observer="memoryless_mse")
    assert_same_search(weights, args, **observer_kwargs)


def test_same_ranges_as_upstream_over_several_observations():
    """Activation-shaped input (several observations per range): scored whole."""
    generator = torch.Generator().manual_seed(2)
    observed = torch.randn(3, 40, 2, 16, generator=generator)
    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=16,
                            observer="memoryless_mse")
    observer = Observer.load_from_registry("memoryless_mse", base_name="weight", args=args)
    positional = (observed, args, observer._token_args)
    options = dict(maxshrink=0.2, patience=5, grid=100.0, norm=2.4, triton_error_buffer=0.3)
    for ours, theirs in zip(grid_search_mse_in_place(*positional, **options),
                            upstream_search(*positional, **options)):
        assert torch.equal(ours, theirs)


def test_only_inside_the_block_and_only_where_checked():
    weights = torch.randn(8, 32)
    int_args = QuantizationArgs(num_bits=4, strategy="group", group_size=16,
                                observer="memoryless_mse")
    fp4_args = QuantizationArgs(num_bits=4, type="float", strategy="group", group_size=16,
                                observer="memoryless_mse")

    def taken(args, dtype=torch.float32) -> bool:
        observer = Observer.load_from_registry("memoryless_mse", base_name="weight", args=args)
        with mock.patch.object(mse_search, "grid_search_mse_in_place",
                               wraps=grid_search_mse_in_place) as spy, \
                mock.patch.dict(ImplBackend._backends, {"_grid_search_mse": [
                    (spy, mse_search._applies, 1)]}):
            observer(weights.to(dtype)).get_qparams()
        return spy.called

    assert not taken(int_args)
    with in_place_mse_search():
        assert taken(int_args)
        assert not taken(fp4_args)
        assert not taken(int_args, torch.bfloat16)
    assert not taken(int_args)


@pytest.mark.parametrize("strategy", ["group", "channel"])
def test_zero_coefficient_with_mse_clipping_is_stock_gptq_with_it(tiny_model_dir, strategy):
    """End to end: ours takes the in-place search, stock GPTQ upstream's; the weights,
    scales and zero points must be the same bits."""
    weights = {"num_bits": 3, "type": "int", "symmetric": False, "strategy": strategy,
               "observer": "memoryless_mse"}
    if strategy == "group":
        weights["group_size"] = 32
    scheme = {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    calls = []
    original = mse_search.grid_search_mse_in_place

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with mock.patch.dict(ImplBackend._backends, {"_grid_search_mse": [
            (counting, mse_search._applies, 1)]}):
        ours = run_oneshot(tiny_model_dir, [GPTAQModifier(ignore=IGNORE,
                                                          asymmetric_coefficient=0.0, **scheme)],
                           shuffle_calibration_samples=False)
        assert calls, "our modifier did not take the in-place search"
        taken = len(calls)
        stock = run_oneshot(tiny_model_dir, [GPTQModifier(ignore=IGNORE, **scheme)],
                            shuffle_calibration_samples=False)
        assert len(calls) == taken, "stock GPTQ took the in-place search"
    ours_state, stock_state = ours.state_dict(), stock.state_dict()
    assert ours_state.keys() == stock_state.keys()
    for key in stock_state:
        assert torch.equal(ours_state[key], stock_state[key]), key
