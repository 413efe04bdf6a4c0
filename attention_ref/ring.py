"""Stage 10: ring attention — one sequence split across R processes that pass key/value blocks.

FlashAttention (stage 05) makes attention's memory linear in the sequence length N, but a million
tokens of keys and values still do not fit one device. **Ring attention** (Liu, Zaharia & Abbeel
2023, arXiv:2310.01889) cuts the sequence into R shards, one per rank (process, device): rank r
keeps its queries Q_r and starts with its own keys and values (K_r, V_r). At each of R steps every
rank attends its queries to the key/value block in hand, then passes that block to the next rank
of the ring (r → r + 1 mod R) and receives one from the previous rank. After R steps every query
has met every key, and the partial results were merged exactly with the rule of split-KV decoding
(stage 07), ``merge_attention_partials``:

    λ = log(e^{λ₁} + e^{λ₂}),    O = e^{λ₁ − λ} O₁ + e^{λ₂ − λ} O₂.

No rank ever holds more than its own shard and two blocks in flight: memory per rank is O(N/R),
while the work per step, O((N/R)²·E), hides the transfer of a block, O((N/R)·E), once the blocks
are long enough.

Layouts (where each rank's tokens lie)
--------------------------------------
* ``"contiguous"``: rank r holds positions [r·N/R, (r+1)·N/R). With a causal mask this is
  unbalanced: rank 0 sees only its own block, rank R−1 sees all of them.
* ``"zigzag"`` (ring-flash-attn; cf. Brandon et al. 2023, Striped Attention, arXiv:2311.09431):
  the sequence is cut into 2R chunks and rank r holds chunks r and 2R−1−r, one early and one late,
  so every rank does the same causal work at every step.

When N is not divisible by R (contiguous) or 2R (zigzag) nothing is padded: the pieces have
⌊N/R⌋ or ⌈N/R⌉ tokens (⌊N/2R⌋ or ⌈N/2R⌉ per zigzag chunk), with boundaries ⌊i·N/R⌋ (⌊i·N/2R⌋),
so shards differ by at most one token (two for zigzag) and every rank can compute every rank's
shard sizes from N alone. ``shard_spans`` gives them.

Public functions
----------------
``shard_spans``                  the global positions of every rank's chunks
``shard`` / ``local_shard`` / ``unshard``  cut a sequence into per-rank shards and put it back
``visible_chunk_pairs``          which (query chunk, key chunk) pairs a causal mask leaves visible
``ring_attention_step``          ONE rank, ONE step: attend the local queries to the block in hand
``ring_attention_backward_step`` the same for the backward pass (dQ stays, dK and dV travel)
``ring_attention_sendrecv``      the ring over MPI, readable first version (blocking Sendrecv)
``ring_attention``               the ring over MPI, sends overlapped with compute (Isend/Irecv)
``ring_attention_backward``      dQ, dK, dV over MPI, dK and dV travelling with their blocks
``simulate_ring_attention``      R virtual ranks in one process (a loop stands in for the
                                 network), recording what each rank computed and sent
``simulate_ring_attention_backward``  the same for the backward pass

``comm`` is an ``mpi4py`` communicator (``MPI.COMM_WORLD``); this module never imports mpi4py
itself, except in the command-line demo (``mpiexec -n 4 python -m attention_ref.ring --seq-len
16384 --causal --layout zigzag``). Arrays are NumPy (or CuPy with a CUDA-aware MPI); the simulator
takes any array-API namespace. Self-attention only (the queries, keys and values of a rank cover the
same positions); no ``attn_mask``, no dropout. Inputs are checked through the shared contract
(:mod:`attention_ref.contract`), so a bad q, k or v gets the error SDPA gives; over MPI every rank
checks its own shards before any transfer and all ranks raise the first error found.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace

from .contract import (
    check_attention,
    check_bool,
    check_choice,
    check_float_arrays,
    check_gradients,
    check_int,
    check_real,
)
from .flash import flash_attention, flash_attention_backward, merge_attention_partials

Array = Any  # an array of any array-API namespace
Span = tuple[int, int]  # global positions [start, stop) of one chunk of the sequence

__all__ = [
    "LAYOUTS",
    "RingEvent",
    "RingStats",
    "local_shard",
    "ring_attention",
    "ring_attention_backward",
    "ring_attention_backward_step",
    "ring_attention_sendrecv",
    "ring_attention_step",
    "shard",
    "shard_spans",
    "simulate_ring_attention",
    "simulate_ring_attention_backward",
    "unshard",
    "visible_chunk_pairs",
]

LAYOUTS = ("contiguous", "zigzag")


# ---------------------------------------------------------------------------------------------
# Where each rank's tokens lie: spans, shard, unshard
# ---------------------------------------------------------------------------------------------


def shard_spans(seq_len: int, world_size: int, layout: str = "contiguous") -> list[list[Span]]:
    """The global positions each rank holds: ``spans[r]`` is rank r's list of chunks [start, stop).

    contiguous: one chunk per rank, boundaries ⌊r·N/R⌋. zigzag: the sequence is cut into 2R chunks
    with boundaries ⌊i·N/(2R)⌋ and rank r holds chunks r and 2R−1−r (in that order, so positions
    grow along a shard). Nothing is padded; chunks may be empty when N < 2R.
    """
    check_choice("layout", layout, LAYOUTS)
    N, R = check_int("seq_len", seq_len, 0), check_int("world_size", world_size, 1)
    if layout == "contiguous":
        return [[(r * N // R, (r + 1) * N // R)] for r in range(R)]
    cut = [i * N // (2 * R) for i in range(2 * R + 1)]
    return [[(cut[r], cut[r + 1]), (cut[2 * R - 1 - r], cut[2 * R - r])] for r in range(R)]


def _length(spans: Sequence[Span]) -> int:
    return sum(stop - start for start, stop in spans)


def _local_rows(spans: Sequence[Span]) -> list[slice]:
    """Where each chunk lies inside the shard: the shard is its chunks one after the other."""
    rows, start = [], 0
    for a, b in spans:
        rows.append(slice(start, start + b - a))
        start += b - a
    return rows


def _take(x: Array, axis: int, span: Span | slice) -> Array:
    index = [slice(None)] * x.ndim
    index[axis] = span if isinstance(span, slice) else slice(*span)
    return x[tuple(index)]


def _axis(x: Array, axis: int, what: str) -> int:
    """``axis`` of the array ``x`` (named ``what`` in errors) as an index ≥ 0."""
    if not (hasattr(x, "shape") and hasattr(x, "ndim")):
        raise TypeError(f"{what} must be an array, got {type(x).__name__}")
    check_int("axis", axis, -x.ndim)
    if axis >= x.ndim:
        raise ValueError(f"axis {axis} is out of range for {what} of shape {tuple(x.shape)}")
    return axis % x.ndim


def local_shard(
    x: Array, world_size: int, rank: int, *, layout: str = "contiguous", axis: int = -2
) -> Array:
    """Rank ``rank``'s shard of the sequence ``x`` (sequence along ``axis``), see :func:`shard`."""
    ax = _axis(x, axis, "x")
    spans = shard_spans(int(x.shape[ax]), world_size, layout)
    if check_int("rank", rank) >= world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    pieces = [_take(x, ax, span) for span in spans[rank]]
    return pieces[0] if len(pieces) == 1 else array_namespace(x).concat(pieces, axis=ax)


