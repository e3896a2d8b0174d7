"""releasing_oneshot_models frees the models of oneshot runs made in one process."""

import gc
import weakref

import pytest
from llmcompressor.modifiers.gptq import GPTQModifier

from rescomp_modifiers import CAEModifier
from rescomp_modifiers.release import releasing_oneshot_models

from helpers import GROUP32, run_oneshot

RECIPES = {
    "stock GPTQ": lambda: [GPTQModifier(ignore=["lm_head"], config_groups=GROUP32)],
    "CAE": lambda: [CAEModifier(ignore=["lm_head"], config_groups=GROUP32)],
}


def quantize(model_dir, recipe) -> weakref.ref:
    """One oneshot; returns only a weak reference to its model."""
    return weakref.ref(run_oneshot(model_dir, recipe))


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
