"""The compensation solver: GPTQ, GPTAQ, CAE and FOEM in one batched column loop.

Notation (docs/design.md has the derivations): a Linear ``y = W x`` with ``W`` of shape ``[rows, columns]``;
per calibration token ``x_q`` is the layer input in the quantized flow and ``x_fp`` the
input in the untouched full-precision flow. Statistics, normalized like llm-compressor's
Hessian (``2/N``, N = number of sequences)::

    H = 2/N sum x_q x_q^T            (hessians)
    D = 2/N sum (x_fp - x_q) x_q^T   (asymmetry, "dXX^T")

``Hd = H + lambda I`` and ``U`` is the upper Cholesky factor of ``Hd^-1``
(``Hd^-1 = U^T U``), exactly what llm-compressor's ``factorize_hessian`` returns.

For column ``c`` with latent value ``w``, original value ``w0`` and quantized value
``q``, the papers' updates of the later columns are::

    GPTQ   W[:, c+1:] -= (w - q) / U[c,c] * U[c, c+1:]
    GPTAQ  W[:, c+1:] += a * w * P[c, c+1:]             P = triu(D U^T, 1) U
    CAE    W[:, c+1:] += b * (w0 - w) * R[c, c+1:]      R = triu((H + D) U^T, 1) U
    FOEM   the GPTQ error becomes ((w - q) - f * (w - w0)) / U[c,c]

Each is the least-squares projection onto the remaining columns of the output residual
that column ``c`` leaves behind: GPTQ's ``(w - q) x_q``, GPTAQ's ``w (x_fp - x_q)`` and
CAE's ``(w0 - w) x_fp``. With ``a = b = 1`` the three add up to ``w0 x_fp - q x_q``: the
layer then greedily matches the full-precision layer's output ``W0 X_fp``.

The algebra this file exploits. Because ``Hd U^T = U^-1`` is upper triangular, the
``H`` half of ``R`` is ``triu(H U^T, 1) U = -triu(U / diag(U)[:, None], 1)``: it is a
multiple of GPTQ's own update row and folds into the error. Writing ``R = P + S``::

    W[:, c+1:] -= e * U[c, c+1:] - v * P[c, c+1:]
    e = ((w - q) + (b + f) * (w0 - w)) / U[c,c]          (modified error)
    v = (a - b) * w + b * w0                              (asymmetric driver)

so every combination is a rank-2 update with a single extra matrix ``P`` (absent with
plain GPTQ statistics, ``D = 0``). The ``b * w0`` part of the driver does not depend on
the loop at all: with scales fixed before the loop its total is ``b * W0 @ P``, and
with ``P = T U``, ``T = triu(D U^T, 1)``, that is ``b * V @ U`` for ``V = W0 T``, whose
column ``c`` sums only original weights of earlier columns. ``V @ U`` has GPTQ's own
shape: column ``c`` receives ``b V[:, c] U[c,c]`` before the loop and the rest rides on
GPTQ's updates as the error shift ``e -> e - b V[:, c]``. ``P`` is then never formed
(:func:`original_weight_drive`). With equal coefficients (``a == b``, the papers' and
the released code's CAE setting) the loop is the plain GPTQ loop with a modified error.

Two semantics (named by :class:`LazyUpdate` and the coefficients):

* the papers' equations: ``a = b = 1``, ``f = 1``, lazy block updates with the latent
  column values, so the result does not depend on the block size;
* the released research code, which produced the published tables: ``a = 0.25``
  (GPTAQ), ``a = b = 0.25`` (CAE), ``f = 0.2`` with a pull of the next in-block column
  toward ``W0`` (FOEM, as in its maintained implementation); CAE's lazy update uses the
  latent values clamped to the group's representable range at 3+ bits ("allw") and the
  quantized values at 2 bits ("org", as released GPTAQ), which makes the result depend
  on the block size.
"""

from __future__ import annotations

import math
from copy import copy
from dataclasses import dataclass, replace
from enum import Enum

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStrategy,
    QuantizationType,
    fake_quantize,
)

from rescomp_modifiers.linalg import inverse_hessian_factor
from rescomp_modifiers.upstream import (
    GPTQ_PRECISION,
    apply_activation_ordering,
    calculate_qparams,
    calculate_range,
    column_scale_window,
    factorize_hessian,
    gptq_block_update,
    load_observer,
)

__all__ = [
    "LazyUpdate",
    "GroupScales",
    "Semantics",
    "CompensationTerms",
    "CompensationResult",
    "compensate_weight",
    "projection_rows",
]

#: columns per in-block window: a column's rank-1 update reaches only the rest of its
#: window; the window's columns update the rest of the block as one matmul at its end
#: (measured on one CPU core, 2048x2048: 32 is about as fast as 16 or 64 and keeps
#: the matmul's inner dimension useful)
IN_BLOCK_WINDOW = 32

SUPPORTED_STRATEGIES = (
    QuantizationStrategy.TENSOR,
    QuantizationStrategy.CHANNEL,
    QuantizationStrategy.GROUP,
    QuantizationStrategy.TENSOR_GROUP,
    QuantizationStrategy.BLOCK,
)


class LazyUpdate(str, Enum):
    """Which column values drive the GPTAQ/CAE terms in the between-block update."""

    #: the latent values, as in the papers' equations; block-size invariant
    LATENT = "latent"
    #: the latent values clamped to the group's representable range (released CAE, 3+ bits)
    CLAMPED_LATENT = "clamped_latent"
    #: the quantized values (released GPTAQ, released CAE at 2 bits); block-size dependent
    QUANTIZED = "quantized"


