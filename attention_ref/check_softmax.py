"""Checker batteries for stage 02's softmaxes: ``softmax``, ``masked_softmax``, ``online_softmax``.

References are float64 and written here (not imported from the library), so the checker keeps
working while the library's internals change; the tests show they agree with the library.
"""

from __future__ import annotations

import numpy as np

from .check_core import Battery, Call, Candidates, Case, Mistake, randn, register, small_ints

# ---------------------------------------------------------------------------------------------
# References (float64)
# ---------------------------------------------------------------------------------------------


def softmax64(x, axis: int = -1, allowed=None):
    """softmax of x along ``axis`` in float64. Entries that are −∞ or not ``allowed`` get exactly 0;
    a row with nothing left gets zeros (the course's convention)."""
    x = np.asarray(x, np.float64)
    ok = x != -np.inf
    if allowed is not None:
        ok = ok & np.asarray(allowed, bool)
    z = np.where(ok, x, -np.inf)
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(ok, np.exp(z - m), 0.0)
    total = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


def _x_axis(call: Call):
    return call.args[0], call.kwargs.get("axis", -1)


def _softmax_reference(x, axis=-1):
    return softmax64(x, axis)


def _masked_reference(x, mask, axis=-1):
    return softmax64(x, axis, np.broadcast_to(mask, np.shape(x)))


def _online_reference(x, chunk_size, axis=-1):
    return softmax64(x, axis)


# ---------------------------------------------------------------------------------------------
# Mistakes shared by the three: each returns what that mistaken softmax gives
# ---------------------------------------------------------------------------------------------


def _naive(x, axis, allowed=None):
    """e^z / Σ e^z in the input's dtype, without subtracting the maximum — as written, and with
    the 0/0 of a row that underflowed to zeros guarded (two candidates)."""
    z = x if allowed is None else np.where(allowed, x, -np.inf)
    e = np.exp(z)
    total = np.sum(e, axis=axis, keepdims=True)
    return Candidates([e / total, e / np.where(total > 0, total, 1)])


def _global_max(x, axis, allowed=None):
    z = x if allowed is None else np.where(allowed, x, -np.inf)
    e = np.exp(z - np.max(z))
    return e / np.sum(e, axis=axis, keepdims=True)


