"""Property-based checks (hypothesis): tiled attention equals the materialised one for any shapes,
block sizes, masks, alignments and windows, forward and backward."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_ref import causal_mask, scaled_dot_product_attention, sliding_window_mask
from attention_ref.flash import attention_backward, flash_attention, flash_attention_backward

window_side = st.one_of(st.none(), st.integers(0, 12))


@st.composite
def problems(draw):
    L, S = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    E, Ev = draw(st.integers(1, 9)), draw(st.integers(1, 6))
    return dict(
        L=L, S=S, E=E, Ev=Ev,
        block_q=draw(st.integers(1, 17)), block_k=draw(st.integers(1, 17)),
        is_causal=draw(st.booleans()),
        alignment=draw(st.sampled_from(["top_left", "bottom_right"])),
        window=draw(st.one_of(st.none(), st.tuples(window_side, window_side))),
        mask_kind=draw(st.sampled_from(["none", "random", "padding"])),
        algorithm=draw(st.sampled_from(["fa1", "fa2"])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(max_examples=60, deadline=None)
@given(problems())
def test_flash_equals_materialised_attention(p):
    rng = np.random.default_rng(p["seed"])
    L, S = p["L"], p["S"]
    q = rng.standard_normal((2, L, p["E"]))
    k, v = rng.standard_normal((2, S, p["E"])), rng.standard_normal((2, S, p["Ev"]))
    do = rng.standard_normal((2, L, p["Ev"]))
    if p["mask_kind"] == "random":
        mask = rng.random((2, L, S)) < 0.6
    elif p["mask_kind"] == "padding":
        mask = np.arange(S)[None, None, :] < rng.integers(0, S + 1, size=(2, 1, 1))
    else:
        mask = None
    kw = dict(is_causal=p["is_causal"], window=p["window"], causal_alignment=p["alignment"])
    tiles = dict(block_q=p["block_q"], block_k=p["block_k"])
    out, lse = flash_attention(q, k, v, attn_mask=mask, algorithm=p["algorithm"], return_lse=True, **kw, **tiles)

    full = np.ones((L, S), dtype=bool) if mask is None else mask
    if p["is_causal"]:
        full = full & causal_mask(L, S, p["alignment"])
    if p["window"] is not None:
        full = full & sliding_window_mask(L, S, *p["window"], alignment=p["alignment"])
    ref = scaled_dot_product_attention(q, k, v, attn_mask=full)
    np.testing.assert_allclose(out, ref, rtol=1e-11, atol=1e-12)
    empty = ~np.broadcast_to(full, (2, L, S)).any(axis=-1)
    assert np.all(np.isneginf(lse[empty])) and np.all(np.isfinite(lse[~empty]))

    grads = flash_attention_backward(q, k, v, out, lse, do, attn_mask=mask, **kw, **tiles)
    ref_grads = attention_backward(q, k, v, do, attn_mask=full)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-11)
