"""The fast kernels' two tile products through every BLAS found here (stage 06).

The fast kernels spend two thirds to four fifths of their time in two BLAS products per tile,
Q_i K_j^T and P V_j (benchmarks/README.md, "Where the time goes"), so the BLAS behind them decides
most of their speed. This script times those two products alone, as the forward kernel calls
them: the forward tile of ``tile_sizes`` (B_q x B_k), E = 64, P V_j added into O (in float32 in
pieces of the kernel's short-sum length), one thread, in one process, the libraries called in
turn round by round so that a slow minute of the machine falls on all of them. Libraries, where
found: Intel MKL (the ``mkl`` package: what the kernels call when it is installed), SciPy's
OpenBLAS (what they call otherwise), NumPy's own OpenBLAS, and BLIS (the ``blis`` package,
cython-blis: ``pip install blis``). Each is called through ctypes with its arguments built once
(about 1 us per call against 50-200 us per product).

    python benchmarks/compare_blas.py                  # -> results/blas_tiles.json, table, figure
    python benchmarks/compare_blas.py --config avx2    # MKL and OpenBLAS held to AVX2 code
    python benchmarks/compare_blas.py --table          # print the stored tables

``--config avx2`` uses bench_cpu.py's environment (``MKL_ENABLE_INSTRUCTIONS=AVX2``,
``OPENBLAS_CORETYPE=Haswell``); BLIS chooses its kernel itself (it records which).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_cpu import CONFIGS, FIGURES, RESULTS, D, _env, machine_info  # noqa: E402

PRODUCTS = ("QK", "PV")
PRODUCT_LABELS = {"QK": "Q_i K_j^T", "PV": "P V_j"}
MATH_LABELS = {"QK": r"$Q_i K_j^\top$", "PV": r"$P\,V_j$"}
DTYPES = ("float32", "float64")


def _output(config: str) -> Path:
    return RESULTS / ("blas_tiles.json" if config == "native" else f"blas_tiles_{config}.json")


# ---------------------------------------------------------------------------------------------
# worker: find the libraries, build the calls, time them
# ---------------------------------------------------------------------------------------------
_KEEP: list = []  # ctypes objects the prepared calls point to


def _by_reference(value, ctype) -> ctypes.c_void_p:
    slot = ctype(value)
    _KEEP.append(slot)
    return ctypes.cast(ctypes.pointer(slot), ctypes.c_void_p)


def _fortran_gemm(address: int, int_type):
    """A function (ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc) -> a call of the Fortran
    ?gemm at ``address`` with those arguments, prepared once (alpha = 1)."""
    function = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 13))(address)
    _KEEP.append(function)

    def prepare(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc):
        real = ctypes.c_float if c.dtype == np.float32 else ctypes.c_double
        args = (_by_reference(ord(ta), ctypes.c_char), _by_reference(ord(tb), ctypes.c_char),
                _by_reference(m, int_type), _by_reference(n, int_type),
                _by_reference(k, int_type), _by_reference(1.0, real),
                ctypes.c_void_p(a.ctypes.data), _by_reference(lda, int_type),
                ctypes.c_void_p(b.ctypes.data), _by_reference(ldb, int_type),
                _by_reference(beta, real), ctypes.c_void_p(c.ctypes.data),
                _by_reference(ldc, int_type))
        return lambda: function(*args)
    return prepare


def _blis_gemm(library):
    """The same for BLIS's typed API (bli_?gemm: strides instead of leading dimensions)."""
    def prepare(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc):
        single = c.dtype == np.float32
        function = library.bli_sgemm if single else library.bli_dgemm
        real = ctypes.c_float if single else ctypes.c_double
        dim = ctypes.c_long
        transpose = {"N": 0, "T": 8}  # BLIS_NO_TRANSPOSE, BLIS_TRANSPOSE
        args = (transpose[ta], transpose[tb], dim(m), dim(n), dim(k),
                _by_reference(1.0, real), ctypes.c_void_p(a.ctypes.data), dim(1), dim(lda),
                ctypes.c_void_p(b.ctypes.data), dim(1), dim(ldb), _by_reference(beta, real),
                ctypes.c_void_p(c.ctypes.data), dim(1), dim(ldc))
        return lambda: function(*args)
    return prepare


def _openblas_of(package: str, infos: list[dict]) -> dict | None:
    """The OpenBLAS a package ships (threadpoolctl's record), with its Fortran ?gemm."""
    from attention_ref.flash_numba import _package_blas

    info = _package_blas(package, infos)
    if info is None or info.get("internal_api") != "openblas":
        return None
    library = ctypes.CDLL(info["filepath"])
    for name in ("scipy_{}gemm_64_", "{}gemm_64_", "scipy_{}gemm_", "{}gemm_"):
        if hasattr(library, name.format("s")) and hasattr(library, name.format("d")):
            int_type = ctypes.c_int64 if "64_" in name else ctypes.c_int32
            return {"library": library, "symbol": name, "int": int_type,
                    "kernel": f"openblas-{info.get('version')}:{info.get('architecture')}"}
    return None


