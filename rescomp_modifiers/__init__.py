"""rescomp-modifiers: compensation-based weight quantizers for llm-compressor.

``import rescomp_modifiers`` registers ``GPTAQModifier``, ``CAEModifier`` and
``FOEMModifier`` with llm-compressor's ``ModifierFactory`` (so YAML recipes that name
them parse) and the ``dual_stream`` calibration pipeline, which ``oneshot`` then picks
by itself for modifiers that need the full-precision stream, and makes
compressed-tensors' dynamic activation quantizers honour a scheme's
``observer_kwargs: {clip_ratio: r}`` (activation_clipping.py). Importing twice is
harmless.
"""

from rescomp_modifiers.activation_clipping import install_activation_clipping
from rescomp_modifiers.checkpoint import register_yaml_enums
from rescomp_modifiers.compensation import (
    CompensationTerms,
    GroupScales,
    LazyUpdate,
    Semantics,
    compensate_weight,
)
from rescomp_modifiers.modifiers import CAEModifier, FOEMModifier, GPTAQModifier
from rescomp_modifiers.pipeline import DualStreamPipeline, last_drift
from rescomp_modifiers.release import releasing_oneshot_models
from rescomp_modifiers.upstream import ModifierFactory

__all__ = [
    "GPTAQModifier",
    "CAEModifier",
    "FOEMModifier",
    "DualStreamPipeline",
    "CompensationTerms",
    "GroupScales",
    "LazyUpdate",
    "Semantics",
    "compensate_weight",
    "last_drift",
    "releasing_oneshot_models",
]

for _modifier in (GPTAQModifier, CAEModifier, FOEMModifier):
    ModifierFactory.register(_modifier.__name__, _modifier)
register_yaml_enums()
install_activation_clipping()
