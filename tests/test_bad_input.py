"""Bad input gives a ValueError/TypeError whose message names the argument and the shapes."""

import numpy as np
import pytest

from attention_ref import (
    init_attention_params,
    init_multi_head_params,
    multi_head_attention,
    scaled_dot_product_attention,
    self_attention,
    split_heads,
)

rng = np.random.default_rng(0)
Q = rng.standard_normal((2, 3, 5, 8))
K = rng.standard_normal((2, 3, 7, 8))
V = rng.standard_normal((2, 3, 7, 4))
PARAMS = init_multi_head_params(rng, 8, 2)

CASES = [
    ("feature sizes differ", lambda: scaled_dot_product_attention(Q, K[..., :6], V), ValueError, r"feature size E.*\(2, 3, 5, 8\).*\(2, 3, 7, 6\)"),
    ("key/value lengths differ", lambda: scaled_dot_product_attention(Q, K, V[..., :6, :]), ValueError, r"key and value.*\(2, 3, 7, 8\).*\(2, 3, 6, 4\)"),
    ("batch dims differ", lambda: scaled_dot_product_attention(Q, K[:1], V[:1]), ValueError, r"query .*\(2, 3, 5, 8\).*key .*\(1, 3, 7, 8\)"),
    ("heads differ without gqa", lambda: scaled_dot_product_attention(Q, K[:, :1], V[:, :1]), ValueError, "enable_gqa"),
    ("gqa heads do not divide", lambda: scaled_dot_product_attention(rng.standard_normal((2, 5, 5, 8)), K[:, :2], V[:, :2], enable_gqa=True), ValueError, r"multiple.*\(2, 5, 5, 8\)"),
    ("mask does not broadcast", lambda: scaled_dot_product_attention(Q, K, V, attn_mask=np.ones((5, 6), bool)), ValueError, r"attn_mask of shape \(5, 6\).*\(2, 3, 5, 7\)"),
    ("mask would enlarge the output", lambda: scaled_dot_product_attention(Q, K, V, attn_mask=np.ones((4, 2, 3, 5, 7), bool)), ValueError, "attn_mask"),
    ("integer mask", lambda: scaled_dot_product_attention(Q, K, V, attn_mask=np.ones((5, 7), int)), TypeError, "attn_mask.*int"),
    ("integer query", lambda: scaled_dot_product_attention(Q.astype(int), K, V), TypeError, "query.*floating.*int"),
    ("complex key", lambda: scaled_dot_product_attention(Q, K.astype(complex), V), TypeError, "key.*floating.*complex"),
    ("mixed dtypes", lambda: scaled_dot_product_attention(Q, K, V.astype(np.float32)), TypeError, "one dtype"),
    ("rank 1", lambda: scaled_dot_product_attention(Q[0, 0, 0], K[0, 0, 0], V[0, 0, 0]), ValueError, r"at least 2 dimensions.*\(8,\)"),
    ("ranks differ", lambda: scaled_dot_product_attention(Q[0], K, V), ValueError, r"same rank.*\(3, 5, 8\)"),
    ("mask and is_causal", lambda: scaled_dot_product_attention(Q, K, V, attn_mask=np.ones((5, 7), bool), is_causal=True), ValueError, "either attn_mask or is_causal"),
    ("dropout without rng", lambda: scaled_dot_product_attention(Q, K, V, dropout_p=0.1), ValueError, "rng"),
    ("dropout out of range", lambda: scaled_dot_product_attention(Q, K, V, dropout_p=1.0), ValueError, "dropout_p"),
    ("unknown fully_masked", lambda: scaled_dot_product_attention(Q, K, V, fully_masked="mean"), ValueError, "fully_masked"),
    ("heads do not divide d_model", lambda: split_heads(np.ones((3, 10)), 3), ValueError, r"num_heads=3.*10.*\(3, 10\)"),
    ("mha kv heads do not divide", lambda: multi_head_attention(Q[0, 0], Q[0, 0], Q[0, 0], PARAMS, 2, num_kv_heads=3), ValueError, "num_kv_heads=3"),
    ("mha wrong model size", lambda: multi_head_attention(K[0, 0, :, :6], K[0, 0], K[0, 0], PARAMS, 2), ValueError, r"query \(W_q\).*6 features.*\(7, 6\).*\(8, 8\)"),
    ("mha mask does not broadcast", lambda: multi_head_attention(Q[0, 0], Q[0, 0], Q[0, 0], PARAMS, 2, attn_mask=np.ones((2, 5, 4), bool)), ValueError, "attn_mask"),
    ("mha integer input", lambda: multi_head_attention(np.ones((3, 8), int), np.ones((3, 8), int), np.ones((3, 8), int), PARAMS, 2), TypeError, "query.*floating.*int"),
    ("mha mixed dtypes", lambda: multi_head_attention(Q[0, 0].astype(np.float32), Q[0, 0], Q[0, 0], PARAMS, 2), TypeError, "one dtype"),
    ("self-attention integer input", lambda: self_attention(np.ones((4, 5), int), init_attention_params(rng, 5)), TypeError, "x.*floating"),
    ("split_heads rank 1", lambda: split_heads(np.ones(6), 2), ValueError, r"\(\.\.\., L, H·E\).*\(6,\)"),
    ("self-attention wrong features", lambda: self_attention(np.ones((4, 3)), init_attention_params(rng, 5)), ValueError, r"W_q.*3 features.*\(4, 3\)"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_message(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_at_least_twelve_cases():
    assert len(CASES) >= 12
