"""One contract: each bad input, run through every public function that takes it, raises the same
exception type from all of them, with a message that names the argument. Good inputs of other
kinds (NumPy integers and floats where Python ones are meant) are accepted everywhere."""

from __future__ import annotations

import numpy as np
import pytest

import attention_ref as ar

rng = np.random.default_rng(0)
Q, K, V = rng.standard_normal((2, 4, 5, 8)), rng.standard_normal((2, 2, 7, 8)), rng.standard_normal((2, 2, 7, 3))
OUT, LSE = ar.flash_attention(Q, K, V, enable_gqa=True, return_lse=True)
DO = rng.standard_normal(OUT.shape)
PARAMS = ar.init_multi_head_params(rng, 8, 2)
X = rng.standard_normal((2, 5, 8))
CACHE = ar.KVCache(rng.standard_normal((1, 2, 3, 8)), rng.standard_normal((1, 2, 3, 8)))
QN = rng.standard_normal((1, 2, 1, 8))
S_, H_ = rng.standard_normal((3, 4)), rng.standard_normal((3, 5, 6))
W_A, U_A, V_A, W_G = rng.standard_normal((4, 7)), rng.standard_normal((6, 7)), rng.standard_normal(7), rng.standard_normal((4, 6))
W_C = rng.standard_normal((10, 3))


def _numba():
    return pytest.importorskip("attention_ref.flash_numba")


# name -> (call taking keyword overrides, {role: the function's name for that argument})
ATTENTION = {"query": "query", "key": "key", "value": "value", "attn_mask": "attn_mask", "is_causal": "is_causal",
             "scale": "scale", "enable_gqa": "enable_gqa", "rank": "query"}