def find_libraries() -> dict[str, dict]:
    """Every BLAS found: its code path and, per dtype, a function preparing calls."""
    import numpy  # noqa: F401  (its OpenBLAS)
    import scipy.linalg.cython_blas  # noqa: F401  (SciPy's)
    from numba.extending import get_cython_function_address
    from threadpoolctl import threadpool_info, threadpool_limits

    threadpool_limits(1)  # both OpenBLAS libraries are loaded by now: one thread, as in the kernels
    from attention_ref import flash_numba

    found: dict[str, dict] = {}
    mkl = flash_numba._mkl()
    if mkl is not None:
        found["MKL"] = {"kernel": mkl["name"],
                        "float32": _fortran_gemm(mkl["float32"], ctypes.c_int32),
                        "float64": _fortran_gemm(mkl["float64"], ctypes.c_int32)}
    infos = threadpool_info()
    scipy_blas = _openblas_of("scipy", infos)
    found["OpenBLAS (SciPy)"] = {
        "kernel": scipy_blas["kernel"] if scipy_blas else "openblas:unknown",
        "float32": _fortran_gemm(get_cython_function_address("scipy.linalg.cython_blas",
                                                             "sgemm"), ctypes.c_int32),
        "float64": _fortran_gemm(get_cython_function_address("scipy.linalg.cython_blas",
                                                             "dgemm"), ctypes.c_int32)}
    numpy_blas = _openblas_of("numpy", infos)
    if numpy_blas is not None:
        library, symbol = numpy_blas["library"], numpy_blas["symbol"]
        found["OpenBLAS (NumPy)"] = {"kernel": numpy_blas["kernel"], **{
            dt: _fortran_gemm(ctypes.cast(getattr(library, symbol.format(prefix)),
                                          ctypes.c_void_p).value, numpy_blas["int"])
            for dt, prefix in (("float32", "s"), ("float64", "d"))}}
    try:
        import blis.about
        import blis.cy
    except ImportError:
        pass
    else:
        library = ctypes.CDLL(blis.cy.__file__)
        library.bli_arch_string.restype = ctypes.c_char_p
        arch = library.bli_arch_string(library.bli_arch_query_id()).decode()
        version = blis.about.__version__
        found["BLIS"] = {"kernel": f"blis-{version}:{arch}",
                         "float32": _blis_gemm(library), "float64": _blis_gemm(library)}
    return found


def tile_calls(prepare, dtype: str, block_q: int, block_k: int, sum_keys: int | None, rng):
    """The forward kernel's two tile products: S = Q_i K_j^T (overwritten) and O += P V_j
    (in pieces of ``sum_keys`` keys where the kernel cuts the sum). Row-major arrays are the
    column-major transposes BLAS sees: S^T = K_j Q_i^T, O^T += V_j^T P^T."""
    q = rng.standard_normal((block_q, D)).astype(dtype)
    k = rng.standard_normal((block_k, D)).astype(dtype)
    v = rng.standard_normal((block_k, D)).astype(dtype)
    s = np.zeros((block_q, block_k), dtype)
    o = np.zeros((block_q, D), dtype)
    _KEEP.extend((q, k, v, s, o))  # the prepared calls hold only their addresses
    qk = prepare("T", "N", block_k, block_q, D, k, D, q, D, 0.0, s, block_k)
    piece = sum_keys or block_k
    pieces = [prepare("N", "N", D, block_q, min(piece, block_k - j), v[j:], D, s[:, j:],
                      block_k, 1.0, o, D) for j in range(0, block_k, piece)]

    def pv():
        for call in pieces:
            call()
    qk()
    tol = 1e-4 if dtype == "float32" else 1e-12
    if not np.allclose(s, q @ k.T, rtol=tol, atol=tol * D):
        raise RuntimeError("Q_i K_j^T differs from NumPy's")
    o[:] = 0
    pv()
    if not np.allclose(o, s @ v, rtol=tol * 10, atol=tol * 10 * np.abs(s).sum(1).max()):
        raise RuntimeError("P V_j differs from NumPy's")
    return {"QK": qk, "PV": pv}


def worker(rounds: int, reps: int) -> dict:
    from attention_ref import flash_numba

    libraries = find_libraries()
    rng = np.random.default_rng(0)
    out: dict = {"libraries": {name: lib["kernel"] for name, lib in libraries.items()},
                 "tiles": {}, "gflops": {}}
    calls = {}
    for dtype in DTYPES:
        tiles = flash_numba.tile_sizes(dtype, "forward")
        bq, bk = tiles["block_q"], tiles["block_k"]
        sum_keys = flash_numba._SUM_KEYS if dtype == "float32" else None
        out["tiles"][dtype] = {"block_q": bq, "block_k": bk, "sum_keys": sum_keys,
                               "source": tiles["source"]}
        for name, lib in libraries.items():
            for product, call in tile_calls(lib[dtype], dtype, bq, bk, sum_keys, rng).items():
                calls[(name, dtype, product)] = (call, 2.0 * bq * bk * D)
    samples: dict = {key: [] for key in calls}
    keys = list(calls)
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            call, flops = calls[key]
            call()  # the operands back into this core's caches, as inside the kernel
            start = time.perf_counter()
            for _ in range(reps):
                call()
            samples[key].append(flops * reps / (time.perf_counter() - start) / 1e9)
    for (name, dtype, product), values in samples.items():
        quartiles = np.percentile(values, [25, 50, 75]).round(1).tolist()
        out["gflops"].setdefault(name, {}).setdefault(dtype, {})[product] = quartiles
    return out


