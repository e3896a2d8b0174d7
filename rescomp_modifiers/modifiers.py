"""GPTAQModifier, CAEModifier and FOEMModifier: thin GPTQModifier subclasses.

Each collects what its terms need on top of GPTQ's Hessian (the asymmetry statistics
``D`` from the full-precision stream, when asked) and hands everything to
:func:`rescomp_modifiers.compensation.compensate_weight`. Every scheme, observer,
``targets``, ``ignore``, ``actorder``, ``block_size`` and ``dampening_frac`` option of
``GPTQModifier`` keeps working.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Literal

import torch
from compressed_tensors.distributed import greedy_bin_packing, wait_for_comms
from compressed_tensors.offload.dist_utils import is_distributed
from compressed_tensors.offload import disable_offloading
from compressed_tensors.quantization import QuantizationStrategy
from compressed_tensors.utils import get_execution_device, getattr_chain
from llmcompressor.core import Event, State
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.gptq.base import _GPTQ_Q_PARAMS
from llmcompressor.modifiers.gptq.helpers import (
    GPTQ_PRECISION,
    assign_batches,
    update_batch_qparams,
)
from llmcompressor.utils.dist import broadcast_qparams_and_cleanup
from llmcompressor.utils.metric_logging import CompressionLogger
from loguru import logger
from pydantic import PrivateAttr
from torch import distributed as dist

from rescomp_modifiers.activation_statistics import (
    GroupedStatistics,
    supports_shared_statistics,
)
from rescomp_modifiers.checkpoint import make_save_atomic
from rescomp_modifiers.full_precision_stream import (
    FullPrecisionStream,
    MissingFullPrecisionStream,
)
from rescomp_modifiers.compensation import (
    CompensationTerms,
    GroupScales,
    LazyUpdate,
    Semantics,
    compensate_weight,
)

__all__ = ["GPTAQModifier", "CAEModifier", "FOEMModifier", "CompensationModifier"]


def _row_stackable(modules: list[torch.nn.Module]) -> bool:
    """Whether solving ``modules`` (sharing H and D) as one row-stacked weight equals
    solving each alone: per-row scales (channel or group strategy, no module-wide
    global scale) and the same quantization arguments, weight dtype and device."""
    first = modules[0]
    quant_args = getattr_chain(first, "quantization_scheme.weights")
    if quant_args.strategy not in (QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP):
        return False
    return all(
        getattr_chain(module, "quantization_scheme.weights") == quant_args
        and getattr(module, "weight_global_scale", None) is None
        and module.weight.dim() == 2
        and module.weight.dtype == first.weight.dtype
        and module.weight.device == first.weight.device
        for module in modules
    )


class CompensationModifier(GPTQModifier):
    """Shared machinery; use one of the concrete modifiers below."""

    #: method name for :meth:`CompensationTerms.for_method`
    method: ClassVar[str] = "gptq"
    #: the log name next to the per-module loss
    log_name: ClassVar[str] = "GPTQ"

    #: Coefficient defaults: ``released`` follows the released research code and
    #: reproduces the published tables; ``paper`` follows the papers' equations
    #: (all coefficients 1, block-size invariant).
    semantics: Semantics = Semantics.RELEASED
    #: When group scales are computed: ``static`` (llm-compressor's observer on the
    #: original weights before the loop; default, exact upstream GPTQ when all terms
    #: are off) or ``dynamic`` (min-max of the latent weights when each group starts,
    #: as the research code without --static-groups).
    group_scales: GroupScales = GroupScales.STATIC
    #: Override of the between-block update mode (None: from ``semantics``).
    lazy_update: LazyUpdate | None = None

    _asymmetry: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(default_factory=dict)
    _fp_stream: FullPrecisionStream | None = PrivateAttr(default=None)
    _statistics: GroupedStatistics = PrivateAttr(default_factory=GroupedStatistics)

    # -- what the subclasses decide -------------------------------------------------
    @property
    def needs_full_precision_stream(self) -> bool:
        return False

    def resolved_method(self) -> str:
        """The :meth:`CompensationTerms.for_method` name for this configuration."""
        return self.method

    def overrides(self) -> dict:
        """Coefficients the user set (None keeps the semantics' default)."""
        return {}

    @property
    def exact_upstream_hessian(self) -> bool:
        """Whether H is summed exactly as upstream's (bit-identical): only where the
        result must be stock GPTQ's, every term off (the coefficients do not depend on
        the bit width). Otherwise it is summed by its upper blocks, about 40% fewer flops
        for H."""
        return self.compensation_terms(4).is_plain_gptq(
            has_asymmetry=self.needs_full_precision_stream
        )

    def compensation_terms(self, num_bits: int) -> CompensationTerms:
        terms = CompensationTerms.for_method(self.resolved_method(), self.semantics, num_bits)
        return terms.with_overrides(
            lazy_update=self.lazy_update, group_scales=self.group_scales, **self.overrides()
        )

    # -- the full-precision stream ----------------------------------------------------
    def attach_full_precision_stream(self, stream: FullPrecisionStream | None) -> None:
        """Called by the dual-stream pipeline before calibration starts."""
        self._fp_stream = stream

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        if self.needs_full_precision_stream and self._fp_stream is None:
            raise MissingFullPrecisionStream(
                f"{type(self).__name__} needs the full-precision activation stream, "
                "which only the `dual_stream` calibration pipeline provides. Do not "
                "force `pipeline='sequential'` (or 'basic') in oneshot: leave "
                "`pipeline` unset or set `pipeline='dual_stream'`."
            )
        super().on_calibration_start(state, event, **kwargs)
        self._statistics.exact_hessian = self.exact_upstream_hessian
        if self._fp_stream is not None:
            self._fp_stream.watch(self._hooked_modules())

    def _hooked_modules(self) -> list[torch.nn.Module]:
        # the modules upstream's on_calibration_start gives a Hessian hook
        return [
            module
            for module in self._module_names
            if getattr_chain(module, "quantization_scheme.weights", None) is not None
            and not isinstance(module, torch.nn.Embedding)
        ]

    def calibrate_module(self, module, args, _output):
        """Accumulate H (like upstream) and, with the FP stream, D for this module.

        Modules reading the same input tensor share one computation and one sum of the
        statistics (see :class:`~rescomp_modifiers.activation_statistics.GroupedStatistics`).
        """
        fp_inp = None
        if self.needs_full_precision_stream:
            fp_inp = self._fp_stream.pop(module)
            if fp_inp is None:
                raise MissingFullPrecisionStream(
                    f"{type(self).__name__} saw a quantized-stream input of "
                    f"{self._module_names.get(module, module)} without its full-precision "
                    "twin; refusing to silently degrade to GPTQ. Run it under the "
                    "`dual_stream` pipeline."
                )
        if not supports_shared_statistics(module):
            if fp_inp is not None:
                raise ValueError(
                    f"Dual-stream statistics support Linear and Conv1D modules, not "
                    f"{type(module).__name__}; add it to `ignore`."
                )
            return super().calibrate_module(module, args, _output)  # e.g. Conv2d
        self._statistics.add(module, args[0], fp_inp, get_execution_device(module))

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self._collect_statistics()
        super().on_calibration_end(state, event, **kwargs)
        if self._fp_stream is not None:
            self._fp_stream.unwatch(self._hooked_modules())

    # -- compression -------------------------------------------------------------------
    def _collect_statistics(self) -> None:
        """Move the grouped sums into upstream's per-module dicts; the members of a
        group share the same tensors."""
        for sums in self._statistics.pop_all():
            for module in sums.members:
                self._hessians[module] = sums.hessian
                self._num_samples[module] = sums.num_samples
                if sums.asymmetry is not None:
                    self._asymmetry[module] = sums.asymmetry

    def _statistics_groups(self, modules) -> list[list[torch.nn.Module]]:
        """The modules grouped by the sums they share (q/k/v, gate/up); modules that
        upstream's own hook calibrated (e.g. Conv2d) have sums of their own."""
        by_sums: dict[int, list[torch.nn.Module]] = {}
        for module in modules:
            by_sums.setdefault(id(self._hessians[module]), []).append(module)
        return list(by_sums.values())

    def compress_module_list(self, module_list):
        """Solve the modules: a group that shares its statistics (q/k/v, gate/up) as one
        row-stacked weight when its rows can be quantized independently, the rest in
        upstream's batches of same-shape modules."""
        stacked, singles = [], []
        for members in self._statistics_groups(module_list):
            if len(members) > 1 and _row_stackable(members):
                stacked.append([members])
            else:
                singles.extend(members)
        batches = stacked + [
            [[module] for module in batch]
            for batch in assign_batches(singles, self.batched_quantization, self.block_size)
        ]
        for units in batches:
            self._compress_units(units)

    def _compress_units(self, units: list[list[torch.nn.Module]]) -> None:
        """One solver call: each unit's modules stacked by rows into one batch item."""
        modules = [module for unit in units for module in unit]
        quant_args = getattr_chain(modules[0], "quantization_scheme.weights")
        terms = self.compensation_terms(quant_args.num_bits)
        qparams = {module: module.weight_observer.get_qparams() for module in modules}
        names = [" + ".join(self._module_names[module] for module in unit) for unit in units]
        logger.info(f"Quantizing {len(modules)} module(s) with {self.log_name}: {names}")
        rows = [[module.weight.shape[0] for module in unit] for unit in units]

        def per_module(stacked: torch.Tensor) -> list[torch.Tensor]:
            # a one-module item may hold a tensor-wide scale: only stacks are split
            return [part for item, item_rows in zip(stacked, rows)
                    for part in (item.split(item_rows) if len(item_rows) > 1 else [item])]

        with torch.no_grad(), disable_offloading(), contextlib.ExitStack() as stack:
            hessians, asymmetry = self._pop_statistics(units)
            weights = torch.stack(
                [torch.cat([module.weight for module in unit]) for unit in units]
            ).to(dtype=GPTQ_PRECISION)
            scales, zero_points = (
                torch.stack([torch.cat([qparams[m][key] for m in unit]) for unit in units])
                for key in ("scale", "zero_point")
            )
            # a global scale is per module: units of one module only (_row_stackable)
            global_scales = (
                torch.stack([qparams[m]["global_scale"].reshape(-1)[0] for m in modules])
                if qparams[modules[0]]["global_scale"] is not None
                else None
            )
            comp_loggers = [stack.enter_context(CompressionLogger(module)) for module in modules]
            result = compensate_weight(
                weights,
                hessians,
                scales,
                zero_points,
                global_scales,
                quant_args,
                asymmetry=None if asymmetry is None else asymmetry.to(weights.device),
                terms=terms,
                blocksize=self.block_size,
                percdamp=self.dampening_frac,
            )
            losses = [part.sum() for part in per_module(result.row_losses)]
            for comp_logger, loss in zip(comp_loggers, losses):
                comp_logger.set_results(name=self.log_name, loss=loss.item())
            for unit, fell_back in zip(units, result.used_rtn_fallback.tolist()):
                if fell_back:
                    self._rtn_fallback_module_names.extend(self._module_names[m] for m in unit)
            stack.close()
            update_batch_qparams(
                modules, per_module(result.quantized), per_module(result.scale),
                per_module(result.zero_point), global_scales, quant_args,
            )
            self._num_compressed_modules += len(modules)

    def _pop_statistics(self, units) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each unit's normalized H (and D), stacked; the sums leave the dicts."""
        hessians, asymmetry = [], []
        for unit in units:
            hessian = self._hessians[unit[0]]
            num_samples = self._num_samples[unit[0]].to(hessian.device)
            hessians.append(hessian / num_samples)
            if self.needs_full_precision_stream:
                asymmetry.append(self._asymmetry[unit[0]] / num_samples)
            self._forget_statistics(unit)
        return torch.stack(hessians), torch.stack(asymmetry) if asymmetry else None

    def _forget_statistics(self, modules) -> None:
        for module in modules:
            for sums in (self._hessians, self._num_samples, self._asymmetry):
                sums.pop(module, None)

    def compress_modules(self):
        self._collect_statistics()
        if not is_distributed():
            self.compress_module_list(list(self._hessians))
            return
        # Upstream's distributed branch by statistics group: a group's sums are reduced
        # once and the group is solved on one rank. The results are broadcast also for
        # modules that execute on the CPU: upstream skips those assuming shared-memory
        # offloading, but plain CPU ranks (gloo) hold private copies, and a rank that
        # did not compress a module would go on with its full-precision weights.
        groups, rank_to_groups, group_to_rank = greedy_bin_packing(
            [tuple(group) for group in self._statistics_groups(self._hessians)],
            dist.get_world_size(),
            item_weight_fn=lambda group: self._hessians[group[0]].shape[0] * len(group),
        )
        self._reduce_statistics_to_target_rank(groups, group_to_rank)
        self.compress_module_list(
            [module for group in rank_to_groups[dist.get_rank()] for module in group]
        )
        broadcast_qparams_and_cleanup(
            [module for group in groups for module in group],
            {module: group_to_rank[group] for group in groups for module in group},
            _GPTQ_Q_PARAMS,
            skip_cpu=False,
        )

    def _reduce_statistics_to_target_rank(self, groups, group_to_rank):
        """Sum H, the sample count and D over ranks onto the rank that solves the group."""
        rank = dist.get_rank()
        pending = []
        for group in groups:
            for sums in (self._hessians, self._num_samples, self._asymmetry):
                if group[0] in sums:
                    pending.append(dist.reduce(sums[group[0]], op=dist.ReduceOp.SUM,
                                               dst=group_to_rank[group], async_op=True))
        wait_for_comms(pending)
        for group in groups:
            if rank != group_to_rank[group]:
                self._forget_statistics(group)

    def on_finalize(self, state: State, **kwargs) -> bool:
        result = super().on_finalize(state, **kwargs)
        self._asymmetry = dict()
        make_save_atomic(state.model)
        return result


class GPTAQModifier(CompensationModifier):
    """GPTAQ: asymmetric calibration (Li et al. 2025, arXiv 2504.02692).

    Each layer is fitted to the full-precision model's output: the column loop adds
    ``a * w * P``, ``P = triu(D U^T, 1) U`` with ``D = (X_fp - X_q) X_q^T``. Needs the
    dual-stream pipeline, which ``oneshot`` picks by itself.

    Sample yaml:

    ```yaml
    quant_stage:
      quant_modifiers:
        GPTAQModifier:
          scheme: W4A16
          targets: [Linear]
          ignore: [lm_head]
          semantics: released   # a = 0.25, as the published tables
    ```

    :param asymmetric_coefficient: ``a``; None takes 0.25 (``released``) or 1
        (``paper``)
    """

    method: ClassVar[str] = "gptaq"
    log_name: ClassVar[str] = "GPTAQ"

    asymmetric_coefficient: float | None = None

    @property
    def needs_full_precision_stream(self) -> bool:
        return True

    def overrides(self) -> dict:
        return {"asymmetric_coefficient": self.asymmetric_coefficient}


class CAEModifier(CompensationModifier):
    """CAE: compensation-aware error (Li et al., ICLR 2026, arXiv 2604.07955).

    Adds ``b * (w0 - w) * R``, ``R = triu((H + D) U^T, 1) U``: the residual that the
    compensation itself (latent weights drifting from the originals) leaves in the
    full-precision output. On GPTAQ statistics by default (the paper's Algorithm 1,
    needs the dual-stream pipeline), or on plain GPTQ statistics with
    ``statistics: gptq`` (Algorithm 2; then ``D = 0`` and CAE costs nothing extra).

    Sample yaml:

    ```yaml
    quant_stage:
      quant_modifiers:
        CAEModifier:
          scheme: W4A16
          targets: [Linear]
          ignore: [lm_head]
          statistics: gptaq
          semantics: released   # a = b = 0.25, "allw" lazy update at 3+ bits
    ```

    :param statistics: ``gptaq`` (asymmetric statistics, Algorithm 1) or ``gptq``
    :param asymmetric_coefficient: ``a`` (GPTAQ term); None: 0.25 released, 1 paper
    :param compensation_aware_coefficient: ``b``; None: 0.25 released, 1 paper
    """

    method: ClassVar[str] = "gptaq_cae"
    log_name: ClassVar[str] = "CAE"

    statistics: Literal["gptaq", "gptq"] = "gptaq"
    asymmetric_coefficient: float | None = None
    compensation_aware_coefficient: float | None = None

    @property
    def needs_full_precision_stream(self) -> bool:
        return self.statistics == "gptaq"

    def resolved_method(self) -> str:
        return "gptaq_cae" if self.statistics == "gptaq" else "gptq_cae"

    def overrides(self) -> dict:
        return {
            "asymmetric_coefficient": self.asymmetric_coefficient,
            "compensation_aware_coefficient": self.compensation_aware_coefficient,
        }


class FOEMModifier(CompensationModifier):
    """FOEM: first-order error compensation (Zheng et al., arXiv 2507.11017).

    The GPTQ error becomes ``((w - q) - f (w - w0)) / U[c,c]``: the gradient of the
    layer loss at the latent weights, which drift from the originals as compensation
    accumulates. Optionally on GPTAQ statistics (``use_asymmetric_statistics``).

    Sample yaml:

    ```yaml
    quant_stage:
      quant_modifiers:
        FOEMModifier:
          scheme: W4A16
          targets: [Linear]
          ignore: [lm_head]
          semantics: released   # f = 0.2 and the next-column pull (GPTQModel)
    ```

    :param first_order_coefficient: ``f``; None: 0.2 released, 1 paper
    :param first_order_next_column_pull: pull the next in-block column toward W0 by
        ``f`` (maintained implementation); None: on for released, off for paper
    :param use_asymmetric_statistics: add GPTAQ's asymmetric term (dual stream)
    :param asymmetric_coefficient: ``a`` with asymmetric statistics
    """

    method: ClassVar[str] = "foem"
    log_name: ClassVar[str] = "FOEM"

    first_order_coefficient: float | None = None
    first_order_next_column_pull: bool | None = None
    use_asymmetric_statistics: bool = False
    asymmetric_coefficient: float | None = None

    @property
    def needs_full_precision_stream(self) -> bool:
        return self.use_asymmetric_statistics

    def resolved_method(self) -> str:
        return "foem_gptaq" if self.use_asymmetric_statistics else "foem"

    def overrides(self) -> dict:
        return {
            "first_order_coefficient": self.first_order_coefficient,
            "first_order_next_column_pull": self.first_order_next_column_pull,
            "asymmetric_coefficient": self.asymmetric_coefficient,
        }
