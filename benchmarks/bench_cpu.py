"""CPU benchmark of attention implementations (stage 06): time, GFLOP/s, memory against N.

Every measurement runs in its own process (``--worker``), the processes are interleaved round by
round (one round = every configuration once, in a shuffled order), and the reported time is the
median over all rounds of the per-process timed calls. Ratios to torch are given as the ratio of
those medians and, to show the noise, as the range of the per-round ratios (each round times
both implementations within a few seconds of each other). Two threads everywhere
(``NUMBA_NUM_THREADS``, ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``torch.set_num_threads``),
one head, d = 64.

Configurations (``--config``):

``native``
    what the machine offers. ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` are removed from the
    workers' environment (they select a slower OpenBLAS kernel on some machines).
``avx2``
    an AVX2-only machine emulated on an AVX-512 one: Numba compiles for ``NUMBA_CPU_NAME=haswell``
    with that CPU's own features (``NUMBA_CPU_FEATURES=""``: AVX2 + FMA, no AVX-512), OpenBLAS
    runs its Haswell kernel (``OPENBLAS_CORETYPE=Haswell``), and torch is held to AVX2 as well
    (``ATEN_CPU_CAPABILITY=avx2`` for its own kernels, ``MKL_ENABLE_INSTRUCTIONS=AVX2`` for MKL's
    gemm -- torch's and the kernels' --, ``ONEDNN_MAX_CPU_ISA=AVX2``). Caches, clock and memory stay those of the host, so this
    checks code generation and the BLAS kernel, not a real AVX2 CPU's caches.

Implementations: ``materialised`` (attention_ref.dot_product + attention_ref.flash.
attention_backward), ``tiled_numpy`` (attention_ref.flash, FA-2, 128 x 128 blocks),
``numba_readable`` and ``numba_fast`` (attention_ref.flash_numba) and ``torch`` (CPU
``scaled_dot_product_attention`` with autograd for the backward pass) when torch is installed.
The slow ones are capped at N <= 4096 (materialised NumPy, tiled NumPy, readable kernel); the
``avx2`` configuration times only ``numba_fast`` and ``torch`` (what its ratios need).

FLOPs: 4 N^2 d per head forward (half when causal); the backward pass counts 2.5x that, so
forward + backward is 3.5x. "share of the BLAS rate" divides by the float32/float64 square matmul
rate (2048^3, 2 threads, the faster of NumPy's BLAS and torch's MKL) measured in the same run and
configuration (the best of one measurement per round).

BLAS: the fast kernels call MKL when the ``mkl`` package is installed, else SciPy's OpenBLAS
(``ATTENTION_REF_BLAS``); ``--blas openblas`` runs the workers with the latter.

Shared machines: other work can slow everything down several times over for minutes. Every
measurement process also times a tiny one-thread matmul (the "probe"); before each process the
driver waits up to ``--wait-quiet`` seconds for the probe to recover, and processes whose probe
fell below 80% of the run's best are kept in the JSON but left out of the medians and ratios.
Memory: growth of the peak resident set during one call (Linux /proc/self/clear_refs + VmHWM),
after a small warm-up call, with the inputs made and the allocator's freed memory handed back
(glibc ``malloc_trim``), so that the output cannot hide in pages the set-up freed; it counts the
output too. Growth below about 0.1 MB is below what this can resolve.

    python benchmarks/bench_cpu.py                    # native, full run, JSON + figures + table
    python benchmarks/bench_cpu.py --config avx2      # the AVX2 emulation -> cpu_avx2.json
    python benchmarks/bench_cpu.py --quick            # N <= 2048, one round -> results/quick/
    python benchmarks/bench_cpu.py --figures-only     # redraw figures from the JSON
    python benchmarks/bench_cpu.py --memory-only      # re-measure only the memory into the JSON
    python benchmarks/bench_cpu.py --table            # print the ratio tables of stored results
    python benchmarks/bench_cpu.py --paired-only --output benchmarks/results/cpu_<machine>.json
                                  # another machine: its description, BLAS rates and goals' ratios
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUICK_RESULTS = RESULTS / "quick"  # --quick runs (not kept in git)
FIGURES = ROOT / "figures"
D = 64
THREADS = 2
NS = [512, 1024, 2048, 4096, 8192, 16384]
CAPS = {"materialised": 4096, "tiled_numpy": 4096, "numba_readable": 4096}
IMPLS = ["materialised", "tiled_numpy", "numba_readable", "numba_fast", "torch"]
CONFIGS = {
    "native": {"set": {}, "impls": IMPLS, "output": "cpu.json"},
    "avx2": {
        "set": {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "",
                "OPENBLAS_CORETYPE": "Haswell", "ATEN_CPU_CAPABILITY": "avx2",
                "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
        "impls": ["numba_fast", "torch"], "output": "cpu_avx2.json",
    },
}
LABELS = {"materialised": "materialised NumPy", "tiled_numpy": "tiled NumPy (stage 05)",
          "numba_readable": "Numba readable", "numba_fast": "Numba fast", "torch": "torch SDPA"}


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _release_free_memory() -> None:
    """Hand the memory glibc's allocator keeps after frees back to the system, so that the
    measured call cannot reuse pages the input set-up freed (which made every call read 0.0 MB)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name)
    if hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make_call(impl: str, dtype: str, causal: bool, mode: str, N: int):
    """Return a zero-argument function running one measured call."""
    import numpy as np

    rng = np.random.default_rng(0)
    # (batch, heads, N, d) = (1, 1, N, 64): torch's CPU flash kernel needs 4-D inputs (3-D ones
    # silently take its materialising "math" path)
    q, k, v, do = (rng.standard_normal((1, 1, N, D)).astype(dtype) for _ in range(4))
    if impl == "torch":
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(THREADS)
        tq, tk, tv, tdo = (torch.from_numpy(x) for x in (q, k, v, do))
        if mode == "fwd":
            def call():
                with torch.no_grad():
                    return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        else:
            def call():
                a, b, c = (x.detach().requires_grad_() for x in (tq, tk, tv))
                out = F.scaled_dot_product_attention(a, b, c, is_causal=causal)
                out.backward(tdo)
                return a.grad
        return call
    if impl == "materialised":
        from attention_ref.dot_product import scaled_dot_product_attention
        from attention_ref.flash import attention_backward

        def call():
            out = scaled_dot_product_attention(q, k, v, is_causal=causal)
            if mode == "fwd":
                return out
            return attention_backward(q, k, v, do, is_causal=causal)
        return call
    if impl == "tiled_numpy":
        from attention_ref.flash import flash_attention, flash_attention_backward

        def call():
            out, lse = flash_attention(q, k, v, is_causal=causal, block_q=128, block_k=128,
                                       return_lse=True)
            if mode == "fwd":
                return out
            return flash_attention_backward(q, k, v, out, lse, do, is_causal=causal,
                                            block_q=128, block_k=128)
        return call
    if impl.startswith("numba_") or impl.startswith("step"):
        from attention_ref.flash_numba import numba_flash_backward, numba_flash_forward

        if impl.startswith("step"):
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from ablation_kernels import step

            n = int(impl[4:])
            q2, k2, v2 = q[0, 0], k[0, 0], v[0, 0]
            return lambda: step(n, q2, k2, v2)
        kernel = impl.split("_")[1]

        def call():
            out, lse = numba_flash_forward(q, k, v, is_causal=causal, kernel=kernel)
            if mode == "fwd":
                return out
            return numba_flash_backward(q, k, v, out, lse, do, is_causal=causal, kernel=kernel)
        return call
    raise ValueError(impl)


