"""Checkpoints that load back: plain-YAML recipes and directory-level atomic saves.

A save never leaves the target without a complete checkpoint, never writes non-finite
tensors, and never writes a ``recipe.yaml`` that ``yaml.safe_load`` (what llm-compressor
uses to read it back for a later stage) cannot parse. On Linux the new checkpoint and the
old one trade places in one step, so the target path loads at every instant, also after
a kill; elsewhere two renames do it, and a kill between them leaves the old checkpoint
beside the target until :func:`recover_checkpoint` (or the next save) moves it back.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import sys
import uuid
from enum import Enum
from functools import wraps
from pathlib import Path

import torch
import yaml
from compressed_tensors.quantization import (
    ActivationOrdering,
    QuantizationStrategy,
    QuantizationType,
)
from loguru import logger
from safetensors import safe_open

from rescomp_modifiers.clipping import ClippingObjective
from rescomp_modifiers.compensation import GroupScales, LazyUpdate, Semantics
from rescomp_modifiers.upstream import is_source_process

__all__ = ["register_yaml_enums", "make_save_atomic", "recover_checkpoint"]

#: transformers cannot load a directory without it: what makes a checkpoint complete
CONFIG_NAME = "config.json"
RECIPE_NAME = "recipe.yaml"

#: weight files a new save replaces; carrying old ones over would mix two models
_WEIGHT_FILE = re.compile(
    r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?"
)

#: safetensors dtypes whose values can be NaN or Inf
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"}

#: how many offending tensors an error names before it only counts the rest
_NAMED_AT_MOST = 10


def _represent_str_enum(dumper: yaml.Dumper, value: Enum):
    return dumper.represent_str(str(value.value))


def register_yaml_enums() -> None:
    """Dump string enums and tuples as plain YAML, so ``recipe.yaml`` parses with safe_load.

    llm-compressor writes the recipe with ``yaml.dump``, which tags enum members as
    ``!!python/object/apply`` (e.g. ``actorder`` inside ``config_groups``) and tuples as
    ``!!python/tuple`` (SmoothQuant's ``mappings``). Such a file only loads with an unsafe
    loader, and llm-compressor itself reads the recipe of a saved checkpoint back with
    ``safe_load`` when a later stage saves on top of it. Tuples become lists, which
    every modifier field that holds them accepts.
    """
    for enum_type in (
        ActivationOrdering, QuantizationStrategy, QuantizationType,
        Semantics, GroupScales, LazyUpdate, ClippingObjective,
    ):
        yaml.add_representer(enum_type, _represent_str_enum)
    yaml.add_representer(tuple, yaml.Dumper.represent_list)


def _leftovers(final: Path, kind: str) -> list[Path]:
    """Our own ``.<name>.<kind>-<id>`` directories beside ``final``, newest first."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.{kind}-[0-9a-f]{{8}}")
    if not final.parent.is_dir():
        return []
    found = [
        entry for entry in final.parent.iterdir()
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink()
    ]
    return sorted(found, key=lambda entry: entry.stat().st_mtime, reverse=True)


def recover_checkpoint(save_directory: str | os.PathLike) -> None:
    """Restore or clean up what an interrupted save into ``save_directory`` left behind.

    Every save runs this first; call it yourself to restore a checkpoint without saving.
    Only directories that fully match ``.<name>.partial-<8 hex>`` or
    ``.<name>.old-<8 hex>`` beside the target are touched:

    - ``.<name>.partial-*`` were being written (never complete), or hold the previous
      checkpoint after the new one took the target's place: removed either way.
    - ``.<name>.old-*`` hold the complete previous checkpoint, renamed aside during a
      swap. If the target is missing, the newest one is moved back; if the target is a
      directory without ``config.json`` (not loadable), it is removed and the newest one
      is moved back. Otherwise the target is the new complete checkpoint and they are
      removed.
    """
    final = _resolve_target(save_directory)
    for partial in _leftovers(final, "partial"):
        logger.info(f"Removing {partial}, left by an interrupted save (never complete)")
        shutil.rmtree(partial)
    old = _leftovers(final, "old")
    if not old:
        return
    if final.is_dir() and not final.is_symlink() and not (final / CONFIG_NAME).exists():
        logger.warning(f"Removing {final}: it has no {CONFIG_NAME}; the complete "
                       f"checkpoint saved before it is {old[0]}")
        shutil.rmtree(final)
    if not os.path.lexists(final):
        logger.warning(f"Restoring {final} from {old[0]}, left by an interrupted save")
        os.rename(old[0], final)
        old = old[1:]
    for stale in old:
        logger.info(f"Removing {stale}, the previous checkpoint of a finished save")
        shutil.rmtree(stale)