def shard(x: Array, world_size: int, *, layout: str = "contiguous", axis: int = -2) -> list[Array]:
    """Cut a sequence into ``world_size`` shards, one per rank, along ``axis`` (the sequence axis).

    ``layout="contiguous"``: rank r gets positions [⌊rN/R⌋, ⌊(r+1)N/R⌋) (a view of ``x``);
    ``"zigzag"``: rank r gets chunks r and 2R−1−r of 2R (a copy). Shards differ in length by at
    most 1 (contiguous) or 2 (zigzag) tokens when R does not divide N; nothing is padded.
    ``unshard(shard(x, R, layout=l), layout=l)`` gives ``x`` back.
    """
    R = check_int("world_size", world_size, 1)
    return [local_shard(x, R, r, layout=layout, axis=axis) for r in range(R)]


def unshard(shards: Sequence[Array], *, layout: str = "contiguous", axis: int = -2) -> Array:
    """Put per-rank shards (from :func:`shard` or a ring's outputs) back in sequence order."""
    if not isinstance(shards, (list, tuple)):
        raise TypeError(f"shards must be a list of arrays, one per rank, got {type(shards).__name__}")
    if len(shards) == 0:
        raise ValueError("unshard needs at least one shard")
    for r, s in enumerate(shards):
        ax = _axis(s, axis, f"shards[{r}]")
    xp = array_namespace(*shards)
    lengths = [int(s.shape[ax]) for s in shards]
    spans = shard_spans(sum(lengths), len(shards), layout)
    expected = [_length(sp) for sp in spans]
    if lengths != expected:
        raise ValueError(
            f"shard lengths {lengths} along axis {axis} are not those of a {layout} layout of "
            f"N = {sum(lengths)} tokens over R = {len(shards)} ranks, {expected}"
        )
    pieces = []  # (global start, chunk)
    for s, rank_spans in zip(shards, spans, strict=True):
        for span, rows in zip(rank_spans, _local_rows(rank_spans), strict=True):
            pieces.append((span[0], _take(s, ax, rows)))
    pieces.sort(key=lambda piece: piece[0])
    return xp.concat([chunk for _, chunk in pieces], axis=ax)


# ---------------------------------------------------------------------------------------------
# The per-rank step: the heart of ring attention
# ---------------------------------------------------------------------------------------------


def visible_chunk_pairs(
    q_spans: Sequence[Span], kv_spans: Sequence[Span], is_causal: bool
) -> list[tuple[int, int, str]]:
    """Which (query chunk c, key chunk j) pairs must be computed, and how: ``(c, j, kind)``.

    Without a causal mask every pair is ``"full"``. With one (query at position pos sees keys at
    positions ≤ pos), compare the chunks' global positions:

    * every key at or before the first query  → ``"full"``: attend without a mask;
    * the same positions on both sides          → ``"diagonal"``: the ordinary causal mask; with
      L = S the top-left and bottom-right alignments coincide;
    * every key after the last query            → hidden: skipped, not listed.

    Chunks of the two layouts are either identical or disjoint, so no other case arises; empty
    chunks are skipped.
    """
    check_bool(is_causal=is_causal)
    q_spans, kv_spans = _check_spans("q_spans", q_spans), _check_spans("kv_spans", kv_spans)
    pairs = []
    for c, (qa, qb) in enumerate(q_spans):
        for j, (ka, kb) in enumerate(kv_spans):
            if qa == qb or ka == kb:
                continue  # an empty chunk (N < 2R)
            if not is_causal or kb - 1 <= qa:
                pairs.append((c, j, "full"))
            elif (ka, kb) == (qa, qb):
                pairs.append((c, j, "diagonal"))
            elif ka <= qb - 1:
                raise ValueError(f"query chunk {(qa, qb)} and key chunk {(ka, kb)} overlap partly")
    return pairs


def ring_attention_step(
    q: Array,
    k_blk: Array,
    v_blk: Array,
    out: Array,
    lse: Array,
    q_spans: Sequence[Span],
    kv_spans: Sequence[Span],
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Array, Array]:
    """One step of ring attention on one rank: attend the local queries to the block in hand.

    Shapes: ``q (..., H, L_r, E)`` this rank's queries; ``k_blk (..., Hkv, S_b, E)`` and
    ``v_blk (..., Hkv, S_b, Ev)`` the key/value block in hand (another rank's shard);
    ``out (..., H, L_r, Ev)`` and ``lse (..., H, L_r)`` the running result of the earlier steps
    (start from 0 and −∞). ``q_spans`` / ``kv_spans`` are the global positions of the chunks of
    the queries and of the block (:func:`shard_spans`). Returns the updated ``(out, lse)``.

    The inner step of Liu et al. (2023), Algorithm 1: for every visible pair of chunks,
    O_b, λ_b = attention(Q_c, K_j, V_j) with its logsumexp (FlashAttention, stage 05), then the
    online-softmax merge into the running result of those query rows (stage 07). Inputs are
    checked as SDPA checks them (errors name q, k_blk, v_blk ``query``, ``key``, ``value``);
    none is modified. Export with ``python -m attention_ref.export ring_attention_step``.
    """
    _check_step(q, k_blk, v_blk, out, lse, q_spans, kv_spans, is_causal, scale, enable_gqa)
    xp = array_namespace(q, k_blk, v_blk, out, lse)
    q_rows, kv_rows = _local_rows(q_spans), _local_rows(kv_spans)  # each chunk's rows in the shard
    pairs = visible_chunk_pairs(q_spans, kv_spans, is_causal)  # hidden pairs are not listed: skipped
    new_out, new_lse = [], []
    for c, rows in enumerate(q_rows):
        out_c, lse_c = out[..., rows, :], lse[..., rows]  # running (O, λ) of query chunk c
        for _, j, kind in (pair for pair in pairs if pair[0] == c):
            cols = kv_rows[j]
            # O_b, λ_b = attention(Q_c, K_j, V_j); a diagonal pair gets the causal mask
            o_b, lse_b = flash_attention(
                q[..., rows, :], k_blk[..., cols, :], v_blk[..., cols, :],
                is_causal=(kind == "diagonal"), scale=scale, enable_gqa=enable_gqa,
                return_lse=True,
            )
            o_b, lse_b = xp.astype(o_b, out.dtype, copy=False), xp.astype(lse_b, lse.dtype, copy=False)
            # λ ← log(e^λ + e^λ_b),  O ← e^{λ_old − λ} O + e^{λ_b − λ} O_b
            out_c, lse_c = merge_attention_partials([out_c, o_b], [lse_c, lse_b])
        new_out.append(out_c)
        new_lse.append(lse_c)
    return xp.concat(new_out, axis=-2), xp.concat(new_lse, axis=-1)