def probe_gflops() -> float:
    """A 0.05-second health check of the machine: the float32 1024^3 matmul rate (GFLOP/s) on
    THREADS threads (a slowed core slows every multi-threaded measurement). On a shared or
    virtual machine other work can slow everything down several times over; a timing taken
    while this probe is low is not a measurement of the code."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    c = np.empty_like(a)
    best = math.inf
    with threadpool_limits(THREADS, "blas"):
        for _ in range(4):
            t = time.perf_counter()
            np.matmul(a, a, out=c)
            best = min(best, time.perf_counter() - t)
    return 2 * 1024**3 / best / 1e9


def worker(impl: str, dtype: str, causal: bool, mode: str, Ns: list[int], reps: int,
           memory: bool) -> None:
    """Time (or measure the memory of) one implementation for several N; print JSON lines."""
    for N in Ns:
        t0 = time.perf_counter()
        if memory:
            # warm up (compile / load kernels, BLAS buffers) on a small problem first
            _make_call(impl, dtype, causal, mode, 256)()
            call = _make_call(impl, dtype, causal, mode, N)
            _release_free_memory()
            before = _rss_kb("VmRSS")
            ok = _reset_peak()
            call()
            peak = _rss_kb("VmHWM")
            print(json.dumps({"N": N, "peak_growth_mb": (peak - before) / 1024 if ok else None}),
                  flush=True)
            continue
        call = _make_call(impl, dtype, causal, mode, N)
        call()  # warm-up: compilation (or the disk cache), page faults
        first = time.perf_counter() - t0
        before = probe_gflops()
        time.sleep(SETTLE_S)  # the probe's BLAS threads spin on after it; let them sleep
        warm_up(call)  # and wake this machine up again (see SETTLE_S)
        times = []
        for _ in range(1 if N >= 8192 else reps):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        probe = min(before, probe_gflops())
        print(json.dumps({"N": N, "times_s": times, "first_call_s": first, "probe": probe}),
              flush=True)


def _square_matmul(dtype: str):
    """The square 2048^3 product on THREADS threads with the faster of the BLAS libraries at
    hand: NumPy's (OpenBLAS) and, when torch is installed, torch's (MKL). The kernels may call
    either (ATTENTION_REF_BLAS), so the ceiling is the better one."""
    import numpy as np

    a, b = (np.random.default_rng(i).standard_normal((2048, 2048)).astype(dtype) for i in range(2))
    c = np.empty_like(a)
    calls = {"numpy": lambda: np.matmul(a, b, out=c)}
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.set_num_threads(THREADS)
        ta, tb, tc = (torch.from_numpy(x) for x in (a, b, c))
        calls["torch"] = lambda: torch.matmul(ta, tb, out=tc)
    best = {}
    for name, call in calls.items():
        call()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        best[name] = min(times)
    return calls[min(best, key=best.get)]


def serve(impl: str, dtype: str, causal: bool, mode: str, N: int) -> None:
    """A persistent worker for paired timing: after two warm-up calls it prints "ready", then
    per "go" line on stdin runs untimed calls for WARM_S seconds, then one timed call, and prints its seconds. ``impl="matmul"`` is the
    square 2048^3 BLAS product (the machine's ceiling)."""
    if impl == "matmul":
        call = _square_matmul(dtype)
    else:
        call = _make_call(impl, dtype, causal, mode, N)
    call()
    call()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        warm_up(call)  # untimed: the calls after an idle pause are slow (see SETTLE_S)
        t = time.perf_counter()
        call()
        print(repr(time.perf_counter() - t), flush=True)


def _describe_worker() -> None:
    """Print what this process's environment runs on: CPU, Numba target, BLAS, tiles, torch."""
    import llvmlite.binding as llvm
    import numba
    import numpy
    import scipy.linalg.cython_blas  # noqa: F401  (the BLAS the kernels call)
    from threadpoolctl import threadpool_info

    from attention_ref import flash_numba

    flags = ""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    target = flash_numba._target_isa()
    info = {
        "cpu": flash_numba._cpu_model(),
        "cpu_isa": "avx512" if " avx512f" in flags else ("avx2" if " avx2" in flags else "other"),
        "host_cpu_name": llvm.get_host_cpu_name(),
        "llvm_cpu": target["llvm_cpu"], "isa": target["isa"],
        "blas_kernel": target["blas"],
        "blas": [{k: d.get(k) for k in ("internal_api", "prefix", "architecture", "num_threads",
                                         "version")} for d in threadpool_info()],
        "l2_kib": flash_numba._l2_bytes() // 1024,
        "tiles": {f"{dt}|{d}": [c["block_q"], c["block_k"], c["source"]]
                  for dt in ("float32", "float64") for d in ("forward", "backward")
                  for c in [flash_numba.tile_sizes(dt, d)]},
        "numpy": numpy.__version__, "numba": numba.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["torch_blas"] = "mkl" if torch.backends.mkl.is_available() else "other"
    except ImportError:
        info["torch"] = None
    print(json.dumps(info))


# ---------------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------------
def _env(config: str = "native") -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES",
                "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                "ATTENTION_REF_TILES"):
        env.pop(var, None)
    env.update(NUMBA_NUM_THREADS=str(THREADS), OMP_NUM_THREADS=str(THREADS),
               OPENBLAS_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    env.update(CONFIGS[config]["set"])
    return env


def _torch_available(config: str) -> bool:
    """Whether the workers of this configuration can import torch (the ratios need it)."""
    return subprocess.run([sys.executable, "-c", "import torch"], capture_output=True,
                          env=_env(config)).returncode == 0


def _run_worker(config, impl, dtype, causal, mode, Ns, reps=3, memory=False, timeout=900):
    cmd = [sys.executable, __file__, "--worker", impl, dtype, str(int(causal)), mode,
           ",".join(map(str, Ns)), str(reps)] + (["--memory"] if memory else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(config), timeout=timeout)
    if res.returncode != 0:
        print(f"  ! {impl} {dtype} causal={causal} {mode}: {res.stderr.strip()[-300:]}", flush=True)
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def machine_info(config: str | None = None) -> dict:
    """The machine and what the kernels run on, as seen by a worker of this configuration (or by
    this process when ``config`` is None)."""
    if config is None:
        import io
        from contextlib import redirect_stdout

        buf = io.StringIO()
        with redirect_stdout(buf):
            _describe_worker()
        info = json.loads(buf.getvalue())
    else:
        res = subprocess.run([sys.executable, __file__, "--describe"], capture_output=True,
                             text=True, env=_env(config))
        info = json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr[-500:]}
        info["config"] = config
        info["environment"] = CONFIGS[config]["set"]
        info["removed_env"] = {v: os.environ.get(v) for v in ("OPENBLAS_CORETYPE",
                                                               "OPENBLAS_L2_SIZE")
                               if os.environ.get(v) is not None and config == "native"}
    info.update(cores=os.cpu_count(), python=platform.python_version(), threads=THREADS, d=D)
    return info


def _ceiling(config: str, rounds: int) -> dict:
    """BLAS matmul rates (GFLOP/s): the square 2048^3 product on all threads (the machine's
    ceiling: the faster of NumPy's BLAS and torch's MKL, both recorded), the attention-shaped
    N x E @ E x N product (N = 2048: an N x N result written for
    only E = 64 multiply-adds per entry), and the fast kernel's own tile products Q_i K_j^T and
    P V_j at this machine's tiles through the kernels' own gemm (the BLAS they call), one thread
    each (as inside the kernel), times THREADS."""
    code = (
        "import json, time, numpy as np, numba as nb\n"
        "from attention_ref import flash_numba as fn\n"
        "def rate(a, b, reps, call=None):\n"
        "    c = np.empty((a.shape[0], b.shape[1]), a.dtype)\n"
        "    call = call or (lambda: np.matmul(a, b, out=c)); call(); best = 1e9\n"
        "    for _ in range(reps):\n"
        "        t = time.perf_counter(); call(); best = min(best, time.perf_counter() - t)\n"
        "    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9\n"
        "@nb.njit\n"
        "def tile(gemm, a, b, c, trans_b, ab, reps):\n"
        "    for _ in range(reps):\n"
        "        fn._gemm(gemm, a, b, c, False, trans_b, ab)\n"
        "def tile_rate(a, b, trans_b, reps=200):\n"
        "    c = np.empty((a.shape[0], b.shape[0] if trans_b else b.shape[1]), a.dtype)\n"
        "    ab = np.array([1, 0], a.dtype); g = fn._blas()[a.dtype.name]\n"
        "    return rate(a, b.T if trans_b else b, 3, lambda: tile(g, a, b, c, trans_b, ab, reps)) * reps\n"
        "out = {'kernel_blas': fn._blas()['name']}\n"
        "rng = np.random.default_rng(0)\n"
        "try:\n"
        "    import torch; torch.set_num_threads(" + str(THREADS) + ")\n"
        "except ImportError:\n"
        "    torch = None\n"
        "for dt in ('float32', 'float64'):\n"
        "    a, b = (rng.standard_normal((2048, 2048)).astype(dt) for _ in range(2))\n"
        "    out[dt + '_numpy'] = rate(a, b, 5)\n"
        "    if torch is not None:\n"
        "        ta, tb = torch.from_numpy(a), torch.from_numpy(b); tc = torch.empty_like(ta)\n"
        "        out[dt + '_torch'] = rate(a, b, 5, lambda: torch.matmul(ta, tb, out=tc))\n"
        "    out[dt] = max(out[dt + '_numpy'], out.get(dt + '_torch', 0.0))\n"
        f"    q, k = (rng.standard_normal((2048, {D})).astype(dt) for _ in range(2))\n"
        "    out[dt + '_Nx64'] = rate(q, np.ascontiguousarray(k.T), 10)\n"
        "    bq, bk = (fn.tile_sizes(dt)[x] for x in ('block_q', 'block_k'))\n"
        "    qi, kj, p = q[:bq].copy(), k[:bk].copy(), rng.standard_normal((bq, bk)).astype(dt)\n"
        "    with fn._single_threaded_blas():\n"
        f"        out[dt + '_tile_QK'] = {THREADS} * tile_rate(qi, kj, True)\n"
        f"        out[dt + '_tile_PV'] = {THREADS} * tile_rate(p, kj, False)\n"
        "    out[dt + '_tiles'] = f'{bq}x{bk}'\n"
        "print(json.dumps(out))\n"
    )
    runs = []
    for _ in range(rounds):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=_env(config))
        runs.append(json.loads(res.stdout))
    return {key: (statistics.median(r[key] for r in runs) if not isinstance(runs[0][key], str)
                  else runs[0][key]) for key in runs[0]}


QUIET_FRACTION = 0.8
# After a multi-threaded call, the thread pools of OpenBLAS (pthreads: about 0.1 s of spinning
# and sched_yield) and of OpenMP keep their threads busy-waiting for the next call; a call of
# another library in that window shares the cores with them. Every switch between libraries
# waits this long first. The pause has its own cost on this kind of (virtual) machine: the first
# call after 0.3 s idle took 20-29 ms instead of 6.5 ms (fast kernel, N = 2048), and the second
# was still slow: 5.53 ms against 5.05 ms in a steady loop (21 rounds, Sapphire Rapids VM), while
# after 50 ms of untimed calls it took 5.02 ms. One untimed call warmed a 53 ms matmul but not a
# 5 ms kernel, and so favoured the longer call; every pause is followed by untimed calls for WARM_S
# instead, the same time for every implementation.
SETTLE_S = 0.3
WARM_S = 0.1


def warm_up(call) -> None:
    """Untimed calls for WARM_S seconds (at least one): the state a timed call starts from."""
    start = time.perf_counter()
    call()
    while time.perf_counter() - start < WARM_S:
        call()


class QuietGate:
    """Before each measurement process: wait (up to ``wait_s`` seconds) until the machine probe,
    taken in this (driver) process, is back within QUIET_FRACTION of its best in this run."""

    def __init__(self, wait_s: float):
        self.wait_s = wait_s
        self.best = 0.0

    def saw(self, probe: float) -> None:
        self.best = max(self.best, probe)

    def wait(self) -> None:
        start = time.time()
        while True:
            probe = probe_gflops()
            self.saw(probe)
            if probe >= QUIET_FRACTION * self.best or time.time() - start > self.wait_s:
                return
            time.sleep(3)


def _flops(N: int, causal: bool, mode: str) -> float:
    f = 4.0 * N * N * D * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwdbwd" else 1.0)


def measure_memory(config: str, impls: list[str], Ns: list[int]) -> dict:
    """Peak memory growth (MB) of one forward call without mask: one process per (impl, dtype)."""
    print(f"[{config}] memory ...", flush=True)
    memory = {}
    for impl in impls:
        for dt in ("float32", "float64"):
            cap = 16384 if impl in ("materialised", "numba_fast", "torch") else 2048
            ns = [n for n in Ns if n <= cap]
            rows = _run_worker(config, impl, dt, False, "fwd", ns, memory=True)
            memory[f"{impl}|{dt}"] = {str(r["N"]): r["peak_growth_mb"] for r in rows}
    return memory


def run(config: str, quick: bool, rounds: int, only: list[str] | None = None,
        previous: dict | None = None, ablation: bool = True, wait_s: float = 60.0) -> dict:
    have_torch = _torch_available(config)
    impls = [i for i in (only or CONFIGS[config]["impls"]) if i != "torch" or have_torch]
    Ns = [n for n in NS if not quick or n <= 2048]
    configs = [(impl, dt, causal, mode) for impl in impls for dt in ("float32", "float64")
               for causal in (False, True) for mode in ("fwd", "fwdbwd")]
    started = time.time()
    print(f"[{config}] machine ...", flush=True)
    result = {"config": config, "machine": machine_info(config),
              "ceiling_gflops": _ceiling(config, 1), "timing": {}, "memory": {}, "ablation": {},
              "compile": {}}
    if previous is not None:  # --only: keep the other implementations' rows of an earlier run
        for part in ("timing", "memory", "ablation", "compile"):
            result[part] = {k: v for k, v in previous.get(part, {}).items()
                            if k.split("|")[0] not in impls}
        result["merged_from_earlier_run"] = sorted({k.split("|")[0] for k in result["timing"]})
    print(json.dumps(result["machine"], indent=1), "\nceiling", result["ceiling_gflops"], flush=True)
    raw: dict[str, dict[int, list[dict | None]]] = {}
    gate = QuietGate(wait_s)
    for r in range(rounds):
        order = configs[:]
        random.Random(r).shuffle(order)
        for impl, dt, causal, mode in order:
            ns = [n for n in Ns if n <= CAPS.get(impl, max(Ns))]
            if r > 1:
                ns = [n for n in ns if n <= 8192]  # 16K: two rounds are enough
            key = f"{impl}|{dt}|{int(causal)}|{mode}"
            gate.wait()
            for row in _run_worker(config, impl, dt, causal, mode, ns):
                per_round = raw.setdefault(key, {}).setdefault(row["N"], [])
                per_round.extend([None] * (r + 1 - len(per_round)))
                per_round[r] = {"times": row["times_s"], "probe": row.get("probe", 0.0)}
        gate.wait()  # the ceiling is a best case: the highest of one measurement per round
        again = _ceiling(config, 1)
        result["ceiling_gflops"] = {k: max(v, again[k]) if not isinstance(v, str) else v
                                    for k, v in result["ceiling_gflops"].items()}
        print(f"[{config}] round {r + 1}/{rounds} done after {time.time() - started:.0f} s "
              f"(driver's machine probe: best {gate.best:.0f} GFLOP/s)", flush=True)
    # A process whose probe fell below QUIET_FRACTION of the best probe of the run was slowed
    # by other work on the machine: its times are kept in the JSON but left out of the medians
    # (unless that would leave nothing).
    probes = [cell["probe"] for per_n in raw.values() for cells in per_n.values()
              for cell in cells if cell]
    threshold = QUIET_FRACTION * max(probes, default=0.0)
    result["quiet"] = {"probe_best_gflops": max(probes, default=0.0),
                       "threshold_gflops": threshold,
                       "processes": len(probes),
                       "kept": sum(p >= threshold for p in probes)}
    for key, per_n in raw.items():
        impl, dt, causal, mode = key.split("|")
        for N, cells in sorted(per_n.items()):
            quiet = [c for c in cells if c and c["probe"] >= threshold] or [c for c in cells if c]
            times = [t for c in quiet for t in c["times"]]
            ms = 1e3 * statistics.median(times)
            gf = _flops(N, causal == "1", mode) / (ms * 1e6)
            result["timing"].setdefault(key, {})[str(N)] = {
                "median_ms": ms, "runs": len(times), "gflops": gf,
                "share_of_ceiling": gf / result["ceiling_gflops"][dt],
                "round_median_ms": [1e3 * statistics.median(c["times"]) if c else None
                                    for c in cells],
                "round_probe_gflops": [c["probe"] if c else None for c in cells],
                "quiet_rounds": len(quiet),
            }
    # ratio to torch from the same run: of the medians, and the range over the rounds in which
    # both processes ran on a quiet machine
    for key, per_n in result["timing"].items():
        impl, dt, causal, mode = key.split("|")
        tkey = f"torch|{dt}|{causal}|{mode}"
        for N, row in per_n.items():
            theirs = result["timing"].get(tkey, {}).get(N)
            if theirs and impl != "torch":
                row["ratio_to_torch"] = row["median_ms"] / theirs["median_ms"]
                pairs = list(zip(row["round_median_ms"], theirs["round_median_ms"],
                                 row["round_probe_gflops"], theirs["round_probe_gflops"],
                                 strict=False))
                per_round = [a / b for a, b, pa, pb in pairs
                             if a and b and min(pa, pb) >= threshold]
                per_round = per_round or [a / b for a, b, _, _ in pairs if a and b]
                if per_round:
                    row["ratio_to_torch_rounds"] = [min(per_round), max(per_round)]
    result["memory"].update(measure_memory(config, impls, Ns))
    result["compile"] = measure_compile(config)
    print(f"[{config}] paired ratios ...", flush=True)
    result["paired"] = run_paired(config, have_torch)
    result["elapsed_s"] = time.time() - started
    if not ablation:
        result["ablation"] = (previous or {}).get("ablation", {})
        return result
    # ablation: the steps from plain loops to the fast kernel (float32, N = 4096, forward)
    print(f"[{config}] ablation ...", flush=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ablation_kernels import STEPS

    n_abl = 2048 if quick else 4096
    abl: dict[int, list[tuple[list[float], float]]] = {}
    for r in range(1 if quick else 3):
        order = list(STEPS)
        random.Random(100 + r).shuffle(order)
        for s in order:
            gate.wait()
            for row in _run_worker(config, f"step{s}", "float32", False, "fwd", [n_abl], reps=7):
                abl.setdefault(s, []).append((row["times_s"], row.get("probe", 0.0)))
    best_probe = max((p for cells in abl.values() for _, p in cells), default=0.0)
    for s, cells in sorted(abl.items()):
        quiet = ([ts for ts, p in cells if p >= QUIET_FRACTION * best_probe]
                 or [ts for ts, _ in cells])
        ms = 1e3 * statistics.median([t for ts in quiet for t in ts])
        result["ablation"][str(s)] = {"what": STEPS[s], "N": n_abl, "median_ms": ms,
                                      "gflops": _flops(n_abl, False, "fwd") / (ms * 1e6),
                                      "quiet_processes": len(quiet)}
    result["elapsed_s"] = time.time() - started
    return result


def paired(config: str, impls: list[str], dtype: str, causal: bool, mode: str, N: int,
           pairs: int) -> dict[str, list[float]]:
    """Time several implementations call by call in turn, each in its own warm process.

    On a shared or virtual machine the speed available to a process drifts by 2x and more within
    seconds, so times taken minutes apart do not compare. Here the implementations alternate
    (A B, B A, A B, ...) with a SETTLE_S pause before every call (so that the other library's
    idle threads have stopped spinning), and every ratio is taken within one such pair: both
    calls saw nearly the same machine."""
    procs = {}
    try:
        for impl in impls:  # started one at a time: warm-ups never overlap
            proc = subprocess.Popen(
                [sys.executable, __file__, "--serve", impl, dtype, str(int(causal)), mode, str(N)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(config))
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"worker {impl} {dtype} N={N} failed to start")
            procs[impl] = proc
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for i in range(pairs):
            for impl in (impls if i % 2 == 0 else impls[::-1]):
                time.sleep(SETTLE_S)
                procs[impl].stdin.write("go\n")
                procs[impl].stdin.flush()
                times[impl].append(float(procs[impl].stdout.readline()))
        return times
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait(timeout=60)


def _quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return [q[0], statistics.median(values), q[2]]


def run_paired(config: str, have_torch: bool) -> dict:
    """The goals' ratios, each from paired calls (see ``paired``): the fast kernel against
    torch at N = 4096, and against the square BLAS matmul (the share of its rate) for
    N >= 2048."""
    out = {}
    if have_torch:
        for key, _, _ in GOALS:
            dt, causal, mode = key.split("|")
            t = paired(config, ["numba_fast", "torch"], dt, causal == "1", mode, 4096, 21)
            ratios = [a / b for a, b in zip(t["numba_fast"], t["torch"], strict=True)]
            out[key] = {"N": 4096, "numba_fast_ms": 1e3 * statistics.median(t["numba_fast"]),
                        "torch_ms": 1e3 * statistics.median(t["torch"]),
                        "ratio_quartiles": _quartiles(ratios), "pairs": len(ratios)}
            print(f"  paired {key}: ratio {out[key]['ratio_quartiles'][1]:.2f}", flush=True)
    for N, pairs in ((2048, 21), (4096, 21), (8192, 9), (16384, 5)):
        t = paired(config, ["numba_fast", "matmul"], "float32", False, "fwd", N, pairs)
        shares = [(_flops(N, False, "fwd") / a) / (2 * 2048**3 / b)
                  for a, b in zip(t["numba_fast"], t["matmul"], strict=True)]
        out[f"share|{N}"] = {"N": N, "numba_fast_ms": 1e3 * statistics.median(t["numba_fast"]),
                             "matmul_gflops": statistics.median(2 * 2048**3 / b / 1e9
                                                                for b in t["matmul"]),
                             "share_quartiles": _quartiles(shares), "pairs": len(shares)}
        print(f"  paired share N={N}: {out[f'share|{N}']['share_quartiles'][1]:.2f}", flush=True)
    return out


def measure_compile(config: str) -> dict:
    """Seconds the first call costs in a fresh process with a warm disk cache, minus a warm call."""
    code = (
        "import time, json, numpy as np\n"
        "from attention_ref.flash_numba import numba_flash_forward, numba_flash_backward\n"
        "out = {}\n"
        "for dt in ('float32', 'float64'):\n"
        "    q = np.ones((1, 64, 64), dt)\n"
        "    t = time.perf_counter(); o, l = numba_flash_forward(q, q, q)\n"
        "    numba_flash_backward(q, q, q, o, l, o); first = time.perf_counter() - t\n"
        "    t = time.perf_counter(); o, l = numba_flash_forward(q, q, q)\n"
        "    numba_flash_backward(q, q, q, o, l, o); warm = time.perf_counter() - t\n"
        "    out[dt] = first - warm\n"
        "print(json.dumps(out))\n"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, env=_env(config))
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                      text=True, env=_env(config)).stdout) for _ in range(3)]
    return {dt: statistics.median(r[dt] for r in runs) for dt in runs[0]}


