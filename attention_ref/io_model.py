"""Counting slow-memory (HBM) traffic: standard attention against FlashAttention-1 and -2.

FlashAttention's claim (Dao et al. 2022, Theorem 2) is about IO, not FLOPs: with a fast memory
(SRAM) of M elements and E ≤ M ≤ NE (N = L = S), standard attention reads and writes Θ(NE + N²)
elements of slow memory while FlashAttention needs Θ(N²E²/M); the backward pass has the same bounds
(Theorem 5). This module runs the algorithms of the papers on a single head with every transfer
between slow and fast memory made explicit, counts the elements moved, and gives the same
counts in closed form.

The model (as in the papers' proofs):

* ``SlowMemory`` holds the named matrices of HBM; ``load`` copies a block into fast memory and
  counts its elements as reads, ``store`` writes a block back and counts writes. Everything
  computed between loads and stores happens "on chip" and costs nothing.
* Standard attention (FA-1 Algorithms 0 and 3) reads each input of a step once and writes its
  output once (a matrix product counts its operands once, as in the proof of Theorem 2).
* Block sizes come from M: the block that stays in fast memory for the whole inner loop (the
  *stationary* one) has ⌈M/(4E)⌉ rows and the streamed one min(⌈M/(4E)⌉, E) rows. For FA-1
  (Algorithm 1, key/value blocks outer) that is exactly the paper's B_c = ⌈M/4d⌉ and
  B_r = min(⌈M/4d⌉, d), our B_k and B_q (the paper's d is our E); FA-2's forward pass keeps the
  query block stationary, so the roles swap; both backward passes keep the key/value block
  stationary.

NumPy only (this is instrumentation, not the library's math). Single head: q (L, E), k (S, E),
v (S, Ev).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .contract import check_choice, check_float_arrays, check_int, check_real
from .dot_product import default_scale
from .softmax import stable_softmax

__all__ = [
    "IOCount",
    "SlowMemory",
    "io_closed_form",
    "io_flash_backward",
    "io_flash_forward",
    "io_standard_backward",
    "io_standard_forward",
    "sram_block_sizes",
]


class SlowMemory:
    """Named matrices in slow memory (HBM) with counters of the elements read and written."""

    def __init__(self, **arrays: np.ndarray) -> None:
        self.arrays = {name: np.array(a, dtype=np.float64) for name, a in arrays.items()}
        self.reads = 0
        self.writes = 0

    def allocate(self, name: str, value: np.ndarray) -> None:
        """Initialise a matrix in HBM (e.g. O = 0): counts as writing all of it."""
        self.arrays[name] = np.array(value, dtype=np.float64)
        self.writes += self.arrays[name].size

    def load(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Copy rows of a matrix into fast memory: ``rows.size`` elements read."""
        block = self.arrays[name][rows].copy()
        self.reads += block.size
        return block

    def store(self, name: str, value: np.ndarray, rows: slice = slice(None)) -> None:
        """Write a block from fast memory back to rows of a (possibly new) matrix in HBM."""
        value = np.asarray(value, dtype=np.float64)
        if rows == slice(None):
            self.arrays[name] = value.copy()
        else:
            self.arrays[name][rows] = value
        self.writes += value.size


@dataclass(frozen=True)
class IOCount:
    """Elements read from and written to slow memory by one instrumented run."""

    reads: int
    writes: int
    block_q: int | None = None
    block_k: int | None = None
    result: Any = None

    @property
    def total(self) -> int:
        return self.reads + self.writes


