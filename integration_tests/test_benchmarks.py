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
