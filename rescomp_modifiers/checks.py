"""Checks a compensation modifier runs when calibration starts, once the scheme is resolved
and the model is known (checks of its fields alone are pydantic validators in
modifiers.py, and fail when the recipe is parsed)."""

from __future__ import annotations

import torch
from compressed_tensors import TRANSFORM_CONFIG_NAME
from compressed_tensors.quantization import QuantizationStrategy
from loguru import logger

from rescomp_modifiers.clipping import CLIPPING_STRATEGIES, ClippingObjective
from rescomp_modifiers.compensation import GroupScales
from rescomp_modifiers.scale_refit import check_refit_supported

__all__ = ["check_before_calibration"]


def check_before_calibration(modifier, model: torch.nn.Module, modules) -> None:
    """Refuse what would fail late or silently, and warn where the configuration was
    measured worse than GPTQ. (The scheme's clip ratios were checked as it resolved,
    :func:`~rescomp_modifiers.activation_clipping.check_clip_ratios`.)"""
    config = modifier.resolve_quantization_config()
    name = type(modifier).__name__
    _check_finite_weights(name, modules, modifier._module_names)
    _check_row_stride(modifier, modules, modifier._module_names)
    _check_clipping(name, modifier.clipping, modifier.group_scales, config)
    if modifier.refit_scales:
        _check_refit(name, config)
    _check_dynamic_groups_observer(name, modifier.group_scales, config)
    _warn_where_measured_worse_after_rotation(modifier, config, model)


def _check_finite_weights(name: str, modules, module_names) -> None:
    """NaN/Inf weights would otherwise surface as non-finite statistics blamed on the
    activations, or as a checkpoint with NaN scales."""
    bad = [module_names[module] for module in modules if not torch.isfinite(module.weight).all()]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(
            f"{name}: the weights of {shown} contain NaN or Inf before quantization; fix "
            "or reload the model (or add these modules to `ignore`).")


def _check_row_stride(modifier, modules, module_names) -> None:
    """A contest on every ``candidate_row_stride``-th row judges a module of fewer rows
    than the stride on its first row alone (the guard's choice by one row's error)."""
    stride = modifier.candidate_row_stride
    if not modifier.selects_candidates or stride == 1 or not modules:
        return
    fewest = min(modules, key=lambda module: module.weight.shape[0])
    rows = fewest.weight.shape[0]
    if stride >= rows:
        raise ValueError(
            f"{type(modifier).__name__}: candidate_row_stride {stride} leaves one row to "
            f"judge: {module_names[fewest]} has {rows} rows (the fewest of the modules it "
            f"quantizes), and the contest takes every {stride}-th. Use a stride below "
            f"{rows} (the recommended default uses 4), or 1 to judge on every row.")


def _check_clipping(name: str, clipping: ClippingObjective, group_scales: GroupScales,
                    config) -> None:
    """A clipping search the scheme cannot take."""
    if clipping == ClippingObjective.OBSERVER:
        return
    supported = CLIPPING_STRATEGIES[clipping]
    for group, scheme in config.config_groups.items():
        weights = scheme.weights
        if weights is None:
            continue
        problem = None
        if weights.type != "int":
            problem = f"{weights.type} weights (it searches integer ranges)"
        elif weights.strategy not in supported:
            problem = (f"the {QuantizationStrategy(weights.strategy).value} strategy (it "
                       f"supports {', '.join(s.value for s in supported)})")
        elif group_scales != GroupScales.STATIC:
            problem = "group_scales: dynamic (the solver recomputes the ranges itself)"
        if problem:
            raise ValueError(f"{name}: clipping {clipping.value!r} cannot take config group "
                             f"{group!r}: {problem}; use clipping: observer with the "
                             "scheme's own observer")


def _check_dynamic_groups_observer(name: str, group_scales: GroupScales, config) -> None:
    """Dynamic groups re-run the scheme's observer on each group's latent weights, out of
    the module's forward hooks: imatrix_mse would find no importance there and fall back
    to plain MSE with only a log line."""
    if group_scales != GroupScales.DYNAMIC:
        return
    for group, scheme in config.config_groups.items():
        if scheme.weights is not None and scheme.weights.observer == "imatrix_mse":
            raise ValueError(
                f"{name}: group_scales: dynamic cannot use observer imatrix_mse (config "
                f"group {group!r}): the ranges are re-searched on the latent weights inside "
                "the column loop, where the observer has no importance data and would "
                "silently become plain MSE. Use group_scales: static with imatrix_mse, or "
                "observer: memoryless_mse with dynamic groups.")


def _check_refit(name: str, config) -> None:
    """A scheme whose scales are not each row's own."""
    for group, scheme in config.config_groups.items():
        if scheme.weights is None:
            continue
        try:
            check_refit_supported(scheme.weights)
        except ValueError as error:
            raise ValueError(f"{name}: config group {group!r}: {error}") from None


def _warn_where_measured_worse_after_rotation(modifier, config, model) -> None:
    """Never silently worse where it was measured worse: after a rotation modifier at 4+
    weight bits, MSE clipping, CAE's terms and FOEM's term each lost to GPTQ (FOEM's at
    3 bits too) on SmolLM2-135M (docs/results), which is why the recommended recipes run
    plain GPTAQ there. A warning, not an error: one model's measurement, and a user may
    want the published method."""
    # a rotation modifier (SpinQuant, QuIP) leaves its transform config on the model,
    # also when it ran in an earlier stage or oneshot call
    if getattr(model, TRANSFORM_CONFIG_NAME, None) is None:
        return
    for scheme in config.config_groups.values():
        weights = scheme.weights
        if weights is None:
            continue
        terms = modifier.compensation_terms(weights.num_bits)
        # (what, used here, from how many bits it lost): FOEM lost at W3 too
        losing = [what for what, used, from_bits in (
            ("MSE clipping", weights.observer in ("memoryless_mse", "mse"), 4),
            ("CAE's terms", terms.compensation_aware_coefficient != 0, 4),
            ("FOEM's term", terms.first_order_coefficient != 0, 3),
        ) if used and weights.num_bits >= from_bits]
        if losing:
            logger.warning(
                f"{type(modifier).__name__} after a rotation at W{weights.num_bits}: "
                f"{' and '.join(losing)} measured worse than GPTQ there (SmolLM2-135M, "
                "3 seeds; docs/results). The recommended recipes run plain GPTAQModifier "
                "with min-max clipping after a rotation at 4+ bits "
                "(recipes/recommended/*_rot.yaml).")
            return