def sram_block_sizes(sram_size: int, E: int, outer: str = "kv") -> tuple[int, int]:
    """Block sizes (block_q, block_k) from the fast-memory size M (FA-1 Algorithm 1, line 1).

    The stationary block (of the outer loop: ``outer="kv"`` for FA-1 and both backward passes,
    ``"q"`` for FA-2's forward pass) gets ⌈M/(4E)⌉ rows, the streamed one min(⌈M/(4E)⌉, E).
    Export with ``python -m attention_ref.export sram_block_sizes``.
    """
    sram_size, E = check_int("sram_size", sram_size, 1), check_int("E", E, 1)
    check_choice("outer", outer, ("kv", "q"))
    big = -(-sram_size // (4 * E))
    small = min(big, E)
    return (small, big) if outer == "kv" else (big, small)


def _blocks(n: int, b: int) -> list[slice]:
    return [slice(i, min(n, i + b)) for i in range(0, n, b)]


def _check_2d(**arrays: np.ndarray) -> None:
    """One head: every array (length, features)."""
    for name, a in arrays.items():
        check_float_arrays(**{name: a})
        if a.ndim != 2:
            raise ValueError(f"{name} must be 2-D (one head: (length, features)), got {tuple(a.shape)}")


def io_standard_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, scale: float | None = None) -> IOCount:
    """Standard attention, FA-1 Algorithm 0, with its HBM traffic counted.

    1. load Q, K; Z = τ Q Kᵀ; write Z.   2. read Z; P = softmax(Z); write P.
    3. load P, V; O = P V; write O.      Reads LE + SE + 2LS + S·Ev, writes 2LS + L·Ev.
    ``result`` is O (L, Ev). Export with ``python -m attention_ref.export io_standard_forward``.
    """
    _check_2d(q=q, k=k, v=v)
    tau = default_scale(q.shape[-1]) if scale is None else check_real("scale", scale)
    hbm = SlowMemory(Q=q, K=k, V=v)
    hbm.store("Z", tau * hbm.load("Q") @ hbm.load("K").T)  # line 1
    hbm.store("P", stable_softmax(hbm.load("Z")))  # line 2
    hbm.store("O", hbm.load("P") @ hbm.load("V"))  # line 3
    return IOCount(hbm.reads, hbm.writes, result=hbm.arrays["O"])


def io_standard_backward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, grad_out: np.ndarray, *, scale: float | None = None
) -> IOCount:
    """Standard attention backward, FA-1 Algorithm 3 (P saved by the forward pass), counted.

    1. load P, dO; dV = Pᵀ dO; write dV.   2. load dO, V; dP = dO Vᵀ; write dP.
    3. read P, dP; dZ = P ∘ (dP − rowsum(P ∘ dP)); write dZ.
    4. load dZ, K; dQ = τ dZ K; write dQ.  5. load dZ, Q; dK = τ dZᵀ Q; write dK.
    The forward pass's P is placed in HBM uncounted. ``result`` is (dQ, dK, dV).
    Export with ``python -m attention_ref.export io_standard_backward``.
    """
    _check_2d(q=q, k=k, v=v, grad_out=grad_out)
    tau = default_scale(q.shape[-1]) if scale is None else check_real("scale", scale)
    hbm = SlowMemory(Q=q, K=k, V=v, dO=grad_out, P=stable_softmax(tau * q @ k.T))
    hbm.store("dV", hbm.load("P").T @ hbm.load("dO"))  # line 1
    hbm.store("dP", hbm.load("dO") @ hbm.load("V").T)  # line 2
    P, dP = hbm.load("P"), hbm.load("dP")  # line 3
    hbm.store("dZ", P * (dP - (P * dP).sum(axis=-1, keepdims=True)))
    hbm.store("dQ", tau * hbm.load("dZ") @ hbm.load("K"))  # line 4
    hbm.store("dK", tau * hbm.load("dZ").T @ hbm.load("Q"))  # line 5
    return IOCount(hbm.reads, hbm.writes, result=tuple(hbm.arrays[n] for n in ("dQ", "dK", "dV")))


