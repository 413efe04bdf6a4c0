"""Stage 09: relative positions inside attention — rotary embeddings (RoPE) and ALiBi.

Stage 03 *added* a sinusoidal vector to each token before attention. Decoders since 2021 put the
position into the attention logits themselves, so that z_ij depends on the *offset* δ between the
positions of query i and key j (README's notation; the papers' own letters are named where quoted):

* **RoPE** (Su et al. 2021, RoFormer, arXiv:2104.09864, eq. 34) rotates every pair of features of a
  query or key by an angle proportional to its position pos. With the frequencies
  ω_f = θ^(−2f/E), f = 0 … E/2 − 1 (RoFormer writes θ_i and the position m),

      R_pos x:   (x_a, x_b)  ↦  (x_a cos(pos·ω_f) − x_b sin(pos·ω_f),  x_a sin(pos·ω_f) + x_b cos(pos·ω_f)),

  and since rotations compose, ⟨R_pos_i q, R_pos_j k⟩ = ⟨q, R_δ k⟩ with δ = pos_j − pos_i: the
  logit sees only the offset. Which features form pair f is a convention. RoFormer, GPT-J and
  llama.cpp pair *neighbours* (a, b) = (2f, 2f + 1) ("interleaved"); Llama in Hugging Face
  ``transformers`` pairs the two *halves* (a, b) = (f, f + E/2) ("rotate-half"). The two differ
  only by a fixed permutation of the features (:func:`rope_permutation`), applied to the rows of
  W_Q and W_K when a checkpoint is converted from one to the other.
* **ALiBi** (Press, Smith & Lewis 2022, arXiv:2108.12409, §3) adds no embedding at all: head h
  adds the bias −μ_h · (pos_i − pos_j) to the logit of query i and key j, with the geometric
  slopes μ_h = 2^(−8h/H), h = 1 … H (the paper calls the slope m). The bias is a float mask Δ
  for stage 02's ``scaled_dot_product_attention`` and stage 05's ``flash_attention``.

Public names
------------
``rope_frequencies``  ω_f = θ^(−2f/E), the E/2 rotation frequencies
``rope``              rotate (..., L, E) queries or keys to their positions (both layouts)
``rope_permutation``  the feature permutation taking the rotate-half layout to the interleaved one
``alibi_slopes``      μ_h for H heads (the paper's rule for H not a power of two)
``alibi_bias``        the (H, L, S) float mask −μ_h · (pos_i − pos_j), causal in either alignment

Everything is namespace-neutral (NumPy, CuPy, array-api-strict). Inputs are never modified.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from array_api_compat import array_namespace

from .contract import check_bool, check_choice, check_float_arrays, check_int, check_real

Array = Any

__all__ = ["alibi_bias", "alibi_slopes", "rope", "rope_frequencies", "rope_permutation"]

_ALIGNMENTS = ("top_left", "bottom_right")


# ----------------------------------------------------------------------------- input checks


def _even_head_size(E: int, where: str) -> None:
    if E % 2 != 0:
        raise ValueError(f"RoPE rotates pairs of features: the head size E must be even, got {where}")


def _check_theta(theta: Any) -> float:
    value = check_real("theta", theta)
    if not 0 < value < float("inf"):  # also false for NaN
        raise ValueError(f"theta must be a positive finite number, got {theta!r}")
    return value


def _check_rope_inputs(xp: ModuleType, x: Array, positions: Array) -> None:
    """The rest of :func:`rope`'s contract: E even, positions (L,) integers."""
    _even_head_size(x.shape[-1], f"x of shape {tuple(x.shape)}")
    if not xp.isdtype(positions.dtype, "integral"):
        raise TypeError(f"positions must be an integer array, got dtype {positions.dtype}")
    if positions.ndim != 1 or positions.shape[0] != x.shape[-2]:
        raise ValueError(
            f"positions must have shape (L,) with L = x.shape[-2]; got positions "
            f"{tuple(positions.shape)} for x {tuple(x.shape)}"
        )