# ---------------------------------------------------------------------------------------------
# report and figures
# ---------------------------------------------------------------------------------------------
GOALS = [
    ("float32|0|fwd", 1.0, "forward, float32, no mask"),
    ("float32|1|fwd", 0.7, "forward, float32, causal"),
    ("float64|0|fwd", 0.85, "forward, float64, no mask"),
    ("float64|1|fwd", 0.55, "forward, float64, causal"),
    ("float32|0|fwdbwd", 1.0, "forward + backward, float32, no mask"),
]
GOAL_SHARE = 0.7


def describe_machine(m: dict) -> str:
    torch_part = (f"; torch {m.get('torch')} ({m.get('torch_cpu_capability')}, "
                  f"{m.get('torch_blas')})" if m.get("torch") else "")
    return (f"{m.get('cpu')} ({m.get('cpu_isa')}, LLVM host {m.get('host_cpu_name')}), "
            f"{m.get('cores')} cores, {m.get('threads')} threads; Numba compiles for "
            f"{m.get('llvm_cpu')} ({m.get('isa')}); BLAS {m.get('blas_kernel')}, L2 "
            f"{m.get('l2_kib')} KiB{torch_part}")


def ratio_table(res: dict, N: str = "4096") -> str:
    """The goals against the measured ratios (one configuration). From the paired calls when
    the run has them (median and quartiles of the per-pair ratios), else from the medians."""
    t = res["timing"]
    pairs = res.get("paired", {})
    lines = [f"[{res.get('config', 'native')}] {describe_machine(res['machine'])}",
             f"{'':44s} {'goal':>7s} {'ratio':>6s} {'spread':>12s} {'Numba':>8s} {'other':>9s}"]
    for key, goal, what in GOALS:
        p = pairs.get(key)
        if p:
            q1, ratio, q3 = p["ratio_quartiles"]
            spread, mine, theirs = f"{q1:.2f}-{q3:.2f}", p["numba_fast_ms"], p["torch_ms"]
        else:
            a = t.get(f"numba_fast|{key}", {}).get(N)
            b = t.get(f"torch|{key}", {}).get(N)
            if not (a and b):
                continue
            ratio = a["median_ms"] / b["median_ms"]
            lo, hi = a.get("ratio_to_torch_rounds", [ratio, ratio])
            spread, mine, theirs = f"{lo:.2f}-{hi:.2f}*", a["median_ms"], b["median_ms"]
        lines.append(f"{what + ', N=' + N + ', vs torch':44s} {'<=' + format(goal, '.2f'):>7s} "
                     f"{_against(ratio, goal, 2, ratio <= goal):>6s} {spread:>12s} {mine:6.1f}ms {theirs:7.1f}ms"
                     f"  {'met' if ratio <= goal else 'not met'}")
    for n in ("2048", "4096", "8192", "16384"):
        p = pairs.get(f"share|{n}")
        if p:
            q1, share, q3 = p["share_quartiles"]
            spread, rate, ceil = f"{q1:.2f}-{q3:.2f}", _flops(int(n), False, "fwd") / (
                p["numba_fast_ms"] * 1e6), p["matmul_gflops"]
        else:
            a = t.get("numba_fast|float32|0|fwd", {}).get(n)
            if not a:
                continue
            share, spread, rate = a["share_of_ceiling"], "*", a["gflops"]
            ceil = res["ceiling_gflops"]["float32"]
        lines.append(f"{'share of the f32 matmul rate, N=' + n:44s} {'>=' + format(GOAL_SHARE, '.2f'):>7s} "
                     f"{_against(share, GOAL_SHARE, 2, share >= GOAL_SHARE):>6s} {spread:>12s} {rate:5.0f}GF/s {ceil:5.0f}GF/s"
                     f"  {'met' if share >= GOAL_SHARE else 'not met'}")
    lines.append("spread: quartiles of the ratios of paired calls (each pair: the two "
                 "implementations called back to back)" if pairs else
                 "* range over rounds of separate processes (no paired calls in this run)")
    return "\n".join(lines)