def ring_attention_backward_step(
    q: Array,
    k_blk: Array,
    v_blk: Array,
    out: Array,
    lse: Array,
    grad_out: Array,
    dq: Array,
    dk_blk: Array,
    dv_blk: Array,
    q_spans: Sequence[Span],
    kv_spans: Sequence[Span],
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Array, Array, Array]:
    """One backward step on one rank: add this block's share of dQ (kept) and dK, dV (travelling).

    ``q, out (..., H, L_r, ·)``, ``lse (..., H, L_r)`` and ``grad_out`` are this rank's rows of the
    *finished* forward pass (out and lse over the whole sequence, from ``ring_attention(...,
    return_lse=True)``); ``k_blk, v_blk`` the block in hand and ``dk_blk, dv_blk`` the gradients
    earlier ranks accumulated for it; ``dq`` this rank's running dQ. Returns ``(dq, dk_blk,
    dv_blk)`` with this step's contributions added.

    Because the global λ is used, P = exp(τ Q Kᵀ − λ) of a chunk pair is the exact slice of the
    full attention weights, and D = rowsum(dO ∘ O) is the full row's: the FlashAttention backward
    (stage 05, FA-2 Algorithm 2) of each visible pair gives exact, additive contributions.
    Export with ``python -m attention_ref.export ring_attention_backward_step``.
    """
    _check_backward_step(q, k_blk, v_blk, out, lse, grad_out, dq, dk_blk, dv_blk, q_spans, kv_spans,
                         is_causal, scale, enable_gqa)
    xp = array_namespace(q, k_blk, v_blk, dq, dk_blk, dv_blk)
    pairs = visible_chunk_pairs(q_spans, kv_spans, is_causal)
    q_rows, kv_rows = _local_rows(q_spans), _local_rows(kv_spans)
    dk_parts = [dk_blk[..., cols, :] for cols in kv_rows]
    dv_parts = [dv_blk[..., cols, :] for cols in kv_rows]
    dq_parts = []
    for c, rows in enumerate(q_rows):
        dq_c = dq[..., rows, :]
        for _, j, kind in (pair for pair in pairs if pair[0] == c):
            cols = kv_rows[j]
            g_q, g_k, g_v = flash_attention_backward(
                q[..., rows, :], k_blk[..., cols, :], v_blk[..., cols, :], out[..., rows, :],
                lse[..., rows], grad_out[..., rows, :], is_causal=(kind == "diagonal"),
                scale=scale, enable_gqa=enable_gqa,
            )
            dq_c = dq_c + xp.astype(g_q, dq.dtype)
            dk_parts[j] = dk_parts[j] + xp.astype(g_k, dk_blk.dtype)
            dv_parts[j] = dv_parts[j] + xp.astype(g_v, dv_blk.dtype)
        dq_parts.append(dq_c)
    return tuple(xp.concat(parts, axis=-2) for parts in (dq_parts, dk_parts, dv_parts))


# ---------------------------------------------------------------------------------------------
# Small shared helpers: checks, accumulators, messages
# ---------------------------------------------------------------------------------------------


def _accumulator_dtype(xp, dtype):
    """float16 is accumulated in float32, as every flash kernel does; others in their own dtype."""
    if getattr(xp, "float16", None) is not None and dtype == xp.float16:
        return xp.float32
    return dtype


def _zero_gradient(x: Array) -> Array:
    """Zeros shaped like ``x``, in the dtype its gradient is accumulated in."""
    xp = array_namespace(x)
    return xp.zeros(x.shape, dtype=_accumulator_dtype(xp, x.dtype), device=x.device)


def _empty_result(q: Array, v: Array) -> tuple[Array, Array]:
    """The result before any key was seen: O = 0 and λ = −∞ (the merge's identity)."""
    xp = array_namespace(q, v)
    dt = _accumulator_dtype(xp, q.dtype)
    out = xp.zeros((*q.shape[:-1], v.shape[-1]), dtype=dt, device=q.device)
    lse = xp.full(tuple(q.shape[:-1]), -math.inf, dtype=dt, device=q.device)
    return out, lse


def _check_options(is_causal: Any, scale: Any, layout: Any = None) -> None:
    """is_causal a bool, scale None or a real number, layout (when given) one of LAYOUTS."""
    check_bool(is_causal=is_causal)
    if scale is not None:
        check_real("scale", scale)
    if layout is not None:
        check_choice("layout", layout, LAYOUTS)


def _check_shaped(name: str, x: Any, shape: tuple[int, ...], context: str) -> None:
    """``x`` a floating-point array of exactly ``shape`` (``context`` says why, in the error)."""
    check_float_arrays(**{name: x})
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} {context}, got {tuple(x.shape)}")


def _check_spans(name: str, spans: Any, rows_of: str | None = None, rows: int = 0) -> list[Span]:
    """A non-empty list of chunks (start, stop), 0 ≤ start ≤ stop, covering ``rows`` rows of the
    array named ``rows_of`` (when given). Returns the chunks as tuples of Python ints."""
    if not isinstance(spans, (list, tuple)) or not all(isinstance(c, (list, tuple)) for c in spans):
        raise TypeError(f"{name} must be a list of chunks (start, stop), got {spans!r}")
    chunks = [tuple(check_int(f"{name} entries", x) for x in chunk) for chunk in spans]
    if not chunks or any(len(c) != 2 or c[0] > c[1] for c in chunks):
        raise ValueError(f"{name} must be a non-empty list of chunks (start, stop) with start <= stop, "
                         f"got {spans!r}")
    if rows_of is not None and _length(chunks) != rows:
        raise ValueError(f"{name} {spans!r} cover {_length(chunks)} tokens, but {rows_of} has {rows} "
                         "along the sequence axis")
    return chunks


