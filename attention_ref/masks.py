"""Stage 02: boolean attention masks. Convention everywhere: **True = attend** (as in PyTorch's
``scaled_dot_product_attention`` and JAX), False = masked out.

Causal alignment when the number of queries L differs from the number of keys S:

* ``"top_left"`` (PyTorch ``is_causal``): query i sees keys j ≤ i — ``tril(ones(L, S))``.
* ``"bottom_right"`` (flash-attn ≥ 2.1, KV-cache decoding): the last query lines up with the last
  key, so query i sees keys j ≤ i + (S − L) — ``tril(ones(L, S), S − L)``.

Masks are created with NumPy unless ``xp`` names another array module (for example ``cupy``).
"""

from __future__ import annotations

import operator
from types import ModuleType
from typing import Any

Array = Any

ALIGNMENTS = ("top_left", "bottom_right")


def _standard(xp: ModuleType | None) -> ModuleType:
    """The array-API view of an array module (NumPy by default): ``cupy`` or ``numpy`` passed in
    as ``xp`` become their array_api_compat wrappers, which have ``bool`` and ``isdtype``."""
    from array_api_compat import array_namespace

    if xp is None:
        import numpy as xp
    return array_namespace(xp.asarray(0))


def _query_positions(L: int, S: int, alignment: str, xp: ModuleType) -> Array:
    """Position of each query on the key axis: i (top-left) or i + S − L (bottom-right), as (L, 1)."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    offset = 0 if alignment == "top_left" else S - L
    return xp.reshape(xp.arange(L) + offset, (L, 1))


def _as_count(name: str, value: Any, allow_none: bool = False) -> int | None:
    """An int-like (Python or NumPy integer, not bool) that is >= 0, else ValueError."""
    if value is None and allow_none:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        count = operator.index(value)
    except TypeError:
        count = -1
    if count < 0:
        raise ValueError(f"{name} must be a non-negative int{' or None' if allow_none else ''}, got {value!r}")
    return count


def causal_mask(L: int, S: int, alignment: str = "top_left", *, xp: ModuleType | None = None) -> Array:
    """Causal mask (Vaswani et al. 2017, §3.2.3): query i may attend key j only when j is not in
    its future.

    Returns a boolean (L, S) array, True = attend. ``alignment`` is ``"top_left"`` (j ≤ i) or
    ``"bottom_right"`` (j ≤ i + S − L); see the module docstring.
    """
    xp = _standard(xp)
    L, S = _as_count("L", L), _as_count("S", S)
    query_pos = _query_positions(L, S, alignment, xp)
    key_pos = xp.reshape(xp.arange(S), (1, S))
    return key_pos <= query_pos


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
    """
    xp = _standard(xp)
    L, S = _as_count("L", L), _as_count("S", S)
    left, right = _as_count("left", left, allow_none=True), _as_count("right", right, allow_none=True)
    query_pos = _query_positions(L, S, alignment, xp)
    key_pos = xp.reshape(xp.arange(S), (1, S))
    mask = xp.ones((L, S), dtype=xp.bool)
    if left is not None:
        mask = xp.logical_and(mask, key_pos >= query_pos - left)
    if right is not None:
        mask = xp.logical_and(mask, key_pos <= query_pos + right)
    return mask


def padding_mask(lengths: Array, S: int, *, xp: ModuleType | None = None) -> Array:
    """Key-padding mask: in batch element b only the first ``lengths[b]`` keys are real.

    lengths: (B,) integers in [0, S] (an array's own namespace is used unless ``xp`` is given). Returns a boolean (B, 1, 1, S) array (True for j <
    lengths[b]) that broadcasts against attention logits (B, H, L, S). For a single-head call
    with logits (B, L, S) use ``padding_mask(lengths, S)[:, 0]``.
    """
    if xp is None and (hasattr(lengths, "__array_namespace__") or type(lengths).__module__.startswith("numpy")):
        from array_api_compat import array_namespace

        xp = array_namespace(lengths)  # follow the namespace of ``lengths`` when it is an array
    else:
        xp = _standard(xp)
    S = _as_count("S", S)
    lengths = xp.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D (B,), got shape {tuple(lengths.shape)}")
    if not xp.isdtype(lengths.dtype, "integral"):
        raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
    if lengths.shape[0] and (bool(xp.any(lengths < 0)) or bool(xp.any(lengths > S))):
        raise ValueError(f"lengths must lie in [0, S={S}], got {lengths}")
    key_pos = xp.reshape(xp.arange(S), (1, 1, 1, S))
    return key_pos < xp.reshape(lengths, (lengths.shape[0], 1, 1, 1))
