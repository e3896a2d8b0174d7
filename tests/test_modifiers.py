"""The modifiers inside llm-compressor's oneshot, on tiny random models (CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from transformers import AutoModelForCausalLM

import rescomp_modifiers
import rescomp_modifiers.units as units_module
from rescomp_modifiers import CAEModifier, FOEMModifier, GPTAQModifier
from rescomp_modifiers.modifiers import CompensationModifier
from rescomp_modifiers.full_precision_stream import MissingFullPrecisionStream

from helpers import (
    GROUP32,
    IGNORE,
    calibration_dataset,
    record_solves,
    run_oneshot,
    targeted_linear_names,
)

YAML_RECIPE = """
quant_stage:
  quant_modifiers:
    {name}:
      ignore: {ignore}
      config_groups:
        group_0:
          targets: [Linear]
          weights: {{num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 32}}
{extra}
"""


@pytest.mark.parametrize(
    "name, extra",
    [("GPTAQModifier", ""), ("CAEModifier", ""),
     ("FOEMModifier", "      use_asymmetric_statistics: true")],
)
def test_yaml_recipe_sees_both_streams(tiny_model_dir, solver_calls, name, extra):
    recipe = YAML_RECIPE.format(name=name, ignore=json.dumps(IGNORE), extra=extra)
    model = run_oneshot(tiny_model_dir, recipe)
    assert set(solver_calls) == targeted_linear_names(model)
    # layer 0 sees the embedding output in both streams: D is exactly zero there
    for module in ("q_proj", "k_proj", "v_proj"):
        assert torch.count_nonzero(solver_calls[f"model.layers.0.self_attn.{module}"]) == 0
    # after layer 0 is quantized the streams differ
    for module in ("q_proj", "o_proj", "gate_proj", "down_proj"):
        d = solver_calls[f"model.layers.1.{'self_attn' if module in ('q_proj', 'o_proj') else 'mlp'}.{module}"]
        assert d.abs().max() > 0
    drift = rescomp_modifiers.last_drift()
    assert drift and drift[-1].mse > 0


def test_modules_sharing_an_input_share_one_statistics_computation_and_solve(
        tiny_model_dir, monkeypatch):
    """q/k/v and gate/up read the same tensor: 4 computations per layer and batch, not 7,
    and 4 solves per layer, q/k/v and gate/up each as one row-stacked weight."""
    import rescomp_modifiers.activation_statistics as statistics

    calls, solved = [], []
    original = statistics.compute_increments
    monkeypatch.setattr(statistics, "compute_increments",
                        lambda *args: calls.append(args) or original(*args))
    record_solves(monkeypatch, lambda names, _hessian, _asymmetry: solved.append(" + ".join(names)))
    model = run_oneshot(tiny_model_dir, [GPTAQModifier(ignore=IGNORE, config_groups=GROUP32)],
                        batch_size=4)  # 8 samples: 2 batches
    layers = len(model.model.layers)
    assert len(calls) == layers * 2 * 4
    assert len(solved) == layers * 4
    layer1 = "model.layers.1."
    assert f"{layer1}self_attn.q_proj + {layer1}self_attn.k_proj + {layer1}self_attn.v_proj" in solved
    assert f"{layer1}mlp.gate_proj + {layer1}mlp.up_proj" in solved


def test_row_stacked_solve_equals_one_solve_per_module(tiny_model_dir, monkeypatch):
    """Oracle: the same CAE run with stacking turned off (every module solved alone)."""
    recipe = [CAEModifier(ignore=IGNORE, config_groups=GROUP32, semantics="paper")]
    stacked = run_oneshot(tiny_model_dir, recipe).state_dict()
    monkeypatch.setattr(units_module, "row_stackable", lambda modules: False)
    recipe = [CAEModifier(ignore=IGNORE, config_groups=GROUP32, semantics="paper")]
    alone = run_oneshot(tiny_model_dir, recipe).state_dict()
    assert stacked.keys() == alone.keys()
    for key in alone:
        assert torch.equal(stacked[key], alone[key]), key


@pytest.mark.parametrize("tiny_model_dir", ["qwen3", "qwen3_moe"], indirect=True)
def test_python_recipe_on_qwen3_and_moe(tiny_model_dir, solver_calls, tmp_path):
    model = run_oneshot(tiny_model_dir, [CAEModifier(ignore=IGNORE, config_groups=GROUP32)])
    assert set(solver_calls) == targeted_linear_names(model)
    assert all(d is not None for d in solver_calls.values())
    later = [d for name, d in solver_calls.items() if ".layers.1." in name]
    assert later and all(d.abs().max() > 0 for d in later)
    _check_reload(model, tiny_model_dir, tmp_path)


def _check_reload(model, model_dir, tmp_path):
    ids = torch.randint(4, 90, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    out = tmp_path / "checkpoint"
    model.save_pretrained(out, save_compressed=True)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, True)
    assert set(IGNORE) <= set(config["ignore"]) or "lm_head" in config["ignore"]
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert "CAEModifier" in json.dumps(recipe)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        actual = reloaded(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert not list(tmp_path.glob(".*partial*"))


def test_hessian_is_upstreams_exactly_where_the_result_must_be_stock_gptq():
    assert GPTAQModifier(asymmetric_coefficient=0.0, scheme="W4A16").exact_upstream_hessian
    for modifier in (GPTAQModifier(scheme="W4A16"), CAEModifier(scheme="W4A16"),
                     CAEModifier(scheme="W4A16", statistics="gptq"),
                     FOEMModifier(scheme="W4A16")):
        assert not modifier.exact_upstream_hessian, modifier


@pytest.mark.parametrize("strategy", ["group", "channel", "tensor", "NVFP4A16"])
def test_gptaq_with_zero_coefficient_is_stock_gptq(tiny_model_dir, strategy):
    """Same data, same order: the dual-stream pipeline feeds upstream's quantized stream.
    Group and channel scales solve q/k/v and gate/up row-stacked; a tensor-wide scale
    or a per-module global scale (NVFP4) solves each module alone from the shared sums."""
    if strategy == "NVFP4A16":
        scheme = {"scheme": "NVFP4A16", "targets": ["Linear"]}
    else:
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": strategy}
        if strategy == "group":
            weights["group_size"] = 32
        scheme = {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    ours = run_oneshot(
        tiny_model_dir,
        [GPTAQModifier(ignore=IGNORE, asymmetric_coefficient=0.0, **scheme)],
        shuffle_calibration_samples=False,
    )
    stock = run_oneshot(
        tiny_model_dir, [GPTQModifier(ignore=IGNORE, **scheme)],
        shuffle_calibration_samples=False,
    )
    ours_state, stock_state = ours.state_dict(), stock.state_dict()
    assert ours_state.keys() == stock_state.keys()
    for key in stock_state:
        assert torch.equal(ours_state[key], stock_state[key]), key


def test_smoothquant_then_cae(tiny_model_dir, solver_calls):
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    model = run_oneshot(
        tiny_model_dir,
        [SmoothQuantModifier(smoothing_strength=0.5),
         CAEModifier(ignore=IGNORE, config_groups=GROUP32)],
    )
    # smoothing rescaled the norms (they start at exactly one) ...
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))
    # ... and CAE quantized every Linear on both streams
    assert set(solver_calls) == targeted_linear_names(model)
    assert solver_calls["model.layers.1.self_attn.q_proj"].abs().max() > 0


def test_rotation_then_cae(tiny_model_dir, solver_calls):
    from llmcompressor.modifiers.transform.quip import QuIPModifier

    model = run_oneshot(
        tiny_model_dir,
        [QuIPModifier(rotations=["v"], transform_type="hadamard"),
         CAEModifier(ignore=IGNORE, config_groups=GROUP32)],
    )
    assert set(solver_calls) == targeted_linear_names(model)
    assert solver_calls["model.layers.1.mlp.up_proj"].abs().max() > 0


def test_true_sequential_targets(tiny_model_dir, solver_calls):
    model = run_oneshot(
        tiny_model_dir, [CAEModifier(ignore=IGNORE, config_groups=GROUP32)],
        sequential_targets=["Linear"],
    )
    assert set(solver_calls) == targeted_linear_names(model)
    # with one Linear per step, o_proj of layer 0 already sees quantized v_proj output
    assert solver_calls["model.layers.0.self_attn.o_proj"].abs().max() > 0


def test_gptq_statistics_and_plain_foem_use_no_fp_stream(tiny_model_dir, solver_calls):
    model = run_oneshot(
        tiny_model_dir,
        [CAEModifier(ignore=IGNORE, config_groups=GROUP32, statistics="gptq")],
        pipeline="sequential",
    )
    assert set(solver_calls) == targeted_linear_names(model)
    assert all(d is None for d in solver_calls.values())


# -- bad input: fail early with a clear message and write nothing ------------------------


def test_forced_upstream_pipeline_fails(tiny_model_dir, tmp_path):
    with pytest.raises(MissingFullPrecisionStream, match="dual_stream"):
        run_oneshot(
            tiny_model_dir, [CAEModifier(ignore=IGNORE, config_groups=GROUP32)],
            pipeline="sequential", output_dir=str(tmp_path / "out"),
        )
    assert not (tmp_path / "out" / "config.json").exists()


def test_group_size_not_dividing(tiny_model_dir, tmp_path):
    groups = {"group_0": {**GROUP32["group_0"]}}
    groups["group_0"]["weights"] = {**groups["group_0"]["weights"], "group_size": 48}
    with pytest.raises(ValueError, match="group_size 48|divisib|divide"):
        run_oneshot(tiny_model_dir, [CAEModifier(ignore=IGNORE, config_groups=groups)],
                    output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize(
    "shuffle, message",
    # upstream's shuffling sampler refuses first; without shuffling our pipeline does
    [(True, "num_samples=0"), (False, "calibration dataset is empty")],
)
def test_empty_dataset(tiny_model_dir, tmp_path, shuffle, message):
    from datasets import Dataset

    empty = Dataset.from_dict({"input_ids": [], "attention_mask": []})
    with pytest.raises(ValueError, match=message):
        run_oneshot(tiny_model_dir, [CAEModifier(ignore=IGNORE, config_groups=GROUP32)],
                    dataset=empty, shuffle_calibration_samples=shuffle,
                    output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "config.json").exists()


def test_no_targetable_layers(tiny_model_dir):
    groups = {"group_0": {**GROUP32["group_0"], "targets": ["re:does_not_exist.*"]}}
    with pytest.raises(ValueError, match="unable to find any modules|no .*modules|match"):
        run_oneshot(tiny_model_dir, [CAEModifier(config_groups=groups)])


def test_nan_activations(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        oneshot(model=model, dataset=calibration_dataset(),
                recipe=[CAEModifier(ignore=IGNORE, config_groups=GROUP32)],
                max_seq_length=32, num_calibration_samples=8)


def test_a_failed_hessian_is_reported_once_by_module_name(tiny_model_dir, monkeypatch):
    """The solver only flags the fallback; the modifier's run summary names the module."""
    from compressed_tensors.quantization import fake_quantize
    from loguru import logger

    failing = "model.layers.1.self_attn.o_proj"
    original = CompensationModifier._pop_statistics

    def indefinite_for_one_module(self, units):
        fit, judge, refit = original(self, units)
        for index, unit in enumerate(units):
            if failing in (self._module_names[module] for module in unit):
                fit.hessians[index] = -fit.hessians[index]  # no Cholesky, even after damping
        return fit, judge, refit

    monkeypatch.setattr(CompensationModifier, "_pop_statistics", indefinite_for_one_module)
    original_weight = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_submodule(
        failing).weight.detach().clone()
    messages = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        model = run_oneshot(tiny_model_dir, [CAEModifier(ignore=IGNORE, config_groups=GROUP32)])
    finally:
        logger.remove(sink)

    naming = [message for message in messages if failing in message]
    assert len(naming) == 1, naming
    assert "round-to-nearest" in naming[0]
    assert not any("model.layers.1.self_attn.q_proj" in message for message in messages)
    module = model.get_submodule(failing)
    rtn = fake_quantize(original_weight, module.weight_scale, module.weight_zero_point,
                        module.quantization_scheme.weights)
    assert torch.equal(module.weight, rtn)


