"""The checkpoints our modifiers write are served by vLLM (CPU backend here).

The embedded SmolLM2-135M-Instruct is quantized W4A16 (group 64: its 576-wide layers
rule out 128) with llm-compressor's stock GPTQModifier and with our CAEModifier, plus an
asymmetric (zero-point) variant, then all of them and the dense model are loaded in one vLLM
worker (vLLM's own environment, built in the cache on first use) and compared within
that one backend: greedy answers, perplexity from prompt log-probabilities on held-out
Brown documents, generation throughput in interleaved rounds, and lm-eval's vLLM
backend on a local perplexity task. A 3-bit checkpoint must be reported as not servable
on CPU. It takes about 6-7 min on 2 cores with the caches in place (a third of it the
vLLM worker); the first run also builds vLLM's environment (about 4 min, 4 GB) and the
model (40 s).
"""

from __future__ import annotations

import json
import math
import statistics
import time

import pytest

from rescomp_harness.assets import brown_documents, default_model_path
from rescomp_harness.data import calibration_dataset, split_documents
from rescomp_harness.serving import checkpoint_servable, ensure_vllm_env, serve_and_measure

from helpers import CLOZE, SANITY, assert_capitals_ranked_first

pytestmark = pytest.mark.integration

GROUP_SIZE = 64
CALIBRATION_SAMPLES, CALIBRATION_LEN = 32, 256
# CAE may be worse than GPTQ measured in the same run by at most this factor: the two
# differ in one calibration-time term, and at 4 bits, group 64, their perplexities on the
# held-out windows are within a few percent of each other.
CAE_VS_GPTQ_MARGIN = 1.10
# Small on purpose (2 cores; benchmarks/vllm_throughput.py has the full table).
THROUGHPUT = {"batch_size": 4, "prompt_len": 32, "output_len": 32, "rounds": 5,
              "models": ["dense", "gptq", "cae"]}
# Round-to-nearest with a zero point: it checks that vLLM decodes asymmetric checkpoints
# (zero points packed by compressed-tensors), whatever computed the values; at 4 bits RTN
# is worse than GPTQ by a few percent on this model (the README's table), a broken zero
# point by orders of magnitude.
RTN_ASYM_VS_GPTQ_MARGIN = 1.5
# CAE's and GPTQ's checkpoints run the same kernel on the same shapes, so their median
# generation throughputs (rounds interleaved) must agree within this fixed fraction.
# It used to be max(0.10, the rounds' observed (max - min) / median): a noisy run then
# excused any gap, the tolerance widening with the very noise it should see through.
# No run's spreads are on record (the test printed them, and pytest -q drops the print
# of a passing test), so 0.10 is the floor that was already in force, not a bound
# derived from measured spreads; the assertion message now carries each model's rounds
# and spread, so a failure records them.
THROUGHPUT_TOLERANCE = 0.10


def _weights(num_bits: int, symmetric: bool = True) -> dict:
    return {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": num_bits, "type": "int", "symmetric": symmetric,
        "strategy": "group", "group_size": GROUP_SIZE}}}


def _quantize(model_dir, tokenizer, dataset, modifier, out_dir):
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    kwargs = {} if dataset is None else {
        "dataset": dataset, "num_calibration_samples": CALIBRATION_SAMPLES,
        "max_seq_length": CALIBRATION_LEN, "batch_size": 8}
    oneshot(model=model, recipe=[modifier], processor=tokenizer, **kwargs)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Quantize, serve everything in one vLLM worker, and return its results."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from rescomp_modifiers import CAEModifier
    from transformers import AutoTokenizer

    timings = {}
    start = time.perf_counter()
    ensure_vllm_env()  # cached after the first build (~4 min, 4 GB)
    timings["vllm_env"] = time.perf_counter() - start

    model_dir = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    split = split_documents(brown_documents())
    dataset = calibration_dataset(tokenizer, split.calibration, CALIBRATION_SAMPLES,
                                  CALIBRATION_LEN, seed=0)
    root = tmp_path_factory.mktemp("vllm_serving")
    recipes = {
        "gptq": GPTQModifier(config_groups=_weights(4), ignore=["lm_head"]),
        "cae": CAEModifier(config_groups=_weights(4), ignore=["lm_head"]),
        # Round-to-nearest (no calibration): seconds instead of minutes.
        "rtn_asym": QuantizationModifier(config_groups=_weights(4, symmetric=False),
                                         ignore=["lm_head"]),
    }
    checkpoints = {"dense": str(model_dir)}
    for name, modifier in recipes.items():
        start = time.perf_counter()
        calibration = None if name.startswith("rtn") else dataset
        checkpoints[name] = str(_quantize(model_dir, tokenizer, calibration, modifier, root / name))
        timings[f"quantize_{name}"] = time.perf_counter() - start
    # Only inspected, never served: round-to-nearest is enough.
    three_bit = _quantize(model_dir, tokenizer, None,
                          QuantizationModifier(config_groups=_weights(3), ignore=["lm_head"]),
                          root / "rtn_w3")

    held_out = [d.text for d in split.evaluation]
    start = time.perf_counter()
    results = serve_and_measure(
        checkpoints, [prompt for prompt, _ in SANITY], held_out, max_tokens=12,
        window=512, max_windows=16, throughput=[THROUGHPUT], choices=CLOZE,
        lm_eval_texts=split.evaluation[:2], lm_eval_models=["cae"],
        log_file=root / "vllm_worker.log",
    )
    timings["vllm_worker"] = time.perf_counter() - start
    results["timings"] = timings
    results["three_bit"] = str(three_bit)
    results["checkpoints"] = checkpoints
    print(json.dumps({k: results[k] for k in ("timings", "kernel_log", "exit_code")}, indent=1))
    return results


