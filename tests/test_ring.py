"""Stage 10: ring attention without MPI — shards, the per-rank step, and the in-process simulator.

The simulator runs the same per-rank step functions as the MPI ring (tests/test_ring_mpi.py runs
those over real mpiexec); here every combination of R, mask, layout, GQA and awkward lengths is
checked against whole-sequence attention.
"""

import itertools
import subprocess
import sys

import numpy as np
import pytest
from arrays import namespace_name, to_numpy

from attention_ref import (
    attention_backward,
    flash_attention,
    flash_attention_backward,
    local_shard,
    ring_attention_backward_step,
    ring_attention_step,
    scaled_dot_product_attention,
    shard,
    shard_spans,
    simulate_ring_attention,
    simulate_ring_attention_backward,
    unshard,
    visible_chunk_pairs,
)

TOL = {"float64": 1e-10, "float32": 1e-5}
LAYOUTS = ["contiguous", "zigzag"]


def _qkv(rng, N, *, Hq=2, Hkv=2, E=8, Ev=6, B=2, dtype="float64"):
    return (rng.standard_normal((B, Hq, N, E)).astype(dtype),
            rng.standard_normal((B, Hkv, N, E)).astype(dtype),
            rng.standard_normal((B, Hkv, N, Ev)).astype(dtype))


# ---------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("N", [0, 1, 5, 7, 16, 37, 48])
@pytest.mark.parametrize("R", [1, 2, 3, 4, 5])
def test_spans_cover_every_position_once(N, R, layout):
    spans = shard_spans(N, R, layout)
    assert len(spans) == R
    positions = [p for rank in spans for a, b in rank for p in range(a, b)]
    assert sorted(positions) == list(range(N))
    lengths = [sum(b - a for a, b in rank) for rank in spans]
    assert max(lengths) - min(lengths) <= (1 if layout == "contiguous" else 2)
    for rank in spans:  # positions grow along a shard: top-left causal works inside it
        flat = [p for a, b in rank for p in range(a, b)]
        assert flat == sorted(flat)


def test_zigzag_pairs_an_early_and_a_late_chunk():
    assert shard_spans(16, 4, "zigzag") == [[(0, 2), (14, 16)], [(2, 4), (12, 14)],
                                            [(4, 6), (10, 12)], [(6, 8), (8, 10)]]
    assert shard_spans(10, 3, "contiguous") == [[(0, 3)], [(3, 6)], [(6, 10)]]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("N, R", [(37, 4), (48, 3), (3, 4), (0, 2)])
def test_shard_unshard_round_trip(xp, rng, N, R, layout):
    x = xp.asarray(rng.standard_normal((2, 3, N, 5)))
    pieces = shard(x, R, layout=layout)
    assert [p.shape[-2] for p in pieces] == [sum(b - a for a, b in s) for s in shard_spans(N, R, layout)]
    assert all(namespace_name(p) == namespace_name(x) for p in pieces)
    np.testing.assert_array_equal(to_numpy(unshard(pieces, layout=layout)), to_numpy(x))
    lse_like = xp.asarray(rng.standard_normal((2, N)))  # the sequence on the last axis
    back = unshard(shard(lse_like, R, layout=layout, axis=-1), layout=layout, axis=-1)
    np.testing.assert_array_equal(to_numpy(back), to_numpy(lse_like))
    for r in range(R):
        np.testing.assert_array_equal(to_numpy(local_shard(x, R, r, layout=layout)), to_numpy(pieces[r]))