# ---------------------------------------------------------------------------------------------
# driver: run the worker in the configuration's environment, store, print, draw
# ---------------------------------------------------------------------------------------------
def run(config: str, rounds: int, reps: int) -> dict:
    env = _env(config)
    env.update(OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, __file__, "--worker", str(rounds), str(reps)],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    result = json.loads(res.stdout.splitlines()[-1])
    machine = machine_info(config)
    machine["threads"] = 1  # one thread per product, as each kernel thread calls them
    return {"config": config, "machine": machine, "rounds": rounds, "reps": reps, **result}


def _tile_time(result: dict, name: str, dtype: str) -> float:
    """Seconds per GFLOP of one tile's two products (they have the same FLOPs), medians."""
    return sum(1 / result["gflops"][name][dtype][p][1] for p in PRODUCTS)


def table(result: dict) -> str:
    """Markdown: GFLOP/s (median, one thread) of each product per library, and each library's
    time for the two products of one tile relative to the kernels' BLAS."""
    tiles = result["tiles"]
    head = ["BLAS", "version: code path"] + [
        f"{dt} {PRODUCT_LABELS[p]} ({tiles[dt]['block_q']} x {tiles[dt]['block_k']})"
        for dt in DTYPES for p in PRODUCTS] + [f"{dt} tile time" for dt in DTYPES]
    reference = next(iter(result["gflops"]))  # MKL where installed, else SciPy's OpenBLAS
    rows = []
    for name, per_dtype in result["gflops"].items():
        cells = [name, f"`{result['libraries'][name]}`"]
        cells += [f"{per_dtype[dt][p][1]:.0f}" for dt in DTYPES for p in PRODUCTS]
        cells += [f"{_tile_time(result, name, dt) / _tile_time(result, reference, dt):.2f}x"
                  for dt in DTYPES]
        rows.append(cells)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    m = result["machine"]
    where = (f"{m.get('cpu', '?')} ({m.get('isa', '?')}, LLVM `{m.get('llvm_cpu', '?')}`), "
             f"config {result['config']}, one thread, E = {D}, medians of {result['rounds']} rounds")
    return "\n".join(lines) + f"\n\nGFLOP/s; tile time relative to {reference}. {where}."


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["gflops"])
    groups = [(dt, p) for dt in DTYPES for p in PRODUCTS]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        lo, med, hi = (np.array([result["gflops"][name][dt][p][j] for dt, p in groups])
                       for j in range(3))
        x = np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width
        ax.bar(x, med, width, yerr=[med - lo, hi - med], capsize=2,
               label=f"{name}: {result['libraries'][name]}")
    tiles = result["tiles"]
    ax.set_xticks(np.arange(len(groups)),
                  [f"{dt}\n{MATH_LABELS[p]}\n{tiles[dt]['block_q']} x {tiles[dt]['block_k']}"
                   for dt, p in groups])
    ax.set_ylabel("GFLOP/s on one thread (median, quartiles)")
    ax.set_xlabel("tile product (forward kernel, E = 64)")
    best = min(names, key=lambda name: _tile_time(result, name, "float32"))
    fallback = "OpenBLAS (SciPy)"  # what the kernels call without MKL
    ratio = _tile_time(result, fallback, "float32") / _tile_time(result, best, "float32")
    versus = f": SciPy's OpenBLAS takes {ratio:.2f}x its time (float32)" if best != fallback else ""
    m = result["machine"]
    ax.set_title(f"{best} does the kernels' tile products fastest here{versus}\n"
                 f"({m.get('cpu', '?')}, {m.get('isa', '?')} code, config {result['config']})",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", nargs=2, type=int, metavar=("ROUNDS", "REPS"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="native")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--reps", type=int, default=40, help="calls per timing")
    ap.add_argument("--output", type=Path, help="JSON path (default results/blas_tiles*.json; "
                    "the figure is named after it: figures/bench_<its name>.png)")
    ap.add_argument("--no-figure", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the stored tables and stop")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    if args.table:
        for path in sorted(RESULTS.glob("blas_tiles*.json")):
            print(f"{path.name}\n\n{table(json.loads(path.read_text()))}\n")
        return
    result = run(args.config, args.rounds, args.reps)
    output = args.output or _output(args.config)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    if not args.no_figure:  # named after the JSON: another machine's run keeps this one's figure
        figure(result, FIGURES / f"bench_{output.stem}.png")
    print(f"wrote {output}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
