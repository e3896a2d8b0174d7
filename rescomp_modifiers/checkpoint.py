"""Checkpoints that load back: plain-YAML recipes and atomic saves."""

from __future__ import annotations

import os
import shutil
import uuid
from enum import Enum
from functools import wraps
from pathlib import Path

import yaml
from compressed_tensors.quantization import (
    ActivationOrdering,
    QuantizationStrategy,
    QuantizationType,
)

from rescomp_modifiers.compensation import GroupScales, LazyUpdate, Semantics

__all__ = ["register_yaml_enums", "make_save_atomic"]

#: written last and removed first: transformers cannot load a directory without it
CONFIG_NAME = "config.json"


def _represent_str_enum(dumper: yaml.Dumper, value: Enum):
    return dumper.represent_str(str(value.value))


def register_yaml_enums() -> None:
    """Dump string enums as plain strings, so ``recipe.yaml`` parses with safe_load.

    llm-compressor writes the recipe with ``yaml.dump``, which tags enum members as
    ``!!python/object/apply`` (e.g. ``actorder`` inside ``config_groups``); such a file
    only loads with an unsafe loader.
    """
    for enum_type in (
        ActivationOrdering, QuantizationStrategy, QuantizationType,
        Semantics, GroupScales, LazyUpdate,
    ):
        yaml.add_representer(enum_type, _represent_str_enum)


def make_save_atomic(model) -> None:
    """Wrap ``model.save_pretrained`` so an interrupted save never looks like a model.

    The checkpoint is written into a hidden sibling directory, then moved into place
    file by file with ``config.json`` removed first and written last. Only wraps
    llm-compressor's own (compressing) wrapper, so it never hides that one.
    """
    inner = model.save_pretrained
    if getattr(inner, "_rescomp_atomic", False) or not getattr(inner, "_overridden", False):
        return

    @wraps(inner)
    def atomic_save_pretrained(save_directory, *args, **kwargs):
        final = Path(save_directory)
        partial = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
        partial.mkdir(parents=True)
        try:
            # upstream appends to an existing recipe.yaml in the target directory
            if (final / "recipe.yaml").exists():
                shutil.copy2(final / "recipe.yaml", partial / "recipe.yaml")
            result = inner(str(partial), *args, **kwargs)
            if not (partial / CONFIG_NAME).exists():
                raise RuntimeError(f"save_pretrained wrote no {CONFIG_NAME} into {partial}")
            final.mkdir(parents=True, exist_ok=True)
            (final / CONFIG_NAME).unlink(missing_ok=True)
            # shards of an earlier save would otherwise mix with the new ones
            for stale in final.glob("model*.safetensors*"):
                stale.unlink()
            for item in sorted(partial.iterdir(), key=lambda p: p.name == CONFIG_NAME):
                target = final / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
            return result
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    atomic_save_pretrained._overridden = True
    atomic_save_pretrained._rescomp_atomic = True
    model.save_pretrained = atomic_save_pretrained
