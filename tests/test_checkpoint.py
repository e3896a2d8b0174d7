"""Saved checkpoints: one complete checkpoint at every instant, finite, plain-YAML recipe."""

import hashlib
import os
from pathlib import Path

import pytest
import torch
import yaml
from llmcompressor import oneshot
from llmcompressor.recipe import Recipe
from transformers import AutoModelForCausalLM

from rescomp_modifiers import CAEModifier
from rescomp_modifiers.checkpoint import recover_checkpoint

from helpers import calibration_dataset, make_tokenizer

GROUP32 = {
    "group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                    "strategy": "group", "group_size": 32},
    }
}
IGNORE = ["lm_head"]
IDS = torch.randint(4, 90, (2, 16), generator=torch.Generator().manual_seed(1))


class Killed(BaseException):
    """Stands for the process being killed: no ``except Exception`` handler sees it."""


def quantize(model_dir, recipe=None, seed=0):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    oneshot(model=model, dataset=calibration_dataset(seed=seed), processor=make_tokenizer(),
            recipe=recipe or [CAEModifier(ignore=IGNORE, config_groups=GROUP32)],
            max_seq_length=32, num_calibration_samples=8)
    return model


def weights_digest(directory):
    return hashlib.sha256((Path(directory) / "model.safetensors").read_bytes()).hexdigest()


def hidden_entries(parent):
    return sorted(entry.name for entry in Path(parent).iterdir() if entry.name.startswith("."))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def two_checkpoints(tiny_model_dir, tmp_path):
    """``out`` holds a saved checkpoint (old); ``new`` is a different model to save over it."""
    out = tmp_path / "out"
    quantize(tiny_model_dir).save_pretrained(out, save_compressed=True)
    new = quantize(tiny_model_dir, seed=1)
    return out, weights_digest(out), new


def renames_only(monkeypatch):
    """The save's fallback where the filesystem cannot exchange two directories in one
    step (not Linux, or a filesystem without RENAME_EXCHANGE): two renames."""
    import rescomp_modifiers.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_exchange", lambda first, second: False)


def kill_at_second_rename(monkeypatch, error=Killed):
    """In the fallback by renames, os.rename raises when the new checkpoint is about to
    be moved into place."""
    renames_only(monkeypatch)
    real_rename = os.rename

    def rename(source, destination):
        if ".partial-" in Path(source).name:
            raise error("killed between the renames")
        return real_rename(source, destination)

    monkeypatch.setattr(os, "rename", rename)


def test_save_killed_between_renames_leaves_old_checkpoint_and_next_save_recovers(
    two_checkpoints, monkeypatch
):
    out, old_digest, new = two_checkpoints
    kill_at_second_rename(monkeypatch)
    with pytest.raises(Killed):
        new.save_pretrained(out, save_compressed=True)
    monkeypatch.undo()

    # the old checkpoint is complete at the stated path and loads
    assert not out.exists()
    [old_name] = [name for name in hidden_entries(out.parent) if name.startswith(".out.old-")]
    assert weights_digest(out.parent / old_name) == old_digest
    AutoModelForCausalLM.from_pretrained(out.parent / old_name)

    expected = logits(new)
    new.save_pretrained(out, save_compressed=True)
    assert hidden_entries(out.parent) == []
    assert weights_digest(out) != old_digest
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), expected,
                               atol=1e-4, rtol=1e-4)


def test_recover_restores_the_old_checkpoint_without_saving(two_checkpoints, monkeypatch):
    out, old_digest, new = two_checkpoints
    kill_at_second_rename(monkeypatch)
    with pytest.raises(Killed):
        new.save_pretrained(out, save_compressed=True)
    monkeypatch.undo()
    recover_checkpoint(out)
    assert weights_digest(out) == old_digest
    assert hidden_entries(out.parent) == []
    AutoModelForCausalLM.from_pretrained(out)


def test_failed_second_rename_puts_the_old_checkpoint_back_at_once(two_checkpoints, monkeypatch):
    out, old_digest, new = two_checkpoints
    kill_at_second_rename(monkeypatch, error=PermissionError)
    with pytest.raises(PermissionError, match="killed between the renames"):
        new.save_pretrained(out, save_compressed=True)
    assert weights_digest(out) == old_digest
    assert hidden_entries(out.parent) == []


def test_killed_while_removing_the_old_checkpoint_keeps_the_new_one(
    two_checkpoints, monkeypatch
):
    out, old_digest, new = two_checkpoints
    import rescomp_modifiers.checkpoint as checkpoint

    renames_only(monkeypatch)  # the old one sits at .old- (test_fault_cases: exchanged)
    real_rmtree = checkpoint.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if ".old-" in Path(path).name:
            (Path(path) / "config.json").unlink()  # killed half-way through
            raise Killed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        new.save_pretrained(out, save_compressed=True)
    monkeypatch.undo()
    new_digest = weights_digest(out)
    assert new_digest != old_digest
    recover_checkpoint(out)
    assert weights_digest(out) == new_digest
    assert hidden_entries(out.parent) == []