def test_shard_errors():
    x = np.zeros((2, 10, 4))
    with pytest.raises(ValueError, match="layout must be one of"):
        shard(x, 2, layout="striped")
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        shard(x, 0)
    with pytest.raises(TypeError, match="world_size must be an int"):
        shard(x, 2.0)
    with pytest.raises(ValueError, match="rank must be an int in"):
        local_shard(x, 2, 2)
    with pytest.raises(TypeError, match="rank must be an int"):
        local_shard(x, 2, True)
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        shard(x, 2, axis=3)
    with pytest.raises(TypeError, match="x must be an array, got list"):
        shard(x.tolist(), 2)
    with pytest.raises(ValueError, match=r"shard lengths \[5, 4\]"):
        unshard([x[:, :5], x[:, 5:9]])
    with pytest.raises(TypeError, match="shards must be a list of arrays"):
        unshard(x)
    with pytest.raises(TypeError, match=r"shards\[1\] must be an array"):
        unshard([x, None])


# ---------------------------------------------------------------------------------------------
# which chunk pairs a causal mask leaves
# ---------------------------------------------------------------------------------------------


def test_visible_chunk_pairs():
    assert visible_chunk_pairs([(4, 8)], [(0, 4)], True) == [(0, 0, "full")]
    assert visible_chunk_pairs([(4, 8)], [(4, 8)], True) == [(0, 0, "diagonal")]
    assert visible_chunk_pairs([(0, 4)], [(4, 8)], True) == []
    assert visible_chunk_pairs([(0, 4)], [(4, 8)], False) == [(0, 0, "full")]
    # zigzag, R = 2: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    r0, r1 = shard_spans(16, 2, "zigzag")
    assert visible_chunk_pairs(r0, r0, True) == [(0, 0, "diagonal"), (1, 0, "full"), (1, 1, "diagonal")]
    assert visible_chunk_pairs(r0, r1, True) == [(1, 0, "full"), (1, 1, "full")]  # late queries only
    assert visible_chunk_pairs(r1, r0, True) == [(0, 0, "full"), (1, 0, "full")]  # early keys only
    assert visible_chunk_pairs([(0, 0)], [(0, 4)], False) == []  # empty chunks are skipped
    with pytest.raises(ValueError, match="overlap partly"):
        visible_chunk_pairs([(0, 4)], [(2, 6)], True)


# ---------------------------------------------------------------------------------------------
# forward and backward equal whole-sequence attention
# ---------------------------------------------------------------------------------------------

GRID = list(itertools.product([1, 2, 3, 4], [False, True], LAYOUTS, [False, True]))


@pytest.mark.parametrize("R, is_causal, layout, gqa", GRID)
def test_simulated_forward_equals_whole_sequence_attention(rng, R, is_causal, layout, gqa):
    N = 37  # divisible by neither R nor 2R (R > 1)
    q, k, v = _qkv(rng, N, Hq=4 if gqa else 2, Hkv=2)
    out, lse, events = simulate_ring_attention(q, k, v, R, is_causal=is_causal, layout=layout,
                                               enable_gqa=gqa, return_lse=True)
    ref = scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
    _, ref_lse = flash_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa, return_lse=True)
    assert out.shape == ref.shape and out.dtype == np.float64
    assert np.max(np.abs(out - ref)) <= TOL["float64"]
    assert np.max(np.abs(lse - ref_lse)) <= TOL["float64"]
    assert len(events) == R * R


@pytest.mark.parametrize("R, is_causal, layout, gqa", GRID)
def test_simulated_backward_equals_whole_sequence_backward(rng, R, is_causal, layout, gqa):
    N = 29
    q, k, v = _qkv(rng, N, Hq=4 if gqa else 2, Hkv=2)
    grad_out = rng.standard_normal((2, q.shape[1], N, v.shape[-1]))
    out, lse, _ = simulate_ring_attention(q, k, v, R, is_causal=is_causal, layout=layout,
                                          enable_gqa=gqa, return_lse=True)
    dq, dk, dv, events = simulate_ring_attention_backward(
        q, k, v, out, lse, grad_out, R, is_causal=is_causal, layout=layout, enable_gqa=gqa)
    ref_out, ref_lse = flash_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa, return_lse=True)
    ref = flash_attention_backward(q, k, v, ref_out, ref_lse, grad_out, is_causal=is_causal,
                                   enable_gqa=gqa)
    materialised = attention_backward(q, k, v, grad_out, is_causal=is_causal, enable_gqa=gqa)
    for got, want, also in zip((dq, dk, dv), ref, materialised):
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) <= TOL["float64"]
        assert np.max(np.abs(got - also)) <= TOL["float64"]
    # K, V, dK, dV travel at every step but the last, where only dK, dV go home
    if R > 1:
        assert all(e.sent_to == (e.rank + 1) % R for e in events)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("N", [1, 3, 7, 8])  # fewer tokens than chunks, and exactly 2R