def _io_fa1_forward(hbm: SlowMemory, tau: float, sram_size: int) -> IOCount:
    """FA-1 Algorithm 1 on the Q, K, V in ``hbm``: key/value blocks outer, O, ℓ, m rewritten."""
    (L, E), (S, Ev) = hbm.arrays["Q"].shape, hbm.arrays["V"].shape
    bq, bk = sram_block_sizes(sram_size, E, outer="kv")
    hbm.allocate("O", np.zeros((L, Ev)))  # line 2
    hbm.allocate("ell", np.zeros(L))
    hbm.allocate("m", np.full(L, -np.inf))
    for cols in _blocks(S, bk):  # line 5
        k_j, v_j = hbm.load("K", cols), hbm.load("V", cols)  # line 6
        for rows in _blocks(L, bq):  # line 7
            q_i, o_i = hbm.load("Q", rows), hbm.load("O", rows)  # line 8
            l_i, m_i = hbm.load("ell", rows), hbm.load("m", rows)
            z = tau * q_i @ k_j.T  # line 9
            m_t = z.max(axis=1)  # line 10
            p_t = np.exp(z - m_t[:, None])
            l_t = p_t.sum(axis=1)
            m_new = np.maximum(m_i, m_t)  # line 11
            l_new = np.exp(m_i - m_new) * l_i + np.exp(m_t - m_new) * l_t
            o_new = ((l_i * np.exp(m_i - m_new))[:, None] * o_i
                     + np.exp(m_t - m_new)[:, None] * (p_t @ v_j)) / l_new[:, None]  # line 12
            hbm.store("O", o_new, rows)
            hbm.store("ell", l_new, rows)  # line 13
            hbm.store("m", m_new, rows)
    lse = hbm.arrays["m"] + np.log(hbm.arrays["ell"])
    return IOCount(hbm.reads, hbm.writes, bq, bk, (hbm.arrays["O"], lse))


def _io_fa2_forward(hbm: SlowMemory, tau: float, sram_size: int) -> IOCount:
    """FA-2 Algorithm 1 on the Q, K, V in ``hbm``: query blocks outer, O_i and λ_i written once."""
    (L, E), (S, Ev) = hbm.arrays["Q"].shape, hbm.arrays["V"].shape
    bq, bk = sram_block_sizes(sram_size, E, outer="q")
    hbm.arrays["O"], hbm.arrays["lse"] = np.zeros((L, Ev)), np.zeros(L)  # outputs, written once
    for rows in _blocks(L, bq):  # line 3
        q_i = hbm.load("Q", rows)  # line 4
        o_i = np.zeros((q_i.shape[0], Ev))  # line 5 (on chip)
        l_i, m_i = np.zeros(q_i.shape[0]), np.full(q_i.shape[0], -np.inf)
        for cols in _blocks(S, bk):  # line 6
            k_j, v_j = hbm.load("K", cols), hbm.load("V", cols)  # line 7
            z = tau * q_i @ k_j.T  # line 8
            m_new = np.maximum(m_i, z.max(axis=1))  # line 9
            p_t = np.exp(z - m_new[:, None])
            alpha = np.exp(m_i - m_new)
            l_i = alpha * l_i + p_t.sum(axis=1)
            o_i = alpha[:, None] * o_i + p_t @ v_j  # line 10
            m_i = m_new
        hbm.store("O", o_i / l_i[:, None], rows)  # lines 12, 14
        hbm.store("lse", m_i + np.log(l_i), rows)  # lines 13, 15
    return IOCount(hbm.reads, hbm.writes, bq, bk, (hbm.arrays["O"], hbm.arrays["lse"]))


def io_flash_forward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, sram_size: int, *, algorithm: str = "fa1",
    scale: float | None = None,
) -> IOCount:
    """FlashAttention forward (FA-1 Algorithm 1 or FA-2 Algorithm 1) with its HBM traffic counted.

    FA-1 (key/value outer): writes O = 0, ℓ = 0, m = −∞ (line 2); per key block loads K_j, V_j
    (line 6); per tile loads Q_i, O_i, ℓ_i, m_i (line 8) and writes O_i, ℓ_i, m_i (lines 12–13).
    FA-2 (query outer): per query block loads Q_i, per tile K_j, V_j; writes O_i and λ_i once.
    ``result`` is (O (L, Ev), λ (L,)). Export with ``python -m attention_ref.export io_flash_forward``.
    """
    _check_2d(q=q, k=k, v=v)
    check_choice("algorithm", algorithm, ("fa1", "fa2"))
    tau = default_scale(q.shape[-1]) if scale is None else check_real("scale", scale)
    hbm = SlowMemory(Q=q, K=k, V=v)
    return (_io_fa1_forward if algorithm == "fa1" else _io_fa2_forward)(hbm, tau, sram_size)


