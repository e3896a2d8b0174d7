"""docs/results/ and the README's headline table regenerate from the committed records."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_pages_are_what_the_records_generate():
    report = _report()
    stale = [str(path.relative_to(ROOT)) for path, text in report.generate().items()
             if not path.is_file() or path.read_text() != text]
    assert stale == [], "run python benchmarks/report.py"


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_best_stock_setting_and_gap_closed_by_hand(tmp_path):
    """Two seeds; the MSE observer is best on Brown, imatrix on SOTU (by mean). Each share
    is worked out by hand: (baseline - method) / (baseline - dense), same seed."""
    report = _report()
    dense = {"method": "dense", "seed": -1, "scores": {"brown": 10.0, "sotu": 20.0}}
    rows = {
        "gptq": [(30.0, 40.0), (32.0, 44.0)],
        "gptq_mse": [(20.0, 36.0), (22.0, 36.0)],
        "gptq_imatrix": [(24.0, 30.0), (26.0, 28.0)],
        "recipe:x/recommended_variant.yaml": [(15.0, 25.0), (22.0, 24.0)],
    }
    records = [dense] + [{"method": m, "seed": s, "scores": {"brown": b, "sotu": o}}
                         for m, values in rows.items() for s, (b, o) in enumerate(values)]
    # the same setting in two runs of the benchmark: merged by setting name
    _write(tmp_path / "run1" / "w3_g64_brown" / "results.jsonl", records[:5])
    _write(tmp_path / "run2" / "w3_g64_brown" / "results.jsonl", [dense] + records[5:])
    (setting,) = report._settings(tmp_path, {"recommended_variant": "recommended"})
    assert setting.best_stock("brown") == "gptq_mse"       # means 31, 21, 25
    assert setting.best_stock("sotu") == "gptq_imatrix"    # means 42, 36, 29
    # Brown vs gptq_mse: seed 0 (20 - 15) / (20 - 10) = 0.5; seed 1 (22 - 22) / 12 = 0
    assert setting.gap_closed("recommended", "brown") == pytest.approx([0.5, 0.0])
    # SOTU vs gptq_imatrix: seed 0 (30 - 25) / 10 = 0.5; seed 1 (28 - 24) / 8 = 0.5
    assert setting.gap_closed("recommended", "sotu") == pytest.approx([0.5, 0.5])
    assert report._share([0.5, 0.0]) == "+25% ± 35 (min +0%)"


def test_disagreeing_duplicate_records_are_refused(tmp_path):
    report = _report()
    dense = {"method": "dense", "seed": -1, "scores": {"brown": 10.0, "sotu": 20.0}}
    _write(tmp_path / "a" / "s" / "results.jsonl",
           [dense, {"method": "gptq", "seed": 0, "scores": {"brown": 30.0, "sotu": 40.0}}])
    _write(tmp_path / "b" / "s" / "results.jsonl",
           [dense, {"method": "gptq", "seed": 0, "scores": {"brown": 31.0, "sotu": 40.0}}])
    with pytest.raises(ValueError, match="recorded twice with different scores"):
        report._settings(tmp_path)