def test_tiny_sequences(rng, N, layout):
    q, k, v = _qkv(rng, N)
    out, _ = simulate_ring_attention(q, k, v, 4, is_causal=True, layout=layout)
    ref = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert np.max(np.abs(out - ref)) <= TOL["float64"]


def test_empty_sequence(rng):
    q, k, v = _qkv(rng, 0)
    out, events = simulate_ring_attention(q, k, v, 3, is_causal=True, layout="zigzag")
    assert out.shape == (2, 2, 0, 6) and all(e.work == 0 for e in events)


def test_scale_and_different_value_size(rng):
    q, k, v = _qkv(rng, 23, E=16, Ev=3)
    out, _ = simulate_ring_attention(q, k, v, 3, is_causal=True, layout="zigzag", scale=0.3)
    ref = scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert np.max(np.abs(out - ref)) <= TOL["float64"]


def test_float32_in_float32_out(rng):
    q, k, v = _qkv(rng, 41, dtype="float32")
    out, lse, _ = simulate_ring_attention(q, k, v, 3, is_causal=True, layout="zigzag",
                                          return_lse=True)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    ref = scaled_dot_product_attention(*(x.astype(np.float64) for x in (q, k, v)), is_causal=True)
    assert np.max(np.abs(out - ref)) <= TOL["float32"]
    grad_out = rng.standard_normal(out.shape).astype(np.float32)
    grads = simulate_ring_attention_backward(q, k, v, out, lse, grad_out, 3, is_causal=True,
                                             layout="zigzag")[:3]
    ref_grads = attention_backward(*(x.astype(np.float64) for x in (q, k, v, grad_out)), is_causal=True)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == np.float32
        assert np.max(np.abs(got - want)) <= 1e-4 * max(1.0, np.max(np.abs(want)))


def test_float16_accumulates_in_float32(rng):
    q, k, v = _qkv(rng, 30, dtype="float16")
    out, lse, _ = simulate_ring_attention(q, k, v, 3, is_causal=True, layout="zigzag",
                                          return_lse=True)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    ref = scaled_dot_product_attention(*(x.astype(np.float64) for x in (q, k, v)), is_causal=True)
    assert np.max(np.abs(out.astype(np.float64) - ref)) <= 5e-3


def test_array_api_namespaces(xp, rng):
    q, k, v = _qkv(rng, 19)
    out, _ = simulate_ring_attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), 3,
                                     is_causal=True, layout="zigzag")
    assert namespace_name(out) == namespace_name(xp.asarray(q))
    ref = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert np.max(np.abs(to_numpy(out) - ref)) <= TOL["float64"]


def test_inputs_are_not_modified(rng):
    q, k, v = _qkv(rng, 21)
    copies = [x.copy() for x in (q, k, v)]
    out, lse, _ = simulate_ring_attention(q, k, v, 3, is_causal=True, layout="zigzag", return_lse=True)
    simulate_ring_attention_backward(q, k, v, out, lse, np.ones_like(out), 3, is_causal=True,
                                     layout="zigzag")
    for x, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(x, c)


# ---------------------------------------------------------------------------------------------
# the per-rank step and the record of the simulator
# ---------------------------------------------------------------------------------------------


