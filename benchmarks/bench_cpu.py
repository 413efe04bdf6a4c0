"""CPU benchmark of attention implementations (stage 06): time, GFLOP/s, memory against N.

Every measurement runs in its own process (``--worker``), the processes are interleaved round by
round (one round = every configuration once, in a shuffled order) and the reported time is the
median over all rounds of the per-process timed calls. Two threads everywhere
(``NUMBA_NUM_THREADS``, ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``torch.set_num_threads``),
one head, d = 64. ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` are removed from the workers'
environment (they select a slower OpenBLAS kernel on some machines); the BLAS kernel threadpoolctl
reports is recorded in the JSON.

Implementations: ``materialised`` (attention_ref.dot_product + attention_ref.flash.
attention_backward), ``tiled_numpy`` (attention_ref.flash, FA-2, 128 x 128 blocks),
``numba_readable`` and ``numba_fast`` (attention_ref.flash_numba) and ``torch`` (CPU
``scaled_dot_product_attention`` with autograd for the backward pass) when torch is installed.
The slow ones are capped at N <= 4096 (materialised NumPy, tiled NumPy, readable kernel).

FLOPs: 4 N^2 d per head forward (half when causal); the backward pass counts 2.5x that, so
forward + backward is 3.5x. "share of ceiling" divides by the float32/float64 BLAS matmul rate.
Memory: growth of the peak resident set during one call (Linux /proc/self/clear_refs + VmHWM).

    python benchmarks/bench_cpu.py                    # full run (~15 min), JSON + figures
    python benchmarks/bench_cpu.py --quick            # N <= 2048, one round
    python benchmarks/bench_cpu.py --figures-only     # redraw figures from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "cpu.json"
FIGURES = ROOT / "figures"
D = 64
THREADS = 2
NS = [512, 1024, 2048, 4096, 8192, 16384]
CAPS = {"materialised": 4096, "tiled_numpy": 4096, "numba_readable": 4096}
IMPLS = ["materialised", "tiled_numpy", "numba_readable", "numba_fast", "torch"]


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


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


def worker(impl: str, dtype: str, causal: bool, mode: str, Ns: list[int], reps: int,
           memory: bool) -> None:
    """Time (or measure the memory of) one implementation for several N; print JSON lines."""
    for N in Ns:
        t0 = time.perf_counter()
        if memory:
            # warm up (compile / load kernels, BLAS buffers) on a small problem first
            _make_call(impl, dtype, causal, mode, 256)()
            call = _make_call(impl, dtype, causal, mode, N)
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
        times = []
        for _ in range(1 if N >= 8192 else reps):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        print(json.dumps({"N": N, "times_s": times, "first_call_s": first}), flush=True)


# ---------------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        env.pop(var, None)
    env.update(NUMBA_NUM_THREADS=str(THREADS), OMP_NUM_THREADS=str(THREADS),
               OPENBLAS_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    return env


def _run_worker(impl, dtype, causal, mode, Ns, reps=3, memory=False, timeout=900):
    cmd = [sys.executable, __file__, "--worker", impl, dtype, str(int(causal)), mode,
           ",".join(map(str, Ns)), str(reps)] + (["--memory"] if memory else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    if res.returncode != 0:
        print(f"  ! {impl} {dtype} causal={causal} {mode}: {res.stderr.strip()[-300:]}", flush=True)
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def _machine_info() -> dict:
    code = (
        "import json, numpy, scipy.linalg\n"
        "from threadpoolctl import threadpool_info\n"
        "print(json.dumps([{k: d.get(k) for k in ('internal_api', 'architecture', 'num_threads',"
        " 'version')} for d in threadpool_info()]))"
    )
    blas = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import numba
    import numpy

    info = {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
        "numpy": numpy.__version__, "numba": numba.__version__,
        "llvm_cpu": __import__("llvmlite.binding", fromlist=["x"]).get_host_cpu_name(),
        "blas": json.loads(blas.stdout) if blas.returncode == 0 else blas.stderr[-300:],
        "threads": THREADS, "d": D,
        "removed_env": {v: os.environ.get(v) for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


def _ceiling(rounds: int) -> dict:
    """BLAS matmul rate (GFLOP/s): square 2048^3 and the attention shape N x 64 @ 64 x N."""
    code = (
        "import json, time, numpy as np\n"
        "out = {}\n"
        "for dt in ('float32', 'float64'):\n"
        "    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(dt)\n"
        "    a @ a; ts = []\n"
        "    for _ in range(5):\n"
        "        t = time.perf_counter(); a @ a; ts.append(time.perf_counter() - t)\n"
        "    out[dt] = 2 * 2048**3 / min(ts) / 1e9\n"
        "    q = a[:, :64].copy(); c = np.empty((2048, 2048), dt); ts = []\n"
        "    for _ in range(20):\n"
        "        t = time.perf_counter(); np.matmul(q, q.T, out=c); ts.append(time.perf_counter() - t)\n"
        "    out[dt + '_Nx64'] = 2 * 2048 * 2048 * 64 / min(ts) / 1e9\n"
        "print(json.dumps(out))\n"
    )
    runs = []
    for _ in range(rounds):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=_env())
        runs.append(json.loads(res.stdout))
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def _flops(N: int, causal: bool, mode: str) -> float:
    f = 4.0 * N * N * D * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwdbwd" else 1.0)


def run(quick: bool, rounds: int, only: list[str] | None = None, previous: dict | None = None,
        ablation: bool = True) -> dict:
    have_torch = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True,
                                env=_env()).returncode == 0
    impls = [i for i in (only or IMPLS) if i != "torch" or have_torch]
    Ns = [n for n in NS if not quick or n <= 2048]
    configs = [(impl, dt, causal, mode) for impl in impls for dt in ("float32", "float64")
               for causal in (False, True) for mode in ("fwd", "fwdbwd")]
    started = time.time()
    print("machine ...", flush=True)
    result = {"machine": _machine_info(), "ceiling_gflops": _ceiling(3), "timing": {},
              "memory": {}, "ablation": {}, "compile": {}}
    if previous is not None:  # --only: keep the other implementations' rows of an earlier run
        for part in ("timing", "memory", "ablation", "compile"):
            result[part] = {k: v for k, v in previous.get(part, {}).items()
                            if k.split("|")[0] not in impls}
        result["merged_from_earlier_run"] = sorted({k.split("|")[0] for k in result["timing"]})
    print(json.dumps(result["machine"], indent=1), "\nceiling", result["ceiling_gflops"], flush=True)
    raw: dict[str, dict[int, list[float]]] = {}
    for r in range(rounds):
        order = configs[:]
        random.Random(r).shuffle(order)
        for impl, dt, causal, mode in order:
            ns = [n for n in Ns if n <= CAPS.get(impl, max(Ns))]
            if r > 0:
                ns = [n for n in ns if n <= 8192 or r == 1]  # 16K: two rounds are enough
            key = f"{impl}|{dt}|{int(causal)}|{mode}"
            for row in _run_worker(impl, dt, causal, mode, ns):
                raw.setdefault(key, {}).setdefault(row["N"], []).extend(row["times_s"])
        print(f"round {r + 1}/{rounds} done after {time.time() - started:.0f} s", flush=True)
    for key, per_n in raw.items():
        impl, dt, causal, mode = key.split("|")
        for N, times in sorted(per_n.items()):
            ms = 1e3 * statistics.median(times)
            gf = _flops(N, causal == "1", mode) / (ms * 1e6)
            result["timing"].setdefault(key, {})[str(N)] = {
                "median_ms": ms, "runs": len(times), "gflops": gf,
                "share_of_ceiling": gf / result["ceiling_gflops"][dt],
            }
    # ratio to torch from the same run
    for key, per_n in result["timing"].items():
        impl, dt, causal, mode = key.split("|")
        tkey = f"torch|{dt}|{causal}|{mode}"
        for N, row in per_n.items():
            if tkey in result["timing"] and N in result["timing"][tkey]:
                row["ratio_to_torch"] = row["median_ms"] / result["timing"][tkey][N]["median_ms"]
    # memory: one process per (impl, dtype), forward, no mask
    print("memory ...", flush=True)
    for impl in impls:
        for dt in ("float32", "float64"):
            cap = 16384 if impl in ("materialised", "numba_fast", "torch") else 2048
            ns = [n for n in Ns if n <= cap]
            rows = _run_worker(impl, dt, False, "fwd", ns, memory=True)
            result["memory"][f"{impl}|{dt}"] = {str(r["N"]): r["peak_growth_mb"] for r in rows}
    # ablation: the steps from plain loops to the fast kernel (float32, N = 4096, forward)
    result["compile"] = measure_compile()
    result["elapsed_s"] = time.time() - started
    if not ablation:
        result["ablation"] = (previous or {}).get("ablation", {})
        return result
    print("ablation ...", flush=True)
    n_abl = 4096
    abl: dict[int, list[float]] = {}
    for r in range(3):
        order = list(range(7))
        random.Random(100 + r).shuffle(order)
        for s in order:
            for row in _run_worker(f"step{s}", "float32", False, "fwd", [n_abl], reps=7):
                abl.setdefault(s, []).extend(row["times_s"])
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ablation_kernels import STEPS

    for s, times in sorted(abl.items()):
        ms = 1e3 * statistics.median(times)
        result["ablation"][str(s)] = {"what": STEPS[s], "N": n_abl, "median_ms": ms,
                                      "gflops": _flops(n_abl, False, "fwd") / (ms * 1e6)}
    result["elapsed_s"] = time.time() - started
    return result


def measure_compile() -> dict:
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
    subprocess.run([sys.executable, "-c", code], capture_output=True, env=_env())  # fill cache
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                      text=True, env=_env()).stdout) for _ in range(3)]
    return {dt: statistics.median(r[dt] for r in runs) for dt in runs[0]}


# ---------------------------------------------------------------------------------------------
# report and figures
# ---------------------------------------------------------------------------------------------
TARGETS = [
    ("numba_fast|float32|0|fwd", "torch|float32|0|fwd", 1.0, "fwd f32 vs torch, no mask"),
    ("numba_fast|float32|1|fwd", "torch|float32|1|fwd", 0.7, "fwd f32 vs torch, causal"),
    ("numba_fast|float64|0|fwd", "torch|float64|0|fwd", 0.85, "fwd f64 vs torch, no mask"),
    ("numba_fast|float64|1|fwd", "torch|float64|1|fwd", 0.55, "fwd f64 vs torch, causal"),
    ("numba_fast|float32|0|fwdbwd", "torch|float32|0|fwdbwd", 1.0, "fwd+bwd f32 vs torch"),
]


def report(res: dict) -> str:
    lines = [f"machine: {res['machine']['cpu']} ({res['machine']['llvm_cpu']}), "
             f"{res['machine']['cores']} cores, {THREADS} threads; BLAS "
             + ", ".join(f"{b.get('internal_api')}:{b.get('architecture')}"
                         for b in res["machine"]["blas"] if isinstance(b, dict)),
             "ceiling (GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in
                                               res["ceiling_gflops"].items()), ""]
    lines.append(f"{'implementation':32s} " + " ".join(f"{n:>9d}" for n in NS))
    for key in sorted(res["timing"]):
        row = res["timing"][key]
        lines.append(f"{key:32s} " + " ".join(
            f"{row[str(n)]['median_ms']:9.1f}" if str(n) in row else " " * 9 for n in NS))
    lines += ["", "GFLOP/s at N = 4096 (share of BLAS ceiling, ratio to torch):"]
    for key in sorted(res["timing"]):
        r = res["timing"][key].get("4096")
        if r:
            lines.append(f"  {key:32s} {r['gflops']:7.1f} GF/s  {100 * r['share_of_ceiling']:5.1f}%"
                         + (f"  x{r['ratio_to_torch']:.2f} torch" if "ratio_to_torch" in r else ""))
    lines += ["", "targets (N = 4096):"]
    for mine, theirs, target, what in TARGETS:
        a = res["timing"].get(mine, {}).get("4096")
        b = res["timing"].get(theirs, {}).get("4096")
        if a and b:
            ratio = a["median_ms"] / b["median_ms"]
            lines.append(f"  {what:28s} {ratio:5.2f}x torch (target <= {target}) "
                         f"{'met' if ratio <= target else 'MISSED'}")
    for N in ("2048", "4096", "8192", "16384"):
        r = res["timing"].get("numba_fast|float32|0|fwd", {}).get(N)
        if r:
            lines.append(f"  share of f32 BLAS ceiling, N={N:>5s}: {100 * r['share_of_ceiling']:5.1f}% "
                         f"(target >= 70%) {'met' if r['share_of_ceiling'] >= 0.7 else 'MISSED'}")
    mem_f = res["memory"].get("numba_fast|float32", {}).get("16384")
    mem_m = res["memory"].get("materialised|float32", {}).get("16384")
    if mem_f is not None and mem_m:
        lines.append(f"  extra memory N=16384 f32: fast {mem_f:.1f} MB vs materialised "
                     f"{mem_m:.0f} MB = {100 * mem_f / mem_m:.2f}% (target <= 2%)")
    for dt, s in res.get("compile", {}).items():
        lines.append(f"  compile in a 2nd process ({dt}, fwd+bwd): {s:.2f} s (target <= 0.5 s)")
    lines += ["", "ablation (float32, forward, no mask):"]
    for s, r in res.get("ablation", {}).items():
        lines.append(f"  step {s}: {r['what']:50s} {r['gflops']:7.1f} GF/s")
    return "\n".join(lines)


def figures(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from attention_ref.plotting import save_figure

    colours = {"materialised": "C0", "tiled_numpy": "C1", "numba_readable": "C2",
               "numba_fast": "C3", "torch": "C4"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, dt in zip(axes, ("float32", "float64"), strict=True):
        for impl, c in colours.items():
            for causal, ls in (("0", "-"), ("1", "--")):
                row = res["timing"].get(f"{impl}|{dt}|{causal}|fwd")
                if not row:
                    continue
                ns = sorted(int(n) for n in row)
                ax.loglog(ns, [row[str(n)]["median_ms"] for n in ns], ls, color=c, marker="o",
                          ms=3, label=f"{impl}{' causal' if causal == '1' else ''}")
        ns = np.array(NS, dtype=float)
        ax.loglog(ns, 30 * (ns / 4096) ** 2, ":", color="grey", label="∝ N²")
        ax.set_title(f"forward, {dt}, d = {D}, {THREADS} threads")
        ax.set_xlabel("N (= L = S)")
    axes[0].set_ylabel("median time (ms)")
    axes[1].legend(fontsize=7, ncol=2)
    save_figure(fig, FIGURES / "06_time_vs_n.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for key, row in sorted(res["memory"].items()):
        impl, dt = key.split("|")
        ns = sorted(int(n) for n in row if row[n] is not None)
        if ns:
            ax.loglog(ns, [max(row[str(n)], 0.01) for n in ns], "-" if dt == "float32" else "--",
                      color=colours[impl], marker="o", ms=3, label=f"{impl} {dt}")
    ax.set_xlabel("N")
    ax.set_ylabel("peak memory growth per call (MB)")
    ax.set_title("memory of one forward call")
    ax.legend(fontsize=7)
    save_figure(fig, FIGURES / "06_memory_vs_n.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwdbwd"), strict=True):
        for impl, c in colours.items():
            for dt, ls in (("float32", "-"), ("float64", "--")):
                row = res["timing"].get(f"{impl}|{dt}|0|{mode}")
                if row:
                    ns = sorted(int(n) for n in row)
                    ax.semilogx(ns, [row[str(n)]["gflops"] for n in ns], ls, color=c, marker="o",
                                ms=3, label=f"{impl} {dt}")
        for dt, ls in (("float32", "-"), ("float64", "--")):
            ax.axhline(res["ceiling_gflops"][dt], color="k", ls=ls, lw=0.8,
                       label=f"BLAS matmul {dt}")
        ax.set_title(f"{'forward' if mode == 'fwd' else 'forward + backward'}, no mask")
        ax.set_xlabel("N")
    axes[0].set_ylabel("GFLOP/s")
    axes[1].legend(fontsize=7, ncol=2)
    save_figure(fig, FIGURES / "06_gflops.png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", nargs=6, metavar=("IMPL", "DTYPE", "CAUSAL", "MODE", "NS", "REPS"))
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--figures-only", action="store_true")
    ap.add_argument("--only", help="comma-separated implementations to re-measure; the other rows "
                    "are kept from the existing JSON")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.worker:
        impl, dt, causal, mode, ns, reps = args.worker
        worker(impl, dt, causal == "1", mode, [int(n) for n in ns.split(",")], int(reps),
               args.memory)
        return
    if args.figures_only:
        res = json.loads(args.output.read_text())
    else:
        only = args.only.split(",") if args.only else None
        previous = json.loads(args.output.read_text()) if only and args.output.exists() else None
        res = run(args.quick, 1 if args.quick else args.rounds, only, previous,
                  not args.no_ablation)
        res["report"] = report(res)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(res, indent=1))
    figures(res)
    print(report(res))


if __name__ == "__main__":
    main()
