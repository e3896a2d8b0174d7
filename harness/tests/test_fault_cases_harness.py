"""Issue 25, the comparison harness: inputs and settings that used to fail late, or run
on nothing, now refused (or warned about) before the model loads. Each test failed on
the main branch before the fix; the failure seen there is in its docstring."""

import contextlib
import json
import random
from pathlib import Path

import pytest
from loguru import logger

from rescomp_harness import compare as compare_module
from rescomp_harness.compare import CompareConfig, InvalidComparison, run_comparison

from helpers import make_model, make_tokenizer

WORDS = [f"w{i}" for i in range(90)]  # the tiny tokenizer's vocabulary: one token a word


def _texts(count: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"{path.stem}-{i}", "text": t}) + "\n"
                            for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_inputs")
    model = root / "model"
    make_model().save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    return {"root": root, "model": model,
            "calibration": _write_jsonl(root / "calibration.jsonl", _texts(30, 50)),
            "evaluation": _write_jsonl(root / "evaluation.jsonl", _texts(60, 20, seed=1))}


def _config(inputs, output, **overrides) -> CompareConfig:
    settings = dict(
        model=str(inputs["model"]), methods=["rtn"], bits=4, group_size=16, samples=2,
        seq_len=16, seeds=[0], calibration=str(inputs["calibration"]),
        evaluation=[str(inputs["evaluation"])], eval_seq_len=16, eval_windows=4,
        drift_windows=1, output=str(output),
    )
    return CompareConfig(**{**settings, **overrides})


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