def _io_backward_memory(q, k, v, out, lse, grad_out, algorithm: str, bq: int) -> SlowMemory:
    """HBM before the backward loop: the inputs, and FA-1's ℓ = 1, m = λ with dQ, dK, dV = 0
    (line 5), or FA-2's λ with the pre-pass D = rowsum(dO ∘ O) and dQ = 0."""
    L, E, S, Ev = q.shape[0], q.shape[1], v.shape[0], v.shape[1]
    hbm = SlowMemory(Q=q, K=k, V=v, O=out, dO=grad_out)
    if algorithm == "fa1":
        hbm.arrays["ell"], hbm.arrays["m"] = np.ones(L), np.asarray(lse, dtype=np.float64)
        hbm.allocate("dQ", np.zeros((L, E)))  # line 5
        hbm.allocate("dK", np.zeros((S, E)))
        hbm.allocate("dV", np.zeros((S, Ev)))
        return hbm
    hbm.arrays["lse"] = np.asarray(lse, dtype=np.float64)
    hbm.arrays["D"] = np.zeros(L)  # space for D; its elements are counted when written
    for rows in _blocks(L, bq):  # pre-pass: D = rowsum(dO ∘ O)
        hbm.store("D", (hbm.load("dO", rows) * hbm.load("O", rows)).sum(axis=1), rows)
    hbm.allocate("dQ", np.zeros((L, E)))
    hbm.arrays["dK"], hbm.arrays["dV"] = np.zeros((S, E)), np.zeros((S, Ev))
    return hbm


def io_flash_backward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, lse: np.ndarray, grad_out: np.ndarray,
    sram_size: int, *, algorithm: str = "fa1", scale: float | None = None,
) -> IOCount:
    """FlashAttention backward (FA-1 Algorithm 4 or FA-2 Algorithm 2) with its HBM traffic counted.

    Both keep the key/value block stationary (outer loop) and stream query blocks.
    FA-1: writes dQ, dK, dV = 0 (line 5); per key block loads K_j, V_j (line 7); per tile loads
    Q_i, O_i, dO_i, dQ_i, ℓ_i, m_i (line 10), computes D_i = rowsum(dO_i ∘ O_i) on chip (line 19)
    and writes dQ_i (line 21); writes dK_j, dV_j (line 24). (ℓ, m are given as ℓ = 1, m = λ: the
    same P = diag(ℓ)⁻¹ e^{Z − m}.)
    FA-2: a pre-pass reads O, dO and writes D = rowsum(dO ∘ O); writes dQ = 0; per tile loads
    Q_i, dO_i, dQ_i, λ_i, D_i and writes dQ_i; writes dK_j, dV_j once.
    ``result`` is (dQ, dK, dV). Export with ``python -m attention_ref.export io_flash_backward``.
    """
    _check_2d(q=q, k=k, v=v, out=out, grad_out=grad_out)
    check_choice("algorithm", algorithm, ("fa1", "fa2"))
    tau = default_scale(q.shape[-1]) if scale is None else check_real("scale", scale)
    bq, bk = sram_block_sizes(sram_size, q.shape[1], outer="kv")
    hbm = _io_backward_memory(q, k, v, out, lse, grad_out, algorithm, bq)
    for cols in _blocks(v.shape[0], bk):  # line 6
        k_j, v_j = hbm.load("K", cols), hbm.load("V", cols)  # line 7
        dk_j, dv_j = np.zeros_like(k_j), np.zeros_like(v_j)  # line 8 (on chip)
        for rows in _blocks(q.shape[0], bq):  # line 9
            q_i, do_i, dq_i = hbm.load("Q", rows), hbm.load("dO", rows), hbm.load("dQ", rows)
            if algorithm == "fa1":  # line 10
                o_i, l_i, m_i = hbm.load("O", rows), hbm.load("ell", rows), hbm.load("m", rows)
                D_i = (do_i * o_i).sum(axis=1)  # line 19 (on chip)
            else:
                l_i, m_i = 1.0, hbm.load("lse", rows)
                D_i = hbm.load("D", rows)
            z = tau * q_i @ k_j.T  # line 11
            p = np.exp(z - m_i[:, None]) / np.broadcast_to(l_i, m_i.shape)[:, None]  # line 13
            dv_j += p.T @ do_i  # line 16
            dp = do_i @ v_j.T  # line 17
            dz = p * (dp - D_i[:, None])  # line 20
            hbm.store("dQ", dq_i + tau * dz @ k_j, rows)  # line 21
            dk_j += tau * dz.T @ q_i  # line 22
        hbm.store("dK", dk_j, cols)  # line 24
        hbm.store("dV", dv_j, cols)
    return IOCount(hbm.reads, hbm.writes, bq, bk, tuple(hbm.arrays[n] for n in ("dQ", "dK", "dV")))