def _check_step(q, k_blk, v_blk, out, lse, q_spans, kv_spans, is_causal, scale, enable_gqa) -> None:
    """The contract for one forward step: q, k_blk, v_blk as SDPA's query, key and value; the
    running out and lse shaped like the step's result; spans covering q's rows and the block's."""
    check_attention(q, k_blk, v_blk, enable_gqa=enable_gqa)
    _check_options(is_causal, scale)
    context = f"for query {tuple(q.shape)} and value {tuple(v_blk.shape)}"
    _check_shaped("out", out, (*q.shape[:-1], v_blk.shape[-1]), context)
    _check_shaped("lse", lse, tuple(q.shape[:-1]), context)
    _check_spans("q_spans", q_spans, "query", q.shape[-2])
    _check_spans("kv_spans", kv_spans, "key", k_blk.shape[-2])


def _check_backward_step(q, k_blk, v_blk, out, lse, grad_out, dq, dk_blk, dv_blk, q_spans, kv_spans,
                         is_causal, scale, enable_gqa) -> None:
    """The contract for one backward step: the forward step's, out, lse and grad_out as
    ``flash_attention_backward`` takes them, and the running gradients shaped like q, k_blk, v_blk."""
    check_attention(q, k_blk, v_blk, enable_gqa=enable_gqa)
    check_gradients(q, v_blk, out, lse, grad_out)
    _check_options(is_causal, scale)
    for name, grad, like, called in (("dq", dq, q, "query"), ("dk_blk", dk_blk, k_blk, "key"),
                                     ("dv_blk", dv_blk, v_blk, "value")):
        _check_shaped(name, grad, tuple(like.shape), f"like {called}")
    _check_spans("q_spans", q_spans, "query", q.shape[-2])
    _check_spans("kv_spans", kv_spans, "key", k_blk.shape[-2])


def _check_ring_inputs(q, k, v, *backward, is_causal, layout, scale, enable_gqa, **flags) -> None:
    """The contract for a ring's inputs — the whole sequence in the simulator, one rank's shards
    over MPI: q, k, v as SDPA's query, key and value (``backward``: out, lse and grad_out as
    ``flash_attention_backward`` takes them), the options (``flags``: the ``return_*`` ones), one
    array library, and self-attention: the queries and the keys cover the same tokens."""
    check_attention(q, k, v, enable_gqa=enable_gqa)
    if backward:
        check_gradients(q, v, *backward)
    _check_options(is_causal, scale, layout)
    check_bool(**flags)
    array_namespace(q, k, v, *backward)  # a TypeError for arrays of different libraries
    if q.shape[-2] != k.shape[-2]:
        raise ValueError("ring attention is self-attention: query and key must cover the same tokens "
                         f"(..., N, ·), got query {tuple(q.shape)}, key {tuple(k.shape)}")


def _checked_on_every_rank(comm: Any, q, k, v, *backward, **options) -> list[list[Span]]:
    """Check this rank's shards through the contract and share the verdict, so that every rank
    raises the same error — a rank that raised alone would leave its neighbours waiting forever for
    its blocks. Returns every rank's spans."""
    try:
        _check_ring_inputs(q, k, v, *backward, **options)
        report = {"shapes": [tuple(x.shape) for x in (q, k, v)],
                  "options": (bool(options["is_causal"]), options["layout"], bool(options["enable_gqa"]),
                              None if options["scale"] is None else float(options["scale"]))}
    except (TypeError, ValueError) as exc:
        report = {"error": type(exc).__name__, "message": str(exc)}
    return _spans_of_ranks(comm.allgather(report), options["layout"])


def _spans_of_ranks(reports: Sequence[dict[str, Any]], layout: str) -> list[list[Span]]:
    """Every rank's spans from what the ranks reported; the first problem is raised (on every rank)."""
    for r, report in enumerate(reports):
        where = f" (on rank {r})" if len(reports) > 1 else ""
        if "error" in report:
            raise (TypeError if report["error"] == "TypeError" else ValueError)(report["message"] + where)
        if report["options"] != reports[0]["options"]:
            raise ValueError("every rank must pass the same (is_causal, layout, enable_gqa, scale): "
                             f"rank 0 passed {reports[0]['options']}, rank {r} {report['options']}")
        mine, first = report["shapes"], reports[0]["shapes"]
        if [s[:-2] + s[-1:] for s in mine] != [s[:-2] + s[-1:] for s in first]:
            raise ValueError(f"rank {r}'s shards {mine} differ from rank 0's {first} outside the "
                             "sequence axis")
    lengths = [report["shapes"][0][-2] for report in reports]
    spans = shard_spans(sum(lengths), len(reports), layout)
    expected = [_length(sp) for sp in spans]
    if lengths != expected:
        raise ValueError(
            f"the ranks' shards have lengths {lengths}, but a {layout} layout of N = {sum(lengths)} "
            f"tokens over R = {len(reports)} ranks has {expected}: cut the inputs with shard()"
        )
    return spans


def _synchronize(x: Array) -> None:
    """Wait for pending GPU work on ``x`` before MPI reads it (CuPy with CUDA-aware MPI)."""
    if hasattr(x, "__cuda_array_interface__"):
        import cupy  # only reached with CuPy arrays

        cupy.cuda.get_current_stream().synchronize()


def _message(x: Array) -> Array:
    """x as one C-contiguous buffer, what MPI sends (a copy only when x is a strided view)."""
    if getattr(getattr(x, "flags", None), "c_contiguous", False):
        return x
    return array_namespace(x).asarray(x, copy=True)


def _empty_like_block(x: Array, length: int) -> Array:
    """A receive buffer shaped like x with ``length`` tokens along the sequence axis."""
    xp = array_namespace(x)
    return xp.empty((*x.shape[:-2], length, x.shape[-1]), dtype=x.dtype, device=x.device)


@dataclass(frozen=True)
class RingStats:
    """Seconds per ring step on one rank: computing, and waiting for the transfers to finish.

    ``compute_s[s]`` is the attention work of step s; ``wait_s[s]`` the time spent in
    ``Wait``/``Sendrecv`` after it (the part of the transfer that compute did not hide).
    """

    compute_s: tuple[float, ...]
    wait_s: tuple[float, ...]

    @property
    def total_s(self) -> float:
        return sum(self.compute_s) + sum(self.wait_s)


# ---------------------------------------------------------------------------------------------
# The ring over MPI
# ---------------------------------------------------------------------------------------------


