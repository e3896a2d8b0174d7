"""The shipped recipes are current and parse into our modifiers."""

import importlib.util
from pathlib import Path

import pytest
import yaml
from llmcompressor.recipe import Recipe

import rescomp_modifiers

ROOT = Path(__file__).parent.parent
spec = importlib.util.spec_from_file_location("generate", ROOT / "recipes" / "generate.py")
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)
RECIPES = generate.recipes()


def test_committed_recipes_match_generator():
    committed = {str(p.relative_to(ROOT)) for p in ROOT.glob("recipes/*/*.yaml")}
    assert committed == set(RECIPES)
    for relative, text in RECIPES.items():
        assert (ROOT / relative).read_text() == text, f"run recipes/generate.py ({relative})"


@pytest.mark.parametrize("relative", sorted(RECIPES))
def test_recipe_parses_into_modifier(relative):
    recipe = Recipe.create_instance(str(ROOT / relative))
    (modifier,) = recipe.modifiers
    method = Path(relative).parent.name
    expected = {"gptaq": rescomp_modifiers.GPTAQModifier, "foem": rescomp_modifiers.FOEMModifier}
    assert type(modifier) is expected.get(method, rescomp_modifiers.CAEModifier)
    if method.endswith("cae"):
        assert modifier.statistics == ("gptaq" if method == "gptaq_cae" else "gptq")
    weights = yaml.safe_load((ROOT / relative).read_text())["quant_stage"]["quant_modifiers"]
    (settings,) = weights.values()
    args = settings["config_groups"]["group_0"]["weights"]
    scheme = Path(relative).stem
    assert args["num_bits"] == int(scheme[1])
    assert ("group_size" in args) == (args["strategy"] == "group")
    if scheme.endswith("_g64"):
        assert args["group_size"] == 64


def test_one_method_vocabulary():
    """Every named method builds its modifier, and the solver's coefficient table knows
    the same names as the vocabulary (less the baselines it does not solve)."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    from rescomp_modifiers.compensation import CompensationTerms
    from rescomp_modifiers.methods import METHODS, build_modifier

    for name, method in METHODS.items():
        modifier = build_modifier(name, scheme="W4A16", ignore=["lm_head"], semantics="paper")
        assert type(modifier).__name__ == method.modifier
        observers = {group.weights.observer
                     for group in modifier.resolve_quantization_config().config_groups.values()}
        if method.weight_observer:
            assert observers == {method.weight_observer}
        else:
            assert observers.isdisjoint({"memoryless_mse", "mse"})
        if isinstance(modifier, rescomp_modifiers.modifiers.CompensationModifier):
            assert modifier.resolved_method() == method.terms_name
            assert modifier.semantics == "paper"
            CompensationTerms.for_method(method.terms_name)
        elif isinstance(modifier, GPTQModifier):
            assert name in ("gptq", "gptq_mse")
    with pytest.raises(ValueError, match="unknown method 'cae'"):
        build_modifier("cae")
    with pytest.raises(ValueError, match="Unknown method 'cae'"):
        CompensationTerms.for_method("cae")
