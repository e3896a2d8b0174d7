"""releasing_oneshot_models frees the models of oneshot runs made in one process."""

import gc
import weakref

import pytest
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from transformers import AutoModelForCausalLM

from rescomp_modifiers import CAEModifier
from rescomp_modifiers.release import releasing_oneshot_models

from conftest import calibration_dataset

SCHEME = {"group_0": {"targets": ["Linear"], "weights": {
    "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}}
RECIPES = {
    "stock GPTQ": lambda: [GPTQModifier(ignore=["lm_head"], config_groups=SCHEME)],
    "CAE": lambda: [CAEModifier(ignore=["lm_head"], config_groups=SCHEME)],
}


def quantize(model_dir, recipe) -> weakref.ref:
    """One oneshot; returns only a weak reference to its model."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    oneshot(model=model, dataset=calibration_dataset(), recipe=recipe, max_seq_length=32,
            num_calibration_samples=8)
    return weakref.ref(model)


@pytest.mark.parametrize("name", RECIPES)
def test_models_of_runs_inside_are_freed(tiny_model_dir, name):
    for _ in range(2):
        with releasing_oneshot_models():
            model = quantize(tiny_model_dir, RECIPES[name]())
            gc.collect()
            # the reason the helper exists: upstream still holds the model the caller
            # dropped (if this ever fails, upstream stopped and the helper can go)
            assert model() is not None
        assert model() is None
