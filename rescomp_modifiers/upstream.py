"""Every use of llm-compressor's, compressed-tensors' and torch's internals, in one place.

The plugin builds on llm-compressor 0.14.0.1 and compressed-tensors 0.19.0, pinned
exactly (pyproject.toml): the names below are not public API and move between releases
(none of the private ones exists in llm-compressor 0.13). Each is imported here once,
with the reason we need it; the rest of the package imports them from this module only.
:data:`CONTRACT` lists each with the parameters we call it with, and
``tests/test_upstream_contract.py`` checks them, so a new release fails there with
"llm-compressor 0.15 changed ..." instead of deep inside a calibration run.

Public API (``oneshot``, ``GPTQModifier``, ``QuantizationArgs``, ...) is imported where it
is used, as any llm-compressor user would.

What changes upstream's behaviour, and for how long:

* ``CalibrationPipeline._infer_pipeline`` is routed to the dual-stream pipeline only
  between our modifiers' ``on_initialize`` and ``on_finalize``
  (:func:`route_pipeline_inference`).
* ``ImplBackend`` gets the in-place MSE search at import, but it applies only inside our
  modifiers' events (``mse_search.in_place_mse_search``): stock runs stay stock.
* Process-wide from ``import rescomp_modifiers``, because a saved checkpoint needs them
  after our modifiers are gone: compressed-tensors' ``compute_dynamic_scales_and_zp``
  honours a scheme's ``observer_kwargs.clip_ratio`` (activation_clipping.py; without the
  key it calls upstream's code unchanged), and YAML representers for enums and tuples
  make llm-compressor's saved recipe readable with ``safe_load`` (checkpoint.py).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from importlib.metadata import version

import torch
from torch import distributed as dist

# registering our modifiers so that recipes name them
from llmcompressor.modifiers.factory import ModifierFactory  # noqa: E402

# -- GPTQ's own pieces: the solver reuses them so that, with every term off, its result is
# -- stock GPTQModifier's bit for bit
# the weight qparam names GPTQ writes and broadcasts between ranks
from llmcompressor.modifiers.gptq.base import _GPTQ_Q_PARAMS  # noqa: E402
# the column loop's block update, activation ordering, scale windows, H's factorization,
# upstream's solver precision, batching of same-shape modules and the qparam write-back
from llmcompressor.modifiers.gptq.gptq_quantize import gptq_block_update  # noqa: E402
from llmcompressor.modifiers.gptq.helpers import (  # noqa: E402
    GPTQ_PRECISION,
    accumulate_hessian,
    apply_activation_ordering,
    assign_batches,
    column_scale_window,
    factorize_hessian,
    make_empty_hessian,
    update_batch_qparams,
)
# per-module loss and time lines, as GPTQ logs them
from llmcompressor.utils.metric_logging import CompressionLogger  # noqa: E402
# distributed GPTQ: modules spread over ranks, results broadcast back
from llmcompressor.utils.dist import broadcast_qparams_and_cleanup  # noqa: E402
from compressed_tensors.distributed import (  # noqa: E402
    greedy_bin_packing,
    is_source_process,
    wait_for_comms,
)
from compressed_tensors.offload.dist_utils import is_distributed  # noqa: E402

# -- the sequential pipeline's machinery, reused by the dual-stream pipeline
from llmcompressor.modifiers.utils.hooks import HooksMixin  # noqa: E402
from llmcompressor.pipelines.cache import IntermediatesCache  # noqa: E402
from llmcompressor.pipelines.registry import CalibrationPipeline  # noqa: E402
from llmcompressor.pipelines.sequential.helpers import (  # noqa: E402
    handle_sequential_oom,
    trace_subgraphs,
)
from llmcompressor.utils.dev import get_main_device  # noqa: E402
from llmcompressor.utils.helpers import (  # noqa: E402
    DisableQuantization,
    calibration_forward_context,
)
from llmcompressor.utils.pytorch.module import infer_sequential_targets  # noqa: E402
from compressed_tensors.offload import disable_offloading, set_onload_device  # noqa: E402

# -- compressed-tensors' quantization internals: the quantized stream quantizes inputs and
# -- the KV cache as at inference; the MSE search and clipping reproduce its arithmetic
from compressed_tensors.quantization.lifecycle.forward import forward_quantize  # noqa: E402
from compressed_tensors.quantization.lifecycle.initialize import (  # noqa: E402
    is_cached_attention_module,
)
import compressed_tensors.quantization.lifecycle.forward as quantized_forward  # noqa: E402
from compressed_tensors.quantization.utils import (  # noqa: E402
    calculate_qparams,
    calculate_range,
)
from compressed_tensors.utils import get_execution_device, getattr_chain  # noqa: E402
# -- every quantization modifier (stock GPTQ too) resolves its scheme through this method
# -- when oneshot initializes it, before calibration: where scheme options that only the
# -- plugin reads are checked (check_resolved_quantization_configs)
from llmcompressor.modifiers.quantization import QuantizationMixin  # noqa: E402
# -- releasing_oneshot_models keeps the last run's recipe without its modifiers (which
# -- hold the model): rebuilt from its YAML into the reset session's lifecycle, where
# -- upstream's save_pretrained reads the recipe it writes
from llmcompressor.core.lifecycle import CompressionLifecycle  # noqa: E402
from llmcompressor.recipe import Recipe  # noqa: E402
from compressed_tensors.utils.impl_backend import ImplBackend  # noqa: E402

__all__ = [
    "ModifierFactory", "GPTQ_Q_PARAMS", "GPTQ_PRECISION", "gptq_block_update", "accumulate_hessian",
    "apply_activation_ordering", "assign_batches", "column_scale_window",
    "factorize_hessian", "make_empty_hessian", "update_batch_qparams", "CompressionLogger",
    "broadcast_qparams_and_cleanup", "greedy_bin_packing", "wait_for_comms",
    "is_distributed", "is_source_process", "HooksMixin", "IntermediatesCache", "CalibrationPipeline",
    "handle_sequential_oom", "trace_subgraphs", "get_main_device", "DisableQuantization",
    "calibration_forward_context", "infer_sequential_targets", "disable_offloading",
    "set_onload_device", "forward_quantize", "is_cached_attention_module",
    "quantized_forward", "calculate_qparams", "calculate_range", "get_execution_device",
    "getattr_chain", "ImplBackend", "observer_hook_handles", "route_pipeline_inference",
    "restore_pipeline_inference", "all_reduce_to",
    "fx_wrapped_functions", "load_observer", "check_resolved_quantization_configs",
    "Recipe", "recipe_without_modifier_state",
    "CONTRACT", "contract_violations",
]

GPTQ_Q_PARAMS = _GPTQ_Q_PARAMS

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


_stock_infer_pipeline = CalibrationPipeline._infer_pipeline


def route_pipeline_inference(pipeline: str) -> None:
    """Make ``oneshot`` choose ``pipeline`` for any modifier list that holds a modifier
    with ``needs_full_precision_stream``; stock's choice otherwise. Idempotent.

    Why: ``CalibrationPipeline.from_modifiers`` asks the static ``_infer_pipeline`` (also
    per modifier under the default ``independent`` pipeline, so a recipe with SmoothQuant
    or AWQ before CAE runs those in upstream's sequential pipeline and CAE in ours), and
    offers no registration hook. ``oneshot`` initializes the modifiers before it asks, so
    our modifiers route in ``on_initialize`` and restore in ``on_finalize``: a process
    that never runs them keeps stock's function.
    """
    def infer(modifiers) -> str:
        if any(getattr(m, "needs_full_precision_stream", False) for m in modifiers):
            return pipeline
        return _stock_infer_pipeline(modifiers)

    infer.routes_to = pipeline
    if getattr(CalibrationPipeline._infer_pipeline, "routes_to", None) != pipeline:
        CalibrationPipeline._infer_pipeline = staticmethod(infer)


def restore_pipeline_inference() -> None:
    """Undo :func:`route_pipeline_inference`."""
    CalibrationPipeline._infer_pipeline = staticmethod(_stock_infer_pipeline)


def all_reduce_to(tensors: dict, destination: dict) -> None:
    """Sum each key's tensors over the ranks onto rank ``destination[key]`` (async, then
    waited for together), as GPTQ reduces its Hessians."""
    pending = [dist.reduce(tensor, op=dist.ReduceOp.SUM, dst=destination[key], async_op=True)
               for key, parts in tensors.items() for tensor in parts]
    wait_for_comms(pending)


def fx_wrapped_functions() -> dict:
    """torch.fx's registry of functions wrapped for tracing (``_wrapped_fns_to_patch``).

    Why: llm-compressor's tracer registers the model's code there and torch.fx never
    forgets it, which keeps every traced model alive (release.py)."""
    from torch.fx import _symbolic_trace

    return getattr(_symbolic_trace, "_wrapped_fns_to_patch", {})


def check_resolved_quantization_configs(check) -> None:
    """Call ``check(modifier, config)`` on every quantization config a quantization
    modifier resolves; an error it raises stops the modifier there. Idempotent (the
    last ``check`` installed is the one called).

    Why: a scheme option that only this plugin reads (the activation clip ratio,
    activation_clipping.py) is checked by no stock modifier: under ``GPTQModifier`` a
    ratio of 1.5 was written into the checkpoint and failed at its first forward.
    ``QuantizationMixin.resolve_quantization_config`` is what every quantization modifier
    (GPTQ, QuantizationModifier, ours) reads its scheme through, at the latest in
    ``on_initialize`` when oneshot starts (``resolved_config``), before any calibration;
    modifiers that need no calibration data read it when the recipe is parsed.
    """
    current = QuantizationMixin.resolve_quantization_config
    resolve = getattr(current, "_rescomp_unchecked", current)

    @functools.wraps(resolve)
    def checked(self):
        config = resolve(self)
        check(self, config)
        return config

    checked._rescomp_unchecked = resolve
    QuantizationMixin.resolve_quantization_config = checked


def recipe_without_modifier_state(recipe):
    """``recipe`` rebuilt from its own YAML: the modifiers it names, as a recipe file
    would create them, holding nothing of a run (no model). Raises ValueError when the
    rebuilt recipe's YAML differs, so a later save would not write the same recipe.

    Why: llm-compressor's ``save_pretrained`` writes ``recipe.yaml`` from the active
    session's ``lifecycle.recipe``; resetting the session (to free the model, release.py)
    empties it, and the run's own modifiers cannot be kept without keeping the model.
    """
    text = recipe.yaml()
    rebuilt = Recipe.create_instance(text)
    if rebuilt.yaml() != text:
        raise ValueError("its YAML reads back as another recipe")
    return rebuilt


def load_observer(name: str, args):
    """A weight observer from llm-compressor's registry, outside any module."""
    from llmcompressor.observers import Observer

    return Observer.load_from_registry(name, base_name="weight", args=args)


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