def _no_keepdims_sum(x, axis, allowed=None):
    z = x if allowed is None else np.where(allowed, x, -np.inf)
    e = np.exp(z - np.max(z, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis)


def _no_keepdims_max(x, axis, allowed=None):
    z = x if allowed is None else np.where(allowed, x, -np.inf)
    e = np.exp(z - np.max(z, axis=axis))
    return e / np.sum(e, axis=axis, keepdims=True)


def _whole_array(x, axis, allowed=None):
    z = x if allowed is None else np.where(allowed, x, -np.inf)
    e = np.exp(z - np.max(z))
    return e / np.sum(e)


def _other_axis(axis: int, ndim: int) -> int | None:
    """The axis a student normalises over by mistake: −2 when −1 was asked (None for 1-D)."""
    if ndim < 2:
        return None
    return -2 if axis % ndim == ndim - 1 else -1


def _wrong_axis(x, axis, allowed=None):
    """softmax down the columns where the last axis was asked (None when that is not the case)."""
    other = _other_axis(axis, x.ndim)
    if other is None or axis % x.ndim != x.ndim - 1:
        return None
    return softmax64(x, other, allowed).astype(x.dtype)


def _ignored_axis(x, axis, allowed=None):
    """softmax along the last axis where another was asked (None when the last one was)."""
    if x.ndim < 2 or axis % x.ndim == x.ndim - 1:
        return None
    return softmax64(x, -1, allowed).astype(x.dtype)


def _square(sizes):
    """Shrink with rows = n, so that a sum or max broadcast against the wrong axis still runs."""
    return {**sizes, "rows": sizes["n"]} if "rows" in sizes and "n" in sizes else sizes


def _common_mistakes(get) -> list[Mistake]:
    """Mistakes of any softmax; ``get(call)`` gives (x, axis, allowed-or-None)."""
    return [
        Mistake(
            "no max-subtraction",
            "e^z overflows for large logits (float32: z > 88) and inf/inf gives NaN. Subtract each "
            "row's maximum m first: softmax(z) = e^{z − m} / Σ e^{z − m}.",
            lambda call: _naive(*get(call)),
        ),
        Mistake(
            "subtracted the maximum of the whole array, not of each row",
            "rows far below the overall maximum underflow to 0/0. Take the max along the softmax "
            "axis with keepdims=True.",
            lambda call: _global_max(*get(call)),
        ),
        Mistake(
            "sum taken without keepdims=True",
            "Σ e^{z − m} of shape (..., rows) broadcasts against the wrong axis (or fails). Use "
            "`e.sum(axis=axis, keepdims=True)`.",
            lambda call: _no_keepdims_sum(*get(call)),
            probe=_square,
            match_errors=True,
        ),
        Mistake(
            "max taken without keepdims=True",
            "each row is shifted by another row's maximum. Use `x.max(axis=axis, keepdims=True)`.",
            lambda call: _no_keepdims_max(*get(call)),
            probe=_square,
            match_errors=True,
        ),
        Mistake(
            "softmax over the wrong axis",
            "your weights sum to 1 down each column instead of along each row; normalise along "
            "the last axis (the keys).",
            lambda call: _wrong_axis(*get(call)),
        ),
        Mistake(
            "ignores the `axis` argument",
            "your function normalises along the last axis whatever `axis` says.",
            lambda call: _ignored_axis(*get(call)),
        ),
        Mistake(
            "normalised over the whole array",
            "Σ runs over every entry; it must run along the axis only (one sum per row).",
            lambda call: _whole_array(*get(call)),
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _tiny(rng, dtype, rows, n):
    return Call((small_ints(rng, (rows, n), dtype),))


def _random(rng, dtype, rows, n):
    return Call((randn(rng, (rows, n), dtype, 2.0),))


def _vector(rng, dtype, n):
    return Call((randn(rng, (n,), dtype, 2.0),))


def _batched(rng, dtype, B, H, rows, n):
    return Call((randn(rng, (B, H, rows, n), dtype, 2.0),))


def _axis(rng, dtype, a, rows, n):
    return Call((randn(rng, (a, rows, n), dtype, 2.0),), {"axis": 1})


def _large(rng, dtype, rows, n):
    """Logits up to ±1000: e^z overflows float32 (and float64) unless the max is subtracted."""
    x = rng.uniform(-1000, 1000, size=(rows, n))
    x[:, 0] = rng.uniform(200, 1000, size=rows)  # every row overflows without the max
    x[0, :] = rng.uniform(-1000, -200, size=n)  # one row underflows to 0/0 without it
    return Call((x.astype(dtype),))


def _with_neg_inf(rng, dtype, rows, n):
    x = randn(rng, (rows, n), dtype, 2.0)
    hole = rng.random((rows, n)) < 0.4
    hole[:, 0] = False  # keep one finite entry per row
    return Call((np.where(hole, -np.inf, x).astype(dtype),))


def _all_neg_inf_row(rng, dtype, rows, n):
    x = randn(rng, (rows, n), dtype, 2.0)
    x[-1] = -np.inf
    return Call((x,))


_SOFTMAX_CASES = [
    Case("tiny hand-checkable example", _tiny, dict(rows=2, n=3)),
    Case("random rows", _random, dict(rows=4, n=7)),
    Case("one vector (1-D)", _vector, dict(n=5)),
    Case("leading batch dims", _batched, dict(B=2, H=3, rows=4, n=5)),
    Case("entries equal to −∞ get weight 0", _with_neg_inf, dict(rows=4, n=6), minimum=dict(n=2)),
    Case("axis=1 of a 3-D array", _axis, dict(a=2, rows=4, n=3)),
    Case("float32 stays float32", _random, dict(rows=3, n=5), dtype="float32"),
    Case("float32, large logits (overflow)", _large, dict(rows=3, n=6), dtype="float32",
         tol=(2e-3, 2e-3), minimum=dict(rows=1, n=1)),
    Case("a row of all −∞ gives zeros (the course's convention)", _all_neg_inf_row,
         dict(rows=3, n=4), bonus=True),
]

register(
    Battery(
        name="softmax",
        stage="02",
        signature="softmax(x, axis=-1)",
        inputs=("x",),
        reference=_softmax_reference,
        cases=_SOFTMAX_CASES,
        mistakes=_common_mistakes(lambda call: (*_x_axis(call), None))
        + [
            Mistake(
                "a row of all −∞ gives NaN",
                "with every entry −∞ the max is −∞ and z − m = −∞ − (−∞) = NaN. Shift such rows by 0 "
                "instead (the course returns zeros for them).",
                lambda call: np.where(
                    np.all(call.args[0] == -np.inf, axis=_x_axis(call)[1], keepdims=True),
                    np.nan, softmax64(*_x_axis(call))).astype(call.args[0].dtype),
            ),
        ],
        shapes=("x.shape",),
        required_options=("axis",),
    )
)

# ---------------------------------------------------------------------------------------------
# masked_softmax(x, mask, axis=-1)
# ---------------------------------------------------------------------------------------------


def _masked(build_x, mask_shape=None, fully_masked=False):
    def build(rng, dtype, **sizes):
        call = build_x(rng, dtype, **sizes)
        x = call.args[0]
        shape = x.shape if mask_shape is None else mask_shape(x.shape)
        mask = rng.random(shape) < 0.6
        axis = call.kwargs.get("axis", -1)
        first = [slice(None)] * len(shape)
        first[axis] = 0
        mask[tuple(first)] = True  # every row keeps a key ...
        if fully_masked:
            mask[..., -1, :] = False  # ... but the last row, which has none
        return Call((x, mask), call.kwargs)

    return build


def _padding_shape(shape):
    return shape[:-2] + (1, shape[-1])


_MASKED_CASES = [
    Case("tiny hand-checkable example", _masked(_tiny), dict(rows=2, n=3)),
    Case("random rows and mask", _masked(_random), dict(rows=4, n=7), minimum=dict(n=2)),
    Case("mask broadcast over rows (key padding)", _masked(_batched, _padding_shape),
         dict(B=2, H=2, rows=3, n=5), minimum=dict(n=2)),
    Case("entries equal to −∞ count as masked", _masked(_with_neg_inf), dict(rows=4, n=6),
         minimum=dict(n=2)),
    Case("axis=1 of a 3-D array", _masked(_axis), dict(a=2, rows=4, n=3)),
    Case("float32 stays float32", _masked(_random), dict(rows=3, n=5), dtype="float32"),
    Case("float32, large logits (overflow)", _masked(_large), dict(rows=3, n=6), dtype="float32",
         tol=(2e-3, 2e-3)),
    Case("a fully masked row gives zeros", _masked(_random, fully_masked=True), dict(rows=3, n=4),
         minimum=dict(rows=1)),
]


def _masked_get(call):
    x, mask = call.args
    return x, call.kwargs.get("axis", -1), np.broadcast_to(mask, x.shape)


def _masked_variant(fn):
    def wrong(call):
        x, axis, allowed = _masked_get(call)
        return fn(x, axis, allowed).astype(x.dtype)

    return wrong


register(
    Battery(
        name="masked_softmax",
        stage="02",
        signature="masked_softmax(x, mask, axis=-1)",
        inputs=("x", "mask"),
        reference=_masked_reference,
        cases=_MASKED_CASES,
        mistakes=[
            Mistake(
                "mask convention inverted (True = ignore)",
                "in this course (as in PyTorch's SDPA) True means *attend*: keep the entries where "
                "the mask is True.",
                _masked_variant(lambda x, a, ok: softmax64(x, a, ~ok)),
            ),
            Mistake(
                "mask applied after the softmax, without renormalising",
                "zeroing weights after the softmax leaves rows that no longer sum to 1. Set the masked "
                "logits to −∞ *before* the softmax.",
                _masked_variant(lambda x, a, ok: softmax64(x, a) * ok),
            ),
            Mistake(
                "logits multiplied by the mask",
                "z · mask turns masked logits into 0, which still gets weight e^0. Set them to −∞.",
                _masked_variant(lambda x, a, ok: softmax64(np.where(ok, x, 0.0), a)),
            ),
            Mistake(
                "masked logits set to a large finite number",
                "−1e9 instead of −∞ gives a fully masked row uniform weights 1/n; this course "
                "returns zeros for such a row (PyTorch's choice).",
                _masked_variant(lambda x, a, ok: softmax64(np.where(ok, x, -1e9), a)),
            ),
            Mistake(
                "a fully masked row gives NaN",
                "when every entry is masked the max is −∞ and z − m is NaN. Shift such rows by 0 and "
                "return zeros for them.",
                _masked_variant(lambda x, a, ok: np.where(
                    np.any(ok & (x != -np.inf), axis=a, keepdims=True), softmax64(x, a, ok), np.nan)),
            ),
        ]
        + _common_mistakes(_masked_get),
        shapes=("x.shape",),
        required_options=("axis",),
    )
)

# ---------------------------------------------------------------------------------------------
# online_softmax(x, chunk_size, axis=-1)
# ---------------------------------------------------------------------------------------------


def _online_sim(x, chunk, axis, variant):
    """The one-pass statistics (m, ℓ) chunk by chunk, with one of the classic slips, then e^{x−m}/ℓ."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    n = x.shape[-1]
    m = np.full(x.shape[:-1] + (1,), -np.inf)
    ell = np.zeros(x.shape[:-1] + (1,))
    stop = (n // chunk) * chunk if variant == "drop_last" else n
    for start in range(0, stop, chunk):
        block = x[..., start : start + chunk]
        m_new = np.maximum(m, np.max(block, axis=-1, keepdims=True))
        safe = np.where(np.isfinite(m_new), m_new, 0.0)
        rescale = 1.0 if variant == "no_rescale" else np.exp(m - safe)
        ell = ell * rescale + np.sum(np.exp(block - safe), axis=-1, keepdims=True)
        m = m_new
    safe = np.where(np.isfinite(m), m, 0.0)
    out = np.exp(x - safe) / ell
    return np.moveaxis(out, -1, axis)


def _online_variant(variant):
    def wrong(call):
        x, chunk = call.args
        return _online_sim(x, chunk, call.kwargs.get("axis", -1), variant).astype(x.dtype)

    return wrong


def _online(build_x, chunk_size):
    def build(rng, dtype, **sizes):
        call = build_x(rng, dtype, **sizes)
        return Call((call.args[0], chunk_size), call.kwargs)

    return build


def _ascending(rng, dtype, rows, n):
    """Each chunk holds larger numbers than the last: the running max changes at every chunk."""
    x = np.sort(randn(rng, (rows, n), np.float64, 3.0), axis=-1) + np.linspace(0, 6, n)
    return Call((x.astype(dtype),))


_ONLINE_CASES = [
    Case("tiny hand-checkable example (chunks of 2)", _online(_tiny, 2), dict(rows=2, n=5)),
    Case("chunks that divide n", _online(_random, 4), dict(rows=3, n=8)),
    Case("growing values: the running max changes every chunk", _online(_ascending, 3),
         dict(rows=3, n=9), minimum=dict(n=4)),
    Case("chunks that do not divide n", _online(_random, 3), dict(rows=3, n=11), minimum=dict(n=4)),
    Case("chunk_size = 1", _online(_random, 1), dict(rows=2, n=6), minimum=dict(n=2)),
    Case("one chunk larger than n", _online(_random, 16), dict(rows=2, n=6)),
    Case("leading batch dims", _online(_batched, 3), dict(B=2, H=2, rows=3, n=7), minimum=dict(n=4)),
    Case("entries equal to −∞ get weight 0", _online(_with_neg_inf, 2), dict(rows=4, n=6),
         minimum=dict(n=3)),
    Case("float32 stays float32", _online(_random, 3), dict(rows=3, n=7), dtype="float32"),
    Case("float32, large logits (overflow)", _online(_large, 2), dict(rows=3, n=6), dtype="float32",
         tol=(2e-3, 2e-3)),
    Case("axis=1 of a 3-D array", _online(_axis, 2), dict(a=2, rows=5, n=3)),
]

register(
    Battery(
        name="online_softmax",
        stage="02",
        signature="online_softmax(x, chunk_size)",
        inputs=("x", "chunk_size"),
        reference=_online_reference,
        cases=_ONLINE_CASES,
        mistakes=[
            Mistake(
                "online-softmax running sum not rescaled",
                "when a chunk raises the running max from m to m', the sum so far must be rescaled: "
                "ℓ ← ℓ·e^{m − m'} + Σ e^{x − m'} (Milakov & Gimelshein 2018).",
                _online_variant("no_rescale"),
            ),
            Mistake(
                "the last, shorter chunk is left out",
                "with n not a multiple of chunk_size the final chunk is shorter; loop "
                "`for start in range(0, n, chunk_size)` and slice `x[..., start:start + chunk_size]`.",
                _online_variant("drop_last"),
            ),
            Mistake(
                "no max-subtraction",
                "e^x overflows for large logits (float32: x > 88): keep a running max m and use e^{x − m}.",
                lambda call: _naive(call.args[0], call.kwargs.get("axis", -1)),
            ),
        ],
        shapes=("x.shape",),
    )
)