class GroupScales(str, Enum):
    """When group scales are computed."""

    #: by llm-compressor's observer from the original weights before the loop (default:
    #: the checkpoint's scales are the observer's, e.g. MSE-searched, and upstream GPTQ
    #: is reproduced exactly)
    STATIC = "static"
    #: min-max from the latent (compensated) weights when a group's first column is
    #: reached, as the research code does without ``--static-groups``
    DYNAMIC = "dynamic"


class Semantics(str, Enum):
    """Which definition of the methods the coefficient defaults follow."""

    #: the released research code; reproduces the published tables
    RELEASED = "released"
    #: the papers' equations (all coefficients 1, block-size invariant)
    PAPER = "paper"


@dataclass(frozen=True)
class CompensationTerms:
    """Which update terms the column loop applies, with their coefficients.

    All zero is plain GPTQ. See the module docstring for the equations.
    """

    #: GPTAQ's coefficient ``a`` on ``w * P`` (needs the asymmetry statistics D)
    asymmetric_coefficient: float = 0.0
    #: CAE's coefficient ``b`` on ``(w0 - w) * R``
    compensation_aware_coefficient: float = 0.0
    #: FOEM's coefficient ``f`` on ``(w - w0)`` in the error
    first_order_coefficient: float = 0.0
    #: FOEM (maintained implementation): pull the next in-block column toward W0 by ``f``
    first_order_next_column_pull: bool = False
    #: which values drive the asymmetric/CAE terms between blocks
    lazy_update: LazyUpdate = LazyUpdate.LATENT
    #: when group scales are computed
    group_scales: GroupScales = GroupScales.STATIC

    def __post_init__(self):
        for name in (
            "asymmetric_coefficient",
            "compensation_aware_coefficient",
            "first_order_coefficient",
        ):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        object.__setattr__(self, "lazy_update", LazyUpdate(self.lazy_update))
        object.__setattr__(self, "group_scales", GroupScales(self.group_scales))

    @property
    def uses_original_weights(self) -> bool:
        return (
            self.compensation_aware_coefficient != 0.0
            or self.first_order_coefficient != 0.0
        )

    def is_plain_gptq(self, has_asymmetry: bool) -> bool:
        return (
            not self.uses_original_weights
            and not (has_asymmetry and self.asymmetric_coefficient != 0.0)
            and self.group_scales == GroupScales.STATIC
        )

    @classmethod
    def for_method(
        cls,
        method: str,
        semantics: Semantics | str = Semantics.RELEASED,
        num_bits: int = 4,
    ) -> "CompensationTerms":
        """Coefficients for a named method.

        :param method: ``gptq``, ``gptaq``, ``gptaq_cae`` (GPTAQ statistics, the paper's
            Algorithm 1), ``gptq_cae`` (plain GPTQ statistics, Algorithm 2), ``foem``
            or ``foem_gptaq``
        :param semantics: ``released`` (the research code; reproduces the published
            tables) or ``paper`` (the papers' equations)
        :param num_bits: weight bits; the released CAE code switches its lazy update
            at 2 bits
        """
        semantics = Semantics(semantics)
        paper = semantics == Semantics.PAPER
        coefficient = 1.0 if paper else 0.25
        foem = 1.0 if paper else 0.2
        if paper:
            cae_lazy = LazyUpdate.LATENT
        else:
            cae_lazy = LazyUpdate.QUANTIZED if num_bits <= 2 else LazyUpdate.CLAMPED_LATENT
        gptaq_lazy = LazyUpdate.LATENT if paper else LazyUpdate.QUANTIZED
        table = {
            "gptq": cls(),
            "gptaq": cls(asymmetric_coefficient=coefficient, lazy_update=gptaq_lazy),
            "gptaq_cae": cls(
                asymmetric_coefficient=coefficient,
                compensation_aware_coefficient=coefficient,
                lazy_update=cae_lazy,
            ),
            "gptq_cae": cls(
                compensation_aware_coefficient=coefficient, lazy_update=cae_lazy
            ),
            "foem": cls(
                first_order_coefficient=foem, first_order_next_column_pull=not paper
            ),
            "foem_gptaq": cls(
                asymmetric_coefficient=coefficient,
                first_order_coefficient=foem,
                first_order_next_column_pull=not paper,
                lazy_update=gptaq_lazy,
            ),
        }
        if method not in table:
            raise ValueError(f"Unknown method {method!r}; choose one of {sorted(table)}")
        return table[method]

    def with_overrides(self, **overrides) -> "CompensationTerms":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class CompensationResult:
    """What :func:`compensate_weight` returns (the first three like upstream's)."""

    #: fake-quantized weights ``[batch, rows, columns]`` in the input dtype
    quantized: torch.Tensor
    #: per-item GPTQ proxy loss ``sum ((w - q) / U[c,c])^2 / 2``
    losses: torch.Tensor
    #: the same loss per row, ``[batch, rows]`` (for row-stacked modules)
    row_losses: torch.Tensor
    #: per-item flag: the Hessian factorization failed, round-to-nearest was used (the
    #: solver does not log it; the modifier reports the modules once, upstream's way)
    used_rtn_fallback: torch.Tensor
    #: scales and zero points that quantize ``quantized`` (changed only by dynamic groups)
    scale: torch.Tensor
    zero_point: torch.Tensor


