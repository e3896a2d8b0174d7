"""`rescomp compare` on a tiny local model: a result is either right or refused.

One real comparison (RTN, one seed, a 2-layer random model, seconds) is run once per
module; each test works on a copy of its output directory.
"""

import contextlib
import gc
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from loguru import logger

from rescomp_harness import cli
from rescomp_harness.compare import CompareConfig, InvalidComparison, run_comparison

from helpers import compare_config, make_model, make_tokenizer, write_jsonl

WORDS = [f"w{i}" for i in range(90)]  # the tiny tokenizer's vocabulary: one token a word


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


_write_jsonl = write_jsonl


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_inputs")
    rng = random.Random(0)
    model = root / "model"
    make_model().save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    return {
        "root": root,
        "model": model,
        "calibration": _write_jsonl(root / "calibration.jsonl", [_words(rng, 50) for _ in range(30)]),
        "evaluation": _write_jsonl(root / "evaluation.jsonl", [_words(rng, 20) for _ in range(60)]),
    }


_config = compare_config


@contextlib.contextmanager
def _logged(level="INFO"):
    """The loguru lines written inside the block, up to oneshot (which replaces the
    handlers with llm-compressor's own)."""
    lines = []
    sink = logger.add(lines.append, format="{level} {message}", level=level)
    try:
        yield lines
    finally:
        with contextlib.suppress(ValueError):
            logger.remove(sink)


@pytest.fixture(scope="module")
def finished(inputs):
    """A finished comparison's output directory and the log lines it wrote."""
    with _logged() as lines:
        out = run_comparison(_config(inputs, inputs["root"] / "finished"))
    return out, lines