def ring_attention_sendrecv(
    q: Array,
    k: Array,
    v: Array,
    comm: Any,
    *,
    is_causal: bool = False,
    layout: str = "contiguous",
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Array:
    """Ring attention, the readable first version: compute a step, then pass the block on.

    Same arguments and result as :func:`ring_attention`. Each step ends with one blocking
    ``Sendrecv`` per array (send the block in hand to rank r+1, receive the next from rank r−1),
    so the ranks sit idle while blocks travel. :func:`ring_attention` overlaps the two.
    """
    R, rank = comm.Get_size(), comm.Get_rank()
    spans = _checked_on_every_rank(comm, q, k, v, is_causal=is_causal, layout=layout, scale=scale,
                                   enable_gqa=enable_gqa)
    to_next, from_prev = (rank + 1) % R, (rank - 1) % R
    out, lse = _empty_result(q, v)
    k_blk, v_blk = _message(k), _message(v)
    for step in range(R):
        owner = (rank - step) % R  # whose keys and values are in hand
        out, lse = ring_attention_step(q, k_blk, v_blk, out, lse, spans[rank], spans[owner],
                                       is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if step < R - 1:  # pass the block on: send ours to r+1, receive r−1's
            incoming = _length(spans[(owner - 1) % R])
            k_next, v_next = _empty_like_block(k_blk, incoming), _empty_like_block(v_blk, incoming)
            _synchronize(k_blk)
            comm.Sendrecv(k_blk, dest=to_next, sendtag=0, recvbuf=k_next, source=from_prev, recvtag=0)
            comm.Sendrecv(v_blk, dest=to_next, sendtag=1, recvbuf=v_next, source=from_prev, recvtag=1)
            k_blk, v_blk = k_next, v_next
    return array_namespace(out).astype(out, q.dtype)


@dataclass
class _Transfer:
    """Blocks on their way round the ring: the receive buffers, the open requests, and the sent
    arrays (kept alive until their sends complete)."""

    received: list[Array]
    requests: list[Any]
    sent: list[Array]

    def wait(self) -> float:
        """Wait for every send and receive; return the seconds spent waiting."""
        start = time.perf_counter()
        for request in self.requests:
            request.Wait()
        self.sent = []
        return time.perf_counter() - start


def _start_pass(comm: Any, blocks: Sequence[Array], incoming: int, tag: int) -> _Transfer:
    """Start sending ``blocks`` to rank r+1 and receiving as many arrays of ``incoming`` tokens
    from rank r−1, without blocking (``Isend`` / ``Irecv``)."""
    R, rank = comm.Get_size(), comm.Get_rank()
    received = [_empty_like_block(b, incoming) for b in blocks]
    _synchronize(blocks[0])
    requests = [comm.Irecv(buf, source=(rank - 1) % R, tag=tag + i) for i, buf in enumerate(received)]
    requests += [comm.Isend(b, dest=(rank + 1) % R, tag=tag + i) for i, b in enumerate(blocks)]
    return _Transfer(received, requests, list(blocks))


def ring_attention(
    q: Array,
    k: Array,
    v: Array,
    comm: Any,
    *,
    is_causal: bool = False,
    layout: str = "contiguous",
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    return_stats: bool = False,
) -> Array | tuple[Any, ...]:
    """Exact attention over a sequence sharded across the ranks of ``comm`` (Liu et al. 2023).

    Call it on every rank of the ring with that rank's shards (:func:`shard` / :func:`local_shard`
    with the same ``layout``): ``q (..., H, N_r, E)``, ``k (..., Hkv, N_r, E)``,
    ``v (..., Hkv, N_r, Ev)`` → this rank's rows of softmax(τ Q Kᵀ + mask) V over the *whole*
    sequence, ``(..., H, N_r, Ev)``. ``is_causal`` masks by global position; τ = ``scale`` or
    1/√E; GQA as in SDPA (``enable_gqa``: only the Hkv key/value heads travel).

    R steps. At step s the rank holds rank (r − s)'s keys and values; it starts sending them to
    rank r+1 and receiving rank (r − s − 1)'s from rank r−1 (``Isend``/``Irecv``), computes
    :func:`ring_attention_step` meanwhile, then waits for the transfers. The blocks that a causal
    mask hides entirely are skipped. Memory: the rank's shards, the running O and λ, and two blocks
    of keys and values (the one in hand and the one arriving).

    Returns ``out``, then ``lse (..., H, N_r)`` if ``return_lse`` (for the backward pass), then a
    :class:`RingStats` (seconds computing and waiting per step) if ``return_stats``.
    """
    R, rank = comm.Get_size(), comm.Get_rank()
    spans = _checked_on_every_rank(comm, q, k, v, is_causal=is_causal, layout=layout, scale=scale,
                                   enable_gqa=enable_gqa, return_lse=return_lse,
                                   return_stats=return_stats)
    out, lse = _empty_result(q, v)
    k_blk, v_blk = _message(k), _message(v)
    compute_s, wait_s = [], []
    for step in range(R):
        owner = (rank - step) % R  # whose keys and values are in hand
        if step < R - 1:  # pass the block on while we compute with it
            incoming = _length(spans[(owner - 1) % R])
            kv_transfer = _start_pass(comm, [k_blk, v_blk], incoming, tag=0)
        start = time.perf_counter()
        out, lse = ring_attention_step(q, k_blk, v_blk, out, lse, spans[rank], spans[owner],
                                       is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        compute_s.append(time.perf_counter() - start)
        wait_s.append(0.0)
        if step < R - 1:
            wait_s[-1] = kv_transfer.wait()
            k_blk, v_blk = kv_transfer.received
    xp = array_namespace(out)
    result: list[Any] = [xp.astype(out, q.dtype)]
    if return_lse:
        result.append(lse)
    if return_stats:
        result.append(RingStats(tuple(compute_s), tuple(wait_s)))
    return result[0] if len(result) == 1 else tuple(result)


def ring_attention_backward(
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    grad_out: Array,
    comm: Any,
    *,
    is_causal: bool = False,
    layout: str = "contiguous",
    scale: float | None = None,
    enable_gqa: bool = False,
    return_stats: bool = False,
) -> tuple[Any, ...]:
    """dQ, dK, dV of :func:`ring_attention`, on every rank of ``comm`` for its shards.

    ``q, k, v`` as for the forward pass; ``out`` and ``lse`` this rank's rows from
    ``ring_attention(..., return_lse=True)``; ``grad_out (..., H, N_r, Ev)``. Returns this rank's
    ``dq, dk, dv`` shaped like ``q, k, v`` (then a :class:`RingStats` if ``return_stats``).

    The queries and dQ stay; keys and values travel as in the forward pass, and their gradients
    dK, dV travel with them one step behind: at step s the rank adds its contribution
    (:func:`ring_attention_backward_step`) to the dK, dV that the earlier holders of the block
    accumulated — received from rank r−1 while it computed — and sends the sum on. After R steps
    every block's gradient has visited every rank and the last transfer brings it home.
    """
    R, rank = comm.Get_size(), comm.Get_rank()
    spans = _checked_on_every_rank(comm, q, k, v, out, lse, grad_out, is_causal=is_causal,
                                   layout=layout, scale=scale, enable_gqa=enable_gqa,
                                   return_stats=return_stats)
    dq = _zero_gradient(q)
    k_blk, v_blk = _message(k), _message(v)
    grad_transfer: _Transfer | None = None  # dK, dV of the block we hold next, on their way
    compute_s, wait_s = [], []
    for step in range(R):
        owner = (rank - step) % R  # whose keys and values are in hand
        incoming = _length(spans[(owner - 1) % R])  # the block we hold next (our own at the end)
        if step < R - 1:  # pass K, V on while we compute with them
            kv_transfer = _start_pass(comm, [k_blk, v_blk], incoming, tag=0)
        start = time.perf_counter()
        dq, dk_blk, dv_blk = ring_attention_backward_step(
            q, k_blk, v_blk, out, lse, grad_out, dq, _zero_gradient(k_blk), _zero_gradient(v_blk),
            spans[rank], spans[owner], is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
        )
        compute_s.append(time.perf_counter() - start)
        dk_blk, dv_blk, waited = _add_arriving(grad_transfer, dk_blk, dv_blk)
        if step < R - 1:
            waited += kv_transfer.wait()
            k_blk, v_blk = kv_transfer.received
        if R > 1:  # send the block's gradients after it, to the rank that holds it next
            grad_transfer = _start_pass(comm, [dk_blk, dv_blk], incoming, tag=2)
        wait_s.append(waited)
    if grad_transfer is not None:  # the last transfer brings our own block's gradients home
        wait_s[-1] += grad_transfer.wait()
        dk_blk, dv_blk = grad_transfer.received
    grads = tuple(array_namespace(g).astype(g, q.dtype) for g in (dq, dk_blk, dv_blk))
    return (*grads, RingStats(tuple(compute_s), tuple(wait_s))) if return_stats else grads


def _add_arriving(transfer: _Transfer | None, dk_blk: Array, dv_blk: Array) -> tuple[Array, Array, float]:
    """This rank's dK, dV for the block in hand plus those its earlier holders accumulated
    (arriving from rank r−1 in ``transfer``; None at the first step: the block is our own), and
    the seconds spent waiting for them."""
    if transfer is None:
        return dk_blk, dv_blk, 0.0
    waited = transfer.wait()
    dk_in, dv_in = transfer.received
    return dk_blk + dk_in, dv_blk + dv_in, waited


# ---------------------------------------------------------------------------------------------
# The simulator: R virtual ranks in one process, a loop standing in for the network
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RingEvent:
    """What one rank did at one step of a simulated ring.

    ``block`` is the rank whose keys and values it held; ``pairs`` the chunk pairs it computed,
    as ``(query span, key span, kind)``; ``work`` the number of query–key logits it evaluated (a
    diagonal pair of n tokens counts n(n+1)/2); ``sent_to`` the rank it passed the block to (None
    at the last step) and ``bytes_sent`` the size of what it sent.
    """

    step: int
    rank: int
    block: int
    pairs: tuple[tuple[Span, Span, str], ...]
    work: int
    sent_to: int | None
    bytes_sent: int


def _work(pairs: Sequence[tuple[Span, Span, str]]) -> int:
    total = 0
    for (qa, qb), (ka, kb), kind in pairs:
        n_q, n_k = qb - qa, kb - ka
        total += n_q * (n_q + 1) // 2 if kind == "diagonal" else n_q * n_k
    return total


def _nbytes(*arrays: Array) -> int:
    return sum(math.prod(a.shape) * array_namespace(a).finfo(a.dtype).bits // 8 for a in arrays)


def _event(step, rank, owner, spans, is_causal, sent_to, sent) -> RingEvent:
    pairs = tuple(
        (spans[rank][c], spans[owner][j], kind)
        for c, j, kind in visible_chunk_pairs(spans[rank], spans[owner], is_causal)
    )
    return RingEvent(step, rank, owner, pairs, _work(pairs), sent_to, _nbytes(*sent))


def _simulated_shards(q, k, v, world_size, *backward, layout, **options):
    """Check the whole-sequence inputs through the contract; cut q, k, v into R ranks' shards."""
    _check_ring_inputs(q, k, v, *backward, layout=layout, **options)
    R = check_int("world_size", world_size, 1)
    qs, ks, vs = (shard(x, R, layout=layout) for x in (q, k, v))
    return R, shard_spans(q.shape[-2], R, layout), qs, ks, vs


def simulate_ring_attention(
    q: Array,
    k: Array,
    v: Array,
    world_size: int,
    *,
    is_causal: bool = False,
    layout: str = "contiguous",
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
) -> tuple[Any, ...]:
    """Run ring attention for ``world_size`` virtual ranks in one process, recording every step.

    ``q (..., H, N, E)``, ``k (..., Hkv, N, E)``, ``v (..., Hkv, N, Ev)`` are the *whole*
    sequence; they are cut with :func:`shard`, every virtual rank runs
    :func:`ring_attention_step` — the same function the MPI ranks run — on the block it holds, and
    then a loop passes every block to the next rank (the network). Returns ``(out, events)`` (or
    ``(out, lse, events)`` with ``return_lse``): ``out (..., H, N, Ev)`` and ``lse (..., H, N)``
    put back in sequence order, and a list of :class:`RingEvent`, one per (step, rank).
    """
    R, spans, qs, ks, vs = _simulated_shards(q, k, v, world_size, is_causal=is_causal, layout=layout,
                                             scale=scale, enable_gqa=enable_gqa, return_lse=return_lse)
    results = [_empty_result(q_r, v_r) for q_r, v_r in zip(qs, vs, strict=True)]
    blocks = [(r, ks[r], vs[r]) for r in range(R)]  # (owner, K, V) in hand on each rank
    events = []
    for step in range(R):
        for rank in range(R):
            owner, k_blk, v_blk = blocks[rank]
            out_r, lse_r = results[rank]
            results[rank] = ring_attention_step(
                qs[rank], k_blk, v_blk, out_r, lse_r, spans[rank], spans[owner],
                is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
            )
            last = step == R - 1  # the last block stays where it is
            events.append(_event(step, rank, owner, spans, is_causal, None if last else (rank + 1) % R,
                                 () if last else (k_blk, v_blk)))
        blocks = [blocks[(rank - 1) % R] for rank in range(R)]  # the network: r−1 → r
    xp = array_namespace(q, k, v)
    out = xp.astype(unshard([o for o, _ in results], layout=layout), q.dtype)
    if return_lse:
        return out, unshard([lse for _, lse in results], layout=layout, axis=-1), events
    return out, events


def simulate_ring_attention_backward(
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    grad_out: Array,
    world_size: int,
    *,
    is_causal: bool = False,
    layout: str = "contiguous",
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Any, ...]:
    """The backward pass for ``world_size`` virtual ranks: ``(dq, dk, dv, events)``.

    Whole-sequence arrays in and out, as in :func:`simulate_ring_attention` (``out``, ``lse`` from
    it or from ``flash_attention(..., return_lse=True)``). Every virtual rank runs
    :func:`ring_attention_backward_step`; the blocks travel with their dK, dV, and after the R
    steps one more pass brings every block's gradients home. ``bytes_sent`` counts K, V, dK, dV.
    """
    R, spans, qs, ks, vs = _simulated_shards(q, k, v, world_size, out, lse, grad_out, is_causal=is_causal,
                                             layout=layout, scale=scale, enable_gqa=enable_gqa)
    outs, grads = shard(out, R, layout=layout), shard(grad_out, R, layout=layout)
    lses = shard(lse, R, layout=layout, axis=-1)
    dqs = [_zero_gradient(q_r) for q_r in qs]
    # (owner, K, V, dK, dV) in hand on each rank
    blocks = [(r, ks[r], vs[r], _zero_gradient(ks[r]), _zero_gradient(vs[r])) for r in range(R)]
    events = []
    for step in range(R):
        for rank in range(R):
            owner, k_blk, v_blk, dk_blk, dv_blk = blocks[rank]
            dqs[rank], dk_blk, dv_blk = ring_attention_backward_step(
                qs[rank], k_blk, v_blk, outs[rank], lses[rank], grads[rank], dqs[rank], dk_blk,
                dv_blk, spans[rank], spans[owner], is_causal=is_causal, scale=scale,
                enable_gqa=enable_gqa,
            )
            blocks[rank] = (owner, k_blk, v_blk, dk_blk, dv_blk)
            # K, V go on while there are steps left; dK, dV always (the last pass brings them home)
            sent = (dk_blk, dv_blk) if step == R - 1 else (k_blk, v_blk, dk_blk, dv_blk)
            events.append(_event(step, rank, owner, spans, is_causal,
                                 None if R == 1 else (rank + 1) % R, () if R == 1 else sent))
        blocks = [blocks[(rank - 1) % R] for rank in range(R)]  # the network: r−1 → r
    # after R passes every block is back with its owner
    assert all(blocks[r][0] == r for r in range(R))
    xp = array_namespace(q, k, v)
    dk = unshard([xp.astype(b[3], k.dtype) for b in blocks], layout=layout)
    dv = unshard([xp.astype(b[4], v.dtype) for b in blocks], layout=layout)
    dq = xp.astype(unshard(dqs, layout=layout), q.dtype)
    return dq, dk, dv, events


# ---------------------------------------------------------------------------------------------
# The demo: mpiexec -n 4 python -m attention_ref.ring --seq-len 16384 --causal --layout zigzag
# ---------------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    """The machine a measurement ran on (CPU model, cores, library versions)."""
    import os
    import platform

    import numpy as np
    from mpi4py import MPI
    from mpi4py import __version__ as mpi4py_version

    from .backends import cpu_model

    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "system": platform.system(),
        "python": platform.python_version(), "numpy": np.__version__, "mpi4py": mpi4py_version,
        "mpi": MPI.Get_library_version().splitlines()[0].strip(),
        "blas_threads_env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
    }


def _measure(fn):
    """Run fn(); return its result, the peak of NumPy/Python memory it allocated beyond what was
    held before (tracemalloc), and the seconds it took."""
    import tracemalloc

    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    return result, peak, seconds


def _time_pass(comm: Any, blocks: Sequence[Array], incoming: int, repeats: int = 5) -> float:
    """Median seconds of one ring pass of ``blocks`` with nothing to compute: the link's cost."""
    times = []
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        _start_pass(comm, blocks, incoming, tag=10).wait()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _max_rss_bytes() -> int:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def _parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m attention_ref.ring",
        description="Ring attention over MPI on seeded random inputs. Run it with "
                    "`mpiexec -n R python -m attention_ref.ring ...`; rank 0 gathers the output, "
                    "compares it with flash_attention over the whole sequence and reports the "
                    "error, per-rank peak memory and time per step (computing vs waiting).")
    parser.add_argument("--seq-len", type=int, default=4096, help="N, tokens in the whole sequence")
    parser.add_argument("--causal", action="store_true", help="causal mask (global positions)")
    parser.add_argument("--layout", choices=LAYOUTS, default="contiguous")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4, help="H, query heads")
    parser.add_argument("--kv-heads", type=int, default=None, help="Hkv (GQA), default H")
    parser.add_argument("--head-dim", type=int, default=64, help="E = Ev")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sendrecv", action="store_true",
                        help="use the blocking Sendrecv version instead of Isend/Irecv")
    parser.add_argument("--backward", action="store_true",
                        help="also run ring_attention_backward and check dQ, dK, dV")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the whole-sequence reference on rank 0")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    return parser