def projection_rows(asymmetry: torch.Tensor, hinv_factor: torch.Tensor, i1: int, i2: int,
                    chunk: int = 128) -> torch.Tensor:
    """Rows ``i1:i2`` of ``P = triu(D U^T, 1) U``, columns ``i1:`` (left of them is 0).

    Row ``c`` of ``P`` equals ``D[c, c+1:] (H_{c+1:})^-1`` for the damped trailing block
    of H: the least-squares coefficients that re-express column ``c``'s input difference
    through the later columns' quantized-flow inputs. ``U`` is upper triangular, so
    ``(D U^T)[c, k]`` for ``k > c >= i1`` needs only ``D[c, i1:]`` and ``U[i1:, i1:]``;
    computing P a block of rows at a time this way never holds the whole ``n x n``
    matrix. Both products skip U's zero triangle a ``chunk`` of columns at a time
    (column ``j`` of ``U^T`` is zero above row ``j``, column ``j`` of ``U`` below it),
    which halves their cost: about ``2n^3/3`` flops for all of P instead of ``4n^3/3``.
    """
    trailing = hinv_factor[:, i1:, i1:]
    rows_in = asymmetry[:, i1:i2, i1:]
    width = trailing.shape[-1]
    rows = torch.empty_like(rows_in)
    for j1 in range(0, width, chunk):
        j2 = min(j1 + chunk, width)
        torch.bmm(rows_in[:, :, j1:], trailing[:, j1:j2, j1:].transpose(-1, -2),
                  out=rows[:, :, j1:j2])
    rows.triu_(1)
    projection = torch.empty_like(rows)
    for j1 in range(0, width, chunk):
        j2 = min(j1 + chunk, width)
        torch.bmm(rows[:, :, :j2], trailing[:, :j2, j1:j2], out=projection[:, :, j1:j2])
    return projection