def _resolve_target(save_directory: str | os.PathLike) -> Path:
    final = Path(save_directory).absolute()
    # a link to a directory: swap the directory it names, keep the link
    return final.resolve() if final.is_symlink() and final.is_dir() else final


def _check_target(final: Path) -> None:
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(
            f"Cannot save a checkpoint to {final}: it is an existing file, not a "
            "directory. Choose another path or remove the file."
        )
    if os.path.lexists(final) and not final.exists():
        raise FileNotFoundError(
            f"Cannot save a checkpoint to {final}: it is a broken symbolic link. "
            "Remove it or point it at a directory."
        )


def _check_source_recipe(model) -> None:
    """The recipe upstream will merge into the new one must parse: fail before writing."""
    source = Path(str(getattr(model, "name_or_path", "") or ""))
    recipe = source / RECIPE_NAME
    if not str(source) or not recipe.is_file():
        return
    try:
        yaml.safe_load(recipe.read_text())
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0]
        raise ValueError(
            f"{recipe} (the recipe of the model this one was loaded from, which the "
            f"new recipe.yaml appends to) does not parse with yaml.safe_load: "
            f"{first_line}. Rewrite its python-tagged entries (e.g. !!python/tuple) "
            "as plain YAML lists, or re-save that stage with rescomp_modifiers imported."
        ) from error


def _non_finite_tensors(directory: Path) -> list[str]:
    """Names of the floating-point tensors in ``directory``'s shards holding NaN or Inf."""
    offending = []
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as tensors:
            for name in tensors.keys():
                if tensors.get_slice(name).get_dtype() not in _FLOAT_DTYPES:
                    continue
                flat = tensors.get_tensor(name).reshape(-1)
                # in pieces: a float32 copy of a whole embedding table is large
                if not all(torch.isfinite(piece.float()).all()
                           for piece in flat.split(1 << 24)):
                    offending.append(f"{name} ({shard.name})")
    return offending


def _check_finite(directory: Path) -> None:
    offending = _non_finite_tensors(directory)
    if offending:
        named = ", ".join(offending[:_NAMED_AT_MOST])
        more = len(offending) - _NAMED_AT_MOST
        raise ValueError(
            f"Refusing to save a checkpoint with non-finite values: NaN or Inf in "
            f"{named}{f' and {more} more' if more > 0 else ''}. Check the weights of "
            "those modules and the calibration data; nothing was saved."
        )


def _check_recipe(directory: Path) -> None:
    recipe = directory / RECIPE_NAME
    if not recipe.is_file():
        return
    try:
        yaml.safe_load(recipe.read_text())
    except yaml.YAMLError as error:
        raise ValueError(
            f"The recipe.yaml being saved does not parse with yaml.safe_load: "
            f"{str(error).splitlines()[0]}; nothing was saved. Register a YAML "
            "representer for that type (see rescomp_modifiers.checkpoint)."
        ) from error


def _carry_over(final: Path, partial: Path) -> None:
    """Files of the old target the new save did not write (a tokenizer, say) stay.

    Hard links where the filesystem allows: nothing is copied, and removing the old
    directory later leaves these files in place.
    """
    for entry in final.iterdir():
        if os.path.lexists(partial / entry.name) or _WEIGHT_FILE.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, partial / entry.name, symlinks=True,
                            copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, partial / entry.name)


def _link_or_copy(source, destination) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), destination)
        return
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


#: renameat2's flag that swaps two existing paths (linux/fs.h), and "paths relative to the
#: working directory"
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
#: errors that mean "this system or filesystem cannot exchange": fall back to renames
_CANNOT_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                             ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