def _demo_inputs(args: Any, R: int, rank: int) -> dict[str, Any]:
    """Every rank draws the same seeded sequence and keeps its shards; rank 0 keeps the whole
    sequence too, for the reference (unless --no-check)."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    H, Hkv, E = args.heads, args.kv_heads or args.heads, args.head_dim
    shapes = {"q": (args.batch, H, args.seq_len, E), "k": (args.batch, Hkv, args.seq_len, E),
              "v": (args.batch, Hkv, args.seq_len, E)}
    whole = {name: rng.standard_normal(shape).astype(args.dtype) for name, shape in shapes.items()}
    if args.backward:
        whole["grad_out"] = rng.standard_normal(shapes["q"]).astype(args.dtype)
    mine = {name: _message(local_shard(x, R, rank, layout=args.layout)) for name, x in whole.items()}
    keep = rank == 0 and not args.no_check
    return {"whole": whole if keep else None, "mine": mine,
            "options": {"is_causal": args.causal, "layout": args.layout, "enable_gqa": Hkv != H}}


def _run_rank(args: Any, comm: Any, inputs: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """This rank's forward (and backward) pass, measured: (out, grads or None, report)."""
    R, rank = comm.Get_size(), comm.Get_rank()
    mine, kw = inputs["mine"], inputs["options"]
    qkv = [mine[name] for name in "qkv"]
    comm.Barrier()
    if args.sendrecv:
        out, peak, seconds = _measure(lambda: ring_attention_sendrecv(*qkv, comm, **kw))
        lse = stats = None
    else:
        (out, lse, stats), peak, seconds = _measure(
            lambda: ring_attention(*qkv, comm, return_lse=True, return_stats=True, **kw))
    report: dict[str, Any] = {
        "rank": rank, "shard_tokens": int(qkv[0].shape[-2]), "inputs_held_bytes": sum(x.nbytes for x in qkv),
        "peak_extra_bytes": peak, "seconds": seconds,
        "compute_s": None if stats is None else list(stats.compute_s),
        "wait_s": None if stats is None else list(stats.wait_s),
    }
    grads = None
    if args.backward and lse is not None:
        comm.Barrier()
        (*grads, bstats), bpeak, bseconds = _measure(lambda: ring_attention_backward(
            *qkv, out, lse, mine["grad_out"], comm, return_stats=True, **kw))
        report.update(backward_peak_extra_bytes=bpeak, backward_seconds=bseconds,
                      backward_compute_s=list(bstats.compute_s), backward_wait_s=list(bstats.wait_s))
    if R > 1:  # the same transfer as one ring step, with nothing to compute
        incoming = _length(shard_spans(args.seq_len, R, args.layout)[(rank - 1) % R])
        report["pass_seconds"] = _time_pass(comm, qkv[1:], incoming)
        report["pass_bytes"] = qkv[1].nbytes + qkv[2].nbytes
    report["max_rss_bytes"] = _max_rss_bytes()
    return out, grads, report


