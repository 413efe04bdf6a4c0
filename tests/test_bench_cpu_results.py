"""The CPU benchmark's stored runs (benchmarks/results/cpu*.json) record the machine they ran on,
hold every goal's paired ratios, and are the runs README's table shows (bench_cpu.py --markdown)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_cpu.py"
STORED = sorted((ROOT / "benchmarks" / "results").glob("cpu*.json"))
SHARES = [f"share|{n}" for n in (2048, 4096, 8192, 16384)]  # the share aim holds for N >= 2048


def _bench():
    """The benchmark script as a module (its own goals and paths, not copies of them)."""
    spec = importlib.util.spec_from_file_location("bench_cpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _goals() -> list[str]:
    """The benchmark's list of goals (dtype|causal|mode keys)."""
    return [key for key, _, _ in _bench().GOALS]


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
    table = [line for line in printed.splitlines() if line.startswith("|")]
    readme = (ROOT / "README.md").read_text().splitlines()
    start = readme.index(table[0])  # ValueError: README's table header is not the stored runs'
    assert readme[start:start + len(table)] == table, (
        "README's CPU table differs from the stored runs: paste `benchmarks/bench_cpu.py --markdown`")
    # one column per stored run, after the goal and its target
    assert table[0].count("|") - 3 == len(STORED)


def test_a_quick_run_never_replaces_a_stored_run(tmp_path):
    bench = _bench()
    results = ROOT / "benchmarks" / "results"
    assert bench.output_path("native", None, False, None) == results / "cpu.json"
    assert bench.output_path("avx2", "openblas", False, None) == results / "cpu_avx2_openblas.json"
    for config, blas in (("native", None), ("avx2", None), ("native", "openblas")):
        assert bench.output_path(config, blas, True, None).parent == results / "quick"
    given = tmp_path / "cpu_elsewhere.json"
    assert bench.output_path("native", None, True, given) == given


def test_without_torch_a_run_refuses_to_replace_a_stored_run(tmp_path):
    # a torch that cannot be imported, ahead of the real one on the workers' path
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch in this test')\n")
    before = {path: path.read_bytes() for path in STORED}
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for args in ([], ["--paired-only"], ["--config", "avx2", "--blas", "openblas"]):
        done = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=120)
        assert done.returncode != 0, args
        assert "torch cannot be imported here" in done.stderr, (args, done.stderr[-500:])
    assert {path: path.read_bytes() for path in STORED} == before