def test_quantized_checkpoints_are_servable_and_3bit_is_not(served):
    for name in ("gptq", "cae", "rtn_asym"):
        ok, reason = checkpoint_servable(served["checkpoints"][name])
        assert ok, f"{name}: {reason}"
    assert "with zero point" in checkpoint_servable(served["checkpoints"]["rtn_asym"])[1]
    ok, reason = checkpoint_servable(served["three_bit"])
    assert not ok
    assert "3-bit" in reason and "GPU" in reason, reason


def test_served_with_cpu_w4a16_kernel(served):
    assert not served["errors"], served["errors"]
    assert served["exit_code"] in (0, 134, -6)  # 134: vLLM's abort at exit, results complete
    assert any("CPUWNA16LinearKernel" in line for line in served["kernel_log"]), served["kernel_log"]
    for name in ("gptq", "cae", "rtn_asym"):  # 30 layers x (qkv, o, gate_up, down)
        assert served["models"][name]["linear_kernels"] == {
            "CompressedTensorsWNA16/CPUWNA16LinearKernel": 120}, served["models"][name]


def test_dense_greedy_answers(served):
    answers = served["models"]["dense"]["generations"]
    for (prompt, word), answer in zip(SANITY, answers):
        assert word in answer, f"dense: {prompt!r} -> {answer!r}"
    for name in ("gptq", "cae", "rtn_asym"):  # decoding runs; the content is the cloze's job
        assert all(a.strip() for a in served["models"][name]["generations"]), served["models"][name]


@pytest.mark.parametrize("name", ["dense", "gptq", "cae", "rtn_asym"])
def test_cloze_ranks_the_right_capital_first(served, name):
    assert_capitals_ranked_first(name, served["models"][name]["choices"])


def test_perplexity_dense_better_and_cae_close_to_gptq(served):
    ppl = {name: m["perplexity"]["perplexity"] for name, m in served["models"].items()}
    print("vLLM prompt-logprob perplexity:", ppl)
    assert all(math.isfinite(p) for p in ppl.values())
    assert ppl["dense"] < ppl["cae"]
    assert ppl["cae"] <= CAE_VS_GPTQ_MARGIN * ppl["gptq"], ppl
    assert ppl["dense"] < ppl["rtn_asym"] <= RTN_ASYM_VS_GPTQ_MARGIN * ppl["gptq"], ppl


def test_throughput_cae_matches_gptq(served):
    key = "b{batch_size}_p{prompt_len}_o{output_len}".format(**THROUGHPUT)
    rounds = {name: served["models"][name]["throughput"][key]["tokens_per_s"]
              for name in THROUGHPUT["models"]}
    median = {name: statistics.median(values) for name, values in rounds.items()}
    # round-to-round spread, (max - min) / median: reported, never a tolerance
    spread = {name: (max(values) - min(values)) / median[name] for name, values in rounds.items()}
    ratio = median["cae"] / median["gptq"]
    report = (f"tokens/s rounds {rounds}; medians {median}; spreads {spread}; "
              f"CAE/GPTQ {ratio:.3f} (tolerance {THROUGHPUT_TOLERANCE}); "
              f"CAE/dense {median['cae'] / median['dense']:.3f}")
    print(report)
    assert abs(ratio - 1) <= THROUGHPUT_TOLERANCE, report


def test_lm_eval_vllm_backend_perplexity(served):
    result = served["models"]["cae"]["lm_eval"]
    print("lm-eval (vLLM backend) on CAE:", result)
    assert math.isfinite(result["word_perplexity"]) and result["word_perplexity"] > 1, result
