"""The GPU benchmark's stored results redraw without a GPU (benchmarks/bench_gpu.py --plot-only)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
RESULTS = BENCH.parent / "results" / "gpu.json"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not RESULTS.exists(), reason="no stored GPU run")
def test_stored_run_is_complete_and_consistent():
    stored = json.loads(RESULTS.read_text())
    ok = [r for r in stored["rows"] if r["status"] == "ok"]
    assert {r["impl"] for r in ok} >= {"materialised", "tiled"}
    # the run is also a correctness check: both CuPy paths agree
    # (max |materialised - tiled| over the outputs; tolerances per dtype)
    tolerance = {"float32": 1e-5, "float16": 1e-3}
    checks = [r for r in stored["rows"] if r["status"] == "check"]
    assert checks
    for r in checks:
        assert r["ms"] < tolerance[r["dtype"]], r


@pytest.mark.skipif(not RESULTS.exists(), reason="no stored GPU run")
def test_plot_only_redraws_with_a_takeaway_title(monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("ATTENTION_REF_SAVE_FIGURES", "0")  # draw, but leave the committed figure
    bench = _bench()
    assert bench.main(["--plot-only"]) == 0
    title = bench._takeaway(json.loads(RESULTS.read_text())["rows"], "GPU")
    assert "faster than NumPy-style code" in title
