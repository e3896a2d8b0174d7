"""The method vocabulary: each method named once, with its modifier and settings.

Everything that names a method derives from :data:`METHODS`: the solver's coefficient
table (:meth:`~rescomp_modifiers.compensation.CompensationTerms.for_method`), the
modifiers' own ``resolved_method``, the recipe generator (``recipes/generate.py``) and
the comparison harness (``rescomp compare --methods``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Method", "METHODS", "build_modifier", "method_for_setting"]


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
    #: the weight observer its scheme uses (None: the scheme's own, min-max by default);
    #: ``memoryless_mse`` searches the clipping range by MSE, as the CAE paper did
    weight_observer: str | None = None
    #: the solver-table name of its update terms, when it is a configuration of another
    #: method (None: its own name)
    solver_method: str | None = None
    #: ``(bits, name)``: after a rotation, at this many weight bits or more, method
    #: ``name`` runs in its place (None: this method in every setting)
    after_rotation: tuple[int, str] | None = None

    @property
    def terms_name(self) -> str:
        return self.solver_method or self.name


#: the recommended default's modifier settings (its observer is on the Method): GPTAQ+CAE
#: with the guard judged on every 4th row, which closed the same share of GPTQ's gap as
#: every row at a fraction of the guard's cost. Its clipping is llm-compressor's
#: imatrix_mse observer, whose importance our pipeline gathers from the quantized
#: stream: the plugin's own clipping search (clipping: uncompensable) beat imatrix on
#: SmolLM2 at W3 but lost to every stock observer on Qwen2.5-Coder-0.5B at W4 g128
#: (docs/results/), so it is an option, not the default
RECOMMENDED_SETTINGS = {"statistics": "gptaq", "guard": "gptq", "candidate_row_stride": 4}

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("rtn", "RTN (round to nearest)", "QuantizationModifier",
               description="round to nearest, llm-compressor's QuantizationModifier",
               ships_recipes=False),
        Method("gptq", "GPTQ (llm-compressor)", "GPTQModifier",
               description="llm-compressor's stock GPTQModifier", ships_recipes=False),
        Method("gptq_mse", "GPTQ (llm-compressor, MSE clipping)", "GPTQModifier",
               description="stock GPTQModifier with the MSE weight observer",
               ships_recipes=False, weight_observer="memoryless_mse"),
        # llm-compressor 0.14's strongest stock clipping on some models and bits: the
        # range searched by an MSE weighted with each input channel's E[x^2] (llama.cpp's
        # importance matrix); which stock observer wins depends on model and bits
        Method("gptq_imatrix", "GPTQ (llm-compressor, imatrix clipping)", "GPTQModifier",
               description="stock GPTQModifier with the imatrix_mse weight observer",
               ships_recipes=False, weight_observer="imatrix_mse"),
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
        # The project's recommended default: docs/results/ has the measurements behind
        # it (docs/usage.md, "The recommended recipes", the choices).
        Method("recommended", "GPTAQ+CAE, imatrix clipping, GPTQ guard (recommended)",
               "CAEModifier", RECOMMENDED_SETTINGS,
               "the recommended default: GPTAQ + CAE (released coefficients) with "
               "llm-compressor's imatrix_mse clipping, each module kept only where it beats "
               "GPTQ on held-out calibration tokens", weight_observer="imatrix_mse",
               solver_method="gptaq_cae", after_rotation=(4, "gptaq")),
        # the papers' true-sequential statistics on top (an option, not the default:
        # docs/usage.md, "True-sequential statistics")
        Method("recommended_true_sequential", "recommended, true-sequential statistics",
               "CAEModifier", {**RECOMMENDED_SETTINGS, "true_sequential": True},
               "the recommended default with true-sequential statistics (q/k/v, o, "
               "gate/up, down calibrated in turn)", ships_recipes=False,
               weight_observer="imatrix_mse", solver_method="gptaq_cae"),
    )
}


def method_for_setting(name: str, bits: int, rotated: bool) -> Method:
    """The method that runs for ``name`` at ``bits`` weight bits, after a rotation or
    not: the method itself, or the one its :attr:`Method.after_rotation` names.

    The earlier recommended default's MSE clipping and CAE terms lost to GPTQ after a
    rotation at 4 bits, each on its own and together, in both calibration directions
    (docs/rotations.md); GPTAQ alone tied GPTQ there. At 3 bits after a rotation the
    default still won by far, so the switch is by bits.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    method = METHODS[name]
    if rotated and method.after_rotation is not None and bits >= method.after_rotation[0]:
        return METHODS[method.after_rotation[1]]
    return method


def build_modifier(name: str, **fields):
    """The modifier for method ``name`` with extra ``fields`` (scheme, ignore, ...).

    Fields that only our modifiers have (``semantics``, ``guard``, ...) are dropped for
    llm-compressor's own baselines, so one set of options builds every row of a
    comparison; a field that no modifier has is refused.
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
    unknown = sorted(set(fields) - set().union(*(c.model_fields for c in classes.values())))
    if unknown:
        raise ValueError(f"build_modifier({name!r}): no modifier has the field(s) "
                         f"{', '.join(unknown)}; check the spelling (see the modifiers' fields "
                         "in docs/usage.md)")
    accepted = {key: value for key, value in fields.items() if key in cls.model_fields}
    if method.weight_observer:
        accepted = _with_weight_observer(accepted, method.weight_observer)
    return cls(**method.settings, **accepted)


def _with_weight_observer(fields: dict, observer: str) -> dict:
    """``fields`` with every config group's weights observed by ``observer``; a preset
    ``scheme`` name is expanded to its config group first."""
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    fields = dict(fields)
    groups = fields.pop("config_groups", None)
    if groups is None:
        scheme = fields.pop("scheme", None)
        if not isinstance(scheme, str):
            raise ValueError("a method with its own weight observer needs config_groups or "
                             "a preset scheme name")
        targets = fields.pop("targets", ["Linear"])
        targets = [targets] if isinstance(targets, str) else list(targets)
        groups = {"group_0": preset_name_to_scheme(scheme, targets)}
    updated = {}
    for name, group in groups.items():
        group = (group.model_dump(exclude_none=True) if isinstance(group, QuantizationScheme)
                 else dict(group))
        group["weights"] = dict(group["weights"], observer=observer)
        updated[name] = group
    fields["config_groups"] = updated
    return fields
