"""The full-precision activation stream of the dual-stream pipeline.

GPTAQ's asymmetry statistics ``D = 2/N sum (x_fp - x_q) x_q^T`` need each module's input
from the untouched model (``x_fp``) next to its input in the quantized model (``x_q``) for
the same sample. The pipeline fills :class:`FullPrecisionStream` in a full-precision pass
of each batch; the modifiers' hooks pop the twin in the quantized pass that follows.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque

import torch

__all__ = ["FullPrecisionStream", "MissingFullPrecisionStream", "PIPELINE_NAME",
           "FULL_PRECISION_CACHE_DEVICE_ENV", "cache_device", "cache_device_override"]

#: the calibration pipeline that provides the stream (rescomp_modifiers/pipeline.py)
PIPELINE_NAME = "dual_stream"

#: overrides where the FP stream's activation cache lives (a torch device string)
FULL_PRECISION_CACHE_DEVICE_ENV = "RESCOMP_FULL_PRECISION_CACHE_DEVICE"


def cache_device(value: str, setting: str) -> torch.device:
    """``value`` (of ``setting``, named in the errors) as a device that can hold an
    activation cache: the CPU or an accelerator torch sees. ``meta`` holds no data."""
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(
            f"{setting}={value!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise ValueError(
            f"{setting}={value!r}: meta tensors hold no data and the full-precision cache "
            "holds the activations: use cpu, cuda or cuda:N")
    backend = getattr(torch, device.type, None)
    if not callable(getattr(backend, "is_available", None)) or not backend.is_available():
        kind = "CUDA" if device.type == "cuda" else repr(device.type)
        raise ValueError(
            f"{setting}={value!r}: the full-precision cache device is {value!r} but torch "
            f"sees no {kind} device: set {FULL_PRECISION_CACHE_DEVICE_ENV} (or "
            "sequential_offload_device) to cpu.")
    return device


def cache_device_override() -> torch.device | None:
    """``$RESCOMP_FULL_PRECISION_CACHE_DEVICE`` as a device (None: not set), checked."""
    value = os.environ.get(FULL_PRECISION_CACHE_DEVICE_ENV)
    return cache_device(value, FULL_PRECISION_CACHE_DEVICE_ENV) if value else None


class MissingFullPrecisionStream(RuntimeError):
    """A dual-stream modifier ran without the full-precision activation stream."""



class FullPrecisionStream:
    """Per-module FIFO of full-precision inputs, filled by the dual-stream pipeline.

    The pipeline runs each batch through the still-full-precision subgraph with all
    modifier hooks disabled while :meth:`capturing`; plain forward-pre hooks stash every
    watched module's input. The quantized pass of the same batch follows at once and
    each modifier hook pops its twin, so X_fp and X_q of one sample always meet in one
    statistics update and at most one batch of inputs is held.
    """

    def __init__(self):
        self._queues: dict[torch.nn.Module, deque] = {}
        self._handles: dict[torch.nn.Module, torch.utils.hooks.RemovableHandle] = {}
        self._capturing: set[torch.nn.Module] | None = None

    def watch(self, modules) -> None:
        for module in modules:
            if module in self._handles:
                continue
            self._queues[module] = deque()
            self._handles[module] = module.register_forward_pre_hook(self._stash)

    def unwatch(self, modules) -> None:
        for module in list(modules):
            handle = self._handles.pop(module, None)
            if handle is not None:
                handle.remove()
            self._queues.pop(module, None)

    def close(self) -> None:
        self.unwatch(list(self._handles))

    def _stash(self, module, args):
        if self._capturing is not None and module in self._capturing:
            self._queues[module].append(args[0].detach())

    @contextlib.contextmanager
    def capturing(self, modules):
        """Stash the inputs of the watched ``modules`` (a true-sequential stage's, or the
        whole subgraph's) during the full-precision pass."""
        self._capturing = set(modules)
        try:
            yield
        finally:
            self._capturing = None

    def pop(self, module) -> torch.Tensor | None:
        queue = self._queues.get(module)
        return queue.popleft() if queue else None

    def assert_consumed(self) -> None:
        """Every stashed input met its quantized twin (else the streams diverged)."""
        leftover = [q for q in self._queues.values() if q]
        for queue in leftover:
            queue.clear()
        if leftover:
            raise MissingFullPrecisionStream(
                f"{len(leftover)} module(s) got full-precision inputs without a "
                "quantized-stream twin in the same batch; the two streams took "
                "different paths through the model."
            )
