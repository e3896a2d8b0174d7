"""The papers' activation clipping ratio, for compressed-tensors' dynamic quantizers.

QuaRot, SpinQuant and the GPTAQ paper quantize each token's input activations in their
W4A4 rows with a range shrunk by a fixed ratio (0.9): the scale and zero point come from
``(r * min, r * max)`` instead of ``(min, max)``, and the few values beyond that range
are clamped. At 4 bits this trades a little clamping error on the largest value for a
finer step on all the others. compressed-tensors' dynamic quantizers take the range from
the token's own minimum and maximum and have no such option.

A scheme asks for it where compressed-tensors keeps a quantizer's options, so the ratio
is saved in the checkpoint's ``config.json`` with the rest of the scheme::

    input_activations: {num_bits: 4, type: int, strategy: token, dynamic: true,
                        symmetric: true, observer_kwargs: {clip_ratio: 0.9}}

``import rescomp_modifiers`` makes compressed-tensors' quantized forward honour it: the
dynamic scale of a tensor whose arguments carry ``clip_ratio`` is computed from
``clip_ratio * value``, whose minimum and maximum are exactly ``r * min`` and
``r * max`` (multiplying by ``r > 0`` keeps the order, and rounds as the product of
the extremes would), and the tensor itself is then quantized unscaled. Everything else
(no ``clip_ratio``, static scales, weights) takes upstream's code unchanged. This holds
wherever compressed-tensors' forward runs in a process that imported the plugin: our
modifiers' quantized stream, and a checkpoint reloaded in transformers. vLLM does not
read the option: :func:`rescomp_harness.serving.checkpoint_servable` refuses such
checkpoints rather than serve them unclipped.

The ratio is checked whenever a quantization modifier resolves its scheme (stock
``GPTQModifier`` too, :func:`check_clip_ratios`): when oneshot initializes it, before
any calibration, instead of at the quantized model's first forward.
"""

from __future__ import annotations

import math

from compressed_tensors.quantization import DynamicType, QuantizationArgs

from rescomp_modifiers.upstream import check_resolved_quantization_configs
from rescomp_modifiers.upstream import quantized_forward as _forward

__all__ = ["CLIP_RATIO", "activation_clip_ratio", "check_clip_ratios",
           "install_activation_clipping"]

#: the key in ``QuantizationArgs.observer_kwargs`` that holds the ratio
CLIP_RATIO = "clip_ratio"


def activation_clip_ratio(args: QuantizationArgs | None) -> float | None:
    """The clipping ratio ``args`` asks for (None: none), after checking it: a number in
    (0, 1], on dynamic quantization only (a static scale is its observer's business)."""
    if args is None or CLIP_RATIO not in (args.observer_kwargs or {}):
        return None
    ratio = args.observer_kwargs[CLIP_RATIO]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (
            math.isfinite(ratio) and 0 < ratio <= 1):
        raise ValueError(f"observer_kwargs.{CLIP_RATIO} must be a number in (0, 1] (the share "
                         f"of each token's range kept, the papers use 0.9); got {ratio!r}")
    if args.dynamic not in (True, DynamicType.LOCAL):
        raise ValueError(
            f"observer_kwargs.{CLIP_RATIO} applies to dynamic activation quantization "
            f"(dynamic: true), whose range is each token's; these arguments are static "
            f"(dynamic: {args.dynamic}), so their observer sets the range: remove "
            f"{CLIP_RATIO}, or choose a clipping observer such as 'mse'")
    return float(ratio)


def check_clip_ratios(name: str, config) -> None:
    """Refuse a clip ratio in a resolved quantization ``config`` that would be ignored
    or meaningless, naming the modifier ``name``, the config group and the quantizer."""
    quantizers = {f"config group {group!r}, {field}": getattr(scheme, field)
                  for group, scheme in config.config_groups.items()
                  for field in ("weights", "input_activations", "output_activations")}
    quantizers["kv_cache_scheme"] = config.kv_cache_scheme
    for where, args in quantizers.items():
        try:
            activation_clip_ratio(args)
        except ValueError as error:
            raise ValueError(f"{name}: {where}: {error}") from None


_upstream_dynamic_qparams = _forward.compute_dynamic_scales_and_zp


def _dynamic_qparams(value, args, module, global_scale=None):
    """compressed-tensors' ``compute_dynamic_scales_and_zp``, with ``args``'s clip ratio."""
    ratio = activation_clip_ratio(args)
    if ratio is not None and ratio != 1.0:
        value = value * ratio
    return _upstream_dynamic_qparams(value=value, args=args, module=module,
                                     global_scale=global_scale)


def install_activation_clipping() -> None:
    """Route compressed-tensors' quantized forward through :func:`_dynamic_qparams`.
    ``forward_quantize`` looks the function up in its module at every call; installing
    twice is harmless. Every quantization modifier's resolved scheme is checked from
    then on (:func:`check_clip_ratios`)."""
    _forward.compute_dynamic_scales_and_zp = _dynamic_qparams
    check_resolved_quantization_configs(
        lambda modifier, config: check_clip_ratios(type(modifier).__name__, config))
