"""Checker batteries for stage 05: ``flash_attention``, ``flash_attention_backward`` and
``merge_attention_partials``.

The references materialise the L × S matrix in float64 (``check_attention.attention64``); the
mistakes simulate the tiled loop of FlashAttention-2 with one classic slip each. When the student's
function takes ``block_q`` / ``block_k`` the cases pass small blocks (so tiny inputs span several
tiles); otherwise the block size is unknown and a mistake is tested for every plausible one.
"""

from __future__ import annotations

import numpy as np

from .check_attention import (
    LARGE_LOGITS,
    SDPAParts,
    attention64,
    attention_mistakes,
    attention_options,
    qkv,
    repeat_kv,
    sdpa_parts,
)
from .check_core import Battery, Call, Candidates, Case, Mistake, randn, register, unpack_arrays
from .check_softmax import softmax64

_BLOCK_GUESSES = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128)


def logits64(p: SDPAParts, scale=None):
    """Z = τ Q Kᵀ + Δ in float64 with masked entries −∞ (keys repeated for GQA)."""
    q = np.asarray(p.q, np.float64)
    k, _ = repeat_kv(q, np.asarray(p.k, np.float64), np.asarray(p.v, np.float64))
    z = (p.tau if scale is None else scale) * (q @ np.swapaxes(k, -1, -2))
    if p.bias is not None:
        z = z + p.bias
    if p.allowed is not None:
        z = np.where(np.broadcast_to(p.allowed, z.shape), z, -np.inf)
    return z


def lse64(z):
    """λ = log Σ_j e^{z_j} per row, −∞ for a row with nothing to attend to."""
    m = np.max(z, axis=-1, keepdims=True)
    safe = np.where(np.isfinite(m), m, 0.0)
    total = np.sum(np.exp(z - safe), axis=-1)
    with np.errstate(divide="ignore"):
        return np.where(total > 0, safe[..., 0] + np.log(np.where(total > 0, total, 1.0)), -np.inf)


# ---------------------------------------------------------------------------------------------
# flash_attention(query, key, value, attn_mask=None, is_causal=False, scale=None, *, block_q, block_k,
#                 causal_alignment="top_left", return_lse=False)
# ---------------------------------------------------------------------------------------------


def _flash_parts(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
                 causal_alignment="top_left", **_):
    return sdpa_parts(query, key, value, attn_mask, is_causal, scale, causal_alignment)


def _flash_reference(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
                     block_q=None, block_k=None, causal_alignment="top_left", return_lse=False):
    p = _flash_parts(query, key, value, attn_mask, is_causal, scale, causal_alignment=causal_alignment)
    out = attention64(p.q, p.k, p.v, scale=p.tau, allowed=p.allowed, bias=p.bias)[0]
    return (out, lse64(logits64(p))) if return_lse else out


