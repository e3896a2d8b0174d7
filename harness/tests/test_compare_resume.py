"""Resuming a comparison: only results of the same inputs share a results file, and a
results file cut by a kill loses only the cut line. (End to end: test_compare_cli.py.)"""

import json

import pytest

from rescomp_harness.compare import (
    _FINGERPRINT_FORMAT,
    CompareConfig,
    InvalidComparison,
    _append,
    _check_resumable,
    _fingerprint_changes,
    _repair_results,
    _scan_results,
)


def _fingerprint(config=None, model=None, evaluation=None, recipes=None, calibration="c0",
                 methods=None):
    settings = {k: v for k, v in (config or CompareConfig()).__dict__.items()
                if k not in {"methods", "recipes", "seeds", "output", "model", "calibration",
                             "evaluation"}}
    return {
        "format": _FINGERPRINT_FORMAT,
        "settings": settings,
        "model": {"source": "m", "files": model or {"config.json": "a", "model.safetensors": "b"}},
        "calibration": {"source": "brown", "documents": 400, "digest": calibration},
        "evaluation": evaluation or {"brown": {"documents": 100, "digest": "e0"}},
        "recipes": recipes or {},
        "methods": methods or {},
    }


def _previous_run(tmp_path, fingerprint):
    (tmp_path / "fingerprint.json").write_text(json.dumps(fingerprint))
    _append(tmp_path / "results.jsonl", {"method": "gptq", "seed": 0, "scores": {"brown": 60.0}})


def test_changed_setting_is_refused_with_what_changed(tmp_path):
    _previous_run(tmp_path, _fingerprint(CompareConfig(bits=3)))
    with pytest.raises(InvalidComparison, match=r"setting --bits: 3 -> 4\. Pass another --output"):
        _check_resumable(tmp_path, _fingerprint(CompareConfig(bits=4)), has_results=True)


@pytest.mark.parametrize("changed, named", [
    (dict(model={"config.json": "a", "model.safetensors": "B"}), r"model 'm' \(files model.safetensors\)"),
    (dict(calibration="c1"), r"calibration documents \('brown' -> 'brown'\)"),
    (dict(evaluation={"brown": {"documents": 100, "digest": "e1"}}), r"evaluation 'brown' \(its documents\)"),
    (dict(evaluation={"sotu": {"documents": 100, "digest": "e0"}}), r"evaluation sources \['brown'\] -> \['sotu'\]"),
    (dict(recipes={"r.yaml": "r1"}), r"recipe r.yaml \(its content\)"),
    (dict(methods={"recommended": {"runs": "gptaq"}}),
     r"method recommended \(its definition: \{'runs': 'recommended'\} -> \{'runs': 'gptaq'\}\)"),
])
def test_changed_content_is_refused_naming_it(tmp_path, changed, named):
    _previous_run(tmp_path, _fingerprint(recipes={"r.yaml": "r0"},
                                         methods={"recommended": {"runs": "recommended"}}))
    changed.setdefault("recipes", {"r.yaml": "r0"})
    changed.setdefault("methods", {"recommended": {"runs": "recommended"}})
    with pytest.raises(InvalidComparison, match=named):
        _check_resumable(tmp_path, _fingerprint(**changed), has_results=True)


def test_every_change_is_named_at_once():
    changes = _fingerprint_changes(_fingerprint(CompareConfig(bits=3, eval_windows=8)),
                                   _fingerprint(CompareConfig(bits=4, eval_windows=4), calibration="c1"))
    assert changes == ["setting --bits: 3 -> 4", "setting --eval-windows: 8 -> 4",
                       "calibration documents ('brown' -> 'brown')"]


def test_more_seeds_methods_or_recipes_extend_the_run(tmp_path):
    _previous_run(tmp_path, _fingerprint(CompareConfig(seeds=[0], methods=["gptq"]),
                                         recipes={"a.yaml": "ra"}, methods={"gptq": {"runs": "gptq"}}))
    stored = _check_resumable(
        tmp_path, _fingerprint(CompareConfig(seeds=[0, 1, 2], output="x"), recipes={"b.yaml": "rb"},
                               methods={"gptaq": {"runs": "gptaq"}}),
        has_results=True)
    assert stored["recipes"] == {"a.yaml": "ra", "b.yaml": "rb"}  # a later run still checks a.yaml
    assert stored["methods"] == {"gptq": {"runs": "gptq"}, "gptaq": {"runs": "gptaq"}}


def test_results_without_a_fingerprint_are_refused(tmp_path):
    _append(tmp_path / "results.jsonl", {"method": "gptq", "seed": 0, "scores": {}})
    with pytest.raises(InvalidComparison, match="has no fingerprint.json .*another --output, or delete"):
        _check_resumable(tmp_path, _fingerprint(), has_results=True)


def test_fresh_directory_is_fine(tmp_path):
    (tmp_path / "fingerprint.json").write_text(json.dumps(_fingerprint(CompareConfig(bits=8))))
    fingerprint = _fingerprint(CompareConfig(bits=3))
    assert _check_resumable(tmp_path, fingerprint, has_results=False) == fingerprint


def _lines(path):
    return path.read_text().split("\n")


def test_a_torn_last_line_is_dropped_before_appending(tmp_path):
    path = tmp_path / "results.jsonl"
    first = {"method": "dense", "seed": -1, "scores": {"brown": 49.1}}
    _append(path, first)
    with open(path, "a") as handle:
        handle.write('{"method": "gptq", "seed": 0, "scores": {"bro')  # killed mid-write
    scan = _scan_results(path)
    assert scan.records == [first]
    assert path.read_text().count("\n") == 1  # scanning changes nothing
    _repair_results(path, scan)
    second = {"method": "gptq", "seed": 0, "scores": {"brown": 60.0}}
    _append(path, second)
    assert _lines(path) == [json.dumps(first), json.dumps(second), ""]
    assert _scan_results(path).records == [first, second]


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    record = {"method": "gptq", "seed": 0, "scores": {"brown": 60.0}}
    path.write_text(json.dumps(record))  # killed between the record and its newline
    scan = _scan_results(path)
    assert scan.records == [record] and scan.torn_at is None
    _repair_results(path, scan)
    _append(path, {"method": "rtn", "seed": 0, "scores": {}})
    assert [r["method"] for r in _scan_results(path).records] == ["gptq", "rtn"]


@pytest.mark.parametrize("damaged", ['{"method": "gptq", "se', '["not", "a", "record"]', ""])
def test_a_damaged_line_before_the_last_is_refused_with_its_line(tmp_path, damaged):
    path = tmp_path / "results.jsonl"
    _append(path, {"method": "dense", "seed": -1, "scores": {}})
    with open(path, "a") as handle:
        handle.write(damaged + "\n")
    _append(path, {"method": "gptq", "seed": 0, "scores": {}})
    before = path.read_bytes()
    with pytest.raises(InvalidComparison, match=rf"{path}:2: damaged results line"):
        _scan_results(path)
    assert path.read_bytes() == before