def _compare_with_whole_sequence(args: Any, whole: dict[str, Any], gathered: list, result: dict) -> None:
    """Rank 0: flash_attention (and its backward) over the whole sequence against the gathered
    ring results; the errors and the one-process cost go into ``result``."""
    import numpy as np

    q, k, v = whole["q"], whole["k"], whole["v"]
    gqa = k.shape[-3] != q.shape[-3]
    ring_out = unshard([g[0] for g in gathered], layout=args.layout)
    (ref, ref_lse), ref_peak, ref_seconds = _measure(lambda: flash_attention(
        q, k, v, is_causal=args.causal, enable_gqa=gqa, return_lse=True))
    result["max_abs_error"] = float(np.max(np.abs(ring_out.astype(np.float64) - ref)))
    result["one_process"] = {"seconds": ref_seconds, "peak_extra_bytes": ref_peak,
                             "inputs_held_bytes": q.nbytes + k.nbytes + v.nbytes}
    if gathered[0][1] is not None:
        ref_grads = flash_attention_backward(q, k, v, ref, ref_lse, whole["grad_out"],
                                             is_causal=args.causal, enable_gqa=gqa)
        ring_grads = [unshard([g[1][i] for g in gathered], layout=args.layout) for i in range(3)]
        result["backward_max_abs_error"] = max(
            float(np.max(np.abs(got.astype(np.float64) - want)))
            for got, want in zip(ring_grads, ref_grads, strict=True))