FLASH = {**ATTENTION, "window": "window", "block_q": "block_q", "causal_alignment": "causal_alignment"}
FUNCTIONS = {
    "scaled_dot_product_attention": (
        lambda query=Q, key=K, value=V, **kw: ar.scaled_dot_product_attention(
            query, key, value, **{"enable_gqa": True, **kw}), {**ATTENTION, "dropout_p": "dropout_p"}),
    "flash_attention": (
        lambda query=Q, key=K, value=V, **kw: ar.flash_attention(query, key, value, **{"enable_gqa": True, **kw}), FLASH),
    "flash_attention numba": (
        lambda query=Q, key=K, value=V, **kw: (_numba(), ar.flash_attention(
            query, key, value, backend="numba", **{"enable_gqa": True, **kw})), FLASH),
    "flash_attention_backward": (
        lambda query=Q, key=K, value=V, grad_out=DO, **kw: ar.flash_attention_backward(
            query, key, value, OUT, LSE, grad_out, **{"enable_gqa": True, **kw}), {**FLASH, "grad_out": "grad_out"}),
    "flash_attention_backward numba": (
        lambda query=Q, key=K, value=V, grad_out=DO, **kw: (_numba(), ar.flash_attention_backward(
            query, key, value, OUT, LSE, grad_out, backend="numba", **{"enable_gqa": True, **kw})),
        {**FLASH, "grad_out": "grad_out"}),
    "numba_flash_forward": (
        lambda query=Q, key=K, value=V, **kw: (_numba(), ar.numba_flash_forward(
            query, key, value, **{"enable_gqa": True, **kw})),
        {k: v for k, v in FLASH.items() if k not in ("attn_mask", "block_q")}),
    "numba_flash_backward": (
        lambda query=Q, key=K, value=V, grad_out=DO, **kw: (_numba(), ar.numba_flash_backward(
            query, key, value, OUT, LSE, grad_out, **{"enable_gqa": True, **kw})),
        {**{k: v for k, v in FLASH.items() if k not in ("attn_mask", "block_q")}, "grad_out": "grad_out"}),
    "attention_backward": (
        lambda query=Q, key=K, value=V, grad_out=DO, **kw: ar.attention_backward(
            query, key, value, grad_out, **{"enable_gqa": True, **kw}),
        {**{k: v for k, v in FLASH.items() if k != "block_q"}, "grad_out": "grad_out"}),
    "split_kv_attention": (
        lambda query=Q, key=K, value=V, **kw: ar.split_kv_attention(query, key, value, 2, **{"enable_gqa": True, **kw}),
        {k: v for k, v in ATTENTION.items() if k != "is_causal"}),
    "multi_head_attention": (
        lambda query=X, key=X, value=X, num_heads=2, **kw: ar.multi_head_attention(query, key, value, PARAMS, num_heads, **kw),
        {"query": "query", "key": "key", "value": "value", "attn_mask": "attn_mask", "is_causal": "is_causal",
         "num_heads": "num_heads", "rank": "query"}),
    "self_attention": (lambda query=X, **kw: ar.self_attention(query, ar.init_attention_params(rng, 8), **kw),
                       {"query": "x", "attn_mask": "attn_mask", "is_causal": "is_causal"}),
    "decode_step": (
        lambda query=QN, key=QN, value=QN, **kw: ar.decode_step(query, key, value, CACHE, **kw),
        {"query": "q_new", "key": "k_new", "value": "v_new", "scale": "scale", "enable_gqa": "enable_gqa",
         "rank": "q_new"}),
    "additive_attention": (
        lambda query=S_, keys=H_, **kw: ar.additive_attention(query, keys, W_A, U_A, V_A, **kw),
        {"query": "query", "keys": "keys", "mask": "mask"}),
    "luong_attention": (lambda query=S_, keys=H_, **kw: ar.luong_attention(query, keys, "general", W_G, **kw),
                        {"query": "h_t", "keys": "h_s", "mask": "mask"}),
    "cross_attention": (lambda query=X, keys=X, **kw: ar.cross_attention(query, keys, ar.init_attention_params(rng, 8), **kw),
                        {"query": "x", "keys": "context", "attn_mask": "attn_mask", "is_causal": "is_causal"}),
    "attention_weights_from_lse": (
        lambda query=Q, key=K, **kw: ar.attention_weights_from_lse(query, key, LSE, **{"enable_gqa": True, **kw}),
        {k: v for k, v in FLASH.items() if k not in ("value", "block_q")}),
    "additive_score": (lambda query=S_, keys=H_, **kw: ar.additive_score(query, keys, W_A, U_A, V_A, **kw),
                       {"query": "query", "keys": "keys"}),
    "luong_general_score": (lambda query=S_, keys=H_: ar.luong_general_score(query, keys, W_G), {"query": "h_t", "keys": "h_s"}),
    "luong_attentional_state": (lambda query=S_, keys=H_[:, 0]: ar.luong_attentional_state(keys, query, W_C),
                                {"query": "h_t", "keys": "context"}),
    "append_kv": (lambda key=QN, value=QN: ar.append_kv(CACHE, key, value), {"key": "k_new", "value": "v_new"}),
    "split_heads": (lambda query=X, num_heads=2: ar.split_heads(query, num_heads), {"query": "x", "num_heads": "num_heads"}),
    "merge_heads": (lambda query=Q: ar.merge_heads(query), {"query": "x"}),
    "softmax": (lambda query=X, **kw: ar.softmax(query, **kw), {"query": "x"}),
    "logsumexp": (lambda query=X, **kw: ar.logsumexp(query, **kw), {"query": "x"}),
    "online_softmax": (lambda query=X, block_q=3, **kw: ar.online_softmax(query, block_q, **kw),
                       {"query": "x", "block_q": "chunk_size"}),
    "masked_softmax": (lambda query=X, mask=X > 0, **kw: ar.masked_softmax(query, mask, **kw), {"query": "x", "mask": "mask"}),
    "causal_mask": (lambda causal_alignment="top_left", block_q=4: ar.causal_mask(block_q, 6, causal_alignment),
                    {"causal_alignment": "alignment", "block_q": "L"}),
    "sliding_window_mask": (lambda block_q=4: ar.sliding_window_mask(4, 6, block_q, 0), {"block_q": "left"}),
    "truncate_kv": (lambda block_q=2: ar.truncate_kv(CACHE, block_q), {"block_q": "max_length"}),
}