@pytest.fixture
def previous_run(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_no_run_keeps_its_model_alive(inputs, tmp_path):
    """Every run's model is freed when the comparison returns (and so, run by run, a long
    comparison does not grow by one model per run): llm-compressor's session and
    torch.fx's wrapper registry kept them alive (RTN runs the first, GPTQ the second)."""
    from transformers import PreTrainedModel

    def live_models() -> set[int]:
        gc.collect()
        return {id(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel)}

    before = live_models()
    run_comparison(_config(inputs, tmp_path / "out", methods=["rtn", "gptq"], seeds=[0, 1]))
    assert len(_records(tmp_path / "out")) == 5  # dense + 2 methods x 2 seeds
    assert live_models() - before == set()


def test_a_comparison_scores_the_whole_evaluation_file(finished, inputs):
    out, lines = finished
    records = _records(out)
    assert [(r["method"], r["seed"]) for r in records] == [("dense", -1), ("rtn", 0)]
    name = str(inputs["evaluation"])
    assert all(math.isfinite(r["scores"][name]) for r in records)
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    # named only for evaluation: all 60 documents are scored, and all 30 calibrate
    assert fingerprint["evaluation"][name]["documents"] == 60
    assert fingerprint["calibration"]["documents"] == 30
    assert any(f"evaluation {name!r}: 60 documents, 1,200 tokens" in line for line in lines)
    assert any(f"calibration {str(inputs['calibration'])!r}: 30 documents (calibration only: all "
               "of its documents calibrate); each run draws --samples 2 x --seq-len 16 = 32 tokens"
               in line for line in lines)


def test_resume_with_the_same_inputs_does_no_work(previous_run, inputs, monkeypatch):
    import llmcompressor

    before = _snapshot(previous_run)
    monkeypatch.setattr(llmcompressor, "oneshot", lambda **_: pytest.fail("nothing to rerun"))
    run_comparison(_config(inputs, previous_run))
    assert _snapshot(previous_run)["results.jsonl"] == before["results.jsonl"]


def test_resume_after_the_evaluation_file_changed_is_refused(previous_run, inputs):
    evaluation = inputs["evaluation"]
    original = evaluation.read_text()
    lines = original.splitlines()
    record = json.loads(lines[7])
    record["text"] += " w1"  # one more word in one of 60 documents, edited in place
    lines[7] = json.dumps(record)
    before = _snapshot(previous_run)
    try:
        evaluation.write_text("\n".join(lines) + "\n")
        with pytest.raises(InvalidComparison, match=rf"other inputs: evaluation {str(evaluation)!r} "
                                                    r"\(its documents\)\. Pass another --output"):
            run_comparison(_config(inputs, previous_run))
    finally:
        evaluation.write_text(original)
    assert _snapshot(previous_run) == before


@pytest.mark.parametrize("change, named", [
    (dict(bits=3), r"setting --bits: 4 -> 3"),
    (dict(eval_windows=3), r"setting --eval-windows: 4 -> 3"),
    (dict(symmetric=False), r"setting --symmetric: True -> False"),
])
def test_resume_with_another_setting_is_refused(previous_run, inputs, change, named):
    before = _snapshot(previous_run)
    with pytest.raises(InvalidComparison, match=named):
        run_comparison(_config(inputs, previous_run, **change))
    assert _snapshot(previous_run) == before


def test_a_fingerprint_from_before_rotation_and_activation_settings_resumes(
        previous_run, inputs, monkeypatch):
    """Fingerprints written before --rotation/--activation-bits/--kv-bits existed were run
    at their defaults: they resume at the defaults and are refused at any other value."""
    import llmcompressor

    path = previous_run / "fingerprint.json"
    fingerprint = json.loads(path.read_text())
    for key in ("rotation", "rotation_block_size", "activation_bits", "kv_bits",
                "activation_clip_ratio"):
        del fingerprint["settings"][key]
    path.write_text(json.dumps(fingerprint))
    before = _snapshot(previous_run)["results.jsonl"]
    monkeypatch.setattr(llmcompressor, "oneshot", lambda **_: pytest.fail("nothing to rerun"))
    run_comparison(_config(inputs, previous_run))
    assert _snapshot(previous_run)["results.jsonl"] == before
    path.write_text(json.dumps(fingerprint))
    with pytest.raises(InvalidComparison, match=r"setting --activation-bits: 16 -> 8"):
        run_comparison(_config(inputs, previous_run, activation_bits=8))


def test_resume_after_the_model_changed_is_refused(previous_run, inputs, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(inputs["model"], model)
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5  # loads fine, computes something else
    (model / "config.json").write_text(json.dumps(config))
    before = _snapshot(previous_run)
    with pytest.raises(InvalidComparison, match=r"model '.*' \(files config.json\)"):
        run_comparison(_config(inputs, previous_run, model=str(model)))
    assert _snapshot(previous_run) == before


def test_results_without_their_fingerprint_are_not_resumed(previous_run, inputs):
    (previous_run / "fingerprint.json").unlink()
    before = _snapshot(previous_run)
    with pytest.raises(InvalidComparison, match=r"has no fingerprint\.json .* another --output, or "
                                                r"delete .* to start over"):
        run_comparison(_config(inputs, previous_run))
    assert _snapshot(previous_run) == before


def test_more_seeds_or_recipes_extend_the_results(previous_run, inputs):
    before = _records(previous_run)
    run_comparison(_config(inputs, previous_run, seeds=[0, 1]))
    # a recipe file naming our modifier adds its rows and is fingerprinted from then on
    recipe = str(_recipe(inputs["root"] / "cae_w4_g16.yaml", bits=4, group_size=16))
    run_comparison(_config(inputs, previous_run, seeds=[1], recipes=[recipe]))
    after = _records(previous_run)
    assert after[:len(before)] == before
    assert [(r["method"], r["seed"]) for r in after[len(before):]] == [
        ("rtn", 1), (f"recipe:{recipe}", 1)]
    assert all(math.isfinite(v) for r in after for v in r["scores"].values())
    fingerprint = json.loads((previous_run / "fingerprint.json").read_text())
    assert list(fingerprint["recipes"]) == [recipe]


def test_a_cut_off_last_line_is_dropped_with_a_warning(previous_run, inputs):
    results = previous_run / "results.jsonl"
    kept = results.read_text().splitlines()[0]  # the dense row; the rtn row is cut mid-way
    results.write_text(kept + "\n" + '{"method": "rtn", "seed": 0, "sco')
    with _logged("WARNING") as lines:
        run_comparison(_config(inputs, previous_run))
    assert any(line.startswith("WARNING") and "results.jsonl:2: the last line was cut off" in line
               for line in lines)
    text = results.read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert records[0] == json.loads(kept)
    assert [(r["method"], r["seed"]) for r in records] == [("dense", -1), ("rtn", 0)]


def test_a_damaged_line_inside_the_results_is_refused(previous_run, inputs):
    results = previous_run / "results.jsonl"
    dense, rtn = results.read_text().splitlines()
    results.write_text(dense[:20] + "\n" + rtn + "\n")
    before = _snapshot(previous_run)
    with pytest.raises(InvalidComparison, match=r"results\.jsonl:1: damaged results line"):
        run_comparison(_config(inputs, previous_run))
    assert _snapshot(previous_run) == before


def test_a_single_text_file_is_evaluated_whole(inputs, tmp_path, monkeypatch):
    import llmcompressor

    monkeypatch.setattr(llmcompressor, "oneshot", lambda **_: pytest.fail("only the dense row"))
    text = tmp_path / "speech.txt"
    text.write_text(_words(random.Random(1), 3000))
    out = run_comparison(_config(inputs, tmp_path / "out", methods=[], evaluation=[str(text)],
                                 eval_seq_len=64, eval_windows=100))
    (dense,) = _records(out)
    assert math.isfinite(dense["scores"][str(text)])
    assert json.loads((out / "fingerprint.json").read_text())["evaluation"][str(text)]["documents"] == 1


# ------------------------------------------------------------ arguments, via the CLI


def _cli_arguments(inputs, output) -> list[str]:
    return ["compare", "--model", str(inputs["model"]), "--methods", "rtn", "--samples", "2",
            "--seq-len", "16", "--seeds", "0", "--calibration", str(inputs["calibration"]),
            "--evaluation", str(inputs["evaluation"]), "--eval-seq-len", "16",
            "--output", str(output)]


def _bad_jsonl(inputs, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "w1 w2"}\n{"text": "w3\n')
    return ["--evaluation", str(path)], rf"{path}:2: not valid JSON"


def _no_text(inputs, tmp_path):
    path = tmp_path / "notext.jsonl"
    path.write_text('{"text": "w1 w2"}\n{"body": "w3"}\n')
    return ["--calibration", str(path)], rf'{path}:2: no "text" string'


def _missing_model(inputs, tmp_path):
    return ["--model", str(tmp_path / "no" / "model")], rf"--model {tmp_path}/no/model: no such directory"


def _missing_recipe(inputs, tmp_path):
    return ["--recipes", str(tmp_path / "cae.yaml")], rf"--recipes {tmp_path}/cae.yaml: no such file"


def _bad_recipe(inputs, tmp_path):
    path = tmp_path / "cae.yaml"
    path.write_text("quant_stage:\n  quant_modifiers:\n    CAEModifer:\n      targets: [Linear]\n")
    return (["--recipes", str(path)],
            rf"--recipes {path}: ValueError: No modifier of type 'CAEModifer' found")


def _recipe(path: Path, bits: int, group_size: int, rotation: bool = False) -> Path:
    rotation_text = ("    SpinQuantModifier:\n      rotations: [R1, R2]\n"
                     "      transform_type: hadamard\n") if rotation else ""
    path.write_text(
        "quant_stage:\n  quant_modifiers:\n" + rotation_text +
        "    CAEModifier:\n      ignore: [lm_head]\n      config_groups:\n        group_0:\n"
        "          targets: [Linear]\n          weights: {num_bits: %d, type: int, "
        "symmetric: true, strategy: group, group_size: %d}\n" % (bits, group_size))
    return path


def _recipe_of_other_bits(inputs, tmp_path):  # the CLI's default setting is W3 g64
    path = _recipe(tmp_path / "cae.yaml", bits=4, group_size=64)
    return (["--recipes", str(path)],
            rf"--recipes {path}: a recipe runs as written, and this one differs from the "
            rf"comparison's setting: weights W4 g64 symmetric \(the comparison: W3 g64 symmetric\); "
            rf"pass the recipe's setting \(--bits, ")


def _recipe_with_a_rotation(inputs, tmp_path):
    path = _recipe(tmp_path / "cae.yaml", bits=3, group_size=64, rotation=True)
    return (["--recipes", str(path)],
            r"differs from the comparison's setting: rotation SpinQuantModifier R1\+R2 \(the "
            r"full width\) \(the comparison: none\); pass")


def _recipe_without_weights(inputs, tmp_path):
    path = tmp_path / "rotation_only.yaml"
    path.write_text("quant_stage:\n  quant_modifiers:\n    SpinQuantModifier:\n"
                    "      rotations: [R1, R2]\n")
    return ["--recipes", str(path)], rf"--recipes {path}: quantizes no weights"


def _missing_evaluation(inputs, tmp_path):
    return ["--evaluation", str(tmp_path / "held_out.txt")], rf"no such file: {tmp_path}/held_out.txt"


def _too_short_evaluation(inputs, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("w1 w2 w3")
    return ["--evaluation", str(path)], r"3 tokens make no window of --eval-seq-len 16"


def _too_little_calibration(inputs, tmp_path):  # 30 x 50 words, one EOS after each
    return ["--samples", "100"], r"30 calibration documents give 1530 tokens; 100 x 16 = 1600 needed"


def _too_long_windows(inputs, tmp_path):
    return ["--eval-seq-len", "256"], r"--eval-seq-len 256 exceeds the model's 128 positions"


@pytest.mark.parametrize("arguments, message", [
    (["--eval-windows", "0"], r"--eval-windows must be an integer of at least 1"),
    (["--eval-seq-len", "1"], r"--eval-seq-len must be an integer of at least 2"),
    (["--bits", "0"], r"--bits must be an integer from 2 to 8; got 0"),
    (["--bits", "9"], r"--bits must be an integer from 2 to 8; got 9"),
    (["--samples", "0"], r"--samples must be an integer of at least 1"),
    (["--seq-len", "1"], r"--seq-len must be an integer of at least 2"),
    (["--group-size", "-1"], r"--group-size must be an integer of at least 0"),
    (["--bigbench-limit", "0"], r"--bigbench-limit must be at least 1"),
    (_bad_jsonl, None), (_no_text, None), (_missing_model, None), (_missing_recipe, None),
    (_bad_recipe, None), (_recipe_of_other_bits, None), (_recipe_with_a_rotation, None),
    (_recipe_without_weights, None),
    (_missing_evaluation, None), (_too_short_evaluation, None), (_too_little_calibration, None),
    (_too_long_windows, None),
])
def test_invalid_arguments_get_one_line_and_nothing_is_written(inputs, tmp_path, capsys, arguments,
                                                                message, monkeypatch):
    import llmcompressor

    monkeypatch.setattr(llmcompressor, "oneshot", lambda **_: pytest.fail("validated first"))
    # llm-compressor's import binds a loguru handler to the sys.stderr of that moment (an
    # earlier test's captured stream): log to whichever stderr is current instead
    logger.remove()
    logger.add(lambda message: sys.stderr.write(message), level="INFO")
    if callable(arguments):
        arguments, message = arguments(inputs, tmp_path)
    output = tmp_path / "out"
    assert cli.main(_cli_arguments(inputs, output) + arguments) == 2
    stderr = capsys.readouterr().err  # the log lines of the checks that passed, then the error
    (error,) = [line for line in stderr.splitlines() if line.startswith("rescomp compare: error: ")]
    assert "Traceback" not in stderr
    assert re.search(message, error), error
    assert not output.exists()


def test_unknown_method_is_refused_by_the_parser(inputs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(_cli_arguments(inputs, tmp_path / "out") + ["--methods", "gptq", "cea"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'cea'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidComparison, match=r"unknown --methods 'cea'; choose from rtn, gptq"):
        run_comparison(CompareConfig(methods=["cea"], output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ help


def test_help_is_fast_and_imports_nothing_heavy():
    """`rescomp --help` loads no torch, llm-compressor or plugin package (each costs
    seconds; llm-compressor also warns about the accelerator)."""
    probe = ("import sys, rescomp_harness.cli as cli; help = cli.build_parser().format_help(); "
             "sub = cli.build_parser()._subparsers._group_actions[0].choices['compare'].format_help(); "
             "print(sorted(m for m in ('torch', 'llmcompressor', 'transformers', 'rescomp_modifiers') "
             "if m in sys.modules)); print('gptaq_cae: GPTAQ+CAE' in ' '.join(sub.split()))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                            timeout=60, check=True)
    assert result.stdout.split() == ["[]", "True"], result
    assert "accelerator" not in result.stderr.lower()


def test_the_help_vocabulary_is_the_plugins():
    from rescomp_modifiers.methods import METHODS as PLUGIN_METHODS
    from rescomp_harness.compare import METHODS

    assert METHODS == {name: method.label for name, method in PLUGIN_METHODS.items()}


def test_group_size_zero_compares_per_channel_scales():
    from rescomp_harness.compare import CompareConfig, _scheme

    channel = _scheme(CompareConfig(group_size=0))["group_0"]["weights"]
    assert channel["strategy"] == "channel" and "group_size" not in channel
    grouped = _scheme(CompareConfig(group_size=192))["group_0"]["weights"]
    assert (grouped["strategy"], grouped["group_size"]) == ("group", 192)


def test_low_bit_settings_build_rotation_activation_and_kv_quantization():
    from llmcompressor.modifiers.transform import SpinQuantModifier

    from rescomp_harness.compare import build_recipe
    from rescomp_modifiers import CAEModifier

    config = CompareConfig(rotation="spinquant", rotation_block_size=64, activation_bits=4,
                           kv_bits=8)
    rotation, modifier = build_recipe("gptaq_cae", config)
    assert isinstance(rotation, SpinQuantModifier) and rotation.transform_block_size == 64
    assert isinstance(modifier, CAEModifier)
    activations = modifier.config_groups["group_0"].input_activations
    assert (activations.num_bits, activations.strategy, activations.dynamic) == (4, "token", True)
    assert modifier.kv_cache_scheme.num_bits == 8
    assert activations.observer_kwargs == {}
    clipped = CompareConfig(activation_bits=4, activation_clip_ratio=0.9)
    (modifier,) = build_recipe("gptaq", clipped)
    assert modifier.config_groups["group_0"].input_activations.observer_kwargs == {
        "clip_ratio": 0.9}
    (plain,) = build_recipe("gptq", CompareConfig())
    assert plain.config_groups["group_0"].input_activations is None
    assert plain.kv_cache_scheme is None


def test_a_recipe_is_checked_for_the_clip_ratio_too():
    """A recipe's clipped activations match only a comparison with the same ratio."""
    from rescomp_harness.compare import _recipe_setting, _setting_of, build_recipe

    clipped = CompareConfig(activation_bits=4, activation_clip_ratio=0.9)
    found = _recipe_setting(build_recipe("gptaq", clipped))
    assert found["input activations"] == {"4 bits, clipped to 0.9"}
    assert found["input activations"] == {_setting_of(clipped)["input activations"]}
    assert _setting_of(CompareConfig(activation_bits=4))["input activations"] == "4 bits"


def test_a_rotated_w4a8_kv8_comparison_runs(inputs, tmp_path):
    out = run_comparison(_config(inputs, tmp_path / "lowbit", methods=["rtn", "gptaq_cae"],
                                 rotation="spinquant", activation_bits=8, kv_bits=8))
    records = _records(out)
    assert {r["method"] for r in records} == {"dense", "rtn", "gptaq_cae"}
    assert all(math.isfinite(v) for r in records for v in r["scores"].values())
    assert "W4A8KV8 rotated (SpinQuant R1+R2)" in (out / "summary.md").read_text()


@pytest.mark.parametrize("flag, value, message", [
    ("rotation", "quarot", "--rotation must be"),
    ("rotation_block_size", 48, "power of two"),
    ("activation_bits", 6, "--activation-bits must be 4, 8 or 16"),
    ("kv_bits", 2, "--kv-bits must be 4, 8 or 16"),
    ("activation_clip_ratio", 1.2, "--activation-clip-ratio must be in"),
    ("activation_clip_ratio", 0.9, "give --activation-bits 4 or 8 too"),
])
def test_low_bit_settings_are_validated(flag, value, message):
    from rescomp_harness.compare import validate_config

    with pytest.raises(InvalidComparison, match=message):
        validate_config(CompareConfig(**{flag: value}))
