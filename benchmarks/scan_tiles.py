"""Scan the fast kernels' tile sizes (B_q query rows x B_k keys) on this machine.

One process, candidates interleaved round by round (best of the rounds kept: interference from
other work on the machine only ever adds time; each timing also waits for the machine probe of
bench_cpu.py to be within 80% of its best), forward and backward timed separately,
one head per Numba thread, E = 64, no mask. The result shows how far the rule's choice
(``attention_ref.flash_numba.tile_sizes``) is from the best candidate on this machine; notebook 06
and benchmarks/README.md quote it.

    python benchmarks/scan_tiles.py                       # float32, N = 4096
    python benchmarks/scan_tiles.py --dtype float64 --n 2048
    python benchmarks/scan_tiles.py --output benchmarks/results/tiles_avx512.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

FWD = [(bq, bk) for bq in (32, 64, 128, 256) for bk in (128, 256, 512, 1024)]
BWD = [(bq, bk) for bq in (32, 64, 128, 256) for bk in (64, 128, 256, 512)]


def scan(dtype: str, N: int, rounds: int, wait_s: float) -> dict:
    import numba
    from bench_cpu import SETTLE_S, QuietGate, machine_info

    from attention_ref.flash_numba import numba_flash_backward, numba_flash_forward, tile_sizes

    heads = numba.get_num_threads()
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((heads, N, 64)).astype(dtype) for _ in range(4))
    os.environ.pop("ATTENTION_REF_TILES", None)
    rule = {d: tile_sizes(dtype, d) for d in ("forward", "backward")}
    out, lse = numba_flash_forward(q, k, v)
    calls = {}
    for bq, bk in FWD:
        calls[("forward", bq, bk)] = lambda: numba_flash_forward(q, k, v)
    for bq, bk in BWD:
        calls[("backward", bq, bk)] = lambda: numba_flash_backward(q, k, v, out, lse, do)
    best: dict = {}
    gate = QuietGate(wait_s)
    for r in range(rounds):
        keys = list(calls) if r % 2 == 0 else list(calls)[::-1]
        for key in keys:
            os.environ["ATTENTION_REF_TILES"] = f"{key[1]}x{key[2]}"
            if r == 0:
                calls[key]()  # warm-up (compilation is shared: tiles are run-time arguments)
            gate.wait()  # then let the probe's BLAS threads stop spinning and wake up again
            time.sleep(SETTLE_S)
            calls[key]()
            t = time.perf_counter()
            calls[key]()
            ms = 1e3 * (time.perf_counter() - t)
            best[key] = min(best.get(key, ms), ms)
    os.environ.pop("ATTENTION_REF_TILES", None)
    flops = 4.0 * N * N * 64 * heads
    result = {"machine": machine_info(), "dtype": dtype, "N": N, "heads": heads, "rounds": rounds,
              "probe_best_gflops": gate.best,
              "rule": {d: [c["block_q"], c["block_k"], c["reason"]] for d, c in rule.items()},
              "forward_ms": {}, "backward_ms": {}}
    for (direction, bq, bk), ms in best.items():
        result[f"{direction}_ms"][f"{bq}x{bk}"] = ms
    for direction, factor in (("forward", 1.0), ("backward", 2.5)):
        times = result[f"{direction}_ms"]
        winner = min(times, key=times.get)
        rq, rk = rule[direction]["block_q"], rule[direction]["block_k"]
        result[f"{direction}_best"] = {"tiles": winner, "ms": times[winner],
                                       "gflops": factor * flops / (times[winner] * 1e6)}
        result[f"{direction}_rule"] = {"tiles": f"{rq}x{rk}", "ms": times.get(f"{rq}x{rk}"),
                                       "gflops": factor * flops / (times[f"{rq}x{rk}"] * 1e6)
                                       if f"{rq}x{rk}" in times else None}
    return result


def report(res: dict) -> str:
    m = res["machine"]
    lines = [f"{m['cpu']} | numba target {m['llvm_cpu']} ({m['isa']}) | BLAS {m['blas_kernel']} | "
             f"{res['dtype']}, N = {res['N']}, {res['heads']} heads x 1 thread each, best of "
             f"{res['rounds']} rounds (ms)"]
    for direction, grid in (("forward", FWD), ("backward", BWD)):
        bks = sorted({bk for _, bk in grid})
        bqs = sorted({bq for bq, _ in grid})
        lines.append(f"{direction:9s} B_q \\ B_k " + "".join(f"{bk:>8d}" for bk in bks))
        for bq in bqs:
            lines.append(f"{'':9s} {bq:9d} " + "".join(
                f"{res[f'{direction}_ms'][f'{bq}x{bk}']:8.1f}" for bk in bks))
        b, r = res[f"{direction}_best"], res[f"{direction}_rule"]
        lines.append(f"  best {b['tiles']} {b['ms']:.1f} ms ({b['gflops']:.0f} GFLOP/s); rule "
                     f"{r['tiles']} {r['ms']:.1f} ms ({r['gflops']:.0f} GFLOP/s), "
                     f"{r['ms'] / b['ms']:.2f}x the best")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--wait-quiet", type=float, default=30.0, metavar="SECONDS",
                    help="before each timing, wait up to this long for the machine probe to "
                    "recover (bench_cpu.QuietGate)")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    res = scan(args.dtype, args.n, args.rounds, args.wait_quiet)
    res["report"] = report(res)
    print(res["report"])
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
