"""The dual-stream sequential calibration pipeline.

llm-compressor's sequential pipeline carries one activation stream per subgraph. GPTAQ,
CAE on GPTAQ statistics and FOEM with GPTAQ statistics need two: the quantized stream
(earlier subgraphs already compressed) and the full-precision (FP) stream of the
untouched model. Per subgraph (a decoder layer by default) and per batch this pipeline

1. runs the FP stream through the still-FP subgraph with every modifier hook silent,
   stashing each watched module's input (X_fp) and keeping the outputs as the next
   subgraph's FP inputs;
2. runs the quantized stream through the same subgraph with hooks on: the modifiers
   accumulate H and D from X_q and the stashed X_fp of the same samples. Input
   activations and the KV cache are quantized in this stream as at inference
   (:mod:`rescomp_modifiers.quantized_stream`), never in the FP stream;

then compresses the subgraph and propagates the quantized stream through it, logging
the drift (mean squared difference between the two streams' subgraph outputs). With
``true_sequential`` steps 1-2 and the compression run once per stage of the subgraph
(q/k/v, o, gate/up, down), each stage's passes stopping after it
(:mod:`rescomp_modifiers.true_sequential`).

Cost: one extra forward pass per subgraph compared with upstream's sequential pipeline
(three instead of two) and a second activation cache of the same size. Like
llm-compressor's own cache it lives on oneshot's ``sequential_offload_device`` (default
``cpu``); the environment variable ``RESCOMP_FULL_PRECISION_CACHE_DEVICE`` puts it
elsewhere (e.g. ``cuda:0`` to save the transfers when the accelerator has the room, or
``cpu`` while the quantized cache stays on the accelerator).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from llmcompressor.core import CompressionSession, LifecycleCallbacks, active_session
from loguru import logger
from tqdm import tqdm

from rescomp_modifiers.full_precision_stream import (
    FULL_PRECISION_CACHE_DEVICE_ENV,
    PIPELINE_NAME,
    FullPrecisionStream,
    cache_device,
    cache_device_override,
)
from rescomp_modifiers.modifiers import CompensationModifier
from rescomp_modifiers.quantized_stream import QuantizedStreamActivations
from rescomp_modifiers.upstream import (
    CalibrationPipeline,
    DisableQuantization,
    HooksMixin,
    IntermediatesCache,
    calibration_forward_context,
    disable_offloading,
    get_main_device,
    handle_sequential_oom,
    infer_sequential_targets,
    set_onload_device,
    trace_subgraphs,
)
from rescomp_modifiers.true_sequential import (
    FullPrecisionWeights,
    Stage,
    StageComplete,
    discover_stages,
    stage_hooks,
    stop_after,
)

__all__ = [
    "DualStreamPipeline", "DriftRecord", "last_drift",
    "full_precision_cache_device", "FULL_PRECISION_CACHE_DEVICE_ENV",
]

def full_precision_cache_device(dataset_args) -> torch.device:
    """Where the FP activation cache lives: ``$RESCOMP_FULL_PRECISION_CACHE_DEVICE`` if
    set, else oneshot's ``sequential_offload_device``, where the quantized cache lives.
    (The variable is checked when a recipe with a dual-stream modifier is parsed too.)"""
    return cache_device_override() or cache_device(
        dataset_args.sequential_offload_device, "sequential_offload_device")


@dataclass
class DriftRecord:
    """Mean squared difference between the quantized and FP streams per subgraph."""

    subgraph: int
    mse: float


#: the session state's attribute that holds the run's drift records: the record lives as
#: long as the llm-compressor session (``oneshot`` resets the session when it starts)
DRIFT_STATE_ATTRIBUTE = "dual_stream_drift"


def last_drift(session: CompressionSession | None = None) -> list[DriftRecord]:
    """Per-subgraph drift of the last dual-stream calibration run in ``session``.

    :param session: an llm-compressor session; default: the active one (the one
        ``oneshot`` used, also inside ``create_session()``)
    """
    state = (session or active_session()).state
    return list(getattr(state, DRIFT_STATE_ATTRIBUTE, []))


def _dual_stream_modifiers(modifiers) -> list[CompensationModifier]:
    return [
        m
        for m in modifiers
        if isinstance(m, CompensationModifier) and m.needs_full_precision_stream
    ]


def _staged(modifiers) -> bool:
    """Whether the compensation modifiers ask for true-sequential statistics (all or none
    of them: the stage passes calibrate every modifier's modules alike)."""
    flags = {m.true_sequential for m in modifiers if isinstance(m, CompensationModifier)}
    if len(flags) > 1:
        raise ValueError(
            "Some compensation modifiers of the recipe set true_sequential and some do "
            "not; the stage passes calibrate every module alike: set it on all or none."
        )
    return flags == {True}


def _stages(subgraph, model, activations, targets, submodules, staged) -> list[Stage]:
    """The subgraph's stages: one full pass, or the true-sequential stages discovered
    on the first batch."""
    if not staged:
        return [Stage(submodules, stop_module=None)]
    inside = set(submodules)
    return discover_stages(
        lambda: _discovery_forward(subgraph, model, activations.fetch(0, subgraph.input_names)),
        [module for module in targets if module in inside],
        submodules,
    )


def _discovery_forward(subgraph, model, inputs) -> None:
    with HooksMixin.disable_hooks():
        subgraph.forward(model, **inputs)


def _forward(subgraph, model, inputs: dict, stage: Stage) -> dict | None:
    """The subgraph's outputs, or None where the stage's pass stopped early."""
    with stop_after(stage):
        try:
            return subgraph.forward(model, **inputs)
        except StageComplete:
            return None


def _output_drift(quantized: dict, full_precision: dict) -> tuple[float, int]:
    total, count = 0.0, 0
    for name, value in quantized.items():
        other = full_precision.get(name)
        if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and (
            value.is_floating_point() and value.shape == other.shape
        ):
            diff = value.float() - other.to(value.device).float()
            total += float(diff.square().sum())
            count += diff.numel()
    return total, count


@CalibrationPipeline.register(PIPELINE_NAME)
class DualStreamPipeline(CalibrationPipeline):
    @staticmethod
    @handle_sequential_oom
    def __call__(model: torch.nn.Module, dataloader, dataset_args):
        """Calibrate ``model`` subgraph by subgraph with a quantized and an FP stream."""
        session = active_session()
        modifiers = session.lifecycle.recipe.modifiers
        if len(dataloader) == 0:
            raise ValueError(
                "The calibration dataset is empty: pass a dataset with at least one "
                "sample (check `num_calibration_samples` and the dataset split)."
            )
        if not dataset_args.propagate_error:
            raise ValueError(
                "The dual-stream pipeline always propagates the quantized stream; "
                "propagate_error=False would make both streams full precision."
            )

        fp_offload_device = full_precision_cache_device(dataset_args)
        onload_device = get_main_device()
        offload_device = torch.device(dataset_args.sequential_offload_device)
        set_onload_device(model, onload_device)

        sequential_targets = infer_sequential_targets(model, dataset_args.sequential_targets)
        subgraphs = trace_subgraphs(
            model,
            next(iter(dataloader)),
            sequential_targets,
            dataset_args.tracing_ignore,
            dataset_args.sequential_targets_per_subgraph,
        )
        num_subgraphs = len(subgraphs)

        stream = FullPrecisionStream()
        dual = _dual_stream_modifiers(modifiers)
        staged = _staged(modifiers)
        originals = FullPrecisionWeights()
        targets = [module for m in modifiers if isinstance(m, CompensationModifier)
                   for module in m._hooked_modules()]
        for modifier in dual:
            modifier.attach_full_precision_stream(stream)
        drift: list[DriftRecord] = []
        setattr(session.state, DRIFT_STATE_ATTRIBUTE, drift)
        quantized_stream = None

        try:
            LifecycleCallbacks.calibration_start()
            # after calibration_start: its hooks follow the observers' hooks
            quantized_stream = QuantizedStreamActivations(model)
            with contextlib.ExitStack() as stack:
                stack.enter_context(calibration_forward_context(model))
                stack.enter_context(DisableQuantization(model))
                activations = IntermediatesCache.from_dataloader(
                    dataloader, onload_device, offload_device
                )
                # A copy of the first cache, not a second pass over the loader (which
                # may shuffle again): both streams must see the same samples in order.
                # Its entries are shared with the quantized cache until the FP stream
                # replaces them with its own outputs, which go to fp_offload_device.
                fp_activations = IntermediatesCache(
                    [dict(batch) for batch in activations.batch_intermediates],
                    fp_offload_device,
                )
                session.state.loss_masks = None
                num_batches = len(dataloader)

                for index, subgraph in enumerate(subgraphs):
                    last = index == num_subgraphs - 1
                    desc = f"({index + 1}/{num_subgraphs})"
                    with disable_offloading():
                        submodules = subgraph.submodules(model)
                        stages = _stages(subgraph, model, activations, targets, submodules,
                                         staged)
                        for stage_index, stage in enumerate(stages):
                            stage_desc = (desc if len(stages) == 1 else
                                          f"{desc} stage {stage_index + 1}/{len(stages)}")
                            for batch_idx in tqdm(range(num_batches),
                                                  desc=f"{stage_desc}: Calibrating"):
                                session.state.current_batch_idx = batch_idx
                                fp_inputs = fp_activations.fetch(batch_idx, subgraph.input_names)
                                with HooksMixin.disable_hooks(), stream.capturing(
                                        stage.modules), originals.swapped_in():
                                    fp_outputs = _forward(subgraph, model, fp_inputs, stage)
                                del fp_inputs
                                with quantized_stream.quantizing(), stage_hooks(modifiers, stage):
                                    _forward(subgraph, model, activations.fetch(
                                        batch_idx, subgraph.input_names), stage)
                                stream.assert_consumed()
                                if stage.is_last and not last:
                                    fp_activations.update(batch_idx, fp_outputs)
                                    fp_activations.delete(batch_idx, subgraph.consumed_names)
                                del fp_outputs

                            if not stage.is_last:
                                originals.keep(stage.modules)
                            LifecycleCallbacks.sequential_epoch_end(stage.modules)
                        originals.clear()
                        quantized_stream.mark_calibrated(submodules)
                        total, count = 0.0, 0
                        with HooksMixin.disable_hooks(), quantized_stream.quantizing():
                            for batch_idx in tqdm(range(num_batches), desc=f"{desc}: Propagating"):
                                outputs = subgraph.forward(
                                    model, **activations.fetch(batch_idx, subgraph.input_names)
                                )
                                if last:
                                    continue
                                reference = fp_activations.fetch(batch_idx, list(outputs))
                                batch_total, batch_count = _output_drift(outputs, reference)
                                total, count = total + batch_total, count + batch_count
                                activations.update(batch_idx, outputs)
                                activations.delete(batch_idx, subgraph.consumed_names)
                        if count:
                            record = DriftRecord(index, total / count)
                            drift.append(record)
                            logger.info(
                                f"Subgraph {index + 1}/{num_subgraphs}: drift between "
                                f"quantized and full-precision outputs (MSE) {record.mse:.3e}"
                            )

                LifecycleCallbacks.calibration_end()
        finally:
            stream.close()
            if quantized_stream is not None:
                quantized_stream.close()
            for modifier in dual:
                modifier.attach_full_precision_stream(None)
