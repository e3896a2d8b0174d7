"""GPTAQModifier, CAEModifier and FOEMModifier: GPTQModifier subclasses.

Each collects what its terms need on top of GPTQ's Hessian (the asymmetry statistics
``D`` from the full-precision stream, when asked) and hands everything to the solver
(:mod:`rescomp_modifiers.compensation`). Every scheme, observer, ``targets``,
``ignore``, ``actorder``, ``block_size`` and ``dampening_frac`` option of
``GPTQModifier`` keeps working. What the lifecycle delegates to:

* :class:`~rescomp_modifiers.calibration_statistics.CalibrationStatistics`: the sums,
  the held-out split, the distributed reduce;
* :mod:`rescomp_modifiers.units`: which modules are solved together, and the solve;
* :mod:`rescomp_modifiers.selection`: the candidates and the log of who won;
* :mod:`rescomp_modifiers.checks`: what is checked once the scheme and model are known.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Literal

import torch
from llmcompressor.core import Event, State
from llmcompressor.modifiers.gptq import GPTQModifier
from loguru import logger
from pydantic import PrivateAttr, field_validator, model_validator
from torch import distributed as dist

from rescomp_modifiers.activation_statistics import supports_shared_statistics
from rescomp_modifiers.calibration_statistics import (
    CalibrationStatistics,
    restore_caller_generator,
    seed_calibration_order,
)
from rescomp_modifiers.checkpoint import make_save_atomic
from rescomp_modifiers.checks import check_before_calibration
from rescomp_modifiers.clipping import ClippingObjective
from rescomp_modifiers.compensation import (
    CompensationTerms,
    GroupScales,
    LazyUpdate,
    Semantics,
)
from rescomp_modifiers.full_precision_stream import (
    PIPELINE_NAME,
    FullPrecisionStream,
    MissingFullPrecisionStream,
    cache_device_override,
)
from rescomp_modifiers.mse_search import in_place_mse_search
from rescomp_modifiers.selection import SelectionLog, Statistics, build_candidates
from rescomp_modifiers.units import plan_batches, solve_units
from rescomp_modifiers.upstream import (
    GPTQ_Q_PARAMS,
    CompressionLogger,
    broadcast_qparams_and_cleanup,
    disable_offloading,
    get_execution_device,
    getattr_chain,
    greedy_bin_packing,
    is_distributed,
    restore_pipeline_inference,
    route_pipeline_inference,
    update_batch_qparams,
)

__all__ = ["GPTAQModifier", "CAEModifier", "FOEMModifier", "CompensationModifier"]


#: Meaningful coefficient range: each term is a least-squares projection of a residual
#: the column leaves behind, so 1 applies it in full (the papers' equations) and 0 not
#: at all; beyond 1 over-corrects (measured: a = -0.5, b = 5 or f = 3 triple the layer
#: output error) and a negative value pushes the wrong way.
COEFFICIENT_RANGE = (0.0, 1.0)


def _check_coefficient(name: str, value: float | None) -> float | None:
    low, high = COEFFICIENT_RANGE
    if value is not None and not low <= value <= high:
        raise ValueError(
            f"{name} must lie in [{low}, {high}] (1 = the papers' full term, 0 = off); "
            f"got {value}"
        )
    return value


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
    #: ``gptq``: "never worse than GPTQ". Per module (or row-stacked group), this
    #: method's weights and GPTQ's are both solved and the one with the smaller layer
    #: output error ``||W0 X_fp - Q X_q||^2`` on held-out calibration tokens is kept
    #: (:attr:`holdout_every`). ``none`` (default): the method alone, as published.
    guard: Literal["none", "gptq"] = "none"
    #: Coefficients to choose from per module by the same held-out error, e.g.
    #: ``[0.125, 0.25, 0.5]``: each scales the method's own terms (GPTAQ's ``a``, CAE's
    #: ``a = b``, FOEM's ``f``). The method's configured coefficients always compete.
    coefficient_candidates: list[float] | None = None
    #: Also let the least-squares re-solve compete (Qronos-style: the GPTQ loop started
    #: from ``W* = W0 (H + D) Hd^-1``; needs the full-precision stream). Experimental:
    #: on a small model without rotation it won most units' held-out layer error while
    #: the model's perplexity got several times worse, so the guard's layer-level judge
    #: does not protect against it.
    least_squares_candidate: bool = False
    #: With a guard or candidates: every ``holdout_every``-th calibration batch of a
    #: module is held out from the fit and used only to judge the candidates; the
    #: winner is then solved again on all batches. 0 judges on the fitting tokens
    #: themselves (no refit; cheaper, but the choice can overfit).
    holdout_every: int = 4
    #: With a guard or candidates: the candidates are solved and judged on every
    #: ``candidate_row_stride``-th row of a module only, and the winner alone is solved
    #: on all rows. Each row's solve depends only on that row, H and D, so this samples
    #: the rows of the very same contest (the judge's cost falls by the stride); 1
    #: (default) judges on every row. The recommended default uses 4.
    candidate_row_stride: int = 1
    #: With a guard or candidates: the seed of the calibration order when oneshot
    #: shuffles the samples (``shuffle_calibration_samples``, on by default). The held-out
    #: batches are every ``holdout_every``-th of that order, so it is seeded from the
    #: recipe, not from whatever the process drew before: the same recipe, model and
    #: data give the same checkpoint on every run. Another seed draws another order
    #: (and, with fewer samples than the dataset, other samples). Without shuffling the
    #: order is the dataset's and the seed changes nothing. The caller's generator state
    #: is restored when calibration ends.
    shuffle_seed: int = 0
    #: True-sequential statistics, as the research code calibrates: within each decoder
    #: layer, q/k/v are solved first, then o_proj's statistics are gathered with q/k/v
    #: already quantized, then gate/up, then down_proj
    #: (:mod:`rescomp_modifiers.true_sequential`). False (default): one calibration
    #: pass per layer, every module seeing the layer's unquantized earlier modules.
    #: Runs in the dual-stream pipeline; each extra stage pass stops after its stage.
    #: Measured on SmolLM2-135M (docs/usage.md): a few points more of GPTQ's gap closed, at
    #: about 1.8x the recommended default's oneshot time on CPU.
    true_sequential: bool = False
    #: How each group's clipping range is chosen (:mod:`rescomp_modifiers.clipping`).
    #: ``observer`` (default): the scheme's weight observer (min-max, ``memoryless_mse``,
    #: ``imatrix_mse``), exactly as stock GPTQ. ``uncompensable``: searched on the same
    #: shrink grid as upstream's MSE observers, scoring each column's rounding error by
    #: what GPTQ's compensation cannot remove of it (``1 / U_cc^2`` from this layer's
    #: own ``H``, where imatrix uses ``H_cc``). ``hessian_block``: scored by the group's
    #: own output error ``e H_gg e^T``. Integer group (and, for ``uncompensable``,
    #: channel) scales with static groups; the observer's ranges are replaced.
    clipping: ClippingObjective = ClippingObjective.OBSERVER
    #: After the column loop, re-fit each row's group scales to the codes it chose, by
    #: least squares on the layer's output error over all calibration tokens (one
    #: unknown per group; :mod:`rescomp_modifiers.scale_refit`). The integer codes and
    #: zero points stay; a row keeps its scales where the refit would not lower the
    #: error. Integer group or channel scales. Measured (docs/usage.md): better on
    #: SmolLM2 at W3, no change at W4, worse on Qwen2.5-Coder-0.5B at W4 g128; so off.
    refit_scales: bool = False

    @field_validator("block_size")
    @classmethod
    def _validate_block_size(cls, value):
        if value < 1:
            raise ValueError(
                f"block_size must be a positive number of columns (e.g. 128), got {value}"
            )
        return value

    @field_validator("candidate_row_stride")
    @classmethod
    def _validate_candidate_row_stride(cls, value):
        if value < 1:
            raise ValueError(f"candidate_row_stride must be >= 1 (1: judge on every row), "
                             f"got {value}")
        return value

    @field_validator("shuffle_seed")
    @classmethod
    def _validate_shuffle_seed(cls, value):
        if not 0 <= value < 2**63:
            raise ValueError(f"shuffle_seed must be an integer from 0 to 2**63 - 1, got {value}")
        return value

    @field_validator("holdout_every")
    @classmethod
    def _validate_holdout_every(cls, value):
        if value < 0 or value == 1:
            raise ValueError(
                f"holdout_every must be 0 (judge on the fitting tokens) or >= 2 (hold out "
                f"every k-th batch; 1 would hold out everything), got {value}"
            )
        return value

    @field_validator("asymmetric_coefficient", "compensation_aware_coefficient",
                     "first_order_coefficient", check_fields=False)
    @classmethod
    def _validate_coefficient(cls, value, info):
        return _check_coefficient(info.field_name, value)

    @field_validator("coefficient_candidates")
    @classmethod
    def _validate_coefficient_candidates(cls, value):
        for coefficient in value or ():
            _check_coefficient("coefficient_candidates", coefficient)
        return value

    @model_validator(mode="after")
    def _validate_combination(self):
        """Field combinations that cannot work, refused when the recipe is parsed."""
        name = type(self).__name__
        if self.least_squares_candidate and not self.needs_full_precision_stream:
            raise ValueError(
                "least_squares_candidate fits the full-precision output and needs the "
                f"full-precision stream, which {name} does not use here: use "
                "GPTAQModifier, CAEModifier(statistics='gptaq') or "
                "FOEMModifier(use_asymmetric_statistics=True).")
        if self.true_sequential and not self.needs_full_precision_stream:
            raise ValueError(
                "true_sequential runs in the dual-stream pipeline, which "
                f"{name} does not use here: use it with GPTAQ statistics "
                "(GPTAQModifier, CAEModifier(statistics='gptaq'), "
                "FOEMModifier(use_asymmetric_statistics=True)), or give oneshot "
                "sequential_targets=['Linear'] for true-sequential GPTQ statistics.")
        if self.needs_full_precision_stream:
            cache_device_override()  # $RESCOMP_FULL_PRECISION_CACHE_DEVICE, if set
        # by value, not by fields set: a saved recipe spells out every field
        unused = [field for field in ("holdout_every", "candidate_row_stride", "shuffle_seed")
                  if getattr(self, field) != type(self).model_fields[field].default]
        if unused and not self.selects_candidates:
            raise ValueError(
                f"{name}: {', '.join(unused)} only act with a guard or candidates "
                "(guard: gptq, coefficient_candidates or least_squares_candidate); remove "
                f"{'them' if len(unused) > 1 else 'it'} or set guard: gptq.")
        return self

    _fp_stream: FullPrecisionStream | None = PrivateAttr(default=None)
    _calibration: CalibrationStatistics = PrivateAttr(default_factory=CalibrationStatistics)
    _selection_log: SelectionLog | None = PrivateAttr(default=None)

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

    def coefficient_overrides(self, coefficient: float) -> dict:
        """The method's own coefficients all set to ``coefficient`` (candidates)."""
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

    @property
    def selects_candidates(self) -> bool:
        """Whether each module's weights are chosen among several solves."""
        return (self.guard != "none" or bool(self.coefficient_candidates)
                or self.least_squares_candidate)

    def compensation_terms(self, num_bits: int) -> CompensationTerms:
        terms = CompensationTerms.for_method(self.resolved_method(), self.semantics, num_bits)
        return terms.with_overrides(
            lazy_update=self.lazy_update, group_scales=self.group_scales, **self.overrides()
        )

    # -- lifecycle ---------------------------------------------------------------------
    def update_event(self, state: State, event: Event, **kwargs):
        # every weight observation and solve of ours happens inside an event: MSE
        # clipping takes the in-place search there (bit-identical, about half the time)
        with in_place_mse_search():
            return super().update_event(state, event, **kwargs)

    def on_initialize(self, state: State, **kwargs) -> bool:
        if self.needs_full_precision_stream:  # oneshot asks for its pipeline after this
            route_pipeline_inference(PIPELINE_NAME)
        return super().on_initialize(state, **kwargs)

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
        check_before_calibration(self, state.model, self._hooked_modules())
        if self.selects_candidates:  # the pipeline reads the dataloader after this event
            seed_calibration_order(state, self.shuffle_seed, type(self).__name__)
        super().on_calibration_start(state, event, **kwargs)
        self._calibration = CalibrationStatistics(
            self.holdout_every if self.selects_candidates else 0)
        self._calibration.exact_hessian = self.exact_upstream_hessian
        self._selection_log = SelectionLog(self.log_name)
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
        """Accumulate H and, with the FP stream, D for this module (modules reading the
        same input share one computation and one sum)."""
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
        device = get_execution_device(module)
        if supports_shared_statistics(module):
            self._calibration.add(module, args[0], fp_inp, device)
        elif fp_inp is not None:
            raise ValueError(
                f"Dual-stream statistics support Linear and Conv1D modules, not "
                f"{type(module).__name__}; add it to `ignore`."
            )
        else:  # e.g. Conv2d: upstream's own Hessian
            self._calibration.add_unshared(module, args[0], device)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        restore_caller_generator(state)
        self._calibration.collect()
        super().on_calibration_end(state, event, **kwargs)
        if self._fp_stream is not None:
            self._fp_stream.unwatch(self._hooked_modules())

    # -- compression -------------------------------------------------------------------
    def compress_modules(self):
        self._calibration.collect()
        if not is_distributed():
            self.compress_module_list(self._calibration.modules())
            return
        # Upstream's distributed branch by statistics group: a group's sums are reduced
        # once and the group is solved on one rank. The results are broadcast also for
        # modules that execute on the CPU: upstream skips those assuming shared-memory
        # offloading, but plain CPU ranks (gloo) hold private copies, and a rank that
        # did not compress a module would go on with its full-precision weights.
        groups, rank_to_groups, group_to_rank = greedy_bin_packing(
            [tuple(group) for group in self._calibration.groups(self._calibration.modules())],
            dist.get_world_size(),
            item_weight_fn=lambda group: self._calibration.width(group[0]) * len(group),
        )
        self._calibration.reduce_to_ranks(groups, group_to_rank, dist.get_rank())
        self.compress_module_list(
            [module for group in rank_to_groups[dist.get_rank()] for module in group]
        )
        broadcast_qparams_and_cleanup(
            [module for group in groups for module in group],
            {module: group_to_rank[group] for group in groups for module in group},
            GPTQ_Q_PARAMS,
            skip_cpu=False,
        )

    def compress_module_list(self, module_list):
        for units in plan_batches(self._calibration.groups(module_list),
                                  self.batched_quantization, self.block_size):
            self._compress_units(units)

    def _compress_units(self, units: list[list[torch.nn.Module]]) -> None:
        modules = [module for unit in units for module in unit]
        names = [" + ".join(self._module_names[module] for module in unit) for unit in units]
        logger.info(f"Quantizing {len(modules)} module(s) with {self.log_name}: {names}")
        quant_args = getattr_chain(modules[0], "quantization_scheme.weights")
        with torch.no_grad(), disable_offloading(), contextlib.ExitStack() as stack:
            statistics = self._pop_statistics(units)
            comp_loggers = [stack.enter_context(CompressionLogger(module)) for module in modules]
            solved = solve_units(
                units, statistics, self._candidates(self.compensation_terms(quant_args.num_bits)),
                self.selects_candidates, clipping=self.clipping, percdamp=self.dampening_frac,
                block_size=self.block_size, row_stride=self.candidate_row_stride,
                refits_scales=self.refit_scales)
            if solved.selection is not None:
                self._selection_log.record(names, solved.selection)
            for comp_logger, loss in zip(comp_loggers, solved.per_module(solved.result.row_losses)):
                comp_logger.set_results(name=self.log_name, loss=loss.sum().item())
            for unit, fell_back in zip(units, solved.result.used_rtn_fallback.tolist()):
                if fell_back:
                    self._rtn_fallback_module_names.extend(self._module_names[m] for m in unit)
            stack.close()
            result = solved.result
            update_batch_qparams(
                modules, solved.per_module(result.quantized), solved.per_module(result.scale),
                solved.per_module(result.zero_point), solved.global_scales, quant_args,
            )
            self._num_compressed_modules += len(modules)

    def _pop_statistics(self, units) -> tuple[Statistics, Statistics, Statistics | None]:
        """The units' ``(fit, judge, refit)`` statistics; they leave the store."""
        return self._calibration.pop(units, self.selects_candidates, self.log_name)

    def _candidates(self, terms: CompensationTerms):
        variants = {f"{self.log_name}@{coefficient:g}":
                    terms.with_overrides(**self.coefficient_overrides(coefficient))
                    for coefficient in self.coefficient_candidates or ()}
        return build_candidates(self.log_name, terms, variants, self.guard == "gptq",
                                self.least_squares_candidate)

    def selection_summary(self) -> dict[str, dict[str, int]]:
        """How often each candidate won, per layer type."""
        return {} if self._selection_log is None else self._selection_log.summary()

    def on_finalize(self, state: State, **kwargs) -> bool:
        restore_caller_generator(state)  # calibration may have stopped before its end
        if self._selection_log is not None:
            self._selection_log.log_summary()
        unsolved = self._calibration.modules()
        if unsolved:
            raise ValueError(f"{type(self).__name__}: failed to compress {len(unsolved)} "
                             "modules")
        result = super().on_finalize(state, **kwargs)
        restore_pipeline_inference()
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

    def coefficient_overrides(self, coefficient: float) -> dict:
        return {"asymmetric_coefficient": coefficient}


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

    def coefficient_overrides(self, coefficient: float) -> dict:
        return {"asymmetric_coefficient": coefficient,
                "compensation_aware_coefficient": coefficient}


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

    def coefficient_overrides(self, coefficient: float) -> dict:
        return {"first_order_coefficient": coefficient}