def _exchange(first: Path, second: Path) -> bool:
    """Swap what two existing paths name in one step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``): there is no instant at which either is missing. False, with
    nothing changed, where the system or the filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
                 _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in _CANNOT_EXCHANGE:
        return False
    raise OSError(error, os.strerror(error), str(first), None, str(second))


def _swap_into_place(partial: Path, final: Path, save_id: str) -> None:
    """Put the complete checkpoint at ``partial`` in the place of ``final``.

    A save into a fresh path is one rename. Over an existing checkpoint, where the
    filesystem can (:func:`_exchange`):

    1. ``partial`` and ``final`` trade places in one step: ``final`` holds the new
       checkpoint, ``partial`` the old one;
    2. ``partial`` removed.

    ``final`` loads at every instant; a kill in 2 leaves part of the old checkpoint at
    ``partial``, which :func:`recover_checkpoint` (run by the next save) removes.
    Elsewhere, a rename sequence in which a complete checkpoint is always at a stated
    path:

    1. ``final`` -> ``.<name>.old-<id>``: the old checkpoint is there, ``final`` is free.
    2. ``partial`` -> ``final``: the new checkpoint is in place.
    3. ``.<name>.old-<id>`` removed.

    An error in 2 renames the old checkpoint back. A kill between 1 and 2 leaves the old
    one at ``.<name>.old-<id>`` and no ``final`` until :func:`recover_checkpoint` moves
    it back; a kill in 3 leaves part of it there.
    """
    if not final.exists():
        os.rename(partial, final)
        return
    if _exchange(partial, final):
        shutil.rmtree(partial)
        return
    logger.debug(f"{final.parent}: this filesystem cannot exchange two directories in one "
                 "step; replacing the checkpoint by two renames")
    old = final.parent / f".{final.name}.old-{save_id}"
    os.rename(final, old)
    try:
        os.rename(partial, final)
    except Exception:
        # still running: put the old checkpoint back at once rather than on the next save
        os.rename(old, final)
        raise
    shutil.rmtree(old)


def make_save_atomic(model) -> None:
    """Wrap ``model.save_pretrained`` so that a complete checkpoint exists at every instant.

    Each save first recovers what an earlier interrupted save left behind
    (:func:`recover_checkpoint`), refuses a target that is a file, then writes the whole
    new checkpoint into a hidden sibling ``.<name>.partial-<id>``, refuses it (removing
    it, leaving the old checkpoint untouched) if a floating-point tensor holds NaN or Inf
    or its ``recipe.yaml`` does not parse with ``safe_load``, carries over files of the
    old target that the save did not rewrite, and swaps the directories (see
    :func:`_swap_into_place`). One save at a time per target: a concurrent save's partial
    directory would be taken for a leftover.

    Only wraps llm-compressor's own (compressing) wrapper, so it never hides that one.
    Ranks other than the source process write nothing (upstream saves from one process),
    so they call it directly.
    """
    inner = model.save_pretrained
    if getattr(inner, "_rescomp_atomic", False) or not getattr(inner, "_overridden", False):
        return

    @wraps(inner)
    def atomic_save_pretrained(save_directory, *args, **kwargs):
        if not is_source_process():
            return inner(save_directory, *args, **kwargs)
        final = _resolve_target(save_directory)
        _check_target(final)
        _check_source_recipe(model)
        recover_checkpoint(final)
        save_id = uuid.uuid4().hex[:8]
        partial = final.parent / f".{final.name}.partial-{save_id}"
        partial.mkdir(parents=True)
        try:
            result = inner(str(partial), *args, **kwargs)
            if not (partial / CONFIG_NAME).exists():
                raise RuntimeError(f"save_pretrained wrote no {CONFIG_NAME} into {partial}")
            _check_finite(partial)
            _check_recipe(partial)
            if final.is_dir():
                _carry_over(final, partial)
            _swap_into_place(partial, final, save_id)
            return result
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    atomic_save_pretrained._overridden = True
    atomic_save_pretrained._rescomp_atomic = True
    model.save_pretrained = atomic_save_pretrained