def tiled64(p: SDPAParts, block_q: int | None, block_k: int, slip: str):
    """FlashAttention-2's loop (Dao 2023, Algorithm 1) over key blocks, in float64, with one slip:

    "no_rescale_l": ℓ ← ℓ + rowsum P̃ (ℓ not rescaled by e^{m − m_new});
    "no_rescale_o": O ← O + P̃ V (O not rescaled);  "no_rescale": neither;
    "typo": O ← diag(e^{m − m_new})⁻¹ O + P̃ V (the paper's misprint);
    "drop_last_k": the last, shorter key block is skipped;
    "drop_last_q": the rows of the last, shorter query block are never written (stay 0).
    Returns (O, λ).
    """
    z = logits64(p)
    _, v = repeat_kv(p.q, p.k, np.asarray(p.v, np.float64))
    v = np.asarray(v, np.float64)
    L, S = z.shape[-2], z.shape[-1]
    m = np.full(z.shape[:-1] + (1,), -np.inf)
    ell = np.zeros(z.shape[:-1] + (1,))
    o = np.zeros(z.shape[:-1] + (v.shape[-1],))
    stop = (S // block_k) * block_k if slip == "drop_last_k" else S
    for j0 in range(0, stop, block_k):
        s = z[..., j0 : j0 + block_k]
        m_new = np.maximum(m, np.max(s, axis=-1, keepdims=True))
        safe = np.where(np.isfinite(m_new), m_new, 0.0)
        p_tile = np.exp(s - safe)
        alpha = np.exp(m - safe)
        ell = (ell if slip in ("no_rescale_l", "no_rescale") else alpha * ell) + np.sum(p_tile, axis=-1, keepdims=True)
        if slip in ("no_rescale_o", "no_rescale"):
            o = o + p_tile @ v[..., j0 : j0 + block_k, :]
        elif slip == "typo":
            o = o / alpha + p_tile @ v[..., j0 : j0 + block_k, :]
        else:
            o = alpha * o + p_tile @ v[..., j0 : j0 + block_k, :]
        m = m_new
    seen = ell > 0
    out = np.where(seen, o / np.where(seen, ell, 1.0), 0.0)
    lse = np.where(seen, np.where(np.isfinite(m), m, 0.0) + np.log(np.where(seen, ell, 1.0)), -np.inf)[..., 0]
    if slip == "drop_last_q" and block_q:
        full = (L // block_q) * block_q
        out[..., full:, :] = 0.0
    return out, lse


def _tiled_mistake(slip: str, *, needs_q: bool = False):
    """wrong(call) for one slip of the tiled loop, for the block sizes the call used (or, when the
    student's function chose its own, for every plausible one)."""

    def wrong(call):
        p = _flash_parts(*call.args, **call.kwargs)
        block_k = call.kwargs.get("block_k")
        block_q = call.kwargs.get("block_q")
        if needs_q and block_q is None:
            return None
        S = p.k.shape[-2]
        blocks = [block_k] if block_k else sorted(set(_BLOCK_GUESSES) | {max(S, 1)})
        answers = Candidates()
        for b in blocks:
            out, lse = tiled64(p, block_q, b, slip)
            out = out.astype(p.q.dtype)
            answers.append((out, lse.astype(p.q.dtype)) if call.kwargs.get("return_lse") else out)
        return answers

    return wrong


def _flash_build(*, ints=False, mask=None, causal_=False, alignment=None, scale=None, size=1.0, lse=False,
                 growing=False):
    """Inputs for a tiled call; the block sizes B_q, B_k are sizes too, so the shrinker reduces them."""

    def build(rng, dtype, L, S, E, Ev, B_q, B_k, B=None, H=None):
        q, k, v = qkv(rng, dtype, L, S, E, Ev, B, H, ints=ints, size=size)
        if growing:  # positive queries, keys rising along j: the running max rises at every key block
            q = np.abs(q)
            k = (k + np.linspace(0.0, 3.0, S)[:, None]).astype(dtype)
        options = attention_options(rng, dtype, L, S, B, mask=mask, causal=causal_, scale=scale,
                                    causal_alignment=alignment, return_lse=True if lse else None)
        return Call((q, k, v), {"block_q": B_q, "block_k": B_k, **options})

    return build



_FLASH_CASES = [
    Case("tiny hand-checkable example (one tile)", _flash_build(ints=True), dict(L=2, S=3, E=2, Ev=2, B_q=2, B_k=3)),
    Case("several tiles that divide L and S", _flash_build(), dict(L=8, S=8, E=4, Ev=4, B_q=4, B_k=4)),
    Case("keys that score higher and higher (the running max rises every tile)",
         _flash_build(growing=True), dict(L=4, S=8, E=4, Ev=3, B_q=2, B_k=2), minimum=dict(S=3)),
    Case("L, S not multiples of the blocks, Ev ≠ E", _flash_build(), dict(L=7, S=11, E=5, Ev=3, B_q=3, B_k=4),
         minimum=dict(S=5)),
    Case("one-row tiles (B_q = B_k = 1)", _flash_build(), dict(L=3, S=5, E=4, Ev=3, B_q=1, B_k=1)),
    Case("leading batch dims (B, H, L, E)", _flash_build(), dict(L=5, S=7, E=4, Ev=3, B=2, H=2, B_q=2, B_k=3)),
    Case("float32 stays float32", _flash_build(), dict(L=5, S=9, E=4, Ev=3, B_q=3, B_k=4), dtype="float32"),
    Case("float32, large logits (overflow)", _flash_build(size=22.0), dict(L=4, S=7, E=4, Ev=3, B_q=2, B_k=3),
         **LARGE_LOGITS),
    Case("is_causal (top-left), L < S", _flash_build(causal_=True), dict(L=4, S=7, E=4, Ev=3, B_q=2, B_k=3)),
    Case("causal_alignment='bottom_right', L < S", _flash_build(causal_=True,
         alignment="bottom_right"), dict(L=4, S=7, E=4, Ev=3, B_q=2, B_k=3)),
    Case("key-padding mask (B, 1, 1, S)", _flash_build(mask="padding"),
         dict(L=4, S=7, E=4, Ev=3, B=2, H=1, B_q=2, B_k=3)),
    Case("a fully masked row gives 0", _flash_build(mask="fully"), dict(L=3, S=7, E=4, Ev=3, B_q=2, B_k=3)),
    Case("scale given", _flash_build(scale=0.3), dict(L=4, S=7, E=4, Ev=3, B_q=2, B_k=3)),
    Case("return_lse=True gives (O, λ)", _flash_build(lse=True), dict(L=4, S=7, E=4, Ev=3, B_q=2, B_k=3)),
]


def _flash_unpack(value, outputs):
    """``out``, or ``(out, lse)`` with return_lse=True."""
    if isinstance(value, tuple) and len(value) == 2:
        return unpack_arrays(value, ("out", "lse"))
    return unpack_arrays(value, ("out",))


register(
    Battery(
        name="flash_attention",
        stage="05",
        signature="flash_attention(query, key, value)",
        inputs=("query", "key", "value"),
        reference=_flash_reference,
        cases=_FLASH_CASES,
        mistakes=[
            Mistake("online-softmax running sum ℓ not rescaled",
                    "when a tile raises the running max from m to m_new, rescale what you have: "
                    "ℓ ← e^{m − m_new} ℓ + rowsum(P̃) (FlashAttention-2, Algorithm 1, line 9).",
                    _tiled_mistake("no_rescale_l")),
            Mistake("output accumulator O not rescaled",
                    "O ← diag(e^{m − m_new}) O + P̃ V_j: the partial output was weighted with the old max.",
                    _tiled_mistake("no_rescale_o")),
            Mistake("neither ℓ nor O rescaled",
                    "both running quantities must be multiplied by e^{m − m_new} when the max changes.",
                    _tiled_mistake("no_rescale")),
            Mistake("O divided by the rescale factor (the FlashAttention-2 paper's misprint)",
                    "the paper prints diag(e^{m − m_new})⁻¹ O; it is diag(e^{m − m_new}) O.",
                    _tiled_mistake("typo")),
            Mistake("the last, shorter key block is skipped",
                    "when S is not a multiple of B_k the last tile is shorter: loop "
                    "`for j0 in range(0, S, block_k)` and slice `key[..., j0:j0 + block_k, :]`.",
                    _tiled_mistake("drop_last_k")),
            Mistake("the last, shorter query block is never written",
                    "loop `for i0 in range(0, L, block_q)`; the last tile of queries may be shorter.",
                    _tiled_mistake("drop_last_q", needs_q=True)),
        ]
        + attention_mistakes(lambda call: _flash_parts(*call.args, **call.kwargs)),
        outputs=("out", "lse"),
        shapes=("(..., L, Ev)", "(..., L)"),
        passthrough=("block_q", "block_k"),
        unpack=_flash_unpack,
    )
)

# ---------------------------------------------------------------------------------------------
# flash_attention_backward(query, key, value, out, lse, grad_out, attn_mask=None, is_causal=False,
#                          scale=None, *, block_q, block_k, causal_alignment="top_left")
# ---------------------------------------------------------------------------------------------


def backward64(p: SDPAParts, grad_out, slip: str | None = None, out=None, lse=None):
    """(dQ, dK, dV) of O = softmax(Z) V through the materialised matrices (FA-1 Algorithm 3):
    dV = Pᵀ dO; dP = dO Vᵀ; D = rowsum(P ∘ dP); dS = P ∘ (dP − D); dQ = τ dS K; dK = τ dSᵀ Q.

    ``slip``: "no_tau" (τ left out of dQ and dK), "no_D" (dS = P ∘ dP), "unnormalised"
    (P = e^{Z} recomputed without subtracting λ). With ``out`` and ``lse`` given, P = e^{Z − λ} and
    D = rowsum(dO ∘ O), as a tiled backward computes them from the forward pass's results.
    """
    q, k, v = (np.asarray(t, np.float64) for t in (p.q, p.k, p.v))
    do = np.asarray(grad_out, np.float64)
    z = logits64(p)
    if slip == "unnormalised":
        P = np.exp(z)
    elif lse is not None:
        lam = np.asarray(lse, np.float64)[..., None]
        P = np.exp(z - np.where(np.isfinite(lam), lam, 0.0))
    else:
        P = softmax64(z)
    dv = np.swapaxes(P, -1, -2) @ do
    dp = do @ np.swapaxes(v, -1, -2)
    if slip == "no_D":
        D = 0.0
    elif out is not None:
        D = np.sum(do * np.asarray(out, np.float64), axis=-1, keepdims=True)
    else:
        D = np.sum(P * dp, axis=-1, keepdims=True)
    ds = P * (dp - D)
    tau = 1.0 if slip == "no_tau" else p.tau
    dq = tau * (ds @ k)
    dk = tau * (np.swapaxes(ds, -1, -2) @ q)
    return dq, dk, dv


def _backward_parts(call):
    q, k, v, _out, _lse, _do = call.args
    return _flash_parts(q, k, v, **call.kwargs)


def _backward_reference(query, key, value, out, lse, grad_out, attn_mask=None, is_causal=False, scale=None,
                        enable_gqa=False, *, block_q=None, block_k=None, causal_alignment="top_left"):
    p = _flash_parts(query, key, value, attn_mask, is_causal, scale, causal_alignment=causal_alignment)
    return backward64(p, grad_out)


def _backward_slip(slip):
    def wrong(call):
        dtype = call.args[0].dtype
        grads = backward64(_backward_parts(call), call.args[5], slip, out=call.args[3], lse=call.args[4])
        return tuple(g.astype(dtype) for g in grads)

    return wrong


def _backward_build(**options):
    forward = _flash_build(**options)

    def build(rng, dtype, **sizes):
        call = forward(rng, dtype, **sizes)
        q, k, v = call.args
        out, lse = _flash_reference(q, k, v, **{**call.kwargs, "return_lse": True})
        grad_out = randn(rng, out.shape, dtype)
        return Call((q, k, v, out.astype(dtype), lse.astype(dtype), grad_out), call.kwargs)

    return build


_BACKWARD_CASES = [
    Case("tiny example (one tile)", _backward_build(), dict(L=2, S=3, E=2, Ev=2, B_q=2, B_k=3)),
    Case("several tiles, L = S", _backward_build(), dict(L=6, S=6, E=4, Ev=4, B_q=2, B_k=2)),
    Case("L, S not multiples of the blocks, Ev ≠ E", _backward_build(), dict(L=7, S=9, E=5, Ev=3, B_q=3, B_k=4),
         minimum=dict(S=5)),
    Case("leading batch dims (B, H, L, E)", _backward_build(), dict(L=5, S=7, E=4, Ev=3, B=2, H=2, B_q=2, B_k=3)),
    Case("float32 stays float32", _backward_build(), dict(L=5, S=7, E=4, Ev=3, B_q=3, B_k=4), dtype="float32",
         tol=(5e-5, 5e-4)),
    Case("is_causal (top-left)", _backward_build(causal_=True), dict(L=5, S=7, E=4, Ev=3, B_q=2, B_k=3)),
    Case("causal_alignment='bottom_right', L < S", _backward_build(causal_=True,
         alignment="bottom_right"), dict(L=4, S=7, E=4, Ev=3, B_q=2, B_k=3)),
    Case("a fully masked row (λ = −∞) gets zero gradients", _backward_build(mask="fully"),
         dict(L=3, S=7, E=4, Ev=3, B_q=2, B_k=3)),
    Case("scale given", _backward_build(scale=0.3), dict(L=4, S=7, E=4, Ev=3, B_q=2, B_k=3)),
]

register(
    Battery(
        name="flash_attention_backward",
        stage="05",
        signature="flash_attention_backward(query, key, value, out, lse, grad_out)",
        inputs=("query", "key", "value", "out", "lse", "grad_out"),
        reference=_backward_reference,
        cases=_BACKWARD_CASES,
        mistakes=[
            Mistake("wrong scale: τ missing from dQ and dK",
                    "Z = τ Q Kᵀ, so dQ = τ dS K and dK = τ dSᵀ Q.", _backward_slip("no_tau")),
            Mistake("D left out", "dS = P ∘ (dP − D) with D = rowsum(dO ∘ O): the softmax's Jacobian "
                    "subtracts each row's weighted mean.", _backward_slip("no_D")),
            Mistake("P recomputed without the logsumexp",
                    "P = exp(Z − λ) with λ = lse from the forward pass (FA-2 Algorithm 2).",
                    _backward_slip("unnormalised")),
            Mistake("causal mask aligned top-left where bottom-right was asked",
                    "bottom-right: query i sees keys j ≤ i + S − L.",
                    lambda call: _backward_slip(None)(Call(call.args, {**call.kwargs, "causal_alignment": "top_left"}))
                    if call.kwargs.get("causal_alignment") == "bottom_right" else None),
        ],
        outputs=("dq", "dk", "dv"),
        shapes=("query.shape", "key.shape", "value.shape"),
        passthrough=("block_q", "block_k"),
    )
)

# ---------------------------------------------------------------------------------------------
# merge_attention_partials(outs, lses) -> (out, lse)
# ---------------------------------------------------------------------------------------------


def _merge_reference(outs, lses):
    o = np.stack([np.asarray(x, np.float64) for x in outs])
    lam = np.stack([np.asarray(x, np.float64) for x in lses])
    m = np.max(lam, axis=0)
    safe = np.where(np.isfinite(m), m, 0.0)
    total = np.sum(np.exp(lam - safe), axis=0)
    with np.errstate(divide="ignore"):
        lse = np.where(total > 0, safe + np.log(np.where(total > 0, total, 1.0)), -np.inf)
    w = np.exp(lam - np.where(np.isfinite(lse), lse, 0.0))
    return np.sum(w[..., None] * o, axis=0), lse


def _merge_build(*, chunks, ints=False, size=1.0, masked=None):
    def build(rng, dtype, L, S, E, Ev, B=None):
        q, k, v = qkv(rng, dtype, L, S, E, Ev, B, ints=ints, size=size)
        cuts = sorted(rng.choice(np.arange(1, S), size=chunks - 1, replace=False)) if chunks > 1 else []
        bounds = [0, *cuts, S]
        allowed = np.ones((L, S), bool)
        if masked == "one_chunk":  # query 0 sees nothing of the first chunk
            allowed[0, : bounds[1]] = False
        elif masked == "all":  # the last query sees nothing at all
            allowed[-1] = False
        outs, lses = [], []
        for j0, j1 in zip(bounds[:-1], bounds[1:], strict=True):
            p = sdpa_parts(q, k[..., j0:j1, :], v[..., j0:j1, :], allowed[:, j0:j1])
            outs.append(attention64(p.q, p.k, p.v, allowed=p.allowed)[0].astype(dtype))
            lses.append(lse64(logits64(p)).astype(dtype))
        return Call((outs, lses))

    return build


def _merge_naive(outs, lses):
    """Σ_s e^{λ_s} O_s / Σ_s e^{λ_s} in the inputs' dtype, without the max (``out`` only)."""
    w = np.exp(np.stack(lses))
    total = np.sum(w, axis=0)[..., None]
    weighted = np.sum(w[..., None] * np.stack(outs), axis=0)
    return Candidates([weighted / total, weighted / np.where(total > 0, total, 1)])


def _merge_unnormalised(outs, lses):
    """O = Σ_s e^{λ_s − m} O_s with m = max_s λ_s: weights that do not sum to 1 (``out`` only)."""
    lam = np.stack([np.asarray(x, np.float64) for x in lses])
    m = np.max(lam, axis=0)
    w = np.exp(lam - np.where(np.isfinite(m), m, 0.0))
    return np.sum(w[..., None] * np.stack(outs).astype(np.float64), axis=0).astype(outs[0].dtype)


_MERGE_CASES = [
    Case("tiny example: two chunks", _merge_build(chunks=2, ints=True), dict(L=2, S=4, E=2, Ev=2), minimum=dict(S=2)),
    Case("three chunks of different lengths", _merge_build(chunks=3), dict(L=4, S=9, E=4, Ev=3), minimum=dict(S=3)),
    Case("one chunk (nothing to merge)", _merge_build(chunks=1), dict(L=3, S=5, E=4, Ev=3)),
    Case("leading batch dim", _merge_build(chunks=3), dict(L=3, S=8, E=4, Ev=3, B=2), minimum=dict(S=3)),
    Case("a chunk in which a query sees no key (λ_s = −∞)", _merge_build(chunks=2, masked="one_chunk"),
         dict(L=3, S=6, E=4, Ev=3), minimum=dict(S=2)),
    Case("a query that sees no key in any chunk (0 and λ = −∞)", _merge_build(chunks=3, masked="all"),
         dict(L=3, S=7, E=4, Ev=3), minimum=dict(S=3)),
    Case("float32 stays float32", _merge_build(chunks=3), dict(L=3, S=8, E=4, Ev=3), dtype="float32", minimum=dict(S=3)),
    Case("float32, large logsumexps (overflow)", _merge_build(chunks=3, size=22.0), dict(L=3, S=8, E=4, Ev=3),
         minimum=dict(S=3), **LARGE_LOGITS),
]

register(
    Battery(
        name="merge_attention_partials",
        stage="05",
        signature="merge_attention_partials(outs, lses)",
        inputs=("outs", "lses"),
        reference=_merge_reference,
        cases=_MERGE_CASES,
        mistakes=[
            Mistake("plain average of the chunks' outputs",
                    "each chunk counts in proportion to its softmax mass: O = Σ_s e^{λ_s − λ} O_s with "
                    "λ = log Σ_s e^{λ_s}.",
                    lambda call: np.mean(np.stack(call.args[0]), axis=0)),
            Mistake("no max-subtraction", "e^{λ_s} overflows for large logsumexps (float32: > 88): "
                    "compute λ = m + log Σ_s e^{λ_s − m} with m = max_s λ_s.",
                    lambda call: _merge_naive(*call.args)),
            Mistake("λ taken as the largest λ_s", "the merged logsumexp is log Σ_s e^{λ_s}, not max_s λ_s.",
                    lambda call: (_merge_reference(*call.args)[0], np.max(np.stack(call.args[1]), axis=0))),
            Mistake("weights e^{λ_s − max λ} not normalised", "O = Σ_s e^{λ_s − λ} O_s: subtract the merged "
                    "λ, not just the max, so the weights sum to 1.", lambda call: _merge_unnormalised(*call.args)),
            Mistake("a query masked in every chunk gives NaN", "guard the case max_s λ_s = −∞: the output is "
                    "0 and λ = −∞.", lambda call: _masked_nan(*call.args)),
        ],
        outputs=("out", "lse"),
        shapes=("(..., L, Ev)", "(..., L)"),
    )
)


def _masked_nan(outs, lses):
    o, lse = _merge_reference(outs, lses)
    empty = ~np.isfinite(lse)
    if not empty.any():
        return None
    return np.where(empty[..., None], np.nan, o), np.where(empty, np.nan, lse)

