"""Numba FlashAttention kernels (stage 06) against the float64 materialised references.

Compile time counts here: every test uses the same argument types, so each (dtype, kernel) pair
compiles once per process (and is loaded from the on-disk cache afterwards).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")

from attention_ref.dot_product import scaled_dot_product_attention  # noqa: E402
from attention_ref.flash import attention_backward  # noqa: E402
from attention_ref.flash_numba import (  # noqa: E402
    numba_flash_backward,
    numba_flash_forward,
)
from attention_ref.masks import causal_mask, padding_mask, sliding_window_mask  # noqa: E402
from attention_ref.softmax import logsumexp  # noqa: E402

TOL = {np.float64: 1e-12, np.float32: 1e-5}
# Small tiles (B_q x B_k) for the fast kernel, so that the sizes below cross several tiles and
# end in partial ones; the machine's own (larger) tiles are covered by the "machine" case.
BLOCK_Q, BLOCK_K = 32, 64


@pytest.fixture(autouse=True, params=["small-tiles", "machine-tiles"])
def tiles(request, monkeypatch):
    """Run every test with small fixed tiles and with the tiles chosen for this machine."""
    if request.param == "small-tiles":
        monkeypatch.setenv("ATTENTION_REF_TILES", f"{BLOCK_Q}x{BLOCK_K}")
    else:
        monkeypatch.delenv("ATTENTION_REF_TILES", raising=False)
    return request.param
COMBOS = [
    pytest.param(np.float64, "fast", id="f64-fast"),
    pytest.param(np.float64, "readable", id="f64-readable"),
    pytest.param(np.float32, "fast", id="f32-fast"),
    pytest.param(np.float32, "readable", id="f32-readable"),
]


def _mask(L, S, B, is_causal=False, alignment="top_left", window=None, key_lengths=None):
    """The boolean mask (B, 1, L, S) the keyword arguments describe, from the masks module."""
    m = np.ones((B, 1, L, S), dtype=bool)
    if is_causal:
        m &= causal_mask(L, S, alignment)
    if window is not None:
        m &= sliding_window_mask(L, S, window[0], window[1], alignment)
    if key_lengths is not None:
        m &= padding_mask(np.broadcast_to(np.asarray(key_lengths), (B,)), S)
    return m


def _reference(q, k, v, mask, enable_gqa=False):
    """Float64 out, lse (materialised) for q (B, Hq, L, E)."""
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    out = scaled_dot_product_attention(q64, k64, v64, attn_mask=mask, enable_gqa=enable_gqa)
    rep = q.shape[1] // k.shape[1]
    kk = np.repeat(k64, rep, axis=1)
    s = q64 @ np.swapaxes(kk, -1, -2) / np.sqrt(q.shape[-1])
    lse = logsumexp(np.where(mask, s, -np.inf), axis=-1)
    return out, lse


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _qkv(rng, dtype, B=2, Hq=2, H=2, L=37, S=150, E=59, Ev=None):
    Ev = E if Ev is None else Ev
    q = rng.standard_normal((B, Hq, L, E)).astype(dtype)
    k = rng.standard_normal((B, H, S, E)).astype(dtype)
    v = rng.standard_normal((B, H, S, Ev)).astype(dtype)
    return q, k, v


CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"is_causal": True}, id="causal-topleft"),
    pytest.param({"is_causal": True, "causal_alignment": "bottom_right"}, id="causal-bottomright"),
    pytest.param({"window": (20, 3)}, id="window"),
    pytest.param({"window": (70, None), "is_causal": True, "causal_alignment": "bottom_right"},
                 id="window-causal-br"),
    pytest.param({"key_lengths": np.array([0, BLOCK_K + 6])}, id="lengths-with-zero"),
]


@pytest.mark.parametrize(("dtype", "kernel"), COMBOS)
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(rng, dtype, kernel, case):
    L = BLOCK_Q * 5 + 7  # not a multiple of the query block
    S = BLOCK_K + 21  # nor of the key block
    q, k, v = _qkv(rng, dtype, L=L, S=S)
    out, lse = numba_flash_forward(q, k, v, kernel=kernel, **case)
    mask = _mask(L, S, 2, case.get("is_causal", False), case.get("causal_alignment", "top_left"),
                 case.get("window"), case.get("key_lengths"))
    ref, ref_lse = _reference(q, k, v, mask)
    assert out.dtype == dtype and lse.dtype == dtype
    assert out.shape == ref.shape and lse.shape == ref_lse.shape
    assert _rel(out, ref) < TOL[dtype]
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)  # -inf exactly where fully masked
    assert _rel(lse[finite], ref_lse[finite]) < TOL[dtype]
    assert np.all(out[~finite] == 0)


@pytest.mark.parametrize(("dtype", "kernel"), COMBOS)
def test_forward_head_dim_64_gqa_and_l_greater_than_s(rng, dtype, kernel):
    # d = 64 (the common head size), GQA with 4 query heads on 2 KV heads, L > S bottom-right
    q, k, v = _qkv(rng, dtype, Hq=4, H=2, L=90, S=41, E=64, Ev=24)
    out, lse = numba_flash_forward(q, k, v, is_causal=True, causal_alignment="bottom_right",
                                   enable_gqa=True, kernel=kernel)
    ref, ref_lse = _reference(q, k, v, _mask(90, 41, 2, True, "bottom_right"), enable_gqa=True)
    assert _rel(out, ref) < TOL[dtype]
    assert np.all(np.isneginf(lse[..., :49])) and np.all(out[..., :49, :] == 0)
    assert _rel(lse[..., 49:], ref_lse[..., 49:]) < TOL[dtype]


def test_two_dimensional_inputs(rng):
    q, k, v = (x[0, 0] for x in _qkv(rng, np.float64, L=19, S=33, E=8))
    out, lse = numba_flash_forward(q, k, v)
    ref = scaled_dot_product_attention(q, k, v)
    assert out.shape == (19, 8) and lse.shape == (19,)
    assert _rel(out, ref) < 1e-12


GRAD_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"is_causal": True, "causal_alignment": "bottom_right", "window": (40, None)},
                 id="causal-window"),
    pytest.param({"key_lengths": np.array([0, BLOCK_K + 22]), "is_causal": True}, id="lengths"),
]


@pytest.mark.parametrize(("dtype", "kernel"), COMBOS)
@pytest.mark.parametrize("case", GRAD_CASES)
def test_backward_matches_materialised_gradient(rng, dtype, kernel, case):
    L, S = 2 * BLOCK_Q + 5, BLOCK_K + 22
    q, k, v = _qkv(rng, dtype, Hq=4, H=2, L=L, S=S, E=59, Ev=31)
    do = rng.standard_normal(q.shape[:-1] + (31,)).astype(dtype)
    out, lse = numba_flash_forward(q, k, v, enable_gqa=True, kernel=kernel, **case)
    dq, dk, dv = numba_flash_backward(q, k, v, out, lse, do, enable_gqa=True, kernel=kernel, **case)
    mask = _mask(L, S, 2, case.get("is_causal", False), case.get("causal_alignment", "top_left"),
                 case.get("window"), case.get("key_lengths"))
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, do))
    rq, rk, rv = attention_backward(q64, k64, v64, do64, attn_mask=mask, enable_gqa=True)
    for got, ref in ((dq, rq), (dk, rk), (dv, rv)):
        assert got.dtype == dtype and got.shape == ref.shape
        assert _rel(got, ref) < (TOL[dtype] if dtype == np.float64 else 3e-5)
    if "key_lengths" in case:  # batch 0 has no keys: zero output and zero gradients
        assert np.all(dq[0] == 0) and np.all(dk[0] == 0) and np.all(dv[0] == 0)


@pytest.mark.parametrize("kernel", ["fast", "readable"])
def test_backward_finite_differences(rng, kernel):
    q, k, v = _qkv(rng, np.float64, B=1, Hq=1, H=1, L=5, S=7, E=3)
    g = rng.standard_normal((1, 1, 5, 3))
    kw = {"is_causal": True, "causal_alignment": "bottom_right", "kernel": kernel}

    def loss(q_, k_, v_):
        return float(np.sum(numba_flash_forward(q_, k_, v_, **kw)[0] * g))

    out, lse = numba_flash_forward(q, k, v, **kw)
    grads = numba_flash_backward(q, k, v, out, lse, g, **kw)
    eps = 1e-6
    for which, grad in enumerate(grads):
        args = [q, k, v]
        direction = rng.standard_normal(args[which].shape)
        plus = [a.copy() for a in args]
        minus = [a.copy() for a in args]
        plus[which] += eps * direction
        minus[which] -= eps * direction
        numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
        assert abs(numeric - np.sum(grad * direction)) < 1e-7 * max(1.0, abs(numeric))


@pytest.mark.parametrize(("dtype", "kernel"), COMBOS[::2])
def test_bit_identical_repeated_runs(rng, dtype, kernel):
    q, k, v = _qkv(rng, dtype, L=70, S=300, E=16)
    do = rng.standard_normal(q.shape).astype(dtype)
    first = numba_flash_forward(q, k, v, is_causal=True, kernel=kernel)
    grads = numba_flash_backward(q, k, v, *first, do, is_causal=True, kernel=kernel)
    for _ in range(2):
        again = numba_flash_forward(q, k, v, is_causal=True, kernel=kernel)
        np.testing.assert_array_equal(again[0], first[0])
        np.testing.assert_array_equal(again[1], first[1])
        for a, b in zip(numba_flash_backward(q, k, v, *again, do, is_causal=True, kernel=kernel),
                        grads, strict=True):
            np.testing.assert_array_equal(a, b)


def test_inputs_not_modified(rng):
    q, k, v = _qkv(rng, np.float64, L=20, S=30, E=8)
    copies = [x.copy() for x in (q, k, v)]
    out, lse = numba_flash_forward(q, k, v)
    numba_flash_backward(q, k, v, out, lse, out)
    for x, c in zip((q, k, v), copies, strict=True):
        np.testing.assert_array_equal(x, c)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kernel": "turbo"}, ValueError, "kernel"),
        ({"causal_alignment": "middle"}, ValueError, "causal_alignment"),
        ({"window": (3,)}, ValueError, "window"),
        ({"window": (-1, 2)}, ValueError, "window left"),
        ({"key_lengths": np.array([1, 2, 3])}, ValueError, "key_lengths"),
        ({"key_lengths": np.array([-1, 2])}, ValueError, "key_lengths"),
        ({"key_lengths": np.array([1.5, 2.0])}, TypeError, "key_lengths"),
    ],
)
def test_bad_arguments(rng, kwargs, error, match):
    q, k, v = _qkv(rng, np.float64, L=4, S=5, E=3)
    with pytest.raises(error, match=match):
        numba_flash_forward(q, k, v, **kwargs)


def test_bad_arrays(rng):
    q, k, v = _qkv(rng, np.float64, L=4, S=5, E=3)
    with pytest.raises(TypeError, match="dtype"):
        numba_flash_forward(q.astype(np.float32), k, v)
    with pytest.raises(TypeError, match="query.*floating.*int64"):
        numba_flash_forward(q.astype(np.int64), k, v)
    with pytest.raises(TypeError, match="query must be a floating-point array, got list"):
        numba_flash_forward(q.tolist(), k, v)
    with pytest.raises(ValueError, match="feature size"):
        numba_flash_forward(q[..., :2], k, v)
    with pytest.raises(ValueError, match="heads"):
        numba_flash_forward(q, k[:, :1], v[:, :1])
    out, lse = numba_flash_forward(q, k, v)
    with pytest.raises(ValueError, match="lse"):
        numba_flash_backward(q, k, v, out, lse[..., :2], out)
    with pytest.raises(ValueError, match="grad_out"):
        numba_flash_backward(q, k, v, out, lse, out[..., :2])


def test_importing_the_package_does_not_import_numba():
    """Numba is optional: only attention_ref.flash_numba imports it."""
    code = "import sys, attention_ref, attention_ref.flash; print('numba' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("growth", [0.5, 7.9, 8.1, 60.0, 100.0, -3.0])
@pytest.mark.parametrize("is_causal", [False, True])
def test_row_maximum_moving_across_key_tiles(rng, dtype, tol, growth, is_causal, monkeypatch):
    """The online softmax rescales O and ell when a key tile raises a row's maximum: logits that
    rise (or fall) by ``growth`` / tau per tile of B_k keys match the float64 reference -- below
    the fast kernel's lazy threshold (8: P up to e^8, no rescaling), above it (P rescaled), and
    beyond e^64 (P would overflow: the tile's logits are computed again)."""
    monkeypatch.setenv("ATTENTION_REF_TILES", "16x64")
    L, S, E = 50, 64 * 7 + 5, 8
    scale = 1 / np.sqrt(E)
    q = rng.standard_normal((1, 1, L, E))
    k = rng.standard_normal((1, 1, S, E))
    q[..., 0] = 1.0
    k[..., 0] = growth / scale / 64 * np.arange(S)  # logit of key j: about growth * j / (64 tau)
    v = rng.standard_normal((1, 1, S, E))
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    out, lse = numba_flash_forward(q, k, v, is_causal=is_causal)
    ref, ref_lse = _reference(q, k, v, _mask(L, S, 1, is_causal))
    # logits of several hundred are ill-conditioned in float32 whatever the algorithm: allow twice
    # the NumPy tiles' error on the same inputs (as tests/test_flash_numba_accuracy.py does)
    from attention_ref.flash import flash_attention

    out_np, lse_np = flash_attention(q, k, v, is_causal=is_causal, return_lse=True)
    assert _rel(out, ref) <= max(tol, 2 * _rel(out_np, ref))
    assert _rel(lse, ref_lse) <= max(tol, 2 * _rel(lse_np, ref_lse))


def test_forward_kernel_reads_no_key_block_past_the_last(rng, tiles):
    """A query block whose last rows see no key (a sliding window past the last key: lo = hi = their
    own position, beyond S) must not run a tile past the last key block. K and V are views into
    arrays whose next block holds NaN: reading it (0 * NaN in P V_j) would make the rows NaN."""
    from attention_ref.flash_numba import _blas, _fwd_fast, _pad_rows

    if tiles != "small-tiles":
        pytest.skip("one tile layout is enough")
    L, S, E, left, block_q, block_k = 64, 27, 4, 30, 16, 32
    q, k, v = (rng.standard_normal((1, 1, n, E)) for n in (L, S, S))
    kv_blocks = []
    for x in (k, v):
        padded = np.full((1, 1, 2, block_k, E), np.nan)
        padded[:, :, :1] = _pad_rows(x, block_k).reshape(1, 1, 1, block_k, E)
        kv_blocks.append(padded[:, :, :1])  # shape (1, 1, 1, B_k, E); NaN right after it
    out, lse = np.empty((1, 1, L, E)), np.empty((1, 1, L))
    _fwd_fast(_blas()["float64"], q, *kv_blocks, 0.5, np.array([S]), 0, False, left, 0, L, S, block_q,
              out, lse)
    reference = numba_flash_forward(q, k, v, scale=0.5, is_causal=True, window=(left, 0), kernel="readable")
    np.testing.assert_allclose(out, reference[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(lse, reference[1], rtol=1e-12)


@pytest.mark.parametrize("kernel", ["fast", "readable"])
def test_keys_past_the_key_length_are_never_looked_at(rng, kernel, monkeypatch):
    """A KV cache may hold anything past its length: NaN and inf among those keys reach neither the
    output nor the finite-logits test (which would hand the heads to the NumPy core). (Values are
    another matter: 0 * NaN = NaN in P V on every path, as in PyTorch.)"""
    import attention_ref.flash

    def not_expected(*args, **kwargs):
        raise AssertionError("a head was handed to the NumPy core")

    q, k, v = rng.standard_normal((2, 4, 7, 8)), rng.standard_normal((2, 2, 11, 8)), rng.standard_normal((2, 2, 11, 8))
    lengths = np.array([5, 9])
    k[0, :, 5:], k[1, :, 9:10], k[1, :, 10:] = np.nan, np.inf, -np.inf
    monkeypatch.setattr(attention_ref.flash, "forward_fa2", not_expected)
    out, lse = numba_flash_forward(q, k, v, key_lengths=lengths, enable_gqa=True, kernel=kernel)
    for b, n in enumerate(lengths):
        expected = scaled_dot_product_attention(q[b], k[b, :, :n], v[b, :, :n], enable_gqa=True)
        np.testing.assert_allclose(out[b], expected, rtol=1e-12, atol=1e-14)


def test_a_head_with_an_infinity_is_handed_to_the_numpy_core(rng, monkeypatch):
    """...and only that head (query head 3 reads KV head 1 of batch element 0)."""
    import attention_ref.flash

    handed = []
    numpy_core = attention_ref.flash.forward_fa2

    def recording(q, *args):
        handed.append(q.shape)
        return numpy_core(q, *args)

    q, k, v = rng.standard_normal((2, 4, 7, 8)), rng.standard_normal((2, 2, 11, 8)), rng.standard_normal((2, 2, 11, 8))
    q[0, 3, 2, 1] = np.inf
    monkeypatch.setattr(attention_ref.flash, "forward_fa2", recording)
    with np.errstate(invalid="ignore"):
        out, _ = numba_flash_forward(q, k, v, enable_gqa=True)
    assert handed == [(1, 1, 7, 8)]
    nan_rows = np.zeros((2, 4, 7), bool)
    nan_rows[0, 3, 2] = True
    np.testing.assert_array_equal(np.isnan(out).all(-1), nan_rows)
