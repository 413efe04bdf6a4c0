"""Stage 10: ring attention over real MPI processes (mpiexec -n 2 and -n 4, oversubscribed).

Each test launches the virtualenv's own ``mpiexec`` (from the MPICH wheel of the ``mpi`` extra)
with a time limit, because a mismatched send/receive would hang. The launched script is this file:
run as ``python tests/test_ring_mpi.py`` it is the worker that every rank runs (see ``worker``).
The tests are skipped, with the reason, only where MPI itself cannot start.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

TOL = {"float64": 1e-10, "float32": 1e-5}
TIMEOUT_S = 300  # generous: 4 ranks share 2 cores in CI


# ---------------------------------------------------------------------------------------------
# the worker: every rank runs this; rank 0 prints one JSON line of results
# ---------------------------------------------------------------------------------------------


def worker() -> None:
    import numpy as np
    from mpi4py import MPI

    from attention_ref import flash_attention, flash_attention_backward
    from attention_ref.ring import (
        local_shard,
        ring_attention,
        ring_attention_backward,
        ring_attention_sendrecv,
        unshard,
    )

    comm = MPI.COMM_WORLD
    R, rank = comm.Get_size(), comm.Get_rank()
    rng = np.random.default_rng(1234)  # the same inputs on every rank
    cases = []
    grid = itertools.product([False, True], ["contiguous", "zigzag"], [False, True],
                             ["float64", "float32"])
    for is_causal, layout, gqa, dtype in grid:
        N = 2 * R * 5 + 3  # not divisible by 2R
        Hq, Hkv = (4, 2) if gqa else (2, 2)
        q, k, v, grad_out = (rng.standard_normal(s).astype(dtype) for s in
                             ((2, Hq, N, 8), (2, Hkv, N, 8), (2, Hkv, N, 5), (2, Hq, N, 5)))
        mine = [local_shard(x, R, rank, layout=layout) for x in (q, k, v)]
        kw = {"is_causal": is_causal, "layout": layout, "enable_gqa": gqa}
        out, lse = ring_attention(*mine, comm, return_lse=True, **kw)
        out_sendrecv = ring_attention_sendrecv(*mine, comm, **kw)
        grads = ring_attention_backward(*mine, out, lse, local_shard(grad_out, R, rank, layout=layout),
                                        comm, **kw)
        gathered = comm.gather((out, out_sendrecv, *grads), root=0)
        if rank == 0:
            ref, ref_lse = flash_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa, return_lse=True)
            ref_grads = flash_attention_backward(q, k, v, ref, ref_lse, grad_out, is_causal=is_causal,
                                                 enable_gqa=gqa)
            got = [unshard([g[i] for g in gathered], layout=layout) for i in range(5)]
            want = [ref, ref, *ref_grads]
            errors = [float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                      for a, b in zip(got, want, strict=True)]
            scales = [float(np.max(np.abs(b))) for b in want]
            cases.append({"causal": is_causal, "layout": layout, "gqa": gqa, "dtype": dtype, "N": N,
                          "dtypes": [str(a.dtype) for a in got], "errors": errors, "scales": scales})
    # mismatched shards must raise the same error on every rank, not hang in a transfer
    bad = np.zeros((1, 1, 3 + 2 * rank, 4))  # lengths 3, 5, ...: no layout of N cuts these
    try:
        ring_attention(bad, bad, bad, comm)
        message = None
    except ValueError as exc:
        message = str(exc)
    messages = comm.gather(message, root=0)
    # a misshapen grad_out on one rank only: every rank raises, naming it
    good = np.zeros((1, 1, 4, 4))
    try:
        ring_attention_backward(good, good, good, good, good[..., 0], good[..., :3 if rank == 1 else 4],
                                comm)
        grad_message = None
    except ValueError as exc:
        grad_message = str(exc)
    grad_messages = comm.gather(grad_message, root=0)
    # a bad option on rank 1 only, and options that differ between ranks: the same error everywhere
    option_messages = []
    for bad in ({"is_causal": "no" if rank == 1 else False}, {"is_causal": rank == 1},
                {"scale": 0.5 if rank == 1 else None}):
        try:
            ring_attention(good, good, good, comm, **bad)
            option_messages.append(None)
        except (TypeError, ValueError) as exc:
            option_messages.append(f"{type(exc).__name__}: {exc}")
    option_messages = comm.gather(option_messages, root=0)
    if rank == 0:
        print(json.dumps({"world_size": R, "cases": cases, "bad_shard_messages": messages,
                          "bad_grad_out_messages": grad_messages, "bad_option_messages": option_messages}))


# ---------------------------------------------------------------------------------------------
# the tests: launch mpiexec
# ---------------------------------------------------------------------------------------------


def _mpiexec() -> Path:
    return Path(sys.executable).parent / "mpiexec"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _launch(n: int, args: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([str(_mpiexec()), "-n", str(n), sys.executable, *args],
                          capture_output=True, text=True, timeout=timeout, env=_env())


@functools.cache
def _why_mpi_cannot_start() -> str | None:
    """None when 2 ranks can start and pass a message; otherwise the reason."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install 'attention_ref[mpi]')"
    if not _mpiexec().exists():
        return f"no mpiexec next to {sys.executable} (pip install 'attention_ref[mpi]')"
    probe = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
             "x = c.sendrecv(c.Get_rank(), dest=(c.Get_rank() + 1) % 2, source=(c.Get_rank() + 1) % 2); "
             "assert x == 1 - c.Get_rank()")
    try:
        result = _launch(2, ["-c", probe], timeout=60)
    except subprocess.TimeoutExpired:
        return "mpiexec -n 2 did not finish a one-message probe within 60 s"
    if result.returncode != 0:
        return f"mpiexec -n 2 cannot start here: {(result.stderr or result.stdout).strip()[-400:]}"
    return None