def _against(value: float, goal: float, digits: int, met: bool) -> str:
    """value with ``digits`` decimals, one more where it misses the goal but would print as it
    (a share of 69.8% is "69.8% (not met)", not "70% (not met)")."""
    text = f"{value:.{digits}f}"
    if not met and text == f"{goal:.{digits}f}":
        text = f"{value:.{digits + 1}f}"
    return text


def markdown_table(results: dict[str, dict]) -> str:
    """README's tables: one per machine (LLVM's name for the host CPU), each under a line naming
    it, with one column per configuration measured there (paired ratios: median and quartiles)."""
    machines: dict[str, dict[str, dict]] = {}
    for name, res in results.items():
        machines.setdefault(res["machine"].get("host_cpu_name", "?"), {})[name] = res
    parts = []
    for host, runs in machines.items():
        m = next(iter(runs.values()))["machine"]
        parts.append(f"**{m.get('cpu', '?')}, LLVM host `{host}` ({m.get('cpu_isa', '?')}), "
                     f"{m.get('cores', '?')} cores, L2 {m.get('l2_kib', '?')} KiB per core**\n\n"
                     + _markdown_one_machine(runs))
    return "\n\n".join(parts)


def _markdown_one_machine(results: dict[str, dict]) -> str:
    """One machine's table for markdown_table."""
    names = list(results)

    def column(machine: dict) -> str:
        label = f"{machine.get('isa', '?').upper()}: {machine.get('llvm_cpu')}, {machine.get('blas_kernel')}"
        tiles = machine.get("tiles", {})
        if any(t[2] != "rule" for t in tiles.values()):  # say so where the rule did not choose
            label += ", tiles " + " / ".join(
                f"{dt} {tiles[f'{dt}|forward'][0]}x{tiles[f'{dt}|forward'][1]} ({tiles[f'{dt}|forward'][2]})"
                for dt in ("float32", "float64") if f"{dt}|forward" in tiles)
        return label

    head = ["goal (N = 4096 unless stated)", "target"] + [column(results[n]["machine"]) for n in names]
    rows = [head, ["---"] * len(head)]
    for key, goal, what in GOALS:
        row = [f"{what}: time / torch's", f"≤ {goal:.2f}×"]
        for n in names:
            p = results[n].get("paired", {}).get(key)
            if not p:
                row.append("—")
                continue
            q1, med, q3 = p["ratio_quartiles"]
            verdict = "" if med <= goal else " (not met)"
            row.append(f"{_against(med, goal, 2, med <= goal)}×{verdict} ({q1:.2f}–{q3:.2f}; {p['numba_fast_ms']:.1f} vs "
                       f"{p['torch_ms']:.1f} ms)")
        rows.append(row)
    for N in ("2048", "4096", "8192", "16384"):
        row = [f"share of the float32 square-matmul rate, N = {N}", f"≥ {100 * GOAL_SHARE:.0f}%"]
        for n in names:
            p = results[n].get("paired", {}).get(f"share|{N}")
            if not p:
                row.append("—")
                continue
            q1, med, q3 = p["share_quartiles"]
            verdict = "" if med >= GOAL_SHARE else " (not met)"
            row.append(f"{_against(100 * med, 100 * GOAL_SHARE, 0, med >= GOAL_SHARE)}%{verdict} ({100 * q1:.0f}–{100 * q3:.0f}%; of "
                       f"{p['matmul_gflops']:.0f} GFLOP/s)")
        rows.append(row)
    row = ["extra peak memory, N = 16384, float32", "—"]
    for n in names:
        mem = results[n].get("memory", {})
        f, m = mem.get("numba_fast|float32", {}).get("16384"), mem.get(
            "materialised|float32", {}).get("16384")
        row.append(f"{f:.1f} MB" + (f" (materialised: {m / 1024:.1f} GB)" if m else "")
                   if f is not None else "—")
    rows.append(row)
    row = ["first call in a new process (kernels from the disk cache), float32 / float64", "—"]
    for n in names:
        c = results[n].get("compile", {})
        row.append(f"{c['float32']:.2f} s / {c['float64']:.2f} s" if c else "—")
    rows.append(row)
    rows = [r for r in rows if set(r[2:]) != {"—"}]  # rows no run of this machine measured
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def report(res: dict) -> str:
    lines = ["BLAS rates (GFLOP/s): " + ", ".join(
        f"{k} {v:.0f}" if not isinstance(v, str) else f"{k} {v}"
        for k, v in res["ceiling_gflops"].items()), ""]
    lines.append(f"{'implementation':32s} " + " ".join(f"{n:>9d}" for n in NS))
    for key in sorted(res["timing"]):
        row = res["timing"][key]
        lines.append(f"{key:32s} " + " ".join(
            f"{row[str(n)]['median_ms']:9.1f}" if str(n) in row else " " * 9 for n in NS))
    mem_f = res["memory"].get("numba_fast|float32", {}).get("16384")
    mem_m = res["memory"].get("materialised|float32", {}).get("16384")
    if mem_f is not None and mem_m:
        lines.append(f"extra memory N=16384 f32: fast {mem_f:.1f} MB vs materialised "
                     f"{mem_m:.0f} MB = {100 * mem_f / mem_m:.2f}%")
    for dt, s in res.get("compile", {}).items():
        lines.append(f"compile in a 2nd process ({dt}, fwd+bwd): {s:.2f} s")
    if res.get("ablation"):
        lines += ["", "ablation (float32, forward, no mask):"]
        for s, r in res["ablation"].items():
            lines.append(f"  step {s}: {r['what']:55s} {r['gflops']:7.1f} GF/s")
    lines += ["", ratio_table(res)]
    return "\n".join(lines)


