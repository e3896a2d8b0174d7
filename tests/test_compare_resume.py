"""Resuming a comparison: only runs of the same setting may share a results file."""

import json

import pytest

from rescomp_harness.compare import CompareConfig, _check_resumable


def _previous_run(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config.__dict__))
    (tmp_path / "results.jsonl").write_text(json.dumps({"method": "gptq", "seed": 0}) + "\n")


def test_changed_setting_is_refused_with_what_changed(tmp_path):
    _previous_run(tmp_path, CompareConfig(bits=3, output=str(tmp_path)))
    with pytest.raises(ValueError, match=r"bits: 3 -> 4.*another --output"):
        _check_resumable(tmp_path, CompareConfig(bits=4, output=str(tmp_path)))


def test_more_seeds_or_methods_extend_the_run(tmp_path):
    _previous_run(tmp_path, CompareConfig(seeds=[0], methods=["gptq"], output=str(tmp_path)))
    _check_resumable(tmp_path, CompareConfig(seeds=[0, 1, 2], output=str(tmp_path / "x")))


def test_fresh_directory_is_fine(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"bits": 8}))  # no results yet
    _check_resumable(tmp_path, CompareConfig(bits=3))
