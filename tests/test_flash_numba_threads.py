"""BLAS threads inside the Numba kernels (stage 06).

The fast kernels call BLAS's ?gemm (SciPy's OpenBLAS, or MKL when installed) from every Numba
thread, so BLAS must run on one thread inside them -- from the very first call of a fresh process,
when SciPy's BLAS may not be loaded yet. Each test runs in a fresh interpreter for that reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")
pytest.importorskip("threadpoolctl")

_SPY = """
import json, sys
import numpy as np
from threadpoolctl import threadpool_info
import attention_ref.flash_numba as fn

def blas_threads():
    return {d["filepath"]: d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"}

during = {}
def spy(name):
    kernel = getattr(fn, name)
    def wrapped(*args):
        during[name] = blas_threads()  # inside the call, just before the kernel runs
        return kernel(*args)
    setattr(fn, name, wrapped)

spy("_fwd_fast")
spy("_bwd_fast")
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((2, 300, 16)).astype(np.float32) for _ in range(3))
out, lse = fn.numba_flash_forward(q, k, v)
fn.numba_flash_backward(q, k, v, out, lse, out)
print(json.dumps({"during": during, "after": blas_threads()}))
"""


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=600)


def test_blas_limited_to_one_thread_from_the_first_call():
    res = _run(_SPY, OPENBLAS_NUM_THREADS="2", NUMBA_NUM_THREADS="2", ATTENTION_REF_BLAS="openblas")
    assert res.returncode == 0, res.stderr[-2000:]
    state = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("_fwd_fast", "_bwd_fast"):
        during = state["during"][name]
        # the BLAS the kernels call (SciPy's) is loaded and limited before the first kernel runs
        assert any("scipy" in path for path in during), during
        assert all(n == 1 for n in during.values()), (name, during)
    # the limit is lifted after the call
    scipy_libs = {p: n for p, n in state["after"].items() if "scipy" in p}
    assert scipy_libs and all(n == 2 for n in scipy_libs.values()), state["after"]


def test_no_openmp_loop_warnings_with_torch_imported():
    """With torch imported (its OpenMP runtime loaded), a multi-threaded OpenBLAS called from the
    kernels' threads printed "OpenBLAS Warning : Detect OpenMP Loop" once per gemm (1024 lines
    for this forward pass before the limit reached SciPy's BLAS)."""
    pytest.importorskip("torch")
    code = (
        "import torch\n"
        "import numpy as np\n"
        "from attention_ref.flash_numba import numba_flash_forward, numba_flash_backward\n"
        "rng = np.random.default_rng(0)\n"
        # E = 128: tile products large enough for OpenBLAS to use several threads if allowed
        "q, k, v = (rng.standard_normal((1, 2048, 128)).astype(np.float32) for _ in range(3))\n"
        "out, lse = numba_flash_forward(q, k, v)\n"
        "numba_flash_backward(q, k, v, out, lse, out)\n"
        "print('done')\n"
    )
    res = _run(code, OPENBLAS_NUM_THREADS="2", NUMBA_NUM_THREADS="2", OMP_NUM_THREADS="2",
               ATTENTION_REF_BLAS="openblas")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("done")
    assert res.stderr.count("Detect OpenMP Loop") == 0, res.stderr[-2000:]


def test_mkl_runs_sequential_inside_the_kernels():
    """MKL is loaded with its sequential layer (one thread per calling thread, no OpenMP runtime
    of its own) before its first call, whatever MKL_NUM_THREADS says."""
    from attention_ref.flash_numba import _mkl

    if _mkl() is None:
        pytest.skip("the mkl package is not installed (pip install attention_ref[mkl])")
    res = _run(_SPY.replace('d["num_threads"] for d', '(d["num_threads"], d.get("threading_layer")) for d'),
               MKL_NUM_THREADS="2", NUMBA_NUM_THREADS="2", ATTENTION_REF_BLAS="mkl")
    assert res.returncode == 0, res.stderr[-2000:]
    state = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("_fwd_fast", "_bwd_fast"):
        mkl = {p: v for p, v in state["during"][name].items() if "mkl" in p}
        assert mkl and all(v == [1, "sequential"] for v in mkl.values()), (name, state["during"])
