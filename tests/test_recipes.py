"""The shipped recipes are current and parse into our modifiers."""

import importlib.util
from pathlib import Path

import pytest
import yaml
from compressed_tensors.quantization import QuantizationArgs
from llmcompressor.modifiers.transform import SpinQuantModifier
from llmcompressor.recipe import Recipe

import rescomp_modifiers
from rescomp_modifiers.methods import method_for_setting

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
    scheme = Path(relative).stem
    if scheme.endswith("_rot"):
        # the rotation runs first, so the solver quantizes the rotated weights
        rotation, modifier = recipe.modifiers
        assert type(rotation) is SpinQuantModifier
        assert list(rotation.rotations) == ["R1", "R2"]
        assert rotation.transform_block_size == (64 if "_g64" in scheme else None)
    else:
        (modifier,) = recipe.modifiers
    method = Path(relative).parent.name
    # the recommended default runs as GPTAQ after a rotation at 4+ bits (its own test below)
    runs = method_for_setting(method, int(scheme[1]), scheme.endswith("_rot")).name
    expected = {"gptaq": rescomp_modifiers.GPTAQModifier, "foem": rescomp_modifiers.FOEMModifier}
    assert type(modifier) is expected.get(runs, rescomp_modifiers.CAEModifier)
    if method.endswith("cae"):
        assert modifier.statistics == ("gptaq" if method == "gptaq_cae" else "gptq")
    weights = yaml.safe_load((ROOT / relative).read_text())["quant_stage"]["quant_modifiers"]
    (settings,) = (value for key, value in weights.items() if key != "SpinQuantModifier")
    args = settings["config_groups"]["group_0"]["weights"]
    assert args["num_bits"] == int(scheme[1])
    assert ("group_size" in args) == (args["strategy"] == "group")
    if "_g64" in scheme:
        assert args["group_size"] == 64
    base = scheme.removesuffix("_rot").removesuffix("_g64")
    group = settings["config_groups"]["group_0"]
    assert group.get("input_activations") == generate.ACTIVATIONS.get(base)
    kv_cache = generate.KV_CACHE.get(base)
    assert modifier.kv_cache_scheme == (kv_cache and QuantizationArgs(**kv_cache))


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
            assert name in ("gptq", "gptq_mse", "gptq_imatrix")
    with pytest.raises(ValueError, match="unknown method 'cae'"):
        build_modifier("cae")
    # a misspelt field is refused, not dropped (a field only our modifiers have is
    # dropped for the stock baselines: one set of options builds every row)
    with pytest.raises(ValueError, match="no modifier has the field.*gaurd"):
        build_modifier("gptq", scheme="W4A16", gaurd="gptq")
    assert not hasattr(build_modifier("gptq", scheme="W4A16", guard="gptq"), "guard")
    with pytest.raises(ValueError, match="Unknown method 'cae'"):
        CompensationTerms.for_method("cae")


@pytest.mark.parametrize("bits, rotated, runs", [
    (4, True, "gptaq"), (8, True, "gptaq"),  # after a rotation at 4+ bits: GPTAQ
    (3, True, "recommended"), (2, True, "recommended"),
    (4, False, "recommended"), (3, False, "recommended"),
])
def test_recommended_after_a_rotation(bits, rotated, runs):
    """The measured rule (docs/rotations.md): after a rotation at 4 bits or more the
    recommended default runs as plain GPTAQ, min-max clipping; everywhere else as itself
    (with imatrix_mse clipping). The
    shipped recipes, `rescomp compare` and its row label follow the same rule."""
    from rescomp_harness.compare import CompareConfig, build_recipe, method_label

    from rescomp_modifiers.methods import METHODS

    assert method_for_setting("recommended", bits, rotated).name == runs
    assert method_for_setting("gptaq_cae", bits, rotated).name == "gptaq_cae"  # published: as is
    config = CompareConfig(bits=bits, rotation="spinquant" if rotated else "none")
    modifier = build_recipe("recommended", config)[-1]
    assert type(modifier).__name__ == METHODS[runs].modifier
    observers = {group.weights.observer
                 for group in modifier.resolve_quantization_config().config_groups.values()}
    assert (observers == {"imatrix_mse"}) == (runs == "recommended")
    label = method_label("recommended", config)
    assert label == (METHODS["recommended"].label if runs == "recommended"
                     else f"GPTAQ (as recommended: W{bits} after a rotation)")
    if bits in (3, 4) and rotated:
        recipe = RECIPES[f"recipes/recommended/w{bits}a16_g64_rot.yaml"]
        assert f"    {METHODS[runs].modifier}:\n" in recipe
        assert ("observer: imatrix_mse" in recipe) == (runs == "recommended")


def test_rotated_recipes_for_each_method():
    for method in generate.METHODS:
        for scheme in ("w2a16", "w3a16", "w4a16", "w4a4_kv4", "w2a4_kv4"):
            for variant in (f"{scheme}_rot", f"{scheme}_g64_rot"):
                assert f"recipes/{method}/{variant}.yaml" in RECIPES
        # 4-bit activations only with the rotation
        assert f"recipes/{method}/w4a4_kv4.yaml" not in RECIPES
        assert f"recipes/{method}/w8a8.yaml" in RECIPES


@pytest.mark.parametrize("name", ["w4a16_g64_rot", "w4a4_kv4_g64_rot"])
def test_rotated_recipe_file_runs(tiny_model_dir, tmp_path, name):
    """The shipped file end to end: rotation, GPTAQ+CAE, a checkpoint that reloads."""
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from helpers import calibration_dataset

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    oneshot(model=model, dataset=calibration_dataset(), max_seq_length=32,
            num_calibration_samples=8,
            recipe=str(ROOT / "recipes" / "gptaq_cae" / f"{name}.yaml"))
    # rotated: q_proj's input side carries the Hadamard rotation and the fused norm
    q_proj = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(model.get_submodule(q_proj).weight,
                              original.get_submodule(q_proj).weight, atol=0.05)
    ids = torch.randint(4, 90, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "checkpoint", save_compressed=True)
    with torch.no_grad():
        actual = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