def test_drift_is_kept_on_the_session(tiny_model_dir):
    """Each llm-compressor session keeps its own run's drift; no module-wide record."""
    from llmcompressor.core import create_session

    recipe = lambda: [GPTAQModifier(ignore=IGNORE, config_groups=GROUP32)]  # noqa: E731
    with create_session() as first:
        run_oneshot(tiny_model_dir, recipe())
        drift = rescomp_modifiers.last_drift()
    assert drift and drift[-1].mse > 0
    with create_session() as second:
        assert rescomp_modifiers.last_drift() == []
        run_oneshot(tiny_model_dir, recipe(), dataset=calibration_dataset(seed=1))
        other = rescomp_modifiers.last_drift()
    assert other and other != drift
    assert rescomp_modifiers.last_drift(first) == drift
    assert rescomp_modifiers.last_drift(second) == other


# -- distributed -----------------------------------------------------------------------

DDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
if os.environ.get("WORLD_SIZE", "1") != "1":
    dist.init_process_group("gloo")
from helpers import calibration_dataset
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM
import rescomp_modifiers
from rescomp_modifiers import CAEModifier
model = AutoModelForCausalLM.from_pretrained({model!r})
dataset = calibration_dataset(num_samples=8)
if dist.is_initialized():
    # each rank takes its own half, as llm-compressor's get_rank_partition does for
    # hub splits (its automatic partitioning keys on a fingerprint that differs
    # between processes for in-memory datasets)
    half = len(dataset) // 2
    dataset = dataset.select(range(dist.get_rank() * half, (dist.get_rank() + 1) * half))
