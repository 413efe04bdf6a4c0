"""The CPU benchmark's stored runs (benchmarks/results/cpu*.json) record the machine they ran on,
hold every goal's paired ratios, and are the runs README's table shows (bench_cpu.py --markdown)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_cpu.py"
STORED = sorted((ROOT / "benchmarks" / "results").glob("cpu*.json"))
GOALS = ["float32|0|fwd", "float32|1|fwd", "float64|0|fwd", "float64|1|fwd", "float32|0|fwdbwd"]
SHARES = [f"share|{n}" for n in (2048, 4096, 8192, 16384)]


@pytest.mark.parametrize("path", STORED, ids=[p.stem for p in STORED])
def test_a_stored_run_records_its_machine_and_every_goal(path):
    run = json.loads(path.read_text())
    machine = run["machine"]
    # what the issue of speed on every machine asks each result to name: CPU model, instruction
    # set, LLVM's name for the host and for the target, the BLAS kernel, and the tiles used
    for key in ("cpu", "cpu_isa", "host_cpu_name", "llvm_cpu", "isa", "blas_kernel", "tiles",
                "threads"):
        assert machine.get(key), f"{path.name}: machine[{key!r}] missing"
    assert machine["threads"] == 2
    assert set(run["paired"]) >= set(GOALS) | set(SHARES), path.name
    for key in GOALS:
        q1, median, q3 = run["paired"][key]["ratio_quartiles"]
        assert 0 < q1 <= median <= q3, (path.name, key)
    for key in SHARES:
        q1, median, q3 = run["paired"][key]["share_quartiles"]
        assert 0 < q1 <= median <= q3 <= 1.5, (path.name, key)


def test_readme_shows_the_stored_runs():
    if not STORED:
        pytest.skip("no stored CPU run")
    printed = subprocess.run([sys.executable, str(BENCH), "--markdown"], capture_output=True,
                             text=True, check=True, cwd=ROOT).stdout
    table = [line for line in printed.splitlines() if line.startswith("|")]
    readme = (ROOT / "README.md").read_text().splitlines()
    start = readme.index(table[0])  # ValueError: README's table header is not the stored runs'
    assert readme[start:start + len(table)] == table, (
        "README's CPU table differs from the stored runs: paste `benchmarks/bench_cpu.py --markdown`")
    # one column per stored run, after the goal and its target
    assert table[0].count("|") - 3 == len(STORED)
