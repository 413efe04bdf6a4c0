"""benchmarks/compare_blas.py: the kernels' tile products through every BLAS found. A short
worker run checks each library's products against NumPy (inside the script) and records what it
ran; the stored results name their machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")
pytest.importorskip("scipy")
pytest.importorskip("threadpoolctl")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare_blas.py"
STORED = sorted((ROOT / "benchmarks" / "results").glob("blas_tiles*.json"))


def test_a_short_run_times_both_products_of_every_library_found():
    res = subprocess.run([sys.executable, str(SCRIPT), "--worker", "1", "2"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    run = json.loads(res.stdout.splitlines()[-1])
    assert "OpenBLAS (SciPy)" in run["libraries"]  # what the kernels call without MKL
    for name, per_dtype in run["gflops"].items():
        for dtype in ("float32", "float64"):
            for product in ("QK", "PV"):
                lo, median, hi = per_dtype[dtype][product]
                assert 0 < lo <= median <= hi, (name, dtype, product)
    assert run["tiles"]["float32"]["sum_keys"]  # float32 P V_j in the kernel's short sums


@pytest.mark.parametrize("path", STORED, ids=[p.stem for p in STORED])
def test_a_stored_run_names_its_machine_and_each_librarys_code_path(path):
    run = json.loads(path.read_text())
    for key in ("cpu", "isa", "llvm_cpu"):
        assert run["machine"].get(key), f"{path.name}: machine[{key!r}] missing"
    assert set(run["gflops"]) == set(run["libraries"])
    assert all(":" in kernel for kernel in run["libraries"].values())  # version: code path


def test_the_table_of_stored_runs_prints():
    res = subprocess.run([sys.executable, str(SCRIPT), "--table"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    for path in STORED:
        assert path.name in res.stdout
