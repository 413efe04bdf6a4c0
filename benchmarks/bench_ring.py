"""Ring attention over real MPI processes: memory per rank and time per step on this machine.

Runs ``mpiexec -n R python -m attention_ref.ring ...`` (the course's demo) for a few
configurations, each in fresh processes, and writes ``benchmarks/results/ring.json`` (with the
machine) and a table on stdout; notebook 10 draws its figures of measured runs from the JSON:

* the headline: N = 32768 tokens, causal, zigzag, R = 4 ranks — peak extra memory per rank
  (tracemalloc, NumPy/Python allocations made by ring_attention) against one process running
  flash_attention over the whole sequence (measured by rank 0 afterwards, on the same inputs);
* memory and time per rank against R (N = 16384, R = 1, 2, 4);
* contiguous against zigzag, and blocking Sendrecv against Isend/Irecv (N = 16384, R = 4);
* compute against waiting per step for N = 4096 ... 32768 (R = 4).

Each rank runs one BLAS thread (OMP_NUM_THREADS=1). With 4 ranks on a 2-core machine the ranks
share cores, so "waiting" includes time a rank was not scheduled: these are facts of this machine,
not of a cluster. Usage: ``.venv/bin/python benchmarks/bench_ring.py [--quick]`` (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ring.json"
COMMON = ["--heads", "4", "--head-dim", "64", "--dtype", "float32", "--seed", "0"]


def _runs(quick: bool) -> list[dict]:
    big = 8192 if quick else 32768
    mid = 4096 if quick else 16384
    runs = [{"name": "headline", "R": 4, "args": ["--seq-len", str(big), "--causal", "--layout", "zigzag"]}]
    for R in (1, 2, 4):
        runs.append({"name": f"memory_vs_R_{R}", "R": R,
                     "args": ["--seq-len", str(mid), "--causal", "--layout", "zigzag", "--no-check"]})
    runs.append({"name": "contiguous", "R": 4,
                 "args": ["--seq-len", str(mid), "--causal", "--layout", "contiguous", "--no-check"]})
    runs.append({"name": "sendrecv", "R": 4,
                 "args": ["--seq-len", str(mid), "--causal", "--layout", "zigzag", "--sendrecv", "--no-check"]})
    for N in ((1024, 2048) if quick else (4096, 8192)):
        runs.append({"name": f"steps_N_{N}", "R": 4,
                     "args": ["--seq-len", str(N), "--causal", "--layout", "zigzag", "--no-check"]})
    return runs


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run_one(run: dict) -> dict:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ring.json"
        cmd = [str(mpiexec), "-n", str(run["R"]), sys.executable, "-m", "attention_ref.ring",
               *run["args"], *COMMON, "--json", str(out)]
        print("$", " ".join(["mpiexec", *cmd[1:3], "python", *cmd[4:-2]]), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        print(proc.stdout, flush=True)
        result = json.loads(out.read_text())
    result["name"] = run["name"]
    return result


def table(results: dict) -> str:
    mib = 2**20
    lines = ["| run | N | R | layout | comm | slowest rank s | inputs/rank MiB | peak extra/rank MiB "
             "| one process: inputs, peak extra MiB | max error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["runs"]:
        c, ranks = r["config"], r["ranks"]
        one = r.get("one_process")
        one_text = "" if one is None else (
            f"{one['inputs_held_bytes'] / mib:.1f}, {one['peak_extra_bytes'] / mib:.1f}")
        lines.append(
            f"| {r['name']} | {c['seq_len']} | {c['world_size']} | {c['layout']} | {c['communication']} "
            f"| {max(x['seconds'] for x in ranks):.2f} "
            f"| {max(x['inputs_held_bytes'] for x in ranks) / mib:.1f} "
            f"| {max(x['peak_extra_bytes'] for x in ranks) / mib:.1f} "
            f"| {one_text} "
            f"| {r.get('max_abs_error', float('nan')):.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    runs = [run_one(run) for run in _runs(args.quick)]
    results = {"machine": runs[0]["machine"], "common_args": COMMON,
               "threads_per_rank": 1, "runs": runs}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
