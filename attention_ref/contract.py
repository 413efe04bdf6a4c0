"""The one input contract of attention_ref: every public function checks its inputs here.

The same bad input gets the same exception and the same message from every function that takes
it, and the message names the argument and the shapes seen:

* ``TypeError`` for the wrong kind of value: None or a list where an array is expected, an
  integer or complex array where floating point is needed, arrays of different dtypes that would
  be combined, a bool or a float where an int is meant, a string where a number or a bool is meant;
* ``ValueError`` for the right kind with the wrong shape or range.

NumPy integers and floats are accepted wherever Python ones are. The checks never modify, copy or
convert an array. Each check is a small function of its own, so that a function exported with
``python -m attention_ref.export`` carries only the checks it uses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace

from .backends import to_numpy

Shape = tuple[int, ...]


def check_float_arrays(ndim: int = 0, shape_doc: str = "", **arrays: Any) -> None:
    """Each of ``arrays`` (passed by name) must be an array of real floating dtype with at least
    ``ndim`` dimensions (``shape_doc`` shows them), and all of one dtype: nothing is promoted silently."""
    for name, x in arrays.items():
        if not (hasattr(x, "dtype") and array_namespace(x).isdtype(x.dtype, "real floating")):
            raise TypeError(f"{name} must be a floating-point array, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim < ndim:
            raise ValueError(f"{name} must have at least {ndim} dimensions {shape_doc}, got shape {tuple(x.shape)}")
    if len({x.dtype for x in arrays.values()}) > 1:
        raise TypeError(f"{', '.join(arrays)} must share one dtype, got {', '.join(str(x.dtype) for x in arrays.values())}")


def check_mask(name: str, mask: Any, shape: Shape, kinds: tuple[str, ...] = ("bool", "real floating")) -> None:
    """A mask of one of ``kinds`` (bool: True = attend; floating: added) broadcasting to ``shape``."""
    if not (hasattr(mask, "dtype") and array_namespace(mask).isdtype(mask.dtype, kinds)):
        raise TypeError(f"{name} must be a {' or '.join(kinds)} array, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.ndim > len(shape) or any(m not in (1, n) for m, n in zip(mask.shape[::-1], shape[::-1], strict=False)):
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to {shape}")


def check_attention(query: Any, key: Any, value: Any, attn_mask: Any = None, enable_gqa: Any = False) -> None:
    """query (..., H, L, E), key and value (..., Hkv, S, E | Ev) as SDPA takes them (Hkv | H: GQA)."""
    check_float_arrays(2, "(..., L, E)", query=query, key=key, value=value)
    check_bool(enable_gqa=enable_gqa)
    h, hkv = (query.shape[-3], key.shape[-3]) if min(query.ndim, key.ndim) > 2 else (1, 1)
    for wrong, rule in ((not query.ndim == key.ndim == value.ndim, "query, key and value must have the same rank"),
                        (query.shape[-1] != key.shape[-1], "query and key must share the feature size E"),
                        (key.shape[:-1] != value.shape[:-1], "key and value must share (..., S)"),
                        (query.shape[:-3] != key.shape[:-3] or (h != hkv and not (enable_gqa and hkv and h % hkv == 0)),
                         "query and key must share (..., heads), or be a multiple of them with enable_gqa=True")):
        if wrong:
            raise ValueError(f"{rule}: query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
    if attn_mask is not None:
        check_mask("attn_mask", attn_mask, (*query.shape[:-1], key.shape[-2]))


def check_gradients(query: Any, value: Any, out: Any, lse: Any, grad_out: Any) -> None:
    """out = O and grad_out = dO (..., H, L, Ev) of query's dtype, lse = λ (..., H, L)."""
    check_float_arrays(query=query, out=out, grad_out=grad_out)
    check_float_arrays(lse=lse)  # λ is kept in the compute dtype (float32 for float16 inputs)
    for name, x, shape in (("out", out, (*query.shape[:-1], value.shape[-1])),
                           ("grad_out", grad_out, (*query.shape[:-1], value.shape[-1])),
                           ("lse", lse, tuple(query.shape[:-1]))):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for query {tuple(query.shape)} and value "
                             f"{tuple(value.shape)}, got {tuple(x.shape)}")


def check_blocks(L: int, S: int, block_q: Any, block_k: Any, block_mask: Any) -> tuple[int, int, Any]:
    """The tile sizes, and the block mask (⌈L/block_q⌉, ⌈S/block_k⌉) read on the host once as nested
    lists of bools (or None)."""
    block_q, block_k = check_int("block_q", block_q, 1), check_int("block_k", block_k, 1)
    if block_mask is None:
        return block_q, block_k, None
    block_mask = to_numpy(block_mask)  # export: omit
    n_q, n_k = -(-L // block_q), -(-S // block_k)
    if tuple(block_mask.shape) != (n_q, n_k):
        raise ValueError(f"block_mask must have shape (⌈L/block_q⌉, ⌈S/block_k⌉) = ({n_q}, {n_k}) for L={L}, "
                         f"S={S}, block_q={block_q}, block_k={block_k}; got {tuple(block_mask.shape)}")
    return block_q, block_k, [[bool(b) for b in row] for row in block_mask.tolist()]


def check_bool(**flags: Any) -> None:
    """Each flag must be True or False (a NumPy bool too), never a string or a number."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def check_int(name: str, value: Any, minimum: int = 0) -> int:
    """An int ≥ ``minimum`` (a NumPy integer too; never a bool or a float), as a Python int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_real(name: str, value: Any) -> float:
    """A real number (a NumPy one too; never a bool or a string), as a Python float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """One of the strings ``choices``."""
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_window(window: Any) -> tuple[int | None, int | None]:
    """None, or a pair (left, right) of ints ≥ 0 or None (unbounded on that side)."""
    if window is not None and not isinstance(window, (tuple, list)):
        raise TypeError(f"window must be None or a pair (left, right), got {window!r}")
    if window is not None and len(window) != 2:
        raise ValueError(f"window must be a pair (left, right), got {window!r}")
    return tuple(None if w is None else check_int(f"window {side}", w)
                 for side, w in zip(("left", "right"), window or (None, None), strict=True))