# How each implementation is drawn in every figure: colour, marker, line style, filled marker.
# The compiled kernels (Numba fast, torch) often lie on top of each other: torch is dashed with
# open markers, so that both stay visible where they overlap (materialised NumPy likewise, over
# the readable kernel).
LINE = {"materialised": ("C0", "s", "-", False), "tiled_numpy": ("C1", "^", "-", True),
        "numba_readable": ("C2", "v", "-", True), "numba_fast": ("C3", "o", "-", True),
        "torch": ("k", "D", "--", False)}


def _label(impl: str, cap: int | None) -> str:
    return LABELS[impl] + (f" (N ≤ {cap})" if cap else "")


def _draw(ax, impl, xs, ys, cap=None, log_y=True):
    colour, marker, ls, filled = LINE[impl]
    ax.plot(xs, ys, ls=ls, color=colour, marker=marker, ms=5 if filled else 7, lw=1.4,
            mfc=colour if filled else "none", mew=1.2, label=_label(impl, cap), zorder=3)
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")


def _n_axis(ax):
    from matplotlib.ticker import NullLocator

    ax.set_xticks(NS, [f"{n // 1024}K" if n >= 1024 else str(n) for n in NS])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("sequence length N = L = S (tokens)")


def _legend_below(fig, axes, ncol=5):
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.01))


