"""The method vocabulary: each method named once, with its modifier and settings.

Everything that names a method derives from :data:`METHODS`: the solver's coefficient
table (:meth:`~rescomp_modifiers.compensation.CompensationTerms.for_method`), the
modifiers' own ``resolved_method``, the recipe generator (``recipes/generate.py``) and
the comparison harness (``rescomp compare --methods``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Method", "METHODS", "build_modifier"]


@dataclass(frozen=True)
class Method:
    #: the one name used everywhere (recipes/<name>/, compare rows, solver table)
    name: str
    #: how tables and plots label it
    label: str
    #: the llm-compressor modifier class name (resolved through its ModifierFactory)
    modifier: str
    #: the modifier fields that select this method
    settings: dict = field(default_factory=dict)
    #: one line for recipe comments and --help
    description: str = ""
    #: whether recipes are generated for it (the baselines are llm-compressor's own)
    ships_recipes: bool = True


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("rtn", "RTN (round to nearest)", "QuantizationModifier",
               description="round to nearest, llm-compressor's QuantizationModifier",
               ships_recipes=False),
        Method("gptq", "GPTQ (llm-compressor)", "GPTQModifier",
               description="llm-compressor's stock GPTQModifier", ships_recipes=False),
        Method("gptq_cae", "GPTQ+CAE", "CAEModifier", {"statistics": "gptq"},
               "GPTQ + CAE (Algorithm 2; no full-precision stream needed)"),
        Method("gptaq", "GPTAQ", "GPTAQModifier", {},
               "GPTAQ: asymmetric calibration against the FP model's outputs"),
        Method("gptaq_cae", "GPTAQ+CAE", "CAEModifier", {"statistics": "gptaq"},
               "GPTAQ + CAE (the CAE paper's Algorithm 1)"),
        Method("foem", "FOEM", "FOEMModifier", {},
               "FOEM: first-order error compensation"),
        Method("foem_gptaq", "FOEM+GPTAQ", "FOEMModifier", {"use_asymmetric_statistics": True},
               "FOEM on GPTAQ's asymmetric statistics", ships_recipes=False),
    )
}


def build_modifier(name: str, **fields):
    """The modifier for method ``name`` with extra ``fields`` (scheme, ignore, ...).

    Fields that only our modifiers have (``semantics``, ``guard``, ...) are dropped for
    llm-compressor's own baselines, so one set of options builds every row of a
    comparison.
    """
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from rescomp_modifiers.modifiers import CAEModifier, FOEMModifier, GPTAQModifier

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    method = METHODS[name]
    classes = {cls.__name__: cls for cls in (QuantizationModifier, GPTQModifier, GPTAQModifier,
                                             CAEModifier, FOEMModifier)}
    cls = classes[method.modifier]
    accepted = {key: value for key, value in fields.items() if key in cls.model_fields}
    return cls(**method.settings, **accepted)
