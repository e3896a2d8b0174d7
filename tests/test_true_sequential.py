"""True-sequential statistics (``true_sequential: true``) in the dual-stream pipeline.

The oracle is llm-compressor's own way to true-sequential calibration: one subgraph per
Linear (``sequential_targets=["Linear"]``), where each module's statistics are gathered
after every earlier Linear has been compressed and propagated by the pipeline itself.
The stage passes must give every module the same H and D.
"""

import pytest
import torch

from rescomp_modifiers import CAEModifier, GPTAQModifier

from helpers import GROUP32, IGNORE, record_solves, run_oneshot, targeted_linear_names


@pytest.fixture
def statistics(monkeypatch):
    """module name -> (H, D) as handed to the solver."""
    recorded = {}
    record_solves(monkeypatch, lambda names, hessian, asymmetry: recorded.update(
        {name: (hessian, asymmetry) for name in names}))
    return recorded


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_stage_statistics_equal_one_subgraph_per_linear(tiny_model_dir, statistics):
    def run(**kwargs):
        statistics.clear()
        sequential_targets = kwargs.pop("sequential_targets", None)
        extra = {"sequential_targets": sequential_targets} if sequential_targets else {}
        model = run_oneshot(tiny_model_dir, [GPTAQModifier(
            ignore=IGNORE, config_groups=GROUP32, **kwargs)], **extra)
        return dict(statistics), model

    staged, model = run(true_sequential=True)
    oracle, _ = run(sequential_targets=["Linear"])
    layerwise, _ = run()
    assert set(staged) == set(oracle) == targeted_linear_names(model)
    for name in staged:
        hessian, asymmetry = staged[name]
        assert close(hessian, oracle[name][0]), name
        assert close(asymmetry, oracle[name][1]), name
    # and it is not the layer-wise calibration: o_proj, gate/up and down_proj of layer
    # 0 see quantized earlier modules of their own layer (q/k/v see only its input)
    for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert not close(staged[f"model.layers.0.{name}"][1], layerwise[f"model.layers.0.{name}"][1])
    assert close(staged["model.layers.0.self_attn.q_proj"][1],
                 layerwise["model.layers.0.self_attn.q_proj"][1])


def test_stage_passes_stop_after_their_stage(tiny_model_dir, monkeypatch):
    """Forward calls per module and batch: a stage's pass runs its own modules and the
    earlier ones, in both streams, and stops there. Per batch, with stages q/k/v, o,
    gate/up, down and one propagation pass: q/k/v 4 stages x 2 streams + 1 = 9, o
    3 x 2 + 1 = 7, gate/up 2 x 2 + 1 = 5, down 1 x 2 + 1 = 3 (as in one layer-wise
    calibration: FP, quantized, propagation)."""
    from transformers import AutoModelForCausalLM

    counts = {}
    original = AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        model = original(*args, **kwargs)
        for name, module in model.named_modules():
            if name.startswith("model.layers.0.") and isinstance(module, torch.nn.Linear):
                def hook(module, args, name=name):
                    if args[0].device.type != "meta":
                        counts[name] = counts.get(name, 0) + 1
                module.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    run_oneshot(tiny_model_dir, [GPTAQModifier(ignore=IGNORE, config_groups=GROUP32,
                                               true_sequential=True)], batch_size=2)
    num_batches = 8 // 2
    discovery = 1  # one forward of the first batch finds the stages
    short = {name.split(".")[-1]: count for name, count in counts.items()}
    assert short == {
        "q_proj": 9 * num_batches + discovery, "k_proj": 9 * num_batches + discovery,
        "v_proj": 9 * num_batches + discovery, "o_proj": 7 * num_batches + discovery,
        "gate_proj": 5 * num_batches + discovery, "up_proj": 5 * num_batches + discovery,
        "down_proj": 3 * num_batches + discovery,
    }


@pytest.mark.parametrize("tiny_model_dir", ["qwen3_moe"], indirect=True)
def test_moe_experts_and_the_guard(tiny_model_dir, statistics):
    """Experts a batch does not reach join the last stage: every targeted module is
    still solved once, also with the guard's held-out batches."""
    model = run_oneshot(tiny_model_dir, [CAEModifier(
        ignore=IGNORE, config_groups=GROUP32, true_sequential=True, guard="gptq")])
    assert set(statistics) == targeted_linear_names(model)
    assert statistics["model.layers.1.mlp.experts.0.down_proj"][1].abs().max() > 0


def test_mixed_flags_in_one_pipeline_are_refused(tiny_model_dir):
    # (under oneshot's default pipeline each modifier calibrates in a pipeline of its
    # own, so mixing is fine there; one forced pipeline calibrates both alike)
    with pytest.raises(ValueError, match="set it on all or none"):
        run_oneshot(tiny_model_dir, [
            GPTAQModifier(ignore=IGNORE + ["re:.*mlp.*"], config_groups=GROUP32,
                          true_sequential=True),
            CAEModifier(ignore=IGNORE + ["re:.*self_attn.*"], config_groups=GROUP32),
        ], pipeline="dual_stream")


def test_without_the_full_precision_stream_it_says_what_to_use(tiny_model_dir):
    with pytest.raises(ValueError, match="sequential_targets"):
        run_oneshot(tiny_model_dir, [CAEModifier(
            ignore=IGNORE, config_groups=GROUP32, statistics="gptq", true_sequential=True)])