#: (what, object or a callable returning it, parameters we pass it by name or position)
CONTRACT = [
    ("llmcompressor.modifiers.gptq.helpers.accumulate_hessian", accumulate_hessian,
     ["inp", "module", "hessian", "num_samples"]),
    ("llmcompressor.modifiers.gptq.helpers.make_empty_hessian", make_empty_hessian,
     ["module", "device"]),
    ("llmcompressor.modifiers.gptq.helpers.apply_activation_ordering",
     apply_activation_ordering, ["weights", "hessians", "actorder"]),
    ("llmcompressor.modifiers.gptq.helpers.assign_batches", assign_batches, None),
    ("llmcompressor.modifiers.gptq.helpers.column_scale_window", column_scale_window, None),
    ("llmcompressor.modifiers.gptq.helpers.factorize_hessian", factorize_hessian,
     ["weights", "hessians", "percdamp", "used_rtn_fallback"]),
    ("llmcompressor.modifiers.gptq.helpers.update_batch_qparams", update_batch_qparams, None),
    ("llmcompressor.modifiers.gptq.gptq_quantize.gptq_block_update", gptq_block_update,
     None),
    ("llmcompressor.modifiers.gptq.base._GPTQ_Q_PARAMS", _GPTQ_Q_PARAMS, None),
    ("llmcompressor.utils.dist.broadcast_qparams_and_cleanup",
     broadcast_qparams_and_cleanup, ["skip_cpu"]),
    ("llmcompressor.pipelines.sequential.helpers.trace_subgraphs", trace_subgraphs, None),
    ("llmcompressor.pipelines.registry.CalibrationPipeline._infer_pipeline",
     lambda: CalibrationPipeline._infer_pipeline, ["modifiers"]),
    ("llmcompressor.modifiers.utils.hooks.HooksMixin.disable_hooks",
     lambda: HooksMixin.disable_hooks, ["keep"]),
    ("llmcompressor.modifiers.utils.hooks.HooksMixin._HOOKS_KEEP_ENABLED",
     lambda: HooksMixin._HOOKS_KEEP_ENABLED, None),
    ("llmcompressor.observers.imatrix.IMatrixMSEObserver.attach",
     lambda: __import__("llmcompressor.observers.imatrix", fromlist=["x"])
     .IMatrixMSEObserver.attach, ["module"]),
    ("compressed_tensors...forward.compute_dynamic_scales_and_zp",
     lambda: quantized_forward.compute_dynamic_scales_and_zp,
     ["value", "args", "module", "global_scale"]),
    ("compressed_tensors...forward.forward_quantize", forward_quantize, None),
    ("compressed_tensors.quantization.utils.calculate_qparams", calculate_qparams,
     ["min_vals", "max_vals", "quantization_args", "global_scale"]),
    ("compressed_tensors.utils.impl_backend.ImplBackend.register",
     lambda: ImplBackend.register, None),
    ("llmcompressor.modifiers.quantization.QuantizationMixin.resolve_quantization_config",
     lambda: getattr(QuantizationMixin.resolve_quantization_config, "_rescomp_unchecked",
                     QuantizationMixin.resolve_quantization_config), ["self"]),
    ("llmcompressor.modifiers.quantization.QuantizationMixin.resolved_config",
     lambda: QuantizationMixin.resolved_config, None),
    ("llmcompressor.recipe.Recipe.create_instance", lambda: Recipe.create_instance,
     ["path_or_modifiers"]),
    ("llmcompressor.recipe.Recipe.yaml", lambda: Recipe.yaml, ["file_path"]),
    ("llmcompressor.core.lifecycle.CompressionLifecycle.recipe",
     lambda: CompressionLifecycle.__dataclass_fields__["recipe"], None),
    ("llmcompressor.modifiers.factory.ModifierFactory.register",
     lambda: ModifierFactory.register, None),
    ("torch.fx._symbolic_trace._wrapped_fns_to_patch",
     lambda: __import__("torch.fx._symbolic_trace", fromlist=["x"])._wrapped_fns_to_patch,
     None),
]


def contract_violations() -> list[str]:
    """One line per upstream name that moved or changed the parameters we rely on."""
    versions = (f"llm-compressor {version('llmcompressor')}, compressed-tensors "
                f"{version('compressed-tensors')}, torch {torch.__version__}")
    problems = []
    for what, target, parameters in CONTRACT:
        try:
            resolved = target() if callable(target) and target.__name__ == "<lambda>" else target
        except AttributeError as error:
            problems.append(f"{versions}: {what} is gone ({error})")
            continue
        if parameters:
            with contextlib.suppress(TypeError, ValueError):
                missing = [p for p in parameters if p not in _parameters(resolved)]
                if missing:
                    problems.append(f"{versions}: {what} changed its parameters: no "
                                    f"{', '.join(missing)} (has {_parameters(resolved)})")
    return problems
