"""The fast kernels' exponential and row maximum must compile to vector instructions (stage 06).

``math.exp`` would be one scalar library call per logit; the kernels write e^x out so that LLVM
vectorises it. That is a property of the machine code, so the test reads it: a small function
around the kernels' ``_exp_sum`` is compiled in a fresh process for an AVX2-only CPU
(``NUMBA_CPU_NAME=haswell``) and, where the host has it, for AVX-512, with an empty Numba cache;
in the forward kernel's loop (``_exp_sum_max``) the row maximum must stay packed as well.
``benchmarks/inspect_codegen.py`` does the same for the whole kernels.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("numba")

_CHILD = r"""
import json, re
import numba as nb
import numpy as np
from attention_ref.flash_numba import (_FASTMATH, _exp_sum, _exp_sum_max,
                                      _prefer_target_vector_width, _row_max, _vector_bits)

@nb.njit(fastmath=_FASTMATH)
def rows(x, m, tau):
    total = x[0, 0] - x[0, 0]
    for r in range(x.shape[0]):
        total += _exp_sum(x[r], m, tau)
    return total

@nb.njit(fastmath=_FASTMATH)
def rows_as_in_the_kernels(x, m, tau):  # the kernels' vector width, the row maximum in the loop
    _prefer_target_vector_width()
    total = x[0, 0] - x[0, 0]
    for r in range(x.shape[0]):
        row_sum, row_max = _exp_sum_max(x[r], m, tau)
        total += row_sum + row_max
    return total

@nb.njit(fastmath=_FASTMATH)
def row_maxima(x):  # the forward kernel's row maximum, with its vector width
    _prefer_target_vector_width()
    total = x[0, 0] - x[0, 0]
    for r in range(x.shape[0]):
        total += _row_max(x[r])
    return total

out = {"vector_bits": _vector_bits(), "row_max": {}}
for dt in ("float32", "float64"):
    x = np.zeros((4, 512), dtype=dt)
    row_maxima(x)
    asm = row_maxima.inspect_asm(row_maxima.signatures[-1])
    kind = "s" if dt == "float32" else "d"
    out["row_max"][dt] = [l.strip() for l in asm.splitlines() if re.search(r"\bvmaxp" + kind + r"\b", l)]
for name, f in (("default", rows), ("kernels", rows_as_in_the_kernels)):
    for dt in ("float32", "float64"):
        x = np.zeros((4, 512), dtype=dt)
        f(x, x.dtype.type(0), x.dtype.type(0.125))
        asm = f.inspect_asm(f.signatures[-1])
        kind = "s" if dt == "float32" else "d"  # packed single / packed double
        rounding = [l for l in asm.splitlines() if re.search(r"\bv(round|rndscale)p" + kind + r"\b", l)]
        out[f"{name}|{dt}"] = {
            "rounding": rounding,
            "maxima": [l.strip() for l in asm.splitlines() if re.search(r"\bvmaxp" + kind + r"\b", l)],
            "packed_fma": len(re.findall(r"\bvfn?madd\w*p[sd]\b", asm)),
            "exp_calls": len(re.findall(r"call.*\bexpf?\b", asm)),
        }
print(json.dumps(out))
"""


def _compile_for(cpu: str | None, tmp_path) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("NUMBA_CPU_NAME", None)
    env.pop("NUMBA_CPU_FEATURES", None)
    if cpu:
        env.update(NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="")
    res = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _host_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and f" {flag}" in line for line in f)
    except OSError:
        return False


@pytest.mark.skipif(not _host_has("avx2"), reason="the CPU cannot run AVX2 code")
def test_exp_vectorises_on_avx2(tmp_path):
    """8 float32 (4 float64) per 256-bit ymm instruction, no call to a scalar exp."""
    code = _compile_for("haswell", tmp_path)
    assert code.pop("vector_bits") == 256
    for dt, lines in code.pop("row_max").items():  # the row maximum: packed maxima on ymm
        assert any("ymm" in line for line in lines), (dt, lines)
    for dt, c in code.items():
        assert c["rounding"], dt  # the exponential's loop was found
        # its main loop works on 256-bit registers (LLVM adds narrower loops for the remainder;
        # a float64 path left inside the float32 loop once made all its float32 work 128-bit)
        assert any("ymm" in line for line in c["rounding"]), (dt, c["rounding"])
        assert c["packed_fma"] >= 8 and c["exp_calls"] == 0, (dt, c)
        if dt.startswith("kernels"):  # the row maximum found in the same loop: packed too
            assert any("ymm" in line for line in c["maxima"]), (dt, c["maxima"])


@pytest.mark.skipif(not _host_has("avx512f"), reason="the CPU has no AVX-512")
def test_exp_vectorises_on_the_host(tmp_path):
    """On an AVX-512 host: packed registers (ymm or zmm: LLVM prefers 256-bit vectors on Intel);
    in the kernels 512-bit ones (zmm) unless the CPU is of the Skylake-SP family."""
    code = _compile_for(None, tmp_path)
    wide = code.pop("vector_bits") == 512
    for dt, lines in code.pop("row_max").items():
        assert any(("zmm" if wide else "ymm") in line for line in lines), (dt, lines)
    for key, c in code.items():
        assert any(re.search(r"[yz]mm", line) for line in c["rounding"]), (key, c["rounding"])
        assert c["packed_fma"] >= 8 and c["exp_calls"] == 0, (key, c)
        if wide and key.startswith("kernels"):
            assert any("zmm" in line for line in c["rounding"]), (key, c["rounding"])
            assert any("zmm" in line for line in c["maxima"]), (key, c["maxima"])
