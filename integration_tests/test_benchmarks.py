"""Benchmarks that must keep running: their numbers are a benchmark's, not asserted.

A slow tier (each run is its own process, as the benchmarks measure it); the device
check's CPU mode runs in the unit tests (tests/test_device_check.py).
"""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_cost_curve_runs(capsys):
    """The cost-curve benchmark end to end at a toy size (its numbers are not asserted)."""
    spec = importlib.util.spec_from_file_location("cost_curve", BENCHMARKS / "cost_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--widths", "128", "--layers", "1", "--samples", "2", "--seq-len", "16",
                 "--group-size", "32", "--rounds", "1"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 128 |")]
    assert len(table) == 1 and len(table[0].split("|")) == 11


def test_oneshot_cost_runs_rotated_with_quantized_activations():
    """The side-by-side oneshot cost on the embedded model, rotated and with quantized
    activations, at a toy size: every method's row and its ratio to GPTQ are printed."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "oneshot_cost.py"), "--samples", "2", "--seq-len", "32",
         "--rounds", "1", "--methods", "gptq", "gptaq", "--rotation", "spinquant",
         "--rotation-block-size", "64", "--activation-bits", "8"],
        capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W4A8 g64, rotated (spinquant)" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| gptq |", "| gptaq |"))]
    assert len(rows) == 4  # both tables
