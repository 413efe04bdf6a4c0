"""Checker battery for stage 10: ``ring_attention_step(q, k_blk, v_blk, out, lse, q_spans, kv_spans,
*, is_causal=False)`` — what one rank does at one step of ring attention.

The reference is written from the tokens' global positions, not from chunk pairs: the query at
position pos attends the keys of the block at positions ≤ pos (causal) or all of them, and the block's
(O_b, λ_b) is merged into the running (O, λ) with λ ← log(e^λ + e^λ_b). Each case cuts a whole
sequence with the course's ``shard_spans`` and hands the step what a real ring hands it at that
step: rank r's queries, the block of the rank it holds, and the (O, λ) its earlier steps left.
The mistakes replay the step chunk pair by chunk pair, as a student writes it, with one slip each:
in the merge, in the causal mask, in the positions of a zigzag shard's chunks, in the scale.
"""

from __future__ import annotations

import math

import numpy as np

from .check_attention import LARGE_LOGITS, attention64, qkv, repeat_kv
from .check_core import Battery, Call, Candidates, Case, Mistake, register
from .check_flash import _merge_reference, lse64
from .ring import shard_spans


def _positions(spans) -> np.ndarray:
    """The global position of every row of a shard: its chunks one after the other."""
    return np.concatenate([np.arange(a, b) for a, b in spans] + [np.zeros(0, int)])


def _block64(q, k, v, allowed, scale):
    """(O_b, λ_b) in float64 of the queries over the keys ``allowed`` (True = attend): O_b = 0 and
    λ_b = −∞ for a query that sees none of them."""
    q64 = np.asarray(q, np.float64)
    if k.shape[-2] == 0:  # no key yet: the merge's identity
        return np.zeros((*q64.shape[:-1], v.shape[-1])), np.full(q64.shape[:-1], -np.inf)
    k64, v64 = repeat_kv(q64, np.asarray(k, np.float64), np.asarray(v, np.float64))
    tau = 1.0 / math.sqrt(q64.shape[-1]) if scale is None else scale
    z = tau * (q64 @ np.swapaxes(k64, -1, -2))
    if allowed is not None:
        z = np.where(allowed, z, -np.inf)
    return attention64(q64, k64, v64, scale=tau, allowed=allowed)[0], lse64(z)


def _step_reference(q, k_blk, v_blk, out, lse, q_spans, kv_spans, *, is_causal=False, scale=None,
                    enable_gqa=False):
    allowed = _positions(kv_spans)[None, :] <= _positions(q_spans)[:, None] if is_causal else None
    o_b, lse_b = _block64(q, k_blk, v_blk, allowed, scale)
    return _merge_reference([out, o_b], [lse, lse_b])


# ---------------------------------------------------------------------------------------------
# Inputs: rank r's shards at the step where it holds the block of rank `owner`
# ---------------------------------------------------------------------------------------------