# one batch of 4 per rank: the single process then adds the same two batch sums in the
# same order as the all-reduce (b0 + b1), so the checkpoints must match bit for bit.
# With several batches per rank the order differs, and on some CPUs one weight on a
# rounding boundary flipped a quantization level (8 of 4096 in one q_proj).
oneshot(model=model, dataset=dataset, max_seq_length=32,
        num_calibration_samples=len(dataset), shuffle_calibration_samples=False, batch_size=4,
        recipe=[CAEModifier(ignore={ignore!r}, config_groups={groups!r})])
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save({{k: v.clone() for k, v in model.state_dict().items()}}, {out!r})
if dist.is_initialized():
    dist.barrier(); dist.destroy_process_group()
"""


def _run_ddp(model_dir, out, nproc):
    script = out.with_suffix(".py")
    script.write_text(DDP_SCRIPT.format(
        tests=str(Path(__file__).parent), model=str(model_dir), ignore=IGNORE,
        groups=GROUP32, out=str(out)))
    command = [sys.executable, str(script)]
    if nproc > 1:
        import socket

        # a port free now, not a fixed one another run on the machine may hold
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                   str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(port),
                   str(script)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    return torch.load(out)


def test_ddp_two_ranks_equals_one_process(tiny_model_dir, tmp_path):
    single = _run_ddp(tiny_model_dir, tmp_path / "single.pt", 1)
    double = _run_ddp(tiny_model_dir, tmp_path / "double.pt", 2)
    # H and D are summed over ranks and every rank ends with every compressed module
    # (layer 1's D is non-zero, so its reduction is exercised): same checkpoint, exactly
    assert single.keys() == double.keys()
    for key, value in single.items():
        assert torch.equal(value, double[key]), key


def test_modifier_fields_resolve_to_solver_terms():
    from rescomp_modifiers import LazyUpdate

    cae3 = CAEModifier().compensation_terms(num_bits=3)
    assert (cae3.asymmetric_coefficient, cae3.compensation_aware_coefficient) == (0.25, 0.25)
    assert cae3.lazy_update == LazyUpdate.CLAMPED_LATENT
    assert CAEModifier().compensation_terms(num_bits=2).lazy_update == LazyUpdate.QUANTIZED
    algorithm2 = CAEModifier(statistics="gptq", semantics="paper").compensation_terms(3)
    assert (algorithm2.asymmetric_coefficient, algorithm2.compensation_aware_coefficient) == (0.0, 1.0)
    assert algorithm2.lazy_update == LazyUpdate.LATENT
    assert not CAEModifier(statistics="gptq").needs_full_precision_stream
    foem = FOEMModifier(first_order_coefficient=0.3).compensation_terms(4)
    assert (foem.first_order_coefficient, foem.first_order_next_column_pull) == (0.3, True)
    assert not FOEMModifier().needs_full_precision_stream
    assert FOEMModifier(use_asymmetric_statistics=True).compensation_terms(4).asymmetric_coefficient == 0.25
    gptaq = GPTAQModifier(asymmetric_coefficient=0.5, lazy_update="latent").compensation_terms(4)
    assert (gptaq.asymmetric_coefficient, gptaq.lazy_update) == (0.5, LazyUpdate.LATENT)