def io_closed_form(
    kind: str, L: int, S: int, E: int, Ev: int | None = None, sram_size: int | None = None
) -> tuple[int, int]:
    """Closed-form (reads, writes) of the instrumented runs above, for kind in
    ``"standard_forward"``, ``"standard_backward"``, ``"fa1_forward"``, ``"fa2_forward"``,
    ``"fa1_backward"``, ``"fa2_backward"`` (the flash ones need ``sram_size`` M); Ev defaults to E.

    With T_q = ⌈L/B_q⌉, T_k = ⌈S/B_k⌉ from :func:`sram_block_sizes`:

    * standard forward: reads LE + SE + 2LS + S·Ev; writes 2LS + L·Ev        = Θ(NE + N²)
    * FA-1 forward: reads S(E + Ev) + T_k·L(E + Ev + 2); writes (T_k + 1)·L(Ev + 2)
    * FA-2 forward: reads LE + T_q·S(E + Ev); writes L(Ev + 1)          (both Θ(N²E²/M))
    * standard backward: reads 5LS + LE + SE + 2L·Ev + S·Ev; writes 2LS + LE + SE + S·Ev
    * FA-1 backward: reads S(E + Ev) + T_k·L(2E + 2Ev + 2); writes LE + 2S(E + Ev) + T_k·LE
    * FA-2 backward: reads 2L·Ev + S(E + Ev) + T_k·L(2E + Ev + 2); writes L + LE + S(E + Ev) + T_k·LE
    Export with ``python -m attention_ref.export io_closed_form``.
    """
    Ev = E if Ev is None else Ev
    if kind == "standard_forward":
        return L * E + S * E + 2 * L * S + S * Ev, 2 * L * S + L * Ev
    if kind == "standard_backward":
        return (5 * L * S + L * E + S * E + 2 * L * Ev + S * Ev,
                2 * L * S + L * E + S * E + S * Ev)
    if sram_size is None:
        raise ValueError(f"io_closed_form({kind!r}) needs sram_size")
    outer = "q" if kind == "fa2_forward" else "kv"
    bq, bk = sram_block_sizes(sram_size, E, outer=outer)
    n_q, n_k = -(-L // bq), -(-S // bk)  # T_q, T_k
    if kind == "fa1_forward":
        return S * (E + Ev) + n_k * L * (E + Ev + 2), (n_k + 1) * L * (Ev + 2)
    if kind == "fa2_forward":
        return L * E + n_q * S * (E + Ev), L * (Ev + 1)
    if kind == "fa1_backward":
        return S * (E + Ev) + n_k * L * (2 * E + 2 * Ev + 2), L * E + 2 * S * (E + Ev) + n_k * L * E
    if kind == "fa2_backward":
        return (2 * L * Ev + S * (E + Ev) + n_k * L * (2 * E + Ev + 2),
                L + L * E + S * (E + Ev) + n_k * L * E)
    raise ValueError(f"unknown kind {kind!r}")