def _where(res: dict) -> str:
    m = res["machine"]
    isa = m.get("isa", "").upper()
    return f"{m.get('cpu', '')}, {m.get('cores', '?')} cores" + (
        f", {isa}" if isa else "") + (f", BLAS {m['blas_kernel']}" if m.get("blas_kernel") else "")


def figures(res: dict) -> None:
    """figures/06_time_vs_n.png, 06_gflops.png and 06_memory_vs_n.png from one run's results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from attention_ref.plotting import save_figure

    where = _where(res)
    timed_to = {impl: CAPS.get(impl) for impl in IMPLS}

    def at4096(impl, key):
        return res["timing"].get(f"{impl}|{key}", {}).get("4096", {})

    # time against N: one panel per (dtype, mask), one series per implementation
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.6), sharex=True, sharey=True)
    for ax, (dt, causal) in zip(axes.flat, [(d, c) for d in ("float32", "float64")
                                            for c in ("0", "1")], strict=True):
        for impl in LINE:
            row = res["timing"].get(f"{impl}|{dt}|{causal}|fwd")
            if row:
                ns = sorted(int(n) for n in row)
                _draw(ax, impl, ns, [row[str(n)]["median_ms"] for n in ns], timed_to[impl])
        anchor = at4096("numba_fast", f"{dt}|{causal}|fwd").get("median_ms")
        if anchor:  # a slope guide, drawn at a third of the fast kernel's time: it hides nothing
            ns = np.array(NS, dtype=float)
            ax.plot(ns, anchor / 3 * (ns / 4096) ** 2, ":", color="grey", lw=1.2,
                    label="∝ N² (slope guide)", zorder=2)
        ax.set_title(f"{dt}, {'causal mask' if causal == '1' else 'no mask'}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        _n_axis(ax)
    for ax in axes[0]:
        ax.set_xlabel("")
    for ax in axes[:, 0]:
        ax.set_ylabel("median time of one forward call (ms)")
    t = {i: at4096(i, "float32|0|fwd").get("median_ms") for i in LINE}
    headline = "Every implementation's time grows as N²: the tiles change the constant, not the slope"
    numpy_ms = [t[i] for i in ("materialised", "tiled_numpy", "numba_readable") if t[i]]
    if t["numba_fast"] and t["torch"] and numpy_ms:
        headline += (f"\nAt N = 4096 (float32, no mask): Numba fast {t['numba_fast']:.0f} ms, "
                     f"torch {t['torch']:.0f} ms; the NumPy and readable versions "
                     f"{min(numpy_ms):.0f}–{max(numpy_ms):.0f} ms")
    fig.suptitle(f"{headline}\n(one head, E = {D}, {THREADS} threads, median over separate "
                 f"processes; {where})", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _legend_below(fig, axes.flat, ncol=3)
    save_figure(fig, FIGURES / "06_time_vs_n.png")
    plt.close(fig)

    # GFLOP/s: panels forward / forward + backward x dtype, with the BLAS matmul rates
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.6), sharex=True)
    for row_i, dt in enumerate(("float32", "float64")):
        for col, mode in enumerate(("fwd", "fwdbwd")):
            ax = axes[row_i, col]
            for impl in LINE:
                row = res["timing"].get(f"{impl}|{dt}|0|{mode}")
                if row:
                    ns = sorted(int(n) for n in row)
                    _draw(ax, impl, ns, [row[str(n)]["gflops"] for n in ns], timed_to[impl],
                          log_y=False)
            ceil = res["ceiling_gflops"][dt]
            ax.axhline(ceil, color="k", ls="-", lw=0.8, alpha=0.6,
                       label="BLAS square matmul, 2048 × 2048 × 2048")
            thin = res["ceiling_gflops"].get(f"{dt}_Nx64")
            if thin:
                ax.axhline(thin, color="k", ls="-.", lw=0.8, alpha=0.6,
                           label=f"BLAS (N × {D}) · ({D} × N), N = 2048: attention's shape")
            ax.set_ylim(0, 1.12 * ceil)
            ax.set_title(f"{'forward' if mode == 'fwd' else 'forward + backward'}, {dt}, no mask",
                         fontsize=10)
            ax.grid(True, alpha=0.3)
            _n_axis(ax)
        axes[row_i, 0].set_ylabel(f"GFLOP/s ({dt})")
    for ax in axes[0]:
        ax.set_xlabel("")
    share = {i: at4096(i, "float32|0|fwd").get("share_of_ceiling") for i in ("numba_fast", "torch")}
    headline = "Throughput rises with N, but stays below the machine's matrix-multiply rate"
    if share["numba_fast"] and share["torch"]:
        headline += (f"\nAt N = 4096 (float32 forward): Numba fast {100 * share['numba_fast']:.0f}%"
                     f" of the square-matmul rate, torch {100 * share['torch']:.0f}%")
    fig.suptitle(f"{headline}\n(FLOPs: 4N²E per forward call, 3.5× that for forward + backward; "
                 f"one head, E = {D}, {THREADS} threads;\n{where})", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _legend_below(fig, axes.flat, ncol=3)
    save_figure(fig, FIGURES / "06_gflops.png")
    plt.close(fig)

    # memory: float32 and float64 panels. Growth below the resolution is drawn inside the grey
    # floor band, each implementation shifted a little to the right, so that none hides another.
    floor = 0.1
    memory_to = {impl: 2048 for impl in ("tiled_numpy", "numba_readable")}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.9), sharey=True)
    for ax, dt in zip(axes, ("float32", "float64"), strict=True):
        item = 4 if dt == "float32" else 8
        ns = np.array(NS, dtype=float)
        ax.plot(ns, item * ns**2 / 2**20, "--", color="grey", lw=1,
                label="one N × N matrix (Z or P)")
        ax.plot(ns, item * ns * D / 2**20, ":", color="grey", lw=1,
                label="the output O (N × E numbers)")
        ax.axhspan(1e-3, floor, color="0.92", zorder=0)
        ax.text(NS[0], floor * 0.33, "below 0.1 MiB (below resolution): drawn side by side",
                fontsize=7, color="0.3")
        for k, impl in enumerate(LINE):
            row = res["memory"].get(f"{impl}|{dt}", {})
            pts = sorted((int(n), v) for n, v in row.items() if v is not None)
            if pts:
                xs = [n * (1.1 ** (k - 2) if v < floor else 1.0) for n, v in pts]
                _draw(ax, impl, xs, [v if v >= floor else 0.6 * floor for _, v in pts],
                      memory_to.get(impl))
        ax.set_ylim(floor * 0.25, None)
        ax.set_title(dt, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        _n_axis(ax)
    axes[0].set_ylabel("peak memory growth of one forward call (MiB)")
    mat = res["memory"].get("materialised|float32", {}).get("16384")
    fast = res["memory"].get("numba_fast|float32", {}).get("16384")
    headline = "Only the materialised path allocates N² numbers; the tiled kernels stay near O(N·E)"
    if mat and fast is not None:
        headline += (f"\nAt N = 16384 (float32): materialised {mat / 1024:.1f} GiB, "
                     f"Numba fast {fast:.1f} MiB")
    fig.suptitle(f"{headline}\n(one head, E = {D}; {where})", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    _legend_below(fig, axes, ncol=4)
    save_figure(fig, FIGURES / "06_memory_vs_n.png")
    plt.close(fig)


def output_path(config: str, blas: str | None, quick: bool, given: Path | None) -> Path:
    """Where a run's JSON goes: ``given`` (``--output``) if any, else the configuration's stored
    run in benchmarks/results (``*_openblas.json`` with ``--blas openblas``) -- except that a
    ``--quick`` run goes to benchmarks/results/quick/, so that it never replaces a full one."""
    if given is not None:
        return given
    output = RESULTS / CONFIGS[config]["output"]
    if blas == "openblas":
        output = output.with_name(output.stem + "_openblas.json")
    return QUICK_RESULTS / output.name if quick else output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", nargs=6, metavar=("IMPL", "DTYPE", "CAUSAL", "MODE", "NS", "REPS"))
    ap.add_argument("--describe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--paired-only", action="store_true",
                    help="re-measure only the paired ratios (the goals' table) into the JSON (a new "
                         "JSON with the machine and BLAS rates when there is none)")
    ap.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--memory-only", action="store_true",
                    help="re-measure only the peak memory growth into the JSON")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="native")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--figures-only", action="store_true")
    ap.add_argument("--table", action="store_true",
                    help="print the ratio tables of the stored results of every configuration")
    ap.add_argument("--markdown", action="store_true",
                    help="print README's table from the stored results of every configuration")
    ap.add_argument("--only", help="comma-separated implementations to re-measure; the other rows "
                    "are kept from the existing JSON")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--wait-quiet", type=float, default=60.0, metavar="SECONDS",
                    help="before each measurement, wait up to this long for the machine probe "
                    "to recover (other work on the machine slows everything down)")
    ap.add_argument("--output", type=Path)
    ap.add_argument("--blas", choices=("mkl", "openblas"),
                    help="the BLAS the kernels call (ATTENTION_REF_BLAS; default: MKL when "
                         "installed); with openblas the results go to *_openblas.json")
    args = ap.parse_args()
    if args.blas:
        os.environ["ATTENTION_REF_BLAS"] = args.blas  # the workers inherit it (_env)
    if args.worker:
        impl, dt, causal, mode, ns, reps = args.worker
        worker(impl, dt, causal == "1", mode, [int(n) for n in ns.split(",")], int(reps),
               args.memory)
        return
    if args.describe:
        _describe_worker()
        return
    if args.serve:
        impl, dt, causal, mode, n = args.serve
        serve(impl, dt, causal == "1", mode, int(n))
        return
    stored = {}  # each configuration, then the same with OpenBLAS behind the kernels
    for suffix in ("", "_openblas"):
        for name, cfg in CONFIGS.items():
            path = RESULTS / cfg["output"].replace(".json", f"{suffix}.json")
            if path.exists():
                stored[name + suffix] = json.loads(path.read_text())
    # then runs on other machines (``--paired-only --output cpu_<machine>.json`` there)
    known = {RESULTS / cfg["output"].replace(".json", f"{suffix}.json")
             for cfg in CONFIGS.values() for suffix in ("", "_openblas")}
    for path in sorted(set(RESULTS.glob("cpu_*.json")) - known):
        stored[path.stem.removeprefix("cpu_")] = json.loads(path.read_text())
    if args.table:
        for res in stored.values():
            print(ratio_table(res), "\n")
        return
    if args.markdown:
        print(markdown_table(stored))
        return
    if args.config == "avx2" and not args.figures_only and " avx2" not in open("/proc/cpuinfo").read():
        print("this CPU has no AVX2: the avx2 configuration is skipped")
        return
    output = output_path(args.config, args.blas, args.quick, args.output)
    if (not args.figures_only and output.resolve().parent == RESULTS.resolve()
            and not _torch_available(args.config)):
        sys.exit(f"torch cannot be imported here: this run would have no ratios to torch's SDPA "
                 f"and would replace {output.resolve().relative_to(ROOT)} without them. `make bench` "
                 f"installs torch (the `bench` extra); --output FILE measures without it.")
    if args.figures_only:
        res = json.loads(output.read_text())
    elif args.paired_only:
        # on a machine with no stored run: this machine's description and BLAS rates, no curves
        res = json.loads(output.read_text()) if output.exists() else {
            "config": args.config, "machine": machine_info(args.config),
            "ceiling_gflops": _ceiling(args.config, 1), "timing": {}, "memory": {}}
        have_torch = _torch_available(args.config)
        res["paired"] = run_paired(args.config, have_torch)
        res["report"] = report(res)
        output.write_text(json.dumps(res, indent=1))
    elif args.memory_only:
        res = json.loads(output.read_text())
        have_torch = _torch_available(args.config)
        impls = [i for i in CONFIGS[args.config]["impls"] if i != "torch" or have_torch]
        res["memory"] = measure_memory(args.config, impls, NS)
        res["report"] = report(res)
        output.write_text(json.dumps(res, indent=1))
    else:
        only = args.only.split(",") if args.only else None
        previous = json.loads(output.read_text()) if only and output.exists() else None
        res = run(args.config, args.quick, 1 if args.quick else args.rounds, only, previous,
                  not args.no_ablation and args.config == "native", args.wait_quiet)
        res["report"] = report(res)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(res, indent=1))
    if output == RESULTS / CONFIGS["native"]["output"]:  # the stored native run draws the figures
        figures(res)
    print(report(res))


if __name__ == "__main__":
    main()