def test_one_step_merges_into_the_running_result(rng):
    """Rank 1 of 2 (contiguous, causal): its own block, then rank 0's, equals attention over both."""
    q, k, v = _qkv(rng, 10)
    spans = shard_spans(10, 2, "contiguous")
    q1, k0, v0, k1, v1 = q[..., 5:, :], k[..., :5, :], v[..., :5, :], k[..., 5:, :], v[..., 5:, :]
    out, lse = np.zeros((2, 2, 5, 6)), np.full((2, 2, 5), -np.inf)
    out, lse = ring_attention_step(q1, k1, v1, out, lse, spans[1], spans[1], is_causal=True)
    out, lse = ring_attention_step(q1, k0, v0, out, lse, spans[1], spans[0], is_causal=True)
    ref = scaled_dot_product_attention(q, k, v, is_causal=True)[..., 5:, :]
    assert np.max(np.abs(out - ref)) <= TOL["float64"]
    # a block the mask hides entirely changes nothing
    out2, lse2 = ring_attention_step(q[..., :5, :], k1, v1, out, lse, spans[0], spans[1], is_causal=True)
    np.testing.assert_array_equal(out2, out)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("R", [2, 3, 4])
def test_record_counts_every_logit_once(rng, R, layout):
    N = 40
    q, k, v = _qkv(rng, N, B=1, Hq=1, Hkv=1)
    for is_causal, total in ((True, N * (N + 1) // 2), (False, N * N)):
        _, events = simulate_ring_attention(q, k, v, R, is_causal=is_causal, layout=layout)
        assert sum(e.work for e in events) == total
        assert [(e.step, e.rank) for e in events] == [(s, r) for s in range(R) for r in range(R)]
        for e in events:
            assert e.block == (e.rank - e.step) % R  # the schedule: step s holds rank r − s's block
            if e.step < R - 1:
                assert e.sent_to == (e.rank + 1) % R
                assert e.bytes_sent == 8 * (8 + 6) * sum(b - a for a, b in shard_spans(N, R, layout)[e.block])
            else:
                assert e.sent_to is None and e.bytes_sent == 0


@pytest.mark.parametrize("R", [2, 4, 8])
def test_zigzag_balances_causal_work(rng, R):
    N = 16 * R
    q, k, v = _qkv(rng, N, B=1, Hq=1, Hkv=1, E=2, Ev=2)
    work = {}
    for layout in LAYOUTS:
        _, events = simulate_ring_attention(q, k, v, R, is_causal=True, layout=layout)
        grid = np.zeros((R, R), dtype=int)  # [step, rank]
        for e in events:
            grid[e.step, e.rank] = e.work
        work[layout] = grid
    # contiguous: rank 0 works at step 0 only, rank R−1 at every step
    assert np.count_nonzero(work["contiguous"][:, 0]) == 1
    assert np.count_nonzero(work["contiguous"][:, R - 1]) == R
    # zigzag: after the diagonal step every rank does the same work at every step
    assert np.all(work["zigzag"][1:] == work["zigzag"][1, 0])
    # the ring waits for its slowest rank at every step: with n = N/R tokens per rank and chunks
    # of c = n/2, contiguous takes diag(n) + (R−1)·n², zigzag 2·diag(c) + c² + (R−1)·2c²
    # (about half as much, R/(2R−1) of it)
    n, c = N // R, N // (2 * R)
    diag = lambda m: m * (m + 1) // 2
    slowest = {lay: work[lay].max(axis=1).sum() for lay in LAYOUTS}
    assert slowest["contiguous"] == diag(n) + (R - 1) * n * n
    assert slowest["zigzag"] == 2 * diag(c) + c * c + (R - 1) * 2 * c * c


# ---------------------------------------------------------------------------------------------
# input contract, packaging
# ---------------------------------------------------------------------------------------------


BAD_INPUTS = {  # the same bad input, as SDPA and flash_attention see it
    "integer query": lambda q, k, v: (q.astype(np.int64), k, v),
    "float32 query beside float64": lambda q, k, v: (q.astype(np.float32), k, v),
    "a list": lambda q, k, v: (q.tolist(), k, v),
    "None": lambda q, k, v: (q, None, v),
    "heads not a multiple": lambda q, k, v: (np.concatenate([q, q[:, :1]], axis=1), k, v),
    "key and value of different lengths": lambda q, k, v: (q, k, v[..., :10, :]),
    "one dimension": lambda q, k, v: (q[0, 0, 0], k, v),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_inputs_get_the_contracts_error(rng, bad):
    """The simulator and the per-rank step raise what scaled_dot_product_attention raises."""
    q, k, v = BAD_INPUTS[bad](*_qkv(rng, 12))
    with pytest.raises((TypeError, ValueError)) as expected:
        scaled_dot_product_attention(q, k, v)
    with pytest.raises(expected.type) as simulated:
        simulate_ring_attention(q, k, v, 2)
    assert str(simulated.value) == str(expected.value)
    spans = shard_spans(12, 1, "contiguous")[0]
    with pytest.raises(expected.type) as stepped:
        ring_attention_step(q, k, v, np.zeros((2, 2, 12, 6)), np.zeros((2, 2, 12)), spans, spans)
    assert str(stepped.value) == str(expected.value)


def test_bad_ring_inputs(rng):
    q, k, v = _qkv(rng, 12)
    with pytest.raises(ValueError, match="self-attention: query and key must cover the same tokens"):
        simulate_ring_attention(q, k[..., :10, :], v[..., :10, :], 2)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        simulate_ring_attention(q, k, v, 0)
    with pytest.raises(TypeError, match="world_size must be an int"):
        simulate_ring_attention(q, k, v, 2.0)
    with pytest.raises(ValueError, match="layout must be one of"):
        simulate_ring_attention(q, k, v, 2, layout="striped")
    with pytest.raises(TypeError, match="is_causal must be True or False"):
        simulate_ring_attention(q, k, v, 2, is_causal="no")
    with pytest.raises(TypeError, match="return_lse must be True or False"):
        simulate_ring_attention(q, k, v, 2, return_lse=1)
    with pytest.raises(TypeError, match="scale must be a real number"):
        simulate_ring_attention(q, k, v, 2, scale="0.3")


def test_bad_step_inputs(rng):
    q, k, v = _qkv(rng, 12)
    out, lse = np.zeros((2, 2, 12, 6)), np.full((2, 2, 12), -np.inf)
    spans = [(0, 12)]
    with pytest.raises(ValueError, match=r"out must have shape \(2, 2, 12, 6\) for query"):
        ring_attention_step(q, k, v, out[..., :5], lse, spans, spans)
    with pytest.raises(TypeError, match="lse must be a floating-point array, got NoneType"):
        ring_attention_step(q, k, v, out, None, spans, spans)
    with pytest.raises(ValueError, match=r"q_spans \[\(0, 10\)\] cover 10 tokens, but query has 12"):
        ring_attention_step(q, k, v, out, lse, [(0, 10)], spans)
    with pytest.raises(ValueError, match="kv_spans .* cover 11 tokens, but key has 12"):
        ring_attention_step(q, k, v, out, lse, spans, [(0, 5), (6, 12)])
    with pytest.raises(TypeError, match="kv_spans must be a list of chunks"):
        ring_attention_step(q, k, v, out, lse, spans, (0, 12))
    with pytest.raises(TypeError, match="q_spans entries must be an int"):
        ring_attention_step(q, k, v, out, lse, [(0.0, 12.0)], spans)
    with pytest.raises(ValueError, match="start <= stop"):
        ring_attention_step(q, k, v, out, lse, [(12, 0)], spans)
    with pytest.raises(TypeError, match="is_causal must be True or False"):
        ring_attention_step(q, k, v, out, lse, spans, spans, is_causal=None)
    grads = (np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape))
    with pytest.raises(ValueError, match=r"dk_blk must have shape \(2, 2, 12, 8\) like key"):
        ring_attention_backward_step(q, k, v, out, lse, out, grads[0], grads[1][..., :3], grads[2],
                                     spans, spans)
    with pytest.raises(TypeError, match="grad_out must be a floating-point array"):
        ring_attention_backward_step(q, k, v, out, lse, out.astype(int), *grads, spans, spans)


def test_two_dimensional_inputs_work_as_in_sdpa(rng):
    q, k, v = (x[0, 0] for x in _qkv(rng, 12))  # (N, E): no batch, no heads
    out, _ = simulate_ring_attention(q, k, v, 3, is_causal=True, layout="zigzag")
    ref = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert np.max(np.abs(out - ref)) <= TOL["float64"]


EXPORT_CHILD = """
import importlib.util, pickle, sys
sys.path.append(sys.argv[1])  # NumPy, and nothing else
try:
    import attention_ref
except ImportError:
    pass
else:
    raise SystemExit("attention_ref is importable: this interpreter is not NumPy-only")
spec = importlib.util.spec_from_file_location("exported", sys.argv[2])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
name, calls = pickle.loads(sys.stdin.buffer.read())
sys.stdout.buffer.write(pickle.dumps([getattr(module, name)(*args, **kw) for args, kw in calls]))
"""


@pytest.mark.parametrize("name", ["ring_attention_step", "ring_attention_backward_step"])
def test_the_steps_export_to_numpy_only_files(rng, tmp_path, name):
    """`python -m attention_ref.export` gives a file that runs where only NumPy is importable."""
    import pickle
    from pathlib import Path

    import attention_ref
    from attention_ref.export import export

    numpy_only = tmp_path / "numpy_only"
    numpy_only.mkdir()
    for entry in Path(np.__file__).resolve().parent.parent.iterdir():
        if entry.name == "numpy" or entry.name.startswith(("numpy.libs", "numpy-")):
            (numpy_only / entry.name).symlink_to(entry)
    (tmp_path / "step.py").write_text(export(name))
    q, k, v = _qkv(rng, 19, Hq=4, Hkv=2)
    out, lse = flash_attention(q, k, v, is_causal=True, enable_gqa=True, return_lse=True)
    spans, shards = shard_spans(19, 3, "zigzag"), [shard(x, 3, layout="zigzag") for x in (q, k, v, out)]
    kw = {"is_causal": True, "enable_gqa": True}
    calls = []
    for owner in range(3):  # rank 1 with each block
        qr, kb, vb, orr = shards[0][1], shards[1][owner], shards[2][owner], shards[3][1]
        lr = shard(lse, 3, layout="zigzag", axis=-1)[1]
        if name == "ring_attention_step":
            args = (qr, kb, vb, np.zeros_like(orr), np.full(lr.shape, -np.inf), spans[1], spans[owner])
        else:
            args = (qr, kb, vb, orr, lr, orr, np.zeros_like(qr), np.zeros_like(kb), np.zeros_like(vb),
                    spans[1], spans[owner])
        calls.append((args, kw))
    run = subprocess.run([sys.executable, "-I", "-S", "-c", EXPORT_CHILD, str(numpy_only), str(tmp_path / "step.py")],
                         input=pickle.dumps((name, calls)), capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    for got, (args, kw) in zip(pickle.loads(run.stdout), calls):
        for g, w in zip(got, getattr(attention_ref, name)(*args, **kw)):
            np.testing.assert_array_equal(g, w)


def test_ring_module_does_not_import_mpi():
    code = ("import sys, attention_ref, attention_ref.ring; attention_ref.ring_attention; "
            "sys.exit(1 if 'mpi4py' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_backward_names_misshapen_out_lse_grad_out(rng):
    q, k, v = _qkv(rng, 12)
    out, lse, _ = simulate_ring_attention(q, k, v, 2, return_lse=True)
    for name, bad in (("out", (out[..., :5], lse, out)), ("lse", (out, lse[..., :5], out)),
                      ("grad_out", (out, lse, out[..., :3]))):
        with pytest.raises(ValueError, match=f"{name} must have shape"):
            simulate_ring_attention_backward(q, k, v, *bad, 2)