def _skip_without_mpi():
    import pytest

    reason = _why_mpi_cannot_start()
    if reason is not None:
        pytest.skip(reason)


def _run_worker(n: int) -> dict:
    result = _launch(n, [__file__])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check(report: dict, n: int) -> None:
    assert report["world_size"] == n
    assert len(report["cases"]) == 16
    names = ["forward (Isend/Irecv)", "forward (Sendrecv)", "dq", "dk", "dv"]
    for case in report["cases"]:
        assert case["dtypes"] == [case["dtype"]] * 5, case
        for name, err, scale in zip(names, case["errors"], case["scales"]):
            assert err <= TOL[case["dtype"]] * max(1.0, scale), (name, case)
    messages = report["bad_shard_messages"]
    assert messages[0] is not None and "cut the inputs with shard()" in messages[0]
    assert messages == [messages[0]] * n  # the same error on every rank
    grad_messages = report["bad_grad_out_messages"]
    assert grad_messages == [grad_messages[0]] * n
    assert "grad_out must have shape (1, 1, 4, 4)" in grad_messages[0] and "on rank 1" in grad_messages[0]
    option_messages = report["bad_option_messages"]
    assert option_messages == [option_messages[0]] * n
    bad_type, causal_differs, scale_differs = option_messages[0]
    assert bad_type == "TypeError: is_causal must be True or False, got 'no' (on rank 1)"
    assert causal_differs.startswith("ValueError: every rank must pass the same")
    assert "rank 1 (True, 'contiguous', False, None)" in causal_differs
    assert scale_differs.startswith("ValueError: every rank must pass the same")


def test_mpiexec_2_ranks_equal_whole_sequence_attention():
    _skip_without_mpi()
    _check(_run_worker(2), 2)


def test_mpiexec_4_ranks_oversubscribed_equal_whole_sequence_attention():
    _skip_without_mpi()
    _check(_run_worker(4), 4)


def test_demo_command_line(tmp_path):
    """`mpiexec -n 4 python -m attention_ref.ring ...` gathers, checks and reports (small N)."""
    _skip_without_mpi()
    out = tmp_path / "ring.json"
    result = _launch(4, ["-m", "attention_ref.ring", "--seq-len", "203", "--causal", "--layout",
                         "zigzag", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                         "--dtype", "float64", "--backward", "--json", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max |ring − flash_attention over the whole sequence|" in result.stdout
    report = json.loads(out.read_text())
    assert report["max_abs_error"] <= TOL["float64"]
    assert report["backward_max_abs_error"] <= TOL["float64"]
    assert report["config"]["world_size"] == 4 and report["machine"]["cores"] >= 1
    ranks = report["ranks"]
    from attention_ref import shard_spans

    assert [r["shard_tokens"] for r in ranks] == [sum(b - a for a, b in s)
                                                  for s in shard_spans(203, 4, "zigzag")]
    for r in ranks:
        assert len(r["compute_s"]) == len(r["wait_s"]) == 4
        assert r["peak_extra_bytes"] > 0 and r["max_rss_bytes"] > 0


if __name__ == "__main__":
    worker()
