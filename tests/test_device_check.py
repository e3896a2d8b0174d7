"""The GPU device check in its tiny CPU mode, so it cannot rot while no GPU is at hand."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cpu_mode_writes_the_whole_table(device_check, tmp_path, monkeypatch):
    monkeypatch.delenv("RESCOMP_FULL_PRECISION_CACHE_DEVICE", raising=False)
    out = tmp_path / "out"
    code = device_check.main([
        "--device", "cpu", "--out", str(out), "--in-process",
        # one quick test keeps the unit-test stage (subprocess, --solver-device) exercised
        "--unit-tests", "tests/test_linalg.py", "--pytest-k", "test_factor_inverts",
    ])
    assert code == 0
    report = json.loads((out / "device_check.json").read_text())
    assert report["unit_tests"]["exit_code"] == 0 and report["unit_tests"]["passed"] == 2
    assert len(report["solver"]) == 6 and all(row["ok"] for row in report["solver"])
    rows = {row["method"]: row for row in report["oneshot"]}
    assert set(rows) == set(device_check.METHODS)
    for row in rows.values():
        assert "error" not in row, row
        assert row["wall_s"] > 0 and row["layers_timed"] == device_check.CPU_SHAPES[0].layers
        assert row["wall_x"] == pytest.approx(row["wall_s"] / rows["gptq"]["wall_s"])
    markdown = (out / "device_check.md").read_text()
    assert markdown.count("| tiny |") == len(device_check.METHODS)
    assert "gptaq_cae" in markdown and "Solver on the device vs CPU" in markdown


def test_cuda_without_cuda_is_one_clear_error(device_check, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        device_check.main(["--device", "cuda", "--out", str(tmp_path)])
    assert "sees no CUDA device; use --device cpu" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written