# Stage 10, ring attention: the per-rank steps and the simulator, and the MPI rings on a one-rank
# communicator (their checks run before any transfer). A ring is self-attention: L = S.
class OneRank:
    """The three calls of an mpi4py communicator that a ring of one rank makes."""

    def Get_size(self):
        return 1

    def Get_rank(self):
        return 0

    def allgather(self, item):
        return [item]


QR = np.repeat(K, 2, axis=1)  # (2, 4, 7, 8)
OUT_R, LSE_R = ar.flash_attention(QR, K, V, enable_gqa=True, return_lse=True)
SPANS = ([(7, 12)], [(0, 7)])  # Q's 5 queries after K's 7 keys: visible, causal or not
RING = {k: v for k, v in ATTENTION.items() if k != "attn_mask"}
SIMULATOR = {**RING, "block_q": "world_size", "causal_alignment": "layout"}
MPI_RING = {**RING, "causal_alignment": "layout"}
FUNCTIONS.update({
    "ring_attention_step": (
        lambda query=Q, key=K, value=V, **kw: ar.ring_attention_step(
            query, key, value, np.zeros((2, 4, 5, 3)), np.full((2, 4, 5), -np.inf), *SPANS,
            **{"enable_gqa": True, **kw}), RING),
    "ring_attention_backward_step": (
        lambda query=Q, key=K, value=V, grad_out=DO, **kw: ar.ring_attention_backward_step(
            query, key, value, OUT, LSE, grad_out, np.zeros(Q.shape), np.zeros(K.shape), np.zeros(V.shape),
            *SPANS, **{"enable_gqa": True, **kw}), {**RING, "grad_out": "grad_out"}),
    "simulate_ring_attention": (
        lambda query=QR, key=K, value=V, block_q=2, causal_alignment="zigzag", **kw: ar.simulate_ring_attention(
            query, key, value, block_q, layout=causal_alignment, **{"enable_gqa": True, **kw}), SIMULATOR),
    "simulate_ring_attention_backward": (
        lambda query=QR, key=K, value=V, grad_out=OUT_R, block_q=2, causal_alignment="zigzag", **kw:
        ar.simulate_ring_attention_backward(query, key, value, OUT_R, LSE_R, grad_out, block_q,
                                            layout=causal_alignment, **{"enable_gqa": True, **kw}),
        {**SIMULATOR, "grad_out": "grad_out"}),
    "ring_attention one rank": (
        lambda query=QR, key=K, value=V, causal_alignment="zigzag", **kw: ar.ring_attention(
            query, key, value, OneRank(), layout=causal_alignment, **{"enable_gqa": True, **kw}), MPI_RING),
    "ring_attention_sendrecv one rank": (
        lambda query=QR, key=K, value=V, causal_alignment="zigzag", **kw: ar.ring_attention_sendrecv(
            query, key, value, OneRank(), layout=causal_alignment, **{"enable_gqa": True, **kw}), MPI_RING),
    "ring_attention_backward one rank": (
        lambda query=QR, key=K, value=V, grad_out=OUT_R, causal_alignment="zigzag", **kw:
        ar.ring_attention_backward(query, key, value, OUT_R, LSE_R, grad_out, OneRank(), layout=causal_alignment,
                                   **{"enable_gqa": True, **kw}), {**MPI_RING, "grad_out": "grad_out"}),
})