def _standard(xp: ModuleType | None) -> ModuleType:
    """The array-API view of an array module (NumPy by default), which has ``bool``, ``isdtype``."""
    if xp is None:
        import numpy as xp
    return array_namespace(xp.asarray(0))


# ----------------------------------------------------------------------------- RoPE


def rope_frequencies(head_dim: int, theta: float = 10000.0, *, xp: ModuleType | None = None) -> Array:
    """The E/2 rotation frequencies ω_f = θ^(−2f/E), f = 0 … E/2 − 1, float64 (RoFormer eq. 15,
    where they are called θ_i).

    Pair f turns by the angle pos·ω_f at position pos: the first pair one radian per token
    (ω_0 = 1), the last about θ^(−1) radians, so the pairs measure offsets from one token to
    thousands.
    """
    if xp is None:
        import numpy as xp
    E = check_int("head_dim", head_dim, 2)
    _even_head_size(E, f"head_dim={E}")
    base = _check_theta(theta)
    i = xp.arange(E // 2, dtype=xp.float64)
    return base ** (-2.0 * i / E)


def rope(x: Array, positions: Array, *, theta: float = 10000.0, interleaved: bool = False) -> Array:
    """Rotary position embedding of queries or keys (Su et al. 2021, RoFormer eq. 34).

    x: (..., L, E) — e.g. the (batch, H, L, E) heads of stage 04's ``split_heads`` — with E even;
    positions: (L,) integers, the position pos of each of the L rows (``arange(t, t + L)`` for L
    new tokens after t cached ones). Pair f = 0 … E/2 − 1 of a row at position pos is rotated by
    pos·ω_f, ω_f = theta^(−2f/E):

        out_a = x_a cos(pos·ω_f) − x_b sin(pos·ω_f),     out_b = x_b cos(pos·ω_f) + x_a sin(pos·ω_f)

    with (a, b) = (2f, 2f + 1) when ``interleaved`` (RoFormer, GPT-J, llama.cpp) and
    (a, b) = (f, f + E/2) otherwise (the "rotate-half" layout of Llama in ``transformers``).
    The angles are computed in float64 and rounded once to x's dtype; float32 in → float32 out
    (float16 is computed in float32). Returns a new array of x's shape.
    Take it home as one NumPy file with ``python -m attention_ref.export rope``.
    """
    check_float_arrays(2, "(..., L, E)", x=x)  # before array_namespace: a list has none
    check_bool(interleaved=interleaved)
    xp = array_namespace(x)
    positions = xp.asarray(positions)
    _check_rope_inputs(xp, x, positions)
    _check_theta(theta)
    half = getattr(xp, "float16", None)
    work = xp.float32 if half is not None and x.dtype == half else x.dtype
    E = x.shape[-1]
    if E == 0:
        return xp.asarray(x, copy=True)
    freqs = rope_frequencies(E, theta, xp=xp)
    angles = xp.reshape(xp.astype(positions, xp.float64), (-1, 1)) * freqs  # (L, E/2): pos·ω_f
    cos, sin = xp.astype(xp.cos(angles), work), xp.astype(xp.sin(angles), work)
    y = xp.astype(x, work)
    if interleaved:
        pairs = xp.reshape(y, (*y.shape[:-1], E // 2, 2))
        x_a, x_b = pairs[..., 0], pairs[..., 1]
    else:
        x_a, x_b = y[..., : E // 2], y[..., E // 2 :]
    out_a = x_a * cos - x_b * sin
    out_b = x_b * cos + x_a * sin
    if interleaved:
        out = xp.reshape(xp.stack((out_a, out_b), axis=-1), y.shape)
    else:
        out = xp.concat((out_a, out_b), axis=-1)
    return xp.astype(out, x.dtype)


def rope_permutation(head_dim: int, *, xp: ModuleType | None = None) -> Array:
    """The feature order that turns the rotate-half layout into the interleaved one, (E,) ints.

    perm = [0, E/2, 1, E/2 + 1, …]: feature 2f of the interleaved layout is feature f of the
    rotate-half layout and feature 2f + 1 is feature f + E/2. Hence, for any x (..., L, E) and
    positions (L,),

        rope(x[..., perm], positions, interleaved=True) == rope(x, positions)[..., perm],

    and a checkpoint converts between the layouts by reordering the rows of W_Q and W_K within
    each head (llama.cpp's converter applies ``perm``; ``transformers`` undoes it on load).
    """
    if xp is None:
        import numpy as xp
    E = check_int("head_dim", head_dim, 2)
    _even_head_size(E, f"head_dim={E}")
    i = xp.arange(E // 2)
    return xp.reshape(xp.stack((i, i + E // 2), axis=-1), (E,))


# ----------------------------------------------------------------------------- ALiBi


def _slopes_power_of_two(n: int) -> list[float]:
    """2^(−8h/n) for h = 1 … n: a geometric sequence starting (and with ratio) 2^(−8/n)."""
    return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]


def alibi_slopes(num_heads: int, *, xp: ModuleType | None = None) -> Array:
    """The head-specific ALiBi slopes μ_1 … μ_H (Press et al. 2022, §3, where they are called m),
    float64 (H,).

    For H a power of two, μ_h = 2^(−8h/H): for 8 heads 1/2, 1/4, …, 1/256. Otherwise (the
    authors' code): take the 2^⌊log₂ H⌋ slopes of the nearest smaller power of two, then add every
    other slope of the sequence for twice that many heads until there are H.
    """
    if xp is None:
        import numpy as xp
    H = check_int("num_heads", num_heads, 1)
    n = 2 ** int(math.floor(math.log2(H)))
    slopes = _slopes_power_of_two(n)
    if n < H:
        slopes += _slopes_power_of_two(2 * n)[0::2][: H - n]
    return xp.asarray(slopes, dtype=xp.float64)


def alibi_bias(
    num_heads: int,
    L: int,
    S: int,
    *,
    causal: bool = True,
    alignment: str = "top_left",
    dtype: Any = None,
    xp: ModuleType | None = None,
) -> Array:
    """ALiBi's additive mask Δ of shape (H, L, S) (Press et al. 2022, §3, Figure 3).

    Key j sits at position j; query i at pos_i = i (``alignment="top_left"``, PyTorch's
    ``is_causal``) or pos_i = i + S − L (``"bottom_right"``: the last query lines up with the last
    key, as when the queries are the newest tokens of a KV cache). Head h adds

        Δ_hij = −μ_h · (pos_i − j)   for j ≤ pos_i,        Δ_hij = −∞   for j > pos_i   (causal)

    or −μ_h · |pos_i − j| everywhere with ``causal=False`` (the symmetric bidirectional variant).
    Pass it as ``attn_mask`` to ``scaled_dot_product_attention`` or ``flash_attention``
    (it broadcasts over leading batch dimensions of (..., H, L, S)). ``dtype`` defaults to the
    namespace's float32; ``xp`` to NumPy.
    """
    check_choice("alignment", alignment, _ALIGNMENTS)
    check_bool(causal=causal)
    H = check_int("num_heads", num_heads, 1)
    L, S = check_int("L", L), check_int("S", S)
    xp = _standard(xp)
    dtype = xp.float32 if dtype is None else dtype
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"dtype must be a real floating dtype, got {dtype}")
    offset = 0 if alignment == "top_left" else S - L
    query_pos = xp.reshape(xp.arange(L, dtype=xp.float64) + offset, (1, L, 1))
    key_pos = xp.reshape(xp.arange(S, dtype=xp.float64), (1, 1, S))
    distance = query_pos - key_pos  # pos_i − j: positive for keys in the past
    slopes = xp.reshape(alibi_slopes(H, xp=xp), (H, 1, 1))
    bias = -slopes * xp.abs(distance)
    if causal:
        bias = xp.where(distance >= 0, bias, xp.asarray(-math.inf, dtype=xp.float64))
    return xp.astype(bias, dtype)