def test_leftovers_of_killed_saves_are_removed_and_nothing_else(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    ours = [".out.partial-0123abcd", ".out.partial-89abcdef"]
    others = [".out.partial-notours", ".outer.partial-0123abcd", ".other.old-0123abcd",
              ".out.partial-0123abcd.bak", ".cache"]
    for name in ours + others:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partly written")
    (tmp_path / ".out.old-0123abcd.txt").write_text("a file, not our directory")
    quantize(tiny_model_dir).save_pretrained(out, save_compressed=True)
    assert hidden_entries(tmp_path) == sorted(others + [".out.old-0123abcd.txt"])
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("kind", ["file", "link to a file"])
def test_file_target_is_refused_before_anything_is_written(tiny_model_dir, tmp_path, kind):
    model = quantize(tiny_model_dir)
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("my notes")
    else:
        (tmp_path / "notes").write_text("my notes")
        target.symlink_to(tmp_path / "notes")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(NotADirectoryError, match=f"{target}: it is an existing file"):
        model.save_pretrained(target, save_compressed=True)
    assert sorted(os.listdir(tmp_path)) == before
    assert target.read_text() == "my notes"


def test_non_finite_scales_are_refused_naming_the_tensor(two_checkpoints):
    out, old_digest, new = two_checkpoints
    with torch.no_grad():
        new.model.layers[1].mlp.down_proj.weight_scale[3, 0] = float("nan")
        new.model.layers[0].self_attn.q_proj.weight_scale[0, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite") as error:
        new.save_pretrained(out, save_compressed=True)
    message = str(error.value)
    assert "model.layers.1.mlp.down_proj.weight_scale" in message
    assert "model.layers.0.self_attn.q_proj.weight_scale" in message
    assert "weight_packed" not in message  # integer tensors are not suspects
    assert weights_digest(out) == old_digest
    assert hidden_entries(out.parent) == []


def test_files_the_save_does_not_write_stay_and_stale_shards_go(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    make_tokenizer().save_pretrained(out)
    (out / "notes").mkdir()
    (out / "notes" / "run.txt").write_text("kept")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"an earlier sharded save")
    quantize(tiny_model_dir).save_pretrained(out, save_compressed=True)
    assert (out / "tokenizer.json").is_file()
    assert (out / "notes" / "run.txt").read_text() == "kept"
    assert not (out / "model-00001-of-00002.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(out)


def test_save_through_a_link_to_a_directory_keeps_the_link(two_checkpoints):
    out, old_digest, new = two_checkpoints
    link = out.parent / "latest"
    link.symlink_to(out)
    new.save_pretrained(link, save_compressed=True)
    assert link.is_symlink() and link.resolve() == out.resolve()
    assert weights_digest(out) != old_digest


def _smoothquant():
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    return SmoothQuantModifier(smoothing_strength=0.5)


def _awq(monkeypatch):
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    # upstream AWQ pins its cache unconditionally, which needs an accelerator
    monkeypatch.setattr(IntermediatesCache, "pin_memory", lambda self, *args, **kwargs: None)
    return AWQModifier()  # smooths for the scheme of the CAEModifier after it


def _quip():
    from llmcompressor.modifiers.transform.quip import QuIPModifier
    return QuIPModifier(rotations=["v"], transform_type="hadamard")


def _spinquant():
    from llmcompressor.modifiers.transform import SpinQuantModifier
    return SpinQuantModifier(rotations=["R1", "R2"], transform_type="hadamard")


@pytest.mark.parametrize("first", ["SmoothQuantModifier", "AWQModifier", "QuIPModifier",
                                   "SpinQuantModifier"])
def test_recipe_of_each_documented_composition_parses_with_safe_load(
    tiny_model_dir, tmp_path, monkeypatch, first
):
    modifier = {"SmoothQuantModifier": _smoothquant, "AWQModifier": lambda: _awq(monkeypatch),
                "QuIPModifier": _quip, "SpinQuantModifier": _spinquant}[first]()
    out = tmp_path / "out"
    quantize(tiny_model_dir, [modifier, CAEModifier(ignore=IGNORE, config_groups=GROUP32)]
             ).save_pretrained(out, save_compressed=True)
    text = (out / "recipe.yaml").read_text()
    assert "!!python" not in text
    [stage] = yaml.safe_load(text).values()
    assert {first, "CAEModifier"} <= set(stage["default_modifiers"])
    # and llm-compressor builds the same modifiers from it again
    rebuilt = Recipe.create_instance(str(out / "recipe.yaml")).modifiers
    assert {first, "CAEModifier"} <= {type(modifier).__name__ for modifier in rebuilt}


@pytest.mark.parametrize("in_place", [False, True], ids=["new directory", "in place"])
def test_second_stage_on_a_saved_smoothquant_checkpoint(tiny_model_dir, tmp_path, in_place):
    smoothed = tmp_path / "smoothed"
    quantize(tiny_model_dir, [_smoothquant()]).save_pretrained(smoothed, save_compressed=True)
    model = quantize(smoothed)
    expected = logits(model)
    # in place, the recipe and config upstream merges from are read from the target itself
    out = smoothed if in_place else tmp_path / "smoothed_cae"
    model.save_pretrained(out, save_compressed=True)

    stages = yaml.safe_load((out / "recipe.yaml").read_text())
    modifiers = [name for stage in stages.values() for name in stage["default_modifiers"]]
    assert modifiers == ["SmoothQuantModifier", "CAEModifier"]
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), expected,
                               atol=1e-4, rtol=1e-4)
    assert hidden_entries(tmp_path) == []


def test_unparsable_recipe_of_the_source_model_is_refused_before_writing(
    tiny_model_dir, tmp_path
):
    # what llm-compressor wrote after SmoothQuant before tuples were dumped as lists
    (tiny_model_dir / "recipe.yaml").write_text(
        "default_stage:\n  default_modifiers:\n    SmoothQuantModifier:\n      mappings:\n"
        "      - !!python/tuple\n        - ['re:.*q_proj']\n        - re:.*input_layernorm\n"
    )
    model = quantize(tiny_model_dir)
    with pytest.raises(ValueError, match=r"\(the recipe of the model .*python/tuple"):
        model.save_pretrained(tmp_path / "out", save_compressed=True)
    assert os.listdir(tmp_path) == []
