"""Free the models of ``oneshot`` runs made in one process.

In a loop of ``oneshot`` calls (a sweep over methods or seeds) every run's model stays
alive after the run, one per run: 0.4 GiB each for SmolLM2-135M, and a 36-run quality
matrix was killed for memory. Stock GPTQ does the same without this plugin imported.
Two of upstream's registries hold the models:

* llm-compressor's session (``active_session()``) keeps the last run's model and
  modifiers; resetting it freed the models of RTN runs;
* torch.fx's ``_wrapped_fns_to_patch`` keeps for good the globals of the code that the
  sequential pipeline traces, and those globals hold the model.

Run each ``oneshot`` inside :func:`releasing_oneshot_models` (``tests/test_release.py``
counts the live models)::

    for recipe in recipes:
        with releasing_oneshot_models():
            model = load()
            oneshot(model=model, recipe=recipe, ...)
            evaluate(model)
"""

from __future__ import annotations

import contextlib
import gc

__all__ = ["releasing_oneshot_models"]


@contextlib.contextmanager
def releasing_oneshot_models():
    """Release, when the block ends, what llm-compressor and torch.fx keep of the
    ``oneshot`` runs inside it, so their models are freed once the caller drops them."""
    from llmcompressor.core import active_session

    from rescomp_modifiers.upstream import fx_wrapped_functions

    wrapped = fx_wrapped_functions()
    registered_before = set(wrapped)
    try:
        yield
    finally:
        active_session().reset()
        for key in set(wrapped) - registered_before:
            del wrapped[key]
        gc.collect()
