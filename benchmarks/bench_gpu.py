"""GPU benchmark: the same NumPy-written attention code run on CuPy arrays.

Times, on one CUDA device, for N in {1K, 2K, 4K, 8K, 16K}, d = 64, float32 and float16 inputs:

* ``materialised`` — ``scaled_dot_product_attention`` on CuPy (forms the N × N weights);
* ``tiled``        — ``flash_attention`` on CuPy (NumPy-style tile loop, large tiles);
* ``torch``        — ``torch.nn.functional.scaled_dot_product_attention`` on the same GPU, when
  torch with CUDA is installed (optional; never a dependency).

Each point is the median of several runs timed with CUDA events after a warm-up; an
out-of-memory is recorded as such. Writes ``benchmarks/results/gpu.json``, prints a table, and
draws ``figures/bench_gpu_time.png``. Without CuPy or a CUDA device it says so and exits 0.

    python benchmarks/bench_gpu.py [--sizes 1024 2048 ...] [--heads 4] [--repeats 5]
    python benchmarks/bench_gpu.py --plot-only    # redraw the figure from the stored JSON (no GPU)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"
FIGURE = ROOT / "figures" / "bench_gpu_time.png"


def _cupy_or_reason():
    try:
        import cupy
    except ImportError:
        return None, "CuPy is not installed (pip install 'attention_ref[gpu]')"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "no CUDA device"
    except Exception as exc:
        return None, f"no usable CUDA device: {exc}"
    return cupy, None


def _time_gpu(cupy, fn, repeats: int) -> float:
    """Median milliseconds of fn() between CUDA events, after one warm-up call."""
    fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block", type=int, default=1024, help="tile size of the tiled path on the GPU")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the figure from the stored JSON (needs no GPU)")
    args = parser.parse_args(argv)
    if args.plot_only:
        stored = json.loads(RESULTS.read_text())
        _plot(stored["rows"], stored["device"], stored["block"])
        print(f"wrote {FIGURE.relative_to(ROOT)}")
        return 0

    cupy, reason = _cupy_or_reason()
    if cupy is None:
        print(f"bench_gpu: skipped: {reason}")
        return 0
    from attention_ref import flash_attention, scaled_dot_product_attention
    from attention_ref.backends import cpu_model

    try:
        import torch

        torch_ok = torch.cuda.is_available()
    except ImportError:
        torch, torch_ok = None, False

    device_name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"device: {device_name}; CuPy {cupy.__version__}; torch: {torch.__version__ if torch_ok else 'absent'}")
    rows = []
    rng = cupy.random.default_rng(0)
    for dtype_name in ("float32", "float16"):
        dtype = getattr(cupy, dtype_name)
        for n in args.sizes:
            shape = (1, args.heads, n, args.head_dim)
            q, k, v = (rng.standard_normal(shape, dtype=cupy.float32).astype(dtype) for _ in range(3))
            flops = 4.0 * args.heads * n * n * args.head_dim
            impls = {
                "materialised": lambda q=q, k=k, v=v: scaled_dot_product_attention(q, k, v),
                "tiled": lambda q=q, k=k, v=v: flash_attention(q, k, v, block_q=args.block, block_k=args.block),
            }
            if torch_ok:
                tq, tk, tv = (torch.as_tensor(t, device="cuda") for t in (q, k, v))
                impls["torch"] = lambda tq=tq, tk=tk, tv=tv: torch.nn.functional.scaled_dot_product_attention(
                    tq, tk, tv
                )
            for name, fn in impls.items():
                try:
                    ms = _time_gpu(cupy, fn, args.repeats)
                    status = "ok"
                except (cupy.cuda.memory.OutOfMemoryError, RuntimeError) as exc:
                    ms, status = math.nan, f"failed: {type(exc).__name__}"
                cupy.get_default_memory_pool().free_all_blocks()
                rows.append(dict(dtype=dtype_name, n=n, impl=name, ms=ms,
                                 tflops=flops / (ms * 1e-3) / 1e12 if ms == ms else math.nan, status=status))
                print(f"{dtype_name:8s} N={n:6d} {name:13s} {ms:10.2f} ms  {rows[-1]['tflops']:7.2f} TFLOP/s  {status}",
                      flush=True)
            # the two CuPy paths must agree (the GPU run is also a correctness check)
            diff = float(cupy.max(cupy.abs(impls["materialised"]().astype(cupy.float32)
                                           - impls["tiled"]().astype(cupy.float32))))
            rows.append(dict(dtype=dtype_name, n=n, impl="max|materialised - tiled|", ms=diff,
                             tflops=math.nan, status="check"))

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    versions = dict(cuda_driver=cupy.cuda.runtime.driverGetVersion(),
                    cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                    torch=torch.__version__ if torch_ok else None, host_cpu=cpu_model())
    RESULTS.write_text(json.dumps(dict(device=device_name, cupy=cupy.__version__, python=platform.python_version(),
                                       **versions, heads=args.heads, head_dim=args.head_dim, block=args.block, rows=rows),
                                  indent=1))
    _plot(rows, device_name, args.block)
    print(f"wrote {RESULTS.relative_to(ROOT)} and {FIGURE.relative_to(ROOT)}")
    return 0


def _takeaway(rows: list[dict], device_name: str) -> str:
    """The figure's title: how much faster torch's fused kernel is than the NumPy-written
    materialised path at the largest N measured (over both dtypes)."""
    n_max = max(r["n"] for r in rows)
    ms = {(r["dtype"], r["impl"]): r["ms"] for r in rows if r["status"] == "ok" and r["n"] == n_max}
    slower = [ms[dt, "materialised"] / ms[dt, "torch"] for dt in ("float32", "float16")
              if (dt, "materialised") in ms and (dt, "torch") in ms]
    if not slower:
        return f"attention on the {device_name}"
    return (f"{device_name}: torch's fused kernel is {min(slower):.0f}–{max(slower):.0f}× faster than "
            f"NumPy-style code on CuPy (N = {n_max});\nthe tile loop in Python saves memory, not time")


def _plot(rows: list[dict], device_name: str, block: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attention_ref.plotting import save_figure

    sizes = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True, layout="constrained")
    titles = {"float32": "float32 inputs",
              "float16": "float16 inputs (our code computes in float32; torch in float16)"}
    for ax, dtype_name in zip(axes, ("float32", "float16"), strict=True):
        for impl, label in (("materialised", "materialised (scaled_dot_product_attention)"),
                            ("tiled", f"tiled (flash_attention, {block} × {block} tiles)"),
                            ("torch", "torch SDPA (fused kernel)")):
            pts = [(r["n"], r["ms"]) for r in rows
                   if r["dtype"] == dtype_name and r["impl"] == impl and r["status"] == "ok"]
            if pts:
                ax.loglog(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_title(titles[dtype_name], fontsize=10)
        ax.set_xlabel("sequence length N")
        ax.set_xticks(sizes, [f"{n // 1024}K" for n in sizes])
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("milliseconds per call (median)")
    axes[0].legend(fontsize=8)
    fig.suptitle(_takeaway(rows, device_name), fontsize=11)
    save_figure(fig, FIGURE)


if __name__ == "__main__":
    sys.exit(main())
