"""Does the fast kernels' exponential vectorise for the CPU Numba compiles for?

Compiles ``_fwd_fast`` and ``_bwd_fast`` (float32 and float64) in a fresh process with an empty
Numba cache and reads the machine code: the loop that rounds t log2(e) to an integer (``floor``:
``vroundps``/``vrndscaleps`` on x86) is the exponential's loop; it is vectorised when that
instruction and the polynomial's FMAs work on packed registers (``ymm`` = 256-bit AVX2,
``zmm`` = 512-bit AVX-512) rather than on scalars (``ss``/``sd``).

    python benchmarks/inspect_codegen.py                       # what this machine compiles for
    python benchmarks/inspect_codegen.py --cpu haswell          # an AVX2-only target
    python benchmarks/inspect_codegen.py --cpu haswell --output benchmarks/results/codegen_avx2.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, re, sys
import numba as nb
import numpy as np
from numba import types as t
from attention_ref import flash_numba as fn

def loops(asm):
    # split into basic blocks at labels; keep the blocks that contain the rounding of t log2 e
    blocks, cur = [], []
    for line in asm.splitlines():
        if re.match(r"^\.?[A-Za-z0-9_$.]+:", line) and cur:
            blocks.append(cur); cur = []
        cur.append(line.strip())
    blocks.append(cur)
    return [b for b in blocks if any(re.match(r"v(round|rndscale)p[sd]", i) for i in b)]

def summary(block):
    text = "\n".join(block)
    rounding = " ".join(i for i in block if re.match(r"v(round|rndscale)p[sd]", i))
    return {
        "width": 512 if "zmm" in rounding else (256 if "ymm" in rounding else 128),
        "instructions": sum(1 for i in block if i and not i.startswith((".", "#")) and not i.endswith(":")),
        "packed_fma": len(re.findall(r"vfn?madd\w*p[sd]\s", text)),
        "scalar_fma": len(re.findall(r"vfn?madd\w*s[sd]\s", text)),
        "zmm": "zmm" in text, "ymm": "ymm" in text,
        "calls": len(re.findall(r"\bcall", text)),
    }

out = {"llvm_cpu": fn._target_isa()["llvm_cpu"], "isa": fn._target_isa()["isa"], "kernels": {}}
for dt in (t.float32, t.float64):
    a4, a5 = dt[:, :, :, ::1], dt[:, :, :, :, ::1]
    i64 = t.int64[::1]
    fwd = (t.int64, a4, a5, a5, dt, i64, t.int64, t.boolean, t.int64, t.int64, t.int64, t.int64, t.int64,
           a4, dt[:, :, ::1])
    bwd = (t.int64, a4, a5, a5, a4, dt[:, :, ::1], dt[:, :, ::1], dt, i64, t.int64, t.boolean, t.int64,
           t.int64, t.int64, t.int64, t.int64, dt[:, :, :, :, ::1], a5, a5)
    for name, kernel, sig in (("forward", fn._fwd_fast, fwd), ("backward", fn._bwd_fast, bwd)):
        kernel.compile(sig)
        asm = kernel.inspect_asm(kernel.signatures[-1])
        found = loops(asm)
        # the main loop is the widest (LLVM adds narrower epilogue loops for the remainder)
        best = max(found, key=lambda b: (summary(b)["width"], len(b))) if found else []
        out["kernels"][f"{name}|{dt}"] = {
            "exp_loops": [summary(b) for b in found], "exp_loop": summary(best) if best else None,
            "zmm_in_kernel": len(re.findall("zmm", asm)), "ymm_in_kernel": len(re.findall("ymm", asm)),
            "exp_loop_asm": best[:80],
        }
print(json.dumps(out))
"""


def inspect(cpu: str | None) -> dict:
    env = dict(os.environ)
    for var in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES"):
        env.pop(var, None)
    if cpu:
        env.update(NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="")
    with tempfile.TemporaryDirectory() as cache:
        env["NUMBA_CACHE_DIR"] = cache  # a cached kernel cannot be inspected: compile afresh
        res = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                             env=env, timeout=1200)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(res: dict) -> str:
    lines = [f"Numba target {res['llvm_cpu']} ({res['isa']})"]
    for key, k in res["kernels"].items():
        loop = k["exp_loop"]
        if loop is None:
            lines.append(f"  {key:18s} no exp loop found")
            continue
        width = {512: "zmm (512-bit)", 256: "ymm (256-bit)", 128: "xmm (128-bit)"}[loop["width"]]
        vectorised = loop["packed_fma"] > 0 and loop["scalar_fma"] == 0 and loop["calls"] == 0
        lines.append(f"  {key:18s} {len(k['exp_loops'])} exp loops; widest: "
                     f"{loop['instructions']} instructions, "
                     f"{loop['packed_fma']} packed FMAs on {width}, {loop['scalar_fma']} scalar "
                     f"FMAs, {loop['calls']} calls -> {'vectorised' if vectorised else 'NOT vectorised'}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cpu", help="LLVM CPU name to compile for (NUMBA_CPU_NAME), e.g. haswell")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    res = inspect(args.cpu)
    res["report"] = report(res)
    print(res["report"])
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
