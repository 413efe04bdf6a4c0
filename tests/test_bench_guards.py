"""The benchmarks never replace a stored run (benchmarks/results/) with one that lacks its yardstick
(torch for bench_cpu.py, torch and transformers for bench_llama.py), and a --quick run goes to
benchmarks/results/quick/ instead of over the full one."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"


@pytest.fixture
def without(tmp_path):
    """An environment in which the named packages cannot be imported: a package of each name
    that raises ImportError, ahead of the real ones on the path (the scripts' workers too)."""
    def environment(*packages: str) -> dict[str, str]:
        for name in packages:
            (tmp_path / name).mkdir()
            (tmp_path / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
        return {**os.environ, "PYTHONPATH": str(tmp_path)}
    return environment


def _stored() -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in RESULTS.glob("*.json")}


def _refused(script: str, args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode != 0, (script, args, done.stdout[-500:])
    return done.stderr


def test_bench_cpu_without_torch_refuses_to_replace_a_stored_run(without):
    before = _stored()
    env = without("torch")
    for args in ([], ["--paired-only"], ["--blas", "openblas"]):
        assert "torch cannot be imported here" in _refused("bench_cpu.py", args, env), args
    assert _stored() == before


def test_bench_llama_without_transformers_refuses_to_replace_the_stored_run(without):
    before = _stored()
    assert "cannot be imported here" in _refused("bench_llama.py", [], without("transformers"))
    assert _stored() == before


def test_a_quick_cpu_run_never_replaces_a_stored_run(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_cpu", BENCHMARKS / "bench_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.output_path("native", None, False, None) == RESULTS / "cpu.json"
    assert bench.output_path("avx2", "openblas", False, None) == RESULTS / "cpu_avx2_openblas.json"
    for config, blas in (("native", None), ("avx2", None), ("native", "openblas")):
        assert bench.output_path(config, blas, True, None).parent == RESULTS / "quick"
    given = tmp_path / "cpu_elsewhere.json"
    assert bench.output_path("native", None, True, given) == given