# (role, what, bad value, exception). The arrays are wrong in kind (TypeError) or in shape (ValueError).
BAD = [
    ("query", "None", None, TypeError),
    ("query", "a list", [[1.0, 2.0]], TypeError),
    ("query", "integers", np.ones((2, 4, 5, 8), dtype=np.int64), TypeError),
    ("query", "complex", np.ones((2, 4, 5, 8), dtype=complex), TypeError),
    ("rank", "one dimension", np.ones(8), ValueError),
    ("key", "None", None, TypeError),
    ("key", "float32 beside float64", K.astype(np.float32), TypeError),
    ("value", "a list", V.tolist(), TypeError),
    ("value", "float32 beside float64", V.astype(np.float32), TypeError),
    ("keys", "None", None, TypeError),
    ("keys", "float32 beside float64", H_.astype(np.float32), TypeError),
    ("attn_mask", "integers", np.ones((5, 7), dtype=np.int64), TypeError),
    ("attn_mask", "a list", [[True] * 7] * 5, TypeError),
    ("attn_mask", "a shape that does not broadcast", np.ones((5, 6), dtype=bool), ValueError),
    ("mask", "floating", np.ones((3, 5)), TypeError),
    ("mask", "a list", [[True] * 5] * 3, TypeError),
    ("is_causal", "a string", "no", TypeError),
    ("is_causal", "an int", 1, TypeError),
    ("enable_gqa", "a string", "yes", TypeError),
    ("scale", "a string", "0.5", TypeError),
    ("scale", "a bool", True, TypeError),
    ("dropout_p", "a string", "0.1", TypeError),
    ("dropout_p", "out of range", 1.5, ValueError),
    ("window", "a dict", {"left": 1, "right": 2}, TypeError),
    ("window", "three numbers", (1, 2, 3), ValueError),
    ("window", "a bool", (True, 0), TypeError),
    ("window", "a float", (1.5, 0), TypeError),
    ("window", "negative", (-1, 0), ValueError),
    ("block_q", "a bool", True, TypeError),
    ("block_q", "a float", 2.0, TypeError),
    ("block_q", "negative", -1, ValueError),
    ("num_heads", "a string", "2", TypeError),
    ("num_heads", "a bool", True, TypeError),
    ("num_heads", "zero", 0, ValueError),
    ("causal_alignment", "unknown", "centre", ValueError),
    ("grad_out", "integers", DO.astype(np.int64), TypeError),
    ("grad_out", "None", None, TypeError),
]

PAIRS = [pytest.param(fn, role, value, exc, id=f"{fn}-{role} {what}")
         for fn, (_, roles) in FUNCTIONS.items() for role, what, value, exc in BAD if role in roles]


@pytest.mark.parametrize("fn, role, value, exc", PAIRS)
def test_the_same_bad_input_gets_the_same_error_everywhere(fn, role, value, exc):
    call, roles = FUNCTIONS[fn]
    with pytest.raises(exc) as info:
        call(**{"query" if role == "rank" else role: value})
    assert roles[role] in str(info.value), f"{fn}: the message does not name {roles[role]!r}: {info.value}"


def test_every_bad_input_reaches_a_function():
    for role, what, _, _ in BAD:
        takers = [fn for fn, (_, roles) in FUNCTIONS.items() if role in roles]
        assert takers, f"{role} {what}: no function takes it"


@pytest.mark.parametrize("fn", [f for f in FUNCTIONS if "numba" not in f])
def test_numpy_scalars_are_accepted_where_python_ones_are(fn):
    call, roles = FUNCTIONS[fn]
    good = {"block_q": np.int64(3), "window": (np.int64(2), np.int32(0)), "num_heads": np.int64(2),
            "scale": np.float32(0.5), "is_causal": np.True_, "enable_gqa": np.True_}
    call(**{r: v for r, v in good.items() if r in roles})


def test_contract_messages_name_the_shapes():
    with pytest.raises(ValueError, match=r"query \(2, 4, 5, 8\), key \(2, 2, 7, 6\)"):
        ar.scaled_dot_product_attention(Q, K[..., :6], V, enable_gqa=True)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(5, 6\).*\(2, 4, 5, 7\)"):
        ar.flash_attention(Q, K, V, attn_mask=np.ones((5, 6), bool), enable_gqa=True)
    with pytest.raises(TypeError, match="query must be a floating-point array, got list"):
        ar.flash_attention([[1.0]], K, V)
