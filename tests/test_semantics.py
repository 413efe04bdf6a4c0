"""The contract's semantics on every path (README, "Semantics"): zero sizes, E = 0, NaN logits,
0-d masks, dtypes rejected everywhere, and the NumPy and Numba backends agreeing on all of them."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import attention_ref as ar

# (B, Hq, H, L, S, E, Ev): every size zero once, GQA among them
ZERO_SIZES = {"L=0": (2, 4, 2, 0, 5, 4, 3), "S=0": (2, 4, 2, 4, 0, 4, 3), "batch=0": (0, 4, 2, 4, 5, 4, 3),
              "E=0": (2, 4, 2, 4, 5, 0, 3), "Ev=0": (2, 4, 2, 4, 5, 4, 0)}


def _qkv(shape, seed=0):
    B, Hq, H, L, S, E, Ev = shape
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, Hq, L, E)), rng.standard_normal((B, H, S, E)), rng.standard_normal((B, H, S, Ev))


def _numba_or_skip():
    pytest.importorskip("attention_ref.flash_numba")


FORWARD_PATHS = {
    "sdpa": lambda q, k, v, **kw: ar.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw),
    "flash fa2": lambda q, k, v, **kw: ar.flash_attention(q, k, v, enable_gqa=True, block_q=3, block_k=2, **kw),
    "flash fa1": lambda q, k, v, **kw: ar.flash_attention(q, k, v, enable_gqa=True, block_q=3, block_k=2,
                                                           algorithm="fa1", **kw),
    "flash numba": lambda q, k, v, **kw: (_numba_or_skip(), ar.flash_attention(q, k, v, enable_gqa=True,
                                                                                 backend="numba", **kw))[1],
    "numba readable": lambda q, k, v, **kw: (_numba_or_skip(), ar.numba_flash_forward(
        q, k, v, enable_gqa=True, kernel="readable", **kw)[0])[1],
    "numba fast": lambda q, k, v, **kw: (_numba_or_skip(), ar.numba_flash_forward(q, k, v, enable_gqa=True, **kw)[0])[1],
}


@pytest.mark.parametrize("path", FORWARD_PATHS)
@pytest.mark.parametrize("case", ZERO_SIZES)
def test_zero_sizes_forward(path, case):
    q, k, v = _qkv(ZERO_SIZES[case])
    out = FORWARD_PATHS[path](q, k, v, is_causal=True) if case != "S=0" else FORWARD_PATHS[path](q, k, v)
    B, Hq, _, L, S, E, Ev = ZERO_SIZES[case]
    assert out.shape == (B, Hq, L, Ev) and out.dtype == np.float64
    if case == "S=0":
        assert np.all(out == 0)
    if case == "E=0":  # every logit is 0: the mean of the visible values, as in PyTorch
        visible = np.tril(np.ones((L, S)))
        expected = np.repeat(visible @ v / visible.sum(-1, keepdims=True), 2, axis=1)
        np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_zero_keys_give_minus_infinity_lse_on_every_path():
    q, k, v = _qkv(ZERO_SIZES["S=0"])
    for kw in ({}, {"algorithm": "fa1"}):
        assert np.all(np.isneginf(ar.flash_attention(q, k, v, enable_gqa=True, return_lse=True, **kw)[1]))
    _numba_or_skip()
    assert np.all(np.isneginf(ar.flash_attention(q, k, v, enable_gqa=True, return_lse=True, backend="numba")[1]))
    for kernel in ("readable", "fast"):
        assert np.all(np.isneginf(ar.numba_flash_forward(q, k, v, enable_gqa=True, kernel=kernel)[1]))


BACKWARD_PATHS = {
    "flash": lambda q, k, v, o, lse, do: ar.flash_attention_backward(q, k, v, o, lse, do, is_causal=True,
                                                                     enable_gqa=True, block_q=3, block_k=2),
    "flash numba": lambda q, k, v, o, lse, do: (_numba_or_skip(), ar.flash_attention_backward(
        q, k, v, o, lse, do, is_causal=True, enable_gqa=True, backend="numba"))[1],
    "numba readable": lambda q, k, v, o, lse, do: (_numba_or_skip(), ar.numba_flash_backward(
        q, k, v, o, lse, do, is_causal=True, enable_gqa=True, kernel="readable"))[1],
    "numba fast": lambda q, k, v, o, lse, do: (_numba_or_skip(), ar.numba_flash_backward(
        q, k, v, o, lse, do, is_causal=True, enable_gqa=True))[1],
}


@pytest.mark.parametrize("path", BACKWARD_PATHS)
@pytest.mark.parametrize("case", ZERO_SIZES)
def test_zero_sizes_backward(path, case):
    q, k, v = _qkv(ZERO_SIZES[case])
    out, lse = ar.flash_attention(q, k, v, is_causal=True, enable_gqa=True, return_lse=True)
    do = np.random.default_rng(1).standard_normal(out.shape)
    grads = BACKWARD_PATHS[path](q, k, v, out, lse, do)
    reference = ar.attention_backward(q, k, v, do, is_causal=True, enable_gqa=True)
    for g, r, x in zip(grads, reference, (q, k, v), strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)


def test_zero_sizes_elsewhere():
    rng = np.random.default_rng(2)
    context, weights = ar.additive_attention(rng.standard_normal(4), np.zeros((0, 6)), rng.standard_normal((4, 7)),
                                             rng.standard_normal((6, 7)), rng.standard_normal(7))
    assert context.shape == (6,) and weights.shape == (0,) and np.all(context == 0)
    context, weights = ar.luong_attention(rng.standard_normal(4), np.zeros((0, 4)))
    assert context.shape == (4,) and weights.shape == (0,)
    q, k, v = _qkv(ZERO_SIZES["S=0"])
    out, lse = ar.split_kv_attention(q, k, v, 1, enable_gqa=True, return_lse=True)
    assert np.all(out == 0) and np.all(np.isneginf(lse))
    params = ar.init_multi_head_params(rng, 8, 2)
    assert ar.multi_head_attention(np.zeros((3, 0, 8)), np.zeros((3, 5, 8)), np.zeros((3, 5, 8)), params, 2).shape == (3, 0, 8)
    assert np.all(ar.multi_head_attention(np.ones((3, 2, 8)), np.zeros((3, 0, 8)), np.zeros((3, 0, 8)), params, 2)
                  == params.b_o)
    out, cache = ar.decode_step(np.zeros((1, 2, 0, 8)), np.zeros((1, 2, 0, 8)), np.zeros((1, 2, 0, 8)),
                                ar.empty_kv_cache((1,), 2, 8, dtype=np.float64))
    assert out.shape == (1, 2, 0, 8) and cache.length == 0
    assert ar.logsumexp(np.zeros((3, 0)))[0] == -np.inf and ar.softmax(np.zeros((3, 0))).shape == (3, 0)


@pytest.mark.parametrize("where", ["query and key", "key only", "query only"])
@pytest.mark.parametrize("path", FORWARD_PATHS)
def test_a_nan_logit_makes_its_row_nan(path, where):
    """Also with the NaN in only one of q, k: the numba path tests each for a NaN before it
    looks for the rows."""
    q, k, v = _qkv((2, 4, 2, 9, 9, 4, 3))
    nan_rows = np.zeros((2, 4, 9), bool)
    if where != "query only":
        k[0, 1, 3, 2] = np.nan  # key 3 of head 1: the causal rows i >= 3 of query heads 2 and 3 see it
        nan_rows[0, 2:, 3:] = True
    if where != "key only":
        q[1, 0, 5, 0] = np.nan  # one query row
        nan_rows[1, 0, 5] = True
    out = FORWARD_PATHS[path](q, k, v, is_causal=True)
    np.testing.assert_array_equal(np.isnan(out).any(-1), nan_rows)
    np.testing.assert_array_equal(np.isnan(out).all(-1), nan_rows)  # the whole row, not one entry
    reference = ar.scaled_dot_product_attention(np.nan_to_num(q), np.nan_to_num(k), v, is_causal=True, enable_gqa=True)
    np.testing.assert_allclose(out[~nan_rows], reference[~nan_rows], rtol=1e-12)


def _set(x, index, value):
    x[index] = value


# q (2, 4, 9, 4), k (2, 2, 9, 4): query heads 0 and 1 read KV head 0. `big` * `big` overflows the dtype.
NON_FINITE_LOGITS = {
    "+inf in a query": lambda q, k, big: _set(q, (0, 1, 2, 1), np.inf),
    "-inf in a query": lambda q, k, big: _set(q, (0, 1, 2, 1), -np.inf),
    "+inf in a key": lambda q, k, big: _set(k, (1, 0, 3, 0), np.inf),
    "a key of -inf": lambda q, k, big: _set(k, (1, 0, 3), -np.inf),
    "inf * 0 in a logit": lambda q, k, big: (_set(q, (0, 1, 2, 1), np.inf), _set(k, (0, 0, slice(None), 1), 0.0)),
    "a logit overflowing to +inf": lambda q, k, big: (_set(q, (0, 0, 3), big), _set(k, (0, 0, 1), big)),
    "a logit overflowing to -inf": lambda q, k, big: (_set(q, (0, 0, 3), big), _set(k, (0, 0, 1), -big)),
    "inf - inf inside a logit": lambda q, k, big: (_set(q, (0, 0, 3), [big, big, 0, 0]),
                                                   _set(k, (0, 0, 1), [big, -big, 0, 0])),
    "a scale overflowing the logits": lambda q, k, big: {"scale": big},
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", NON_FINITE_LOGITS)
@pytest.mark.parametrize("path", FORWARD_PATHS)
def test_infinite_inputs_and_overflowing_logits_give_the_numpy_answer(path, case, dtype):
    """A logit that is NaN or +inf makes its row NaN, a -inf one counts as masked, as the NumPy
    paths compute it: the numba kernels assume finite logits, and their wrapper hands such heads to
    the NumPy core."""
    q, k, v = (x.astype(dtype) for x in _qkv((2, 4, 2, 9, 9, 4, 3)))
    kw = NON_FINITE_LOGITS[case](q, k, 2 * np.sqrt(np.finfo(dtype).max))
    kw = kw if isinstance(kw, dict) else {}  # the cases that only set entries return None or a tuple
    with np.errstate(all="ignore"):
        out = FORWARD_PATHS[path](q, k, v, is_causal=True, **kw)
        reference = FORWARD_PATHS["sdpa"](q, k, v, is_causal=True, **kw)
    tol = {"rtol": 1e-12} if dtype == np.float64 else {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(out, reference, equal_nan=True, **tol)
    assert out.dtype == dtype


def test_a_nan_logit_makes_its_row_nan_in_softmax_and_luong():
    row = ar.softmax(np.array([[1.0, np.nan, 0.5], [1.0, 2.0, 3.0]]))
    assert np.all(np.isnan(row[0])) and np.all(np.isfinite(row[1]))
    h_s = np.ones((4, 3))
    h_s[2, 0] = np.nan
    _, weights = ar.luong_attention(np.ones(3), h_s)
    assert np.all(np.isnan(weights))
    _, weights = ar.luong_attention(np.ones(3), h_s, mask=np.array([True, True, False, True]))
    assert np.all(np.isfinite(weights)) and weights[2] == 0  # a masked NaN is not seen


@pytest.mark.parametrize("mask", [np.array(True), np.array(False), np.array(0.5), np.array(-np.inf)])
def test_a_zero_dimensional_mask_means_the_same_to_sdpa_and_flash(mask):
    q, k, v = _qkv((2, 2, 2, 5, 7, 4, 3))
    ref = ar.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    np.testing.assert_allclose(ar.flash_attention(q, k, v, attn_mask=mask, block_q=2, block_k=3), ref, rtol=1e-12)
    np.testing.assert_allclose(ar.split_kv_attention(q, k, v, 3, attn_mask=mask), ref, rtol=1e-12)


@pytest.mark.parametrize("attention", ["sdpa", "flash"])
def test_multi_head_mask_and_is_causal_rejected_by_both_attentions(attention):
    params = ar.init_multi_head_params(np.random.default_rng(0), 8, 2)
    x = np.ones((3, 8))
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        ar.multi_head_attention(x, x, x, params, 2, attn_mask=np.ones((3, 3), bool), is_causal=True, attention=attention)


def test_integer_and_mixed_dtypes_rejected_where_they_used_to_slip_through():
    rng = np.random.default_rng(0)
    h_t, h_s, i_s = rng.standard_normal((2, 4)), rng.standard_normal((2, 5, 6)), np.ones((2, 5, 6), dtype=np.int64)
    with pytest.raises(TypeError, match="h_s"):
        ar.luong_score(h_t, i_s, "general", np.ones((4, 6)))
    with pytest.raises(TypeError, match="W_a"):
        ar.luong_score(h_t, h_s, "general", np.ones((4, 6), dtype=np.float32))
    with pytest.raises(TypeError, match="v_a"):
        ar.luong_score(h_t, h_s, "concat", np.ones((10, 3)), np.ones(3, dtype=np.int64))
    with pytest.raises(TypeError, match="W_c"):
        ar.luong_attentional_state(np.ones((2, 6)), h_t, np.ones((10, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="h_t"):
        ar.luong_attentional_state(np.ones((2, 6)), h_t.astype(np.float32), np.ones((10, 3)))
    with pytest.raises(TypeError, match="projected_keys"):
        ar.additive_attention(h_t, h_s, np.ones((4, 3)), np.ones((6, 3)), np.ones(3),
                              projected_keys=np.ones((2, 5, 3), dtype=np.float32))
    q = rng.standard_normal((2, 5, 4))
    out, lse = ar.flash_attention(q, q, q, return_lse=True)
    with pytest.raises(TypeError, match="grad_out"):
        ar.flash_attention_backward(q, q, q, out, lse, np.ones((2, 5, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="grad_out"):
        ar.flash_attention_backward(q, q, q, out, lse, np.ones((2, 5, 4), dtype=np.float32))


def test_float32_in_float32_out_and_float16_computed_in_float32():
    q, k, v = (x.astype(np.float32) for x in _qkv((1, 2, 2, 6, 7, 4, 3)))
    for path in ("sdpa", "flash fa2", "flash fa1"):
        assert FORWARD_PATHS[path](q, k, v).dtype == np.float32
        assert FORWARD_PATHS[path](*(x.astype(np.float16) for x in (q, k, v))).dtype == np.float16


# ------------------------------------------------------------------------------------------------
# readable code: no function of the package longer than 60 lines, but the compiled Numba kernels
# ------------------------------------------------------------------------------------------------
NUMBA_KERNELS = {"_fwd_readable", "_bwd_readable", "_fwd_fast", "_bwd_fast"}


def test_no_function_is_longer_than_sixty_lines():
    too_long = []
    for path in sorted(Path(ar.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 and not (path.name == "flash_numba.py" and node.name in NUMBA_KERNELS):
                    too_long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, "functions over 60 lines: " + ", ".join(too_long)


def test_the_flash_cores_are_short():
    from attention_ref import flash

    for core in (flash.forward_fa2, flash.forward_fa1, flash.backward_fa2):
        lines = len(__import__("inspect").getsource(core).splitlines())
        assert lines <= 60, (core.__name__, lines)