def original_weight_drive(asymmetry: torch.Tensor, hinv_factor: torch.Tensor,
                          original_weights: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
    """Columns ``i1:i2`` of ``V = W0 T``, ``T = triu(D U^T, 1)``, column-major.

    ``original_weights`` is ``W0`` column-major (``[batch, columns, rows]``), and so is
    the result (``[batch, i2 - i1, rows]``).

    CAE's ``b W0 P`` term is ``b V U`` (``P = T U``). ``V[:, c]`` sums only the original
    weights of columns before ``c``, so it is known before the loop, and ``V U`` is a
    GPTQ-shaped update: column ``c`` receives ``b V[:, c] U[c,c]`` itself and
    ``e -> e - b V[:, c]`` carries the rest through GPTQ's own in-block and lazy updates.
    P is then never formed: ``n^3/3`` flops for T's columns and ``rows n^2`` for V,
    instead of ``2n^3/3`` for P plus ``rows n^2`` for ``W0 P``. ``T[c, k]`` for
    ``c < k`` needs ``D[c, k:]`` and ``U[k, k:]`` only (U is upper triangular).
    """
    trailing = hinv_factor[:, i1:i2, i1:]
    upper = torch.bmm(asymmetry[:, :i2, i1:], trailing.transpose(1, 2))  # [batch, i2, count]
    upper[:, i1:].triu_(1)  # T is strictly upper triangular
    return torch.bmm(upper.transpose(1, 2), original_weights[:, :i2])


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``, from its sum: NaN or Inf in any entry makes the sum
    NaN or Inf, and finite entries overflow it only beyond float32's range, where no
    usable statistics lie. ``isfinite(...).all()`` took 6 ms on a 1536^2 H on one core,
    twice per solve; the sum takes 0.4 ms."""
    return bool(torch.isfinite(tensor.sum()))


def _validate(weights, hessians, asymmetry, original_weights, quant_args, terms):
    if weights.ndim != 3 or hessians.ndim != 3:
        raise ValueError(
            "weights must be [batch, rows, columns] and hessians [batch, columns, "
            f"columns]; got {tuple(weights.shape)} and {tuple(hessians.shape)}"
        )
    batch, _, columns = weights.shape
    if hessians.shape != (batch, columns, columns):
        raise ValueError(
            f"hessians must have shape {(batch, columns, columns)} to match weights "
            f"{tuple(weights.shape)}; got {tuple(hessians.shape)} (is H square and "
            "built from this layer's inputs?)"
        )
    if not _all_finite(hessians):
        raise ValueError(
            "The Hessian H contains NaN or Inf: the calibration activations are not "
            "finite. Check the model's dtype (fp16 overflow) and the calibration data."
        )
    if asymmetry is not None:
        if asymmetry.shape != hessians.shape:
            raise ValueError(
                f"asymmetry statistics D must have the Hessian's shape "
                f"{tuple(hessians.shape)}; got {tuple(asymmetry.shape)}"
            )
        if not _all_finite(asymmetry):
            raise ValueError(
                "The asymmetry statistics D contain NaN or Inf: the full-precision or "
                "quantized activations are not finite."
            )
    if original_weights is not None and original_weights.shape != weights.shape:
        raise ValueError(
            f"original_weights must have the weights' shape {tuple(weights.shape)}; "
            f"got {tuple(original_weights.shape)}"
        )
    if terms.uses_original_weights and original_weights is None:
        raise ValueError(
            "CAE and FOEM terms need original_weights (W0); pass the weights as "
            "they were before any compensation."
        )
    if quant_args.strategy not in SUPPORTED_STRATEGIES:
        raise ValueError(
            # QuantizationArgs stores the strategy as a plain string (use_enum_values)
            f"Quantization strategy {QuantizationStrategy(quant_args.strategy).value!r} "
            "is not supported by "
            f"the compensation solver; use one of "
            f"{[s.value for s in SUPPORTED_STRATEGIES]}."
        )
    if terms.group_scales == GroupScales.DYNAMIC and (
        quant_args.strategy != QuantizationStrategy.GROUP
        or quant_args.type != "int"
    ):
        raise ValueError(
            "group_scales='dynamic' recomputes integer group scales from the latent "
            "weights; it needs strategy 'group' with type 'int'. Use "
            "group_scales='static' for other schemes."
        )
    if quant_args.strategy == QuantizationStrategy.GROUP and columns % quant_args.group_size:
        raise ValueError(
            f"group_size {quant_args.group_size} does not divide the layer's "
            f"{columns} input columns; choose a group size that divides {columns} "
            "(e.g. 32 or 64) or add this layer to `ignore`."
        )


def _permute(tensor: torch.Tensor, perm: torch.Tensor, dim: int) -> torch.Tensor:
    """Each batch item's rows (``dim=0``) or columns (``dim=1``) in its ``perm`` order.

    index_select per item: 2-5x faster than gather with an expanded index on CPU.
    """
    out = torch.empty_like(tensor)
    for item, p, target in zip(tensor, perm, out):
        torch.index_select(item, dim, p, out=target)
    return out


def _column_major(tensor: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """``tensor.transpose(1, 2).contiguous()``, a ``chunk`` of rows at a time.

    Reading whole rows keeps the source accesses sequential: about 2x faster on CPU than
    one strided copy (an 8192 x 2048 weight on one core).
    """
    batch, rows, columns = tensor.shape
    out = tensor.new_empty(batch, columns, rows)
    for r1 in range(0, rows, chunk):
        out[:, :, r1:r1 + chunk].copy_(tensor[:, r1:r1 + chunk].transpose(1, 2))
    return out


def _permute_square(tensor: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return _permute(_permute(tensor, perm, dim=0), perm, dim=1)


@torch.no_grad()
def compensate_weight(
    weights: torch.Tensor,
    hessians: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    global_scale: torch.Tensor | None,
    quant_args: QuantizationArgs,
    *,
    asymmetry: torch.Tensor | None = None,
    original_weights: torch.Tensor | None = None,
    terms: CompensationTerms = CompensationTerms(),
    blocksize: int = 128,
    percdamp: float = 0.01,
    rows_with_terms: torch.Tensor | None = None,
) -> CompensationResult:
    """Quantize a batch of weights with any combination of the compensation terms.

    Arguments follow llm-compressor's ``quantize_weight`` (batched ``[batch, rows,
    columns]``, normalized Hessians, observer qparams stacked per item).

    :param asymmetry: ``D = 2/N sum (x_fp - x_q) x_q^T``, ``[batch, columns, columns]``;
        ``None`` means plain GPTQ statistics (``D = 0``)
    :param original_weights: ``W0`` when the weights handed in are not the originals;
        defaults to ``weights`` (the usual case: nothing has touched them yet)
    :param terms: which terms to apply, see :class:`CompensationTerms`
    :param rows_with_terms: ``[rows]`` bool; rows where False are solved as plain GPTQ
        in the same loop (every coefficient 0 there): a method and GPTQ side by side
        for the price of one loop, as the guard's contest needs (None: every row)

    The solver logs nothing: an item whose Hessian factorization failed is quantized
    with round-to-nearest and flagged in :attr:`CompensationResult.used_rtn_fallback`,
    for the caller to report under the module's name.
    """
    # the usual case: W0 is the weights handed in, the loop copies it from W
    w0_is_weights = original_weights is None or original_weights is weights
    if original_weights is None and terms.uses_original_weights:
        original_weights = weights
    _validate(weights, hessians, asymmetry, original_weights, quant_args, terms)

    batch_size, num_rows, num_columns = weights.shape
    final_dtype = weights.dtype
    device = weights.device
    W = weights.to(dtype=GPTQ_PRECISION).clone()
    H = hessians.to(device=device, dtype=GPTQ_PRECISION).clone()
    if rows_with_terms is not None and rows_with_terms.shape != (num_rows,):
        raise ValueError(f"rows_with_terms must be a [{num_rows}] mask, got "
                         f"{tuple(rows_with_terms.shape)}")
    plan = LoopPlan.build(terms, has_asymmetry=asymmetry is not None,
                          rows_with_terms=None if rows_with_terms is None
                          else rows_with_terms.to(device))
    D = asymmetry.to(device=device, dtype=GPTQ_PRECISION) if plan.uses_asymmetry else None
    W0 = (
        original_weights.to(device=device, dtype=GPTQ_PRECISION)
        if terms.uses_original_weights and not w0_is_weights
        else None
    )
    scale = scale.to(device=device).clone()
    zero_point = zero_point.to(device=device).clone()
    if global_scale is not None:
        global_scale = global_scale.to(device=device)

    # Activation ordering permutes W and both axes of H (upstream, in place); D on both
    # axes and W0's columns must follow the same permutation.
    W, H, perm = apply_activation_ordering(W, H, quant_args.actorder)
    if perm is not None:
        if D is not None:
            D = _permute_square(D, perm)
        if W0 is not None:
            W0 = _permute(W0, perm, dim=1)

    g_idx = None
    strategy = quant_args.strategy
    if strategy in (
        QuantizationStrategy.GROUP,
        QuantizationStrategy.TENSOR_GROUP,
        QuantizationStrategy.BLOCK,
    ):
        divisor = (
            quant_args.group_size
            if strategy != QuantizationStrategy.BLOCK
            else quant_args.block_structure[1]
        )
        g_idx = torch.arange(num_columns, device=device, dtype=torch.int) // divisor
        g_idx = g_idx.unsqueeze(0).expand(batch_size, -1)
        if perm is not None:
            g_idx = torch.gather(g_idx, 1, perm)

    losses = torch.zeros(batch_size, num_rows, device=device)
    used_rtn_fallback = torch.zeros(batch_size, dtype=torch.bool, device=device)
    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0
    # both zero W's dead columns; plain GPTQ keeps upstream's own factorization (bit for
    # bit), the compensation loop takes the faster one (same U up to rounding)
    factorize = factorize_hessian if plan.plain_gptq else inverse_hessian_factor
    Hinv = factorize(W, H, percdamp, used_rtn_fallback)
    del H
    if dead.any():
        if W0 is not None:
            W0 = W0.masked_fill(dead.unsqueeze(1), 0)
        if D is not None:
            D = D.masked_fill(dead.unsqueeze(1), 0)
    if D is not None:
        # A failed factorization means round-to-nearest: no projected terms at all.
        D = D.masked_fill(used_rtn_fallback.view(-1, 1, 1), 0)

    if plan.plain_gptq:
        return _finish(
            _upstream_loop(W, Hinv, scale, zero_point, global_scale, g_idx, quant_args,
                           blocksize, losses),
            perm, losses, used_rtn_fallback, scale, zero_point, final_dtype,
        )

    # The compensation loop holds weights column-major, [batch, columns, rows]: every
    # per-column read, write and update then touches contiguous memory (a column of a
    # row-major matrix is strided, one cache line per element).
    W = _column_major(W)
    if terms.uses_original_weights:
        # W0 == W here when W0 is the weights handed in (same permutation, same dead
        # columns zeroed): a copy is ~10x cheaper than a second transposition
        W0 = W.clone() if W0 is None else _column_major(W0)
    quantizer = _ColumnQuantizer(scale, zero_point, global_scale, g_idx, quant_args, num_rows)
    columns_major = _compensation_loop(plan, W, W0, D, Hinv, quantizer, used_rtn_fallback,
                                       blocksize, losses)
    return _finish(columns_major, perm, losses, used_rtn_fallback, scale, zero_point,
                   final_dtype, column_major=True)


def _compensation_loop(plan, W, W0, D, Hinv, quantizer, used_rtn_fallback, blocksize, losses):
    """GPTQ's lazy block loop with the compensation terms, on column-major ``W``, ``W0``.

    ``W`` and ``W0`` are ``[batch, columns, rows]``; ``W`` is quantized in place and
    returned. Within a block, in-block updates are themselves lazy over windows of
    :data:`IN_BLOCK_WINDOW` columns: a column updates only the rest of its window, and
    the window's columns update the rest of the block as one matmul when it ends (the
    same arithmetic as every column updating every later one, regrouped).
    """
    num_columns = W.shape[1]
    window = IN_BLOCK_WINDOW
    dynamic = None if plan.static_scales else _DynamicGroups(quantizer)
    # FOEM's pull toward W0, off for round-to-nearest fallback items (no terms at all)
    # [batch, 1]
    pull = plan.first_order_coefficient * (~used_rtn_fallback).to(W.dtype).unsqueeze(-1)

    for i1 in range(0, num_columns, blocksize):
        block = _Block(plan, W, W0, D, Hinv, quantizer, i1, min(i1 + blocksize, num_columns))
        pending = 0  # columns pending:i have updated their window, not the columns after it
        window_end = min(window, block.count)
        for i in range(block.count):
            if i == window_end:  # the window's columns update the rest of the block
                block.flush(pending, i, i)
                pending, window_end = i, min(i + window, block.count)
                if plan.next_column_pull:
                    block.pull_toward_original(i, pull)
            if dynamic is not None and dynamic.starts_group(i1 + i):
                # a new group's scales come from its members' exact latent values
                block.flush(pending, i, window_end)
                pending = i
                dynamic.compute(i1 + i, block.latent_snapshot(i))
                block.refresh_scales()
            # q = Q(w); e and -v; W[:, c+1:window_end] -= e U[c] - v P[c]
            block.quantize_column(i, window_end)
            if plan.next_column_pull and i + 1 < window_end:
                block.pull_toward_original(i + 1, pull)
        # loss, Q into W, and the lazy update of the columns after the block
        block.finish(losses)
    return W


@dataclass(frozen=True)
class LoopPlan:
    """What the column loop does, decided once from the terms and the statistics.

    Every field follows from the module docstring's algebra. With the column's latent
    value ``w``, original ``w0`` and quantized ``q``, the loop applies::

        e  = ((1 - c) w + c w0 - q) / U[c,c]        c = b + f     (modified error)
        -v = (b - a) w - b w0                                      (negative driver)
        W[:, c+1:] -= e U[c, c+1:] + (-v) P[c, c+1:]               P = triu(D U^T, 1) U

    With ``rows_with_terms`` the four coefficients are per-row tensors (``[rows]``,
    broadcast over the column-major ``[..., rows]`` layout): 0 on the rows solved as
    plain GPTQ. The flags are the terms' own, so those rows run the same loop with every
    term multiplied by 0, which is GPTQ's update exactly.
    """

    #: GPTAQ's ``a``; 0 without D (its term is ``a w P`` and P is built from D)
    asymmetric_coefficient: float
    #: CAE's ``b``: its ``H`` half is the ``b`` in ``c``, its ``D`` half the ``b`` in ``v``
    compensation_aware_coefficient: float
    #: FOEM's ``f``, the ``f`` in ``c``
    first_order_coefficient: float
    #: ``c = b + f``: the share of ``w0 - w`` that the modified error carries
    error_coefficient: float
    #: ``c != 0``: the error carries ``c w0`` (a CAE or FOEM term)
    error_has_original: bool
    #: D enters the solve (a GPTAQ or CAE term with D given); otherwise ``P = 0``
    uses_asymmetry: bool
    #: the driver ``v`` and P's rows are formed in the loop: ``a != b`` leaves a ``w``
    #: part, and dynamic scales keep the ``b w0`` part in the loop (below)
    driver_in_loop: bool
    #: ``b W0 P`` rides on GPTQ's update as the error shift ``e -> e - b V[:, c]``
    #: (:func:`original_weight_drive`): needs D, ``b != 0`` and static scales
    w0_error_shift: bool
    #: the ``b w0`` part stays in ``v``: with dynamic scales, group scales read the
    #: latent values of columns whose block has not started yet
    #: (:func:`_latent_snapshot`), which the shift would leave without their ``b V U``
    w0_in_driver: bool
    #: which value of a column drives the between-block (lazy) update
    lazy_update: LazyUpdate
    #: the lazy update uses other values than the in-block updates: a clamped or
    #: quantized lazy mode, and a term (D or ``b``) that reads the value
    lazy_differs: bool
    #: group scales fixed before the loop (llm-compressor's observer)
    static_scales: bool
    #: FOEM (maintained implementation): pull the next in-block column toward W0 by ``f``
    next_column_pull: bool
    #: every term off with static scales: upstream's own GPTQ loop, bit for bit
    plain_gptq: bool

    @classmethod
    def build(cls, terms: CompensationTerms, has_asymmetry: bool,
              rows_with_terms: torch.Tensor | None = None) -> "LoopPlan":
        """The plan for ``terms``; ``has_asymmetry``: D was handed to the solver;
        ``rows_with_terms``: a ``[rows]`` bool mask, the other rows are plain GPTQ."""
        b = terms.compensation_aware_coefficient
        f = terms.first_order_coefficient
        a = terms.asymmetric_coefficient if has_asymmetry else 0.0
        uses_asymmetry = has_asymmetry and (a != 0.0 or b != 0.0)
        static = terms.group_scales == GroupScales.STATIC
        driver_in_loop = uses_asymmetry and (a != b or not static)
        mask = None if rows_with_terms is None else rows_with_terms.to(GPTQ_PRECISION)
        per_row = (lambda value: value) if mask is None else (lambda value: value * mask)
        return cls(
            asymmetric_coefficient=per_row(a),
            compensation_aware_coefficient=per_row(b),
            first_order_coefficient=per_row(f),
            error_coefficient=per_row(b + f),
            error_has_original=b + f != 0.0,
            uses_asymmetry=uses_asymmetry,
            driver_in_loop=driver_in_loop,
            w0_error_shift=uses_asymmetry and b != 0.0 and static,
            w0_in_driver=driver_in_loop and not static and b != 0.0,
            lazy_update=terms.lazy_update,
            lazy_differs=terms.lazy_update != LazyUpdate.LATENT and (uses_asymmetry or b != 0.0),
            static_scales=static,
            next_column_pull=terms.first_order_next_column_pull,
            plain_gptq=terms.is_plain_gptq(has_asymmetry) and rows_with_terms is None,
        )


class _ColumnQuantizer:
    """The quantization grid: qparams per column window, column-major, and the range."""

    def __init__(self, scale, zero_point, global_scale, g_idx, quant_args, num_rows):
        self.scale = scale  # [batch, rows, groups]; dynamic groups update it in place
        self.zero_point = zero_point
        self.global_scale = global_scale
        self.g_idx = g_idx
        self.quant_args = quant_args
        self.num_rows = num_rows
        # the window's scales are per column already: quantize column by column
        self.column_args = copy(quant_args)
        self.column_args.strategy = QuantizationStrategy.CHANNEL
        self.q_min, self.q_max = calculate_range(quant_args, scale.device)
        self.integer = quant_args.type == QuantizationType.INT

    def quantize(self, values: torch.Tensor, scale: torch.Tensor,
                 zero_point: torch.Tensor | None) -> torch.Tensor:
        """compressed-tensors' ``fake_quantize`` of one column (``[batch, rows]`` each).

        For integers in the loop's own precision it is done here, the same operations
        in the same order as compressed-tensors' ``_quantize_dequantize``,
        ``(clamp(w / s + z, q_min, q_max).round() - z) * s``, so the same bits
        (``tests/test_compensation.py``): the call itself costs twice the arithmetic
        in dispatch, on every column of every solve (about 2 s of a CPU oneshot).
        """
        if not self.integer or scale.dtype != values.dtype:
            return fake_quantize(
                values.transpose(0, 1), scale.transpose(0, 1),
                None if zero_point is None else zero_point.transpose(0, 1), self.column_args,
            ).transpose(0, 1)
        quantized = torch.div(values, scale)
        if zero_point is not None:
            zero_point = zero_point.to(values.dtype)
            quantized += zero_point
        torch.clamp(quantized, self.q_min, self.q_max, out=quantized).round_()
        if zero_point is not None:
            quantized -= zero_point
        return quantized.mul_(scale)

    def window(self, i1: int, i2: int):
        """Scales and zero points of columns ``i1:i2``, ``[batch, count, rows]``."""
        eff, zp = column_scale_window(self.scale, self.zero_point, self.global_scale,
                                      self.g_idx, self.quant_args, self.num_rows, i1, i2)
        if zp is not None:
            # integer zero points as floats once per window, not once per column
            zp = zp.transpose(1, 2).to(eff.dtype if self.integer else zp.dtype).contiguous()
        return eff.transpose(1, 2).contiguous(), zp


class _Block:
    """One block ``i1:i2`` of the loop: its views, per-column records and steps."""

    def __init__(self, plan: LoopPlan, W, W0, D, Hinv, quantizer: _ColumnQuantizer,
                 i1: int, i2: int):
        self.plan, self.W, self.D, self.Hinv, self.quantizer = plan, W, D, Hinv, quantizer
        self.i1, self.i2, self.count = i1, i2, i2 - i1
        self.P_rows = projection_rows(D, Hinv, i1, i2) if plan.driver_in_loop else None
        self.W1 = W1 = W[:, i1:i2]  # a view: updated in place
        self.Q1 = torch.empty_like(W1)
        # each column's latent value when it was quantized: the block itself, since a
        # quantized column receives no more updates and Q1 replaces it at the block end
        self.Latent1 = W1
        self.Err1 = torch.empty_like(W1)  # in-block error e
        self.Hinv1 = Hinv1 = Hinv[:, i1:i2, i1:i2]
        self.diagonal1 = diagonal1 = torch.diagonal(Hinv1, dim1=-2, dim2=-1).unsqueeze(-1)
        self.W0_1 = W0[:, i1:i2] if W0 is not None else None
        # e = ((1 - c) w + error_offset - q) / U_cc, error_offset = c w0 - b V[:, c] U_cc
        cae = plan.compensation_aware_coefficient
        c = plan.error_coefficient
        self.error_offset = c * self.W0_1 if plan.error_has_original else None
        if plan.w0_error_shift:
            # b W0 P = b V U: V's diagonal term now, the rest through the shifted error
            drive1 = original_weight_drive(D, Hinv, W0, i1, i2).mul_(diagonal1)
            _add_scaled(W1, drive1, cae)
            self.error_offset = drive1.mul_(-cae) if self.error_offset is None else (
                _add_scaled(self.error_offset, drive1, -cae))
        if plan.driver_in_loop:
            self.P1 = self.P_rows[:, :, :self.count]
            self.Drive1 = torch.empty_like(W1)  # -v of each column
            # [batch, count, count, 2]: [i, j] holds U[i, j] and P[i, j] (rank-2 update)
            self.factors1 = torch.stack((Hinv1, self.P1), dim=-1)
        self.refresh_scales()

    def refresh_scales(self) -> None:
        self.eff, self.zp = self.quantizer.window(self.i1, self.i2)

    def pull_toward_original(self, i: int, pull: torch.Tensor) -> None:
        """FOEM's pull of column ``i`` toward W0 (released code)."""
        W1 = self.W1
        W1[:, i] -= pull * (W1[:, i] - self.W0_1[:, i])

    def quantize_column(self, i: int, window_end: int) -> None:
        """Quantize column ``i``; record e and -v; update the rest of its window."""
        plan, W1 = self.plan, self.W1
        w = W1[:, i]  # [batch, rows]
        q = self.quantizer.quantize(w, self.eff[:, i], None if self.zp is None else self.zp[:, i])
        self.Q1[:, i] = q
        error = self.Err1[:, i]
        if self.error_offset is not None:
            torch.sub(self.error_offset[:, i], q, out=error)
            _add_scaled(error, w, 1.0 - plan.error_coefficient)  # + (1 - c) w
        else:
            torch.sub(w, q, out=error)
        error.div_(self.diagonal1[:, i])
        if plan.driver_in_loop:
            # -v = (b - a) w - b w0 (the w0 part here only with dynamic scales)
            negative_drive = self.Drive1[:, i]
            torch.mul(w, plan.compensation_aware_coefficient - plan.asymmetric_coefficient,
                      out=negative_drive)
            if plan.w0_in_driver:
                _add_scaled(negative_drive, self.W0_1[:, i], -plan.compensation_aware_coefficient)
        if i + 1 < window_end:
            later = W1[:, i + 1:window_end]
            if plan.driver_in_loop:
                # one fused rank-2 update: W[:, c+1:] -= e U[c, c+1:] - v P[c, c+1:]
                rows = torch.stack((error, negative_drive), dim=1)
                later.baddbmm_(self.factors1[:, i, i + 1:window_end], rows, alpha=-1.0)
            else:
                later.baddbmm_(self.Hinv1[:, i, i + 1:window_end].unsqueeze(-1),
                               error.unsqueeze(1), alpha=-1.0)

    def flush(self, start: int, stop: int, window_end: int) -> None:
        """Apply columns ``start:stop``'s in-block updates to columns ``window_end:``."""
        if start == stop or window_end == self.count:
            return
        target = self.W1[:, window_end:]
        target.baddbmm_(self.Hinv1[:, start:stop, window_end:].transpose(1, 2),
                        self.Err1[:, start:stop], alpha=-1.0)
        if self.plan.driver_in_loop:
            target.baddbmm_(self.P1[:, start:stop, window_end:].transpose(1, 2),
                            self.Drive1[:, start:stop], alpha=-1.0)

    def lazy_terms(self, stop: int):
        """Error and driver of columns ``:stop`` as the lazy block update uses them.

        Computed for all those columns at once from their recorded latent values, not
        column by column: only the in-block updates need the per-column error.
        """
        plan = self.plan
        cae = plan.compensation_aware_coefficient
        latent = self.Latent1[:, :stop]
        lazy_error, lazy_value = self.Err1[:, :stop], latent
        if plan.lazy_differs:
            if plan.lazy_update == LazyUpdate.CLAMPED_LATENT:
                # the group's representable range, with these scales
                offset = 0.0 if self.zp is None else self.zp[:, :stop]
                scl = self.eff[:, :stop]
                q_min, q_max = self.quantizer.q_min, self.quantizer.q_max
                lazy_value = torch.clamp(latent, (q_min - offset) * scl, (q_max - offset) * scl)
            else:
                lazy_value = self.Q1[:, :stop]
            # e_lazy = e + b (w - w_lazy) / U_cc: CAE's H-part with the lazy value
            lazy_error = lazy_error + cae * (latent - lazy_value) / self.diagonal1[:, :stop]
        if not plan.driver_in_loop:
            return lazy_error, None
        lazy_drive = (plan.asymmetric_coefficient - cae) * lazy_value
        if plan.w0_in_driver:
            lazy_drive = lazy_drive + cae * self.W0_1[:, :stop]
        return lazy_error, lazy_drive

    def latent_snapshot(self, i: int) -> torch.Tensor:
        """The exact latent weights of columns ``i1 + i`` on (for dynamic group scales)."""
        return _latent_snapshot(self.W, self.i1, self.i2, i, self.Hinv, self.P_rows,
                                *self.lazy_terms(i))

    def finish(self, losses: torch.Tensor) -> None:
        """Record the block's loss, write its quantized values, update later columns."""
        # upstream's proxy loss ((w - q) / U_cc)^2 / 2, for the whole block at once
        losses += ((self.Latent1 - self.Q1) / self.diagonal1).square().sum(1) / 2
        num_columns = self.W.shape[1]
        lazy_error, lazy_drive = (self.lazy_terms(self.count) if self.i2 < num_columns
                                  else (None, None))
        self.W1.copy_(self.Q1)  # Latent1 is gone from here on
        if self.i2 < num_columns:
            later = self.W[:, self.i2:]
            later.baddbmm_(self.Hinv[:, self.i1:self.i2, self.i2:].transpose(1, 2),
                           lazy_error, alpha=-1.0)
            if self.plan.driver_in_loop:
                later.baddbmm_(self.P_rows[:, :, self.count:].transpose(1, 2), lazy_drive)