def _build(*, layout="contiguous", causal=False, rank=0, owner=0, ints=False, size=1.0, scale=None, gqa=False):
    """A step of a ring of R ranks over a sequence of N tokens: rank ``rank`` holds the block of
    rank ``owner`` (negative numbers count from R), after the steps that brought it there."""

    def build(rng, dtype, N, R, E, Ev, batch=None, H=None):
        q, k, v = qkv(rng, dtype, N, N, E, Ev, batch, H, Hkv=None if not gqa else H // 2, ints=ints, size=size)
        spans = shard_spans(N, R, layout)
        r, o = rank % R, owner % R
        step = (r - o) % R  # rank r holds rank (r − s)'s block at step s
        rows = _positions(spans[r])
        seen = np.concatenate([_positions(spans[(r - s) % R]) for s in range(step)] + [np.zeros(0, int)])
        allowed = seen[None, :] <= rows[:, None] if causal else None
        kv_rows = _positions(spans[o])
        out, lse = _block64(q[..., rows, :], k[..., seen, :], v[..., seen, :], allowed, scale)  # earlier steps
        kwargs = {"is_causal": True} if causal else {}
        if scale is not None:
            kwargs["scale"] = scale
        if gqa:
            kwargs["enable_gqa"] = True
        args = (q[..., rows, :], k[..., kv_rows, :], v[..., kv_rows, :], out.astype(dtype), lse.astype(dtype),
                spans[r], spans[o])
        return Call(args, kwargs)

    return build


def _case(title, sizes, *, dtype="float64", tol=None, **build):
    """Sizes keep R (the chunk layout is the point of a case) and at least two tokens per chunk."""
    chunks = sizes["R"] * (2 if build.get("layout") == "zigzag" else 1)
    extra = {} if tol is None else {"tol": tol}
    return Case(title, _build(**build), sizes, dtype=dtype, minimum=dict(R=sizes["R"], N=2 * chunks), **extra)


_CASES = [
    _case("tiny hand-checkable example: the first step (own block, nothing seen yet)",
          dict(N=4, R=2, E=2, Ev=2), rank=1, owner=1, ints=True),
    _case("a later step: merge the block into the running (O, λ)", dict(N=6, R=2, E=3, Ev=2), rank=0, owner=1),
    _case("three ranks, N not divisible by R, Ev ≠ E", dict(N=11, R=3, E=4, Ev=3), rank=1, owner=2),
    _case("leading batch dims (batch, H, L_r, E)", dict(N=8, R=2, E=4, Ev=3, batch=2, H=2), rank=1, owner=0),
    _case("causal: the own block (the diagonal)", dict(N=8, R=2, E=4, Ev=3), causal=True, rank=1, owner=1),
    _case("causal: an earlier rank's block (every key visible)", dict(N=9, R=3, E=4, Ev=3), causal=True,
          rank=2, owner=0),
    _case("causal: a later rank's block (hidden: (O, λ) unchanged)", dict(N=9, R=3, E=4, Ev=3), causal=True,
          rank=0, owner=2),
    _case("zigzag, causal: the own block (two chunks, rank r holds chunks r and 2R−1−r)",
          dict(N=8, R=2, E=4, Ev=3), layout="zigzag", causal=True, rank=0, owner=0),
    _case("zigzag, causal: an earlier rank's block (only its early chunk is visible)",
          dict(N=16, R=4, E=4, Ev=3), layout="zigzag", causal=True, rank=2, owner=0),
    _case("zigzag, causal: a later rank's block (only the late query chunk sees it)",
          dict(N=16, R=4, E=4, Ev=3), layout="zigzag", causal=True, rank=1, owner=2),
    _case("zigzag, causal, N not divisible by 2R (chunks of different lengths)",
          dict(N=17, R=3, E=4, Ev=3), layout="zigzag", causal=True, rank=0, owner=1),
    _case("float32 stays float32", dict(N=12, R=2, E=4, Ev=3), dtype="float32", layout="zigzag", causal=True,
          rank=1, owner=0),
    _case("float32, large logits (overflow)", dict(N=12, R=2, E=4, Ev=3), layout="zigzag", causal=True,
          rank=1, owner=0, size=22.0, **LARGE_LOGITS),
    _case("scale given", dict(N=12, R=2, E=4, Ev=3), layout="zigzag", causal=True, rank=1, owner=0, scale=0.3),
    _case("GQA (enable_gqa, H = 4, Hkv = 2)", dict(N=12, R=2, E=4, Ev=3, batch=1, H=4), layout="zigzag", causal=True,
          rank=1, owner=0, gqa=True),
]


# ---------------------------------------------------------------------------------------------
# The mistakes: the step replayed chunk pair by chunk pair, with one slip
# ---------------------------------------------------------------------------------------------


def _slipped_positions(spans, slip):
    """Where a student thinks the shard's rows lie: "reversed" takes the chunks in the wrong order
    (the late chunk first), "run" one run of positions from the first chunk's start."""
    if slip == "reversed":
        return _positions(list(spans)[::-1])
    if slip == "run":
        return np.arange(spans[0][0], spans[0][0] + sum(b - a for a, b in spans))
    return _positions(spans)


def _visible(slip, q_pos, k_pos, q_chunk, k_chunk):
    """(L_r, S_b) True where the student's causal mask lets a query see a key. ``q_chunk`` and
    ``k_chunk`` give each row's chunk as its span's start (the layouts' chunks are identical or
    disjoint, so equal starts mean the same chunk)."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    qi, kj = np.arange(len(q_pos))[:, None], np.arange(len(k_pos))[None, :]
    if slip == "none":
        return np.ones((len(q_pos), len(k_pos)), bool)
    if slip == "no_skip":  # the pair of a chunk with itself is masked, every other pair attended in full
        same = q_chunk[:, None] == k_chunk[None, :]
        return np.where(same, kp <= qp, True)
    if slip == "tril_block":
        return kj <= qi
    if slip == "tril_block_bottom_right":
        return kj <= qi + len(k_pos) - len(q_pos)
    if slip == "tril_pairs":  # is_causal=True handed to every chunk pair: top-left within the pair
        q_first = np.array([np.argmax(q_chunk == c) for c in q_chunk])[:, None]
        k_first = np.array([np.argmax(k_chunk == c) for c in k_chunk])[None, :]
        return kj - k_first <= qi - q_first
    return kp <= qp


def _merge(slip, o, lam, o_b, lam_b, dtype):
    """The running (O, λ) merged with a chunk pair's (O_b, λ_b), as the student merges them."""
    if slip == "sum":
        return o + o_b, _merge_reference([o, o_b], [lam, lam_b])[1]
    if slip == "average":
        return (o + o_b) / 2, _merge_reference([o, o_b], [lam, lam_b])[1]
    if slip == "overwrite":
        return o_b, lam_b
    if slip == "stale_lse":
        return _merge_reference([o, o_b], [lam, lam_b])[0], lam
    if slip == "naive":  # e^λ in the inputs' dtype, without subtracting the max
        with np.errstate(all="ignore"):
            w, w_b = np.exp(lam.astype(dtype))[..., None], np.exp(lam_b.astype(dtype))[..., None]
            total = w + w_b
            return ((w * o.astype(dtype) + w_b * o_b.astype(dtype)) / total).astype(np.float64), \
                np.log(total[..., 0]).astype(np.float64)
    return _merge_reference([o, o_b], [lam, lam_b])


def _replay(call, *, by="pairs", positions="spans", sides=("q", "kv"), mask="global", merge="logsumexp",
            scale="given"):
    """The step with one slip, chunk pair by chunk pair (``by="pairs"``: pairs the mask hides are
    skipped) or the whole block at once (``by="block"``): (out, lse) in the inputs' dtype."""
    q, k, v, out, lse, q_spans, kv_spans = call.args
    is_causal = call.kwargs.get("is_causal", False)
    tau = {"given": call.kwargs.get("scale"), "ignored": None, "one": 1.0}[scale]
    q_pos = _slipped_positions(q_spans, positions if "q" in sides else "spans")
    k_pos = _slipped_positions(kv_spans, positions if "kv" in sides else "spans")
    q_chunk = np.repeat([a for a, _ in q_spans], [b - a for a, b in q_spans])
    k_chunk = np.repeat([a for a, _ in kv_spans], [b - a for a, b in kv_spans])
    allowed = _visible(mask if is_causal else "none", q_pos, k_pos, q_chunk, k_chunk)
    o, lam = np.array(out, np.float64), np.array(lse, np.float64)
    q_parts = [q_chunk == a for a, b in q_spans if b > a] if by == "pairs" else [np.ones(len(q_pos), bool)]
    k_parts = [k_chunk == a for a, b in kv_spans if b > a] if by == "pairs" else [np.ones(len(k_pos), bool)]
    for rows in q_parts:
        for cols in k_parts:
            seen = allowed[np.ix_(rows, cols)]
            if by == "pairs" and not seen.any():
                continue  # a pair the mask hides: skipped
            o_b, lam_b = _block64(q[..., rows, :], k[..., cols, :], v[..., cols, :], seen, tau)
            o[..., rows, :], lam[..., rows] = _merge(merge, o[..., rows, :], lam[..., rows], o_b, lam_b, q.dtype)
    return o.astype(q.dtype), lam.astype(q.dtype)


def _replays(**slip):
    """wrong(call) for one slip: the step worked chunk pair by chunk pair, or the whole block at once
    (a student may write either; they differ once a slip is in)."""
    return lambda call: Candidates([_replay(call, by=by, **slip) for by in ("pairs", "block")])


def _either_side(**slip):
    """The slip on both shards' positions, or on the queries' or the block's only."""
    return lambda call: Candidates([_replay(call, by=by, sides=sides, **slip) for by in ("pairs", "block")
                                    for sides in (("q", "kv"), ("q",), ("kv",))])


def _when(option, wrong):
    return lambda call: wrong(call) if option in call.kwargs else None


_MERGE_ADVICE = ("O and O_b are each normalised over different keys; weight each by its share of the softmax "
                 "mass: λ_new = log(e^λ + e^λ_b), O ← e^{λ − λ_new} O + e^{λ_b − λ_new} O_b "
                 "(merge_attention_partials).")

_MISTAKES = [
    Mistake("partial outputs added without the logsumexp weights", _MERGE_ADVICE,
            _replays(merge="sum")),
    Mistake("partial outputs averaged", "a plain mean weights every block the same, whatever its share of the "
            "softmax mass. " + _MERGE_ADVICE, _replays(merge="average")),
    Mistake("the block's result replaces the running (O, λ)", "merge it into the result of the earlier "
            "steps rather than overwrite it. " + _MERGE_ADVICE, _replays(merge="overwrite")),
    Mistake("λ not updated", "return the merged λ_new = log(e^λ + e^λ_b) with O: the next step weighs the "
            "running O by it.", _replays(merge="stale_lse")),
    Mistake("merge without max-subtraction", "e^λ overflows for large logsumexps (float32: λ > 88) and "
            "inf/inf gives NaN: with m = max(λ, λ_b), λ_new = m + log(e^{λ − m} + e^{λ_b − m}) "
            "(merge_attention_partials does this).", _replays(merge="naive")),
    Mistake("no causal mask", "with is_causal the query at global position pos sees only the keys at "
            "positions ≤ pos: in a ring most blocks are either wholly visible or wholly hidden.",
            _when("is_causal", _replays(mask="none"))),
    Mistake("causal mask aligned by local, not global, positions",
            "row i of q and column j of the block are tokens at the global positions of q_spans and "
            "kv_spans, not i and j: compare those. A chunk pair is then wholly visible (no mask), the "
            "same chunk on both sides (the causal mask), or wholly hidden (skip it) — "
            "visible_chunk_pairs says which; is_causal=True is only for the diagonal pair.",
            lambda call: Candidates([_replay(call, by=by, mask=m) for by in ("pairs", "block") for m in
                                     ("tril_pairs", "tril_block", "tril_block_bottom_right")])),
    Mistake("hidden chunk pairs not skipped", "a key chunk that lies wholly after a query chunk is hidden by the "
            "causal mask: skip the pair instead of attending to it without a mask.",
            _replays(mask="no_skip")),
    Mistake("the shard's chunks taken in the wrong order",
            "a zigzag shard holds chunk r, then chunk 2R−1−r, in the order of its spans (positions grow "
            "along the shard): local row 0 is at position q_spans[0][0], and the rows of the second "
            "chunk come after those of the first.", _either_side(positions="reversed")),
    Mistake("the shard treated as one contiguous run of positions",
            "a zigzag shard is two chunks far apart: a row's global position comes from the chunk it lies "
            "in (q_spans), not from q_spans[0][0] + i.", _either_side(positions="run")),
    Mistake("no scale", "the logits are Z = τ Q Kᵀ with τ = 1/√E (or `scale`).",
            _replays(scale="one")),
    Mistake("ignores the `scale` argument", "use τ = scale when it is given, 1/√E otherwise.",
            _when("scale", _replays(scale="ignored"))),
]

register(
    Battery(
        name="ring_attention_step",
        stage="10",
        signature="ring_attention_step(q, k_blk, v_blk, out, lse, q_spans, kv_spans, *, is_causal=False)",
        inputs=("q", "k_blk", "v_blk", "out", "lse", "q_spans", "kv_spans"),
        reference=_step_reference,
        cases=_CASES,
        mistakes=_MISTAKES,
        outputs=("out", "lse"),
        shapes=("(..., H, L_r, Ev)", "(..., H, L_r)"),
        required_options=("is_causal",),
    )
)
