"""The CPU benchmark's stored runs (benchmarks/results/cpu*.json) record the machine they ran on,
hold every goal's paired ratios, and are the runs README's table shows (bench_cpu.py --markdown)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_cpu.py"
STORED = sorted((ROOT / "benchmarks" / "results").glob("cpu*.json"))
SHARES = [f"share|{n}" for n in (2048, 4096, 8192, 16384)]  # the share aim holds for N >= 2048


def _goals() -> list[str]:
    """The benchmark's own list of goals (dtype|causal|mode keys), not a copy of it."""
    spec = importlib.util.spec_from_file_location("bench_cpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return [key for key, _, _ in bench.GOALS]


@pytest.mark.parametrize("path", STORED, ids=[p.stem for p in STORED])
def test_a_stored_run_records_its_machine_and_every_goal(path):
    run = json.loads(path.read_text())
    machine = run["machine"]
    # a result is only quoted with its machine: CPU model, instruction set, LLVM's name for the
    # host and for the target, the BLAS kernel, and the tiles used
    for key in ("cpu", "cpu_isa", "host_cpu_name", "llvm_cpu", "isa", "blas_kernel", "tiles",
                "threads"):
        assert machine.get(key), f"{path.name}: machine[{key!r}] missing"
    assert machine["threads"] == 2
    goals = _goals()
    assert set(run["paired"]) >= set(goals) | set(SHARES), path.name
    for key in goals:
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
    readme = (ROOT / "README.md").read_text().splitlines()
    # one table per machine, each under the line that names the machine
    blocks = printed.strip().split("\n\n")
    tables = [block.splitlines() for block in blocks[1::2]]
    for title, table in zip(blocks[::2], tables, strict=True):
        # ValueError: README does not name this machine, or shows other runs under it
        start = readme.index(table[0], readme.index(title))
        assert readme[start:start + len(table)] == table, (
            "README's CPU tables differ from the stored runs: paste `benchmarks/bench_cpu.py --markdown`")
    # one column per stored run, after the goal and its target
    assert sum(table[0].count("|") - 3 for table in tables) == len(STORED)
