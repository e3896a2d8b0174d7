"""True-sequential statistics inside one subgraph (``true_sequential: true``).

The research code of GPTQ, GPTAQ and CAE calibrates a decoder layer in stages: q/k/v,
then o, then gate/up, then down, each stage's statistics gathered with the earlier
stages already quantized, so ``o_proj``'s ``H`` and ``D`` see the error of the quantized
``v_proj``. llm-compressor gets there with ``sequential_targets=["Linear"]``: one
subgraph per Linear, each with its own activation caches, several times the pipeline's
cost. Here the subgraph (a decoder layer) stays one subgraph and is calibrated in
stages instead:

* **Stages** come from one forward of the first batch: the targeted modules in the
  order they run, grouped while consecutive modules read the very same input tensor
  (q/k/v, gate/up). A module that runs more than once per forward, or not at all on
  that batch (an MoE expert the batch did not route to), joins the last stage, whose
  pass is a full forward.
* **Stage passes**: for each stage, every batch runs through the subgraph with only
  that stage's hooks on (statistics, observers) and **stops right after the stage's
  last module** (a forward hook raises :class:`StageComplete`), so the q/k/v pass
  costs a norm and three GEMMs, not a layer. The stage is then compressed
  (``sequential_epoch_end`` for its modules), and the next stage's pass sees it
  quantized. The last stage runs every remaining hook (the KV-cache observers of the
  attention, e.g., see the layer once, with all of q/k/v/o quantized).
* **The full-precision stream** re-runs each stage too, and must not see the earlier
  stages' quantized weights: their full-precision weights are kept
  (:class:`FullPrecisionWeights`, one layer's worth at most) and swapped in for its
  passes. Keeping them costs less memory than stashing every stage's inputs for all
  batches (``(3 + 1 + 3 + 8/3)`` hidden-sized activations per token on a Llama layer).

Cost (``benchmarks/oneshot_cost.py --methods recommended_true_sequential``): the stage passes re-run the
layer's beginning, about two more layer forwards per layer in each stream.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from rescomp_modifiers.upstream import HooksMixin, observer_hook_handles

__all__ = ["FullPrecisionWeights", "Stage", "StageComplete", "discover_stages",
           "stage_hooks", "stop_after"]


class StageComplete(BaseException):
    """Raised by the stop hook once a stage's last module has run. A BaseException,
    like ``GeneratorExit``: it is control flow, and upstream's ``except Exception``
    wrappers around the subgraph forward must let it through untouched."""


@dataclass
class Stage:
    """The modules one stage pass calibrates and, after it, compresses."""

    modules: list[torch.nn.Module]
    #: the pass stops after this module's forward hooks; None: a full forward (last stage)
    stop_module: torch.nn.Module | None
    #: modules calibrated by earlier stages: their hooks stay off in this pass
    earlier: set[torch.nn.Module] = field(default_factory=set)

    @property
    def is_last(self) -> bool:
        return self.stop_module is None


def discover_stages(run_forward, targets: list[torch.nn.Module],
                    subgraph_modules: list[torch.nn.Module]) -> list[Stage]:
    """The stages of one subgraph.

    :param run_forward: runs the subgraph on one batch (hooks off, nothing captured)
    :param targets: the modules the compensation modifiers calibrate, in this subgraph
    :param subgraph_modules: every module of the subgraph; those that are not in an
        earlier stage belong to the last one (their epoch ends with it)
    """
    order: list[tuple[torch.nn.Module, torch.Tensor]] = []
    handles = [
        module.register_forward_pre_hook(
            lambda module, args: order.append((module, args[0] if args else None)))
        for module in targets
    ]
    try:
        run_forward()
    finally:
        for handle in handles:
            handle.remove()

    runs: dict[torch.nn.Module, int] = {}
    for module, _ in order:
        runs[module] = runs.get(module, 0) + 1
    groups: list[tuple[torch.Tensor, list[torch.nn.Module]]] = []
    for module, inp in order:
        if runs[module] != 1:
            continue
        if groups and groups[-1][0] is inp:
            groups[-1][1].append(module)
        else:
            groups.append((inp, [module]))

    stages, earlier = [], set()
    for _, modules in groups[:-1]:
        stages.append(Stage(modules, stop_module=modules[-1], earlier=set(earlier)))
        earlier.update(modules)
    stages.append(Stage([m for m in subgraph_modules if m not in earlier],
                        stop_module=None, earlier=earlier))
    return stages


def _hook_dicts(module: torch.nn.Module) -> list[dict]:
    return [module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
            module._backward_pre_hooks]


def _handles_on(handles, modules) -> set:
    dicts = {id(d) for module in modules for d in _hook_dicts(module)}
    return {handle for handle in handles if id(handle.hooks_dict_ref()) in dicts}


@contextlib.contextmanager
def stage_hooks(modifiers, stage: Stage):
    """Only the stage's modifier hooks are on: in an early stage those on its own
    modules, in the last stage every hook but those on earlier stages' modules."""
    if stage.is_last and not stage.earlier:  # one pass for the whole subgraph
        yield
        return
    handles = set().union(*(getattr(m, "_hooks", set()) for m in modifiers))
    if stage.is_last:
        keep = handles - _handles_on(handles, stage.earlier)
    else:
        keep = _handles_on(handles, stage.modules)
    # observers' own hooks (imatrix_mse's importance) follow their module's stage
    keep |= observer_hook_handles(stage.modules)
    with HooksMixin.disable_hooks(keep=keep):
        yield


@contextlib.contextmanager
def stop_after(stage: Stage):
    """End the forward once the stage's last module has run (after its own hooks):
    catch :class:`StageComplete` around the forward call."""
    if stage.is_last:
        yield
        return

    def stop(_module, _args, _output):
        raise StageComplete

    handle = stage.stop_module.register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


class FullPrecisionWeights:
    """The full-precision weights of a subgraph's already compressed stages."""

    def __init__(self):
        self._weights: dict[torch.nn.Module, torch.Tensor] = {}

    def keep(self, modules) -> None:
        """Copy the weights of ``modules`` before they are compressed."""
        for module in modules:
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                self._weights[module] = weight.detach().clone()

    @contextlib.contextmanager
    def swapped_in(self):
        """The kept weights in place of the compressed ones (for the FP stream's pass)."""
        swapped = {}
        try:
            for module, original in self._weights.items():
                swapped[module] = module.weight.data
                module.weight.data = original
            yield
        finally:
            for module, compressed in swapped.items():
                module.weight.data = compressed

    def clear(self) -> None:
        self._weights.clear()