def _print_report(result: dict[str, Any]) -> None:
    """Rank 0's report: the errors, memory and seconds per rank, the link, the steps."""
    c, reports = result["config"], result["ranks"]
    N, R = c["seq_len"], c["world_size"]
    print(f"ring attention over MPI: N = {N}, R = {R} ranks, {c['layout']} layout, "
          f"{'causal' if c['causal'] else 'no mask'}, batch {c['batch']}, H = {c['heads']} "
          f"(Hkv = {c['kv_heads']}), E = {c['head_dim']}, {c['dtype']}, {c['communication']}")
    if "max_abs_error" in result:
        print(f"max |ring − flash_attention over the whole sequence| = {result['max_abs_error']:.2e}")
    if "backward_max_abs_error" in result:
        print("max |ring backward − flash_attention_backward| over dQ, dK, dV = "
              f"{result['backward_max_abs_error']:.2e}")
    print("\nrank  tokens   inputs held   peak extra (ring)  max RSS (process)  seconds")
    for rep in reports:
        print(f"{rep['rank']:4d}  {rep['shard_tokens']:6d}  {_mib(rep['inputs_held_bytes'])}  "
              f"{_mib(rep['peak_extra_bytes'])}       {_mib(rep['max_rss_bytes'])}   "
              f"{rep['seconds']:7.3f}")
    if "one_process" in result:
        one = result["one_process"]
        print(f" one process, flash_attention over all {N} tokens: inputs {_mib(one['inputs_held_bytes'])}, "
              f"peak extra {_mib(one['peak_extra_bytes'])}, {one['seconds']:.3f} s")
    if R > 1:
        slowest = max(rep["pass_seconds"] for rep in reports)
        print(f"\none ring pass of a key/value block alone ({_mib(reports[0]['pass_bytes']).strip()} "
              f"per rank): {slowest * 1e3:.2f} ms on the slowest rank")
    if reports[0]["compute_s"] is not None:
        print("\nseconds per step, computing / waiting for the transfer:")
        print("step  " + "  ".join(f"  rank {r:<2d}        " for r in range(R)))
        for s in range(R):
            print(f"{s:4d}  " + "  ".join(f"{rep['compute_s'][s]:7.3f} / {rep['wait_s'][s]:7.3f}"
                                        for rep in reports))


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run ring attention on seeded random inputs over MPI; rank 0 checks it and reports."""
    import json

    from mpi4py import MPI

    args = _parser().parse_args(argv)
    comm = MPI.COMM_WORLD
    R, rank = comm.Get_size(), comm.Get_rank()
    inputs = _demo_inputs(args, R, rank)
    out, grads, report = _run_rank(args, comm, inputs)
    gathered = comm.gather((out, grads, report), root=0)
    if rank != 0:
        return None
    result: dict[str, Any] = {
        "config": {"seq_len": args.seq_len, "world_size": R, "layout": args.layout,
                   "causal": args.causal, "batch": args.batch, "heads": args.heads,
                   "kv_heads": args.kv_heads or args.heads, "head_dim": args.head_dim,
                   "dtype": args.dtype, "seed": args.seed,
                   "communication": "Sendrecv" if args.sendrecv else "Isend/Irecv"},
        "machine": _machine(), "ranks": [g[2] for g in gathered],
    }
    if inputs["whole"] is not None:
        _compare_with_whole_sequence(args, inputs["whole"], gathered, result)
    _print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
