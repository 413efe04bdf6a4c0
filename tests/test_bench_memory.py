"""The benchmark's memory measurement sees what a call allocates (benchmarks/bench_cpu.py).

Before the allocator handed back the memory freed while the inputs were made, the output of a
call could reuse those pages and the growth read 0.0 MB. A size is checked, never a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py"
E = 64  # the benchmark's head size


def _peak_growth_mib(impl: str, N: int) -> float:
    run = subprocess.run([sys.executable, str(BENCH), "--worker", impl, "float32", "0", "fwd",
                          str(N), "1", "--memory"], capture_output=True, text=True, timeout=600,
                         check=True)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    growth = rows[-1]["peak_growth_mb"]
    if growth is None:
        pytest.skip("/proc/self/clear_refs is not writable here: no peak memory to reset")
    return growth


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_the_fast_kernel_is_seen_to_allocate_its_output_and_no_n_squared_matrix() -> None:
    N = 4096
    output_mib = N * E * 4 / 2**20
    growth = _peak_growth_mib("numba_fast", N)
    assert output_mib <= growth < N * N * 4 / 2**20 / 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_the_materialised_path_is_seen_to_allocate_n_squared_matrices() -> None:
    N = 1024
    assert _peak_growth_mib("materialised", N) >= N * N * 4 / 2**20
