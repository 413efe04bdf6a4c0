"""Stage 02: boolean attention masks. Convention everywhere: **True = attend** (as in PyTorch's
``scaled_dot_product_attention`` and JAX), False = masked out.

Causal alignment when the number of queries L differs from the number of keys S:

* ``"top_left"`` (PyTorch ``is_causal``): query i sees keys j ≤ i — ``tril(ones(L, S))``.
* ``"bottom_right"`` (flash-attn ≥ 2.1, KV-cache decoding): the last query lines up with the last
  key, so query i sees keys j ≤ i + (S − L) — ``tril(ones(L, S), S − L)``.

The band
--------
Causal masks and sliding windows are one shape, a *band*: query row i sits at key position
p = i + offset (offset 0 top-left, S − L bottom-right) and sees the keys p − left ≤ j ≤ p + right.
:func:`band` turns the options into the three ints (offset, left, right) — causal is right = 0, an
unbounded side is L + S, further than any key — and three helpers read it; they are the only place
in the package that knows what causal and windowed mean:

``band_mask``   the band as a boolean array (these masks, SDPA's ``is_causal``, FlashAttention's
                partially masked tiles)
``key_range``   the keys lo ≤ j < hi of one query row (the Numba kernels, compiled)
``tile_state``  "full", "partial" or "skip" for a tile of rows × keys (FlashAttention's tile skipping)

Masks are created with NumPy unless ``xp`` names another array module (for example ``cupy``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from .contract import check_bool, check_choice, check_int, check_window

Array = Any

ALIGNMENTS = ("top_left", "bottom_right")


def band(L: int, S: int, is_causal: bool = False, window: tuple[int | None, int | None] | None = None,
         alignment: str = "top_left") -> tuple[int, int, int]:
    """(offset, left, right): query row i, at p = i + offset, sees keys p − left ≤ j ≤ p + right."""
    left, right = (L + S if w is None else w for w in window or (None, None))  # L + S: unbounded
    return (0 if alignment == "top_left" else S - L), left, (min(right, 0) if is_causal else right)


def checked_band(L: int, S: int, is_causal: Any, window: Any, causal_alignment: Any) -> tuple[int, int, int]:
    """:func:`band` of FlashAttention's and the Numba kernels' options, checked first."""
    check_bool(is_causal=is_causal)
    check_choice("causal_alignment", causal_alignment, ALIGNMENTS)
    return band(L, S, is_causal, check_window(window), causal_alignment)


def band_mask(xp: Any, i0: int, i1: int, j0: int, j1: int, offset: int, left: int, right: int,
              device: Any = None) -> Array:
    """The band on rows i0 ≤ i < i1 and keys j0 ≤ j < j1 as a boolean array, True = attend."""
    p = xp.reshape(xp.arange(i0, i1, device=device), (i1 - i0, 1)) + offset
    j = xp.reshape(xp.arange(j0, j1, device=device), (1, j1 - j0))
    return xp.logical_and(j >= p - left, j <= p + right)


def key_range(i: int, offset: int, left: int, right: int, S: int) -> tuple[int, int]:
    """The keys lo ≤ j < hi that query row i sees among the first S keys (lo = hi: none)."""
    p = i + offset
    lo = max(p - left, 0)
    return lo, max(min(p + right + 1, S), lo)


def tile_state(i0: int, i1: int, j0: int, j1: int, offset: int, left: int, right: int) -> str:
    """"skip", "full" or "partial": how much of the tile i0 ≤ i < i1, j0 ≤ j < j1 the band hides."""
    # both ends of a row's key range grow with i, so the first and the last row decide
    lo_first, hi_first = key_range(i0, offset, left, right, j1)
    lo_last, hi_last = key_range(i1 - 1, offset, left, right, j1)
    if hi_last <= j0 or lo_first >= j1:
        return "skip"
    return "full" if lo_last <= j0 and hi_first >= j1 else "partial"


def _namespace(xp: ModuleType | None) -> Any:
    """The array-API namespace of an array module (NumPy by default): ``cupy`` or ``numpy`` become
    their array_api_compat wrappers, which have ``bool`` and ``isdtype``."""
    return array_namespace((np if xp is None else xp).asarray(0))


def causal_mask(L: int, S: int, alignment: str = "top_left", *, xp: ModuleType | None = None) -> Array:
    """Causal mask (Vaswani et al. 2017, §3.2.3): query i may attend key j only when j is not in
    its future.

    Returns a boolean (L, S) array, True = attend. ``alignment`` is ``"top_left"`` (j ≤ i) or
    ``"bottom_right"`` (j ≤ i + S − L), as the docstring of ``attention_ref.masks`` explains.
    Export with ``python -m attention_ref.export causal_mask``.
    """
    L, S = check_int("L", L), check_int("S", S)
    check_choice("alignment", alignment, ALIGNMENTS)
    return band_mask(_namespace(xp), 0, L, 0, S, *band(L, S, True, None, alignment))


def sliding_window_mask(
    L: int,
    S: int,
    left: int | None,
    right: int | None = 0,
    alignment: str = "top_left",
    *,
    xp: ModuleType | None = None,
) -> Array:
    """Sliding-window (local) mask (Longformer; Mistral): query i at key-axis position p attends
    keys p − left ≤ j ≤ p + right.

    ``left``/``right`` of None mean unbounded on that side, so ``left=None, right=0`` is the
    causal mask and ``left=w, right=0`` is causal attention over the last w + 1 keys. p is i
    (``"top_left"``) or i + S − L (``"bottom_right"``). Returns a boolean (L, S) array.
    Export with ``python -m attention_ref.export sliding_window_mask``.
    """
    L, S = check_int("L", L), check_int("S", S)
    window = tuple(None if w is None else check_int(name, w) for name, w in (("left", left), ("right", right)))
    check_choice("alignment", alignment, ALIGNMENTS)
    return band_mask(_namespace(xp), 0, L, 0, S, *band(L, S, False, window, alignment))


def padding_mask(lengths: Array, S: int, *, xp: ModuleType | None = None) -> Array:
    """Key-padding mask: in batch element b only the first ``lengths[b]`` keys are real.

    lengths: (B,) integers in [0, S] (an array keeps its own namespace unless ``xp`` is given).
    Returns a boolean (B, 1, 1, S) array (True for j < lengths[b]) that broadcasts against attention
    logits (B, H, L, S). For a single-head call with logits (B, L, S) use ``padding_mask(lengths, S)[:, 0]``.
    Export with ``python -m attention_ref.export padding_mask``.
    """
    S = check_int("S", S)
    if xp is None and hasattr(lengths, "dtype"):
        xp = array_namespace(lengths)  # follow the namespace of ``lengths`` when it is an array
    else:
        xp = _namespace(xp)
    lengths = xp.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D (B,), got shape {tuple(lengths.shape)}")
    if not xp.isdtype(lengths.dtype, "integral"):
        raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
    if lengths.shape[0] and (bool(xp.any(lengths < 0)) or bool(xp.any(lengths > S))):
        raise ValueError(f"lengths must lie in [0, S={S}], got {lengths}")
    key_pos = xp.reshape(xp.arange(S), (1, 1, 1, S))
    return key_pos < xp.reshape(lengths, (lengths.shape[0], 1, 1, 1))

