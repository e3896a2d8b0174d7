"""llm-compressor's MSE clipping search, the same numbers in half the time on CPU.

The recommended default clips group scales with llm-compressor's ``memoryless_mse``
weight observer, as the CAE paper did. On CPU its eager search
(``llmcompressor.observers.mse_quant._grid_search_mse``) was about 14 s of a 110 s
oneshot of the embedded model (W4 g64, 16 x 512 tokens): every shrink step allocates a
fresh tensor the size of the weight for each of about ten operations, and memory that
large is fresh pages each time. :func:`grid_search_mse_in_place` runs the same
operations, in the same order and on the same layout, in one reused buffer: every
element and every per-group sum is computed exactly as upstream computes it, so the
chosen ranges are bit-identical (``tests/test_mse_search.py`` compares them on the
embedded model's weights and on random ones) and it takes about half the time.

It plugs into upstream's own dispatch point for this search (compressed-tensors'
``ImplBackend``, where upstream registers its Triton kernel for CUDA), and only inside
:func:`in_place_mse_search`: the compensation modifiers enter it while they observe and
compress, so stock ``GPTQModifier`` runs stay stock. Anything the in-place path was not
checked for (floating-point formats, tensor-group scales, another scale dtype, CUDA,
whose Triton kernel goes first anyway) takes upstream's path.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from compressed_tensors.quantization import QuantizationStrategy, QuantizationType
from compressed_tensors.quantization.utils import calculate_qparams, calculate_range
from compressed_tensors.utils.impl_backend import ImplBackend

__all__ = ["grid_search_mse_in_place", "in_place_mse_search"]

#: upstream's name for the search in compressed-tensors' ImplBackend registry
SEARCH_NAME = "_grid_search_mse"
_enabled = contextvars.ContextVar("rescomp_in_place_mse_search", default=False)


@contextlib.contextmanager
def in_place_mse_search():
    """Route llm-compressor's MSE observers through :func:`grid_search_mse_in_place`
    inside the block (where it applies)."""
    token = _enabled.set(True)
    try:
        yield
    finally:
        _enabled.reset(token)


def _applies(observed: torch.Tensor, args, *_args, **_kwargs) -> bool:
    return (
        _enabled.get()
        and not observed.is_cuda
        and observed.dtype == torch.float32
        and observed.is_contiguous()
        and args.type == QuantizationType.INT
        and args.strategy != QuantizationStrategy.TENSOR_GROUP
        and args.scale_dtype in (None, torch.float32)
    )


@torch.no_grad()
def grid_search_mse_in_place(observed: torch.Tensor, args, token_args, maxshrink: float,
                             patience: int, grid: float, norm: float,
                             triton_error_buffer: float, expand: float = 1.0):
    """Upstream's eager ``_grid_search_mse``, step for step, in one reused buffer.

    For shrink factors ``p = 1, 1 - 1/grid, ...`` (``int(maxshrink * grid)`` of them,
    stopping after ``patience`` steps in which no range improved) each range
    ``(p min, p max)`` is scored by ``sum |fake_quantize(x) - x| ** norm`` over its
    values, and the first best one is kept. Fake quantization is compressed-tensors'
    ``_quantize_dequantize``: ``(clamp(x / s + z, q_min, q_max).round() - z) * s``.

    :param observed: ``[observations, *qparams_shape, group_size]``
    :return: the chosen ``(min, max)``, ``qparams_shape`` each
    """
    del token_args, triton_error_buffer  # the range comes from args; CUDA-only option
    min_val = torch.amin(observed, dim=(0, -1)) * expand
    max_val = torch.amax(observed, dim=(0, -1)) * expand
    best_error = torch.full_like(min_val, torch.finfo(min_val.dtype).max)
    best_min, best_max = min_val.clone(), max_val.clone()
    q_min, q_max = calculate_range(args, observed.device)
    values = torch.empty_like(observed)
    stale = 0
    for step in range(int(maxshrink * grid)):
        p = 1 - step / grid
        shrunk_min, shrunk_max = min_val * p, max_val * p
        scale, zero_point = calculate_qparams(
            min_vals=shrunk_min, max_vals=shrunk_max, quantization_args=args, global_scale=None
        )
        scale = scale.unsqueeze(-1)
        torch.div(observed, scale, out=values)
        if zero_point is not None:
            zero_point = zero_point.unsqueeze(-1).to(observed.dtype)
            values += zero_point
        torch.clamp(values, q_min, q_max, out=values).round_()
        if zero_point is not None:
            values -= zero_point
        values *= scale
        values -= observed
        error = values.abs_().pow_(norm).sum(dim=(0, -1))
        improved = error < best_error
        if torch.any(improved):
            best_error = torch.where(improved, error, best_error)
            best_min = torch.where(improved, shrunk_min, best_min)
            best_max = torch.where(improved, shrunk_max, best_max)
            stale = 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best_min, best_max


# after upstream's Triton backend (priority 0): CUDA inputs never reach this one anyway
ImplBackend.register(SEARCH_NAME, _applies, 1)(grid_search_mse_in_place)
