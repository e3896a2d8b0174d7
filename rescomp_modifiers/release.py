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

What the session knew of the last run stays for after the block, without the objects
that hold the model: its recipe, rebuilt from its YAML (a ``save_pretrained`` after the
block writes the same ``recipe.yaml`` as one inside it), and the dual-stream drift
(:func:`~rescomp_modifiers.pipeline.last_drift`). The next ``oneshot`` replaces both, as
it would without the block. A recipe that cannot be rebuilt from its YAML is not kept,
with a warning that a later save writes an empty recipe.
"""

from __future__ import annotations

import contextlib
import gc

from loguru import logger

__all__ = ["releasing_oneshot_models"]


@contextlib.contextmanager
def releasing_oneshot_models():
    """Release, when the block ends, what llm-compressor and torch.fx keep of the
    ``oneshot`` runs inside it, so their models are freed once the caller drops them.
    The last run's recipe and drift stay in the session (module docstring)."""
    from llmcompressor.core import active_session

    from rescomp_modifiers.upstream import fx_wrapped_functions

    wrapped = fx_wrapped_functions()
    registered_before = set(wrapped)
    try:
        yield
    finally:
        session = active_session()
        recipe, drift = _recipe_without_the_model(session), _drift(session)
        session.reset()
        if recipe is not None:
            session.lifecycle.recipe = recipe
        if drift:
            from rescomp_modifiers.pipeline import DRIFT_STATE_ATTRIBUTE

            setattr(session.state, DRIFT_STATE_ATTRIBUTE, drift)
        for key in set(wrapped) - registered_before:
            del wrapped[key]
        gc.collect()


def _recipe_without_the_model(session):
    """The session's recipe, rebuilt from its YAML: the same ``recipe.yaml`` when saved,
    with modifiers that never saw the model. None when there is none or it cannot be
    rebuilt (said in a warning)."""
    from rescomp_modifiers.upstream import recipe_without_modifier_state

    recipe = session.lifecycle.recipe
    if not recipe.modifiers:
        return None
    try:
        return recipe_without_modifier_state(recipe)
    except Exception as error:  # any modifier's validation
        logger.warning(
            f"releasing_oneshot_models: the recipe of the last oneshot is not kept "
            f"({type(error).__name__}: {' '.join(str(error).split())[:200]}): a "
            "save_pretrained after this block writes an empty recipe.yaml (default_stage: "
            "{}); save inside the block to keep it.")
        return None


def _drift(session) -> list:
    from rescomp_modifiers.pipeline import last_drift

    return last_drift(session)
