"""Issue 25, the comparison harness: inputs and settings that used to fail late, or run
on nothing, now refused (or warned about) before the model loads. Each test failed on
the main branch before the fix; the failure seen there is in its docstring."""

import contextlib
import json
import sys

import pytest
from loguru import logger

from rescomp_harness import cli
from rescomp_harness import compare as compare_module
from rescomp_harness.compare import InvalidComparison, run_comparison

from helpers import (
    VOCAB,
    compare_config,
    make_model,
    make_tokenizer,
    random_texts,
    write_jsonl,
)

_texts = random_texts
_write_jsonl = write_jsonl


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_inputs")
    model = root / "model"
    make_model().save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    return {"root": root, "model": model,
            "calibration": _write_jsonl(root / "calibration.jsonl", _texts(30, 50)),
            "evaluation": _write_jsonl(root / "evaluation.jsonl", _texts(60, 20, seed=1))}


_config = compare_config


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the comparison gets as far as loading a model."""
    monkeypatch.setattr(compare_module, "_load_model",
                        lambda path: pytest.fail(f"checked before the model loads ({path})"))


@contextlib.contextmanager
def _warnings():
    lines = []
    sink = logger.add(lines.append, format="{level} {message}", level="WARNING")
    try:
        yield lines
    finally:
        with contextlib.suppress(ValueError):
            logger.remove(sink)


# -- 3. calibration text without tokens -------------------------------------------------

@pytest.mark.parametrize("blank", ["", "   ", "\n\t \n"])
def test_calibration_text_without_tokens_is_refused_before_the_model_loads(
        inputs, tmp_path, no_model_load, blank):
    """Before: 40 empty documents gave 40 end-of-sequence tokens, enough for 2 x 16: the
    comparison calibrated on them alone, exited 0 and printed its table."""
    calibration = _write_jsonl(tmp_path / "blank.jsonl", [blank] * 40)
    with pytest.raises(InvalidComparison,
                       match=rf"calibration '{calibration}': all 40 documents are empty or "
                             rf"whitespace-only \({calibration.name}: 40 of 40\)"):
        run_comparison(_config(inputs, tmp_path / "out", calibration=str(calibration)))
    assert not (tmp_path / "out").exists()


def test_partly_empty_calibration_text_is_warned_about_with_counts(inputs, tmp_path):
    """Before: no word about the 7 empty documents (each adding one end-of-sequence
    token between the windows' real text)."""
    calibration = _write_jsonl(tmp_path / "some_blank.jsonl",
                               _texts(30, 50) + ["", " "] * 3 + ["\n"])
    with _warnings() as lines:
        run_comparison(_config(inputs, tmp_path / "out", calibration=str(calibration),
                               methods=[]))
    assert any(f"calibration '{calibration}': 7 of 37 documents are empty or whitespace-only "
               f"({calibration.name}: 7 of 37)" in line for line in lines), lines


# -- 6. rotation widths, output folders ---------------------------------------------------

@pytest.fixture(scope="module")
def odd_width_model(tmp_path_factory):
    """48 wide (no 48-point Sylvester Hadamard matrix), heads of 16."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=3, head_dim=16,
        max_position_embeddings=128, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("odd_width") / "model"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_a_rotation_the_width_cannot_take_is_refused_before_anything_is_written(
        inputs, odd_width_model, tmp_path, monkeypatch):
    """Before: the dense row was written, then the first method's oneshot failed in
    SpinQuant (``ValueError: Cannot construct deterministic hadamard of size != 2^n``),
    and the retry with --rotation-block-size 16 into the same --output was refused
    (``holds results computed on other inputs: setting --rotation-block-size: None ->
    16``)."""
    out = tmp_path / "out"
    settings = dict(model=str(odd_width_model), rotation="spinquant")
    loaded = []
    monkeypatch.setattr(compare_module, "_load_model",
                        lambda path: loaded.append(path) or pytest.fail("model loaded"))
    with pytest.raises(InvalidComparison,
                       match=r"--rotation spinquant: the model's hidden size 48 has no "
                             r"Hadamard matrix.*pass --rotation-block-size 16"):
        run_comparison(_config(inputs, out, **settings))
    with pytest.raises(InvalidComparison,
                       match=r"--rotation-block-size 32 does not divide the model's hidden "
                             r"size 48.*16"):
        run_comparison(_config(inputs, out, rotation_block_size=32, **settings))
    assert not out.exists() and not loaded
    monkeypatch.undo()
    finished = run_comparison(_config(inputs, out, rotation_block_size=16, **settings))
    methods = {json.loads(line)["method"]
               for line in (finished / "results.jsonl").read_text().splitlines()}
    assert methods == {"dense", "rtn"}


@pytest.mark.parametrize("where", ["under a file", "under a broken link"])
def test_an_output_folder_that_cannot_be_created_is_refused_by_the_cli(
        inputs, tmp_path, capsys, no_model_load, where):
    """Before: the model and documents loaded, then ``out.mkdir`` raised
    ``NotADirectoryError`` (``FileExistsError`` under the broken link) as a traceback
    out of ``rescomp compare``."""
    blocker = tmp_path / "blocker"
    if where == "under a file":
        blocker.write_text("a file")
    else:
        blocker.symlink_to(tmp_path / "gone")
    output = blocker / "results"
    logger.remove()
    logger.add(lambda message: sys.stderr.write(message), level="INFO")
    code = cli.main(["compare", "--model", str(inputs["model"]), "--methods", "rtn",
                     "--samples", "2", "--seq-len", "16", "--seeds", "0",
                     "--calibration", str(inputs["calibration"]),
                     "--evaluation", str(inputs["evaluation"]), "--eval-seq-len", "16",
                     "--output", str(output)])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    (error,) = [line for line in stderr.splitlines()
                if line.startswith("rescomp compare: error: ")]
    assert f"--output {output}: cannot be created: {blocker} is" in error
    assert "choose another --output" in error
    assert "Traceback" not in stderr
