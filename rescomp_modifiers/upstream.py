"""Every use of llm-compressor's, compressed-tensors' and torch's internals, in one place.

The plugin builds on llm-compressor 0.14.0.1 and compressed-tensors 0.19.0, pinned
exactly: the pieces below are not public API and move between releases. Each name is
imported or reached here once, with the reason we need it, and
``tests/test_upstream_contract.py`` checks that every one still exists with the
signature we call, so a new release fails there with "llm-compressor X changed Y"
instead of deep inside a calibration run.
"""

from __future__ import annotations

import torch

__all__ = ["observer_hook_handles"]

#: the observers compressed-tensors attaches to a quantized module
OBSERVER_ATTRIBUTES = ("weight_observer", "input_observer", "output_observer")


def observer_hook_handles(modules) -> set:
    """The raw forward-pre hooks that weight observers registered on ``modules``.

    Why: llm-compressor 0.14's ``imatrix_mse`` observer gathers its importance (E[x^2]
    per input column) with a plain torch hook (``IMatrixMSEObserver._imatrix_hook``)
    that stays silent whenever ``HooksMixin.disable_hooks`` is active unless its handle
    is in the ``keep`` set. The true-sequential stage passes disable every hook but the
    stage's own, so without these handles imatrix would silently fall back to MSE.
    """
    handles = set()
    for module in modules:
        for attribute in OBSERVER_ATTRIBUTES:
            handle = getattr(getattr(module, attribute, None), "_imatrix_hook", None)
            if isinstance(handle, torch.utils.hooks.RemovableHandle):
                handles.add(handle)
    return handles