def _upstream_loop(W, Hinv, scale, zero_point, global_scale, g_idx, quant_args, blocksize, losses):
    """Upstream's GPTQ loop (its eager or Triton block kernel), for plain GPTQ terms."""
    num_columns = W.shape[-1]
    for i1 in range(0, num_columns, blocksize):
        i2 = min(i1 + blocksize, num_columns)
        W1 = W[:, :, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        losses1 = torch.zeros_like(W1)
        gptq_block_update(
            W1, Hinv[:, i1:i2, i1:i2], Q1, Err1, losses1,
            scale=scale, zero_point=zero_point, global_scale=global_scale,
            g_idx=g_idx, quant_args=quant_args, i1=i1,
        )
        W[:, :, i1:i2] = Q1
        losses += torch.sum(losses1, 2) / 2
        W[:, :, i2:] -= torch.bmm(Err1, Hinv[:, i1:i2, i2:])
    return W


def _finish(W, perm, losses, used_rtn_fallback, scale, zero_point, final_dtype,
            column_major=False):
    if perm is not None:
        invperm = torch.argsort(perm, dim=-1)
        # column-major W holds the columns as rows
        W = _permute(W, invperm, dim=0 if column_major else 1)
    if column_major:
        W = W.transpose(1, 2)
    return CompensationResult(
        quantized=W.to(final_dtype, memory_format=torch.contiguous_format),
        losses=losses.sum(dim=1),
        row_losses=losses,
        used_rtn_fallback=used_rtn_fallback,
        scale=scale,
        zero_point=zero_point,
    )


def _add_scaled(target: torch.Tensor, tensor: torch.Tensor,
                coefficient: float | torch.Tensor) -> torch.Tensor:
    """``target += coefficient * tensor`` in place, for a scalar or per-row coefficient
    (a scalar keeps the fused ``alpha`` form, whose rounding the published paths use)."""
    if isinstance(coefficient, torch.Tensor):
        return target.add_(tensor * coefficient)
    return target.add_(tensor, alpha=coefficient)


def _latent_snapshot(W, i1, i2, i, Hinv, P_rows, lazy_error, lazy_drive):
    """The exact latent weights of all columns from ``i1 + i`` on, column-major.

    In-block columns are current in ``W``; later columns still miss the lazy update of
    this block's already processed columns (``lazy_error`` and ``lazy_drive`` of columns
    ``i1:i1 + i``), which is applied here to a copy.
    """
    later = W[:, i2:] - torch.bmm(Hinv[:, i1:i1 + i, i2:].transpose(1, 2), lazy_error)
    if lazy_drive is not None:
        later += torch.bmm(P_rows[:, :i, i2 - i1:].transpose(1, 2), lazy_drive)
    return torch.cat((W[:, i1 + i:i2], later), dim=1)


class _DynamicGroups:
    """Group scales recomputed from the latent weights at each group's start.

    Min-max by default, as the research code; with an MSE weight observer
    (``observer: memoryless_mse`` or ``mse``) the clipping range is searched by
    llm-compressor's own observer on the group's latent values, so both
    ``group_scales`` modes clip the same way.
    """

    def __init__(self, quantizer: _ColumnQuantizer):
        self.quant_args = quantizer.quant_args
        self.scale = quantizer.scale  # [batch, rows, groups], updated in place
        self.zero_point = quantizer.zero_point
        num_groups = self.scale.shape[-1]
        # [batch, columns] group of each processed column
        self.g_idx_cpu = quantizer.g_idx.cpu()
        self.started = torch.zeros(self.g_idx_cpu.shape[0], num_groups, dtype=torch.bool)
        self.observer = _group_observer(self.quant_args)

    def starts_group(self, column: int) -> bool:
        groups = self.g_idx_cpu[:, column]
        return bool((~self.started[torch.arange(len(groups)), groups]).any())

    def compute(self, column: int, latent: torch.Tensor) -> None:
        """``latent`` holds the latent values of columns ``column...``, column-major."""
        for item in range(self.g_idx_cpu.shape[0]):
            group = int(self.g_idx_cpu[item, column])
            if self.started[item, group]:
                continue
            self.started[item, group] = True
            members = (self.g_idx_cpu[item, column:] == group).nonzero().flatten()
            values = latent[item][members.to(latent.device)]  # [group columns, rows]
            if self.observer is None:
                new_scale, new_zero = calculate_qparams(
                    values.amin(dim=0), values.amax(dim=0), self.quant_args
                )
            else:
                qparams = self.observer(values.t().contiguous()).get_qparams()
                new_scale, new_zero = qparams["scale"][:, 0], qparams["zero_point"][:, 0]
            self.scale[item, :, group] = new_scale.to(self.scale.dtype)
            self.zero_point[item, :, group] = new_zero.to(self.zero_point.dtype)


def _group_observer(quant_args: QuantizationArgs):
    """llm-compressor's MSE observer for one group's rows (per-row scales), or None for
    min-max (every other observer name)."""
    name = quant_args.observer or ""
    if "mse" not in name:
        return None
    row_args = quant_args.model_copy(
        update={"strategy": QuantizationStrategy.CHANNEL, "group_size": None, "actorder": None}
    )
    return load_observer(name, row_args)
