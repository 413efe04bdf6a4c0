"""The one input contract of attention_ref: every public function checks its inputs here.

The same bad input gets the same exception and the same message from every function that takes
it, and the message names the argument and the shapes seen:

* ``TypeError`` for the wrong kind of value: None or a list where an array is expected, an
  integer or complex array where floating point is needed, arrays of different dtypes that would
  be combined, a bool or a float where an int is meant, a string where a number or a bool is meant;
* ``ValueError`` for the right kind with the wrong shape or range.

NumPy integers and floats are accepted wherever Python ones are. The checks never modify, copy or
convert an array. Each check is a small function of its own, so a function exported with
``python -m attention_ref.export`` carries only the checks it uses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace


def check_float_array(name: str, x: Any, ndim: int = 0, shape_doc: str = "") -> None:
    """``x`` must be an array of real floating dtype with at least ``ndim`` dimensions."""
    if not (hasattr(x, "dtype") and hasattr(x, "shape")):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not array_namespace(x).isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype, got {x.dtype}")
    if x.ndim < ndim:
        raise ValueError(f"{name} must have at least {ndim} dimensions {shape_doc}, got shape {tuple(x.shape)}")


def check_same_dtype(names: str, *arrays: Any) -> None:
    """Arrays that are combined must share one dtype: nothing is promoted silently."""
    if any(x.dtype != arrays[0].dtype for x in arrays):
        raise TypeError(f"{names} must share one dtype, got {', '.join(str(x.dtype) for x in arrays)}")


def check_mask(name: str, mask: Any, shape: tuple[int, ...], shape_doc: str, floating: bool = True) -> None:
    """A boolean mask (True = attend), or a floating one (added) when ``floating``, that
    broadcasts to ``shape`` without enlarging it."""
    if not (hasattr(mask, "dtype") and hasattr(mask, "shape")):
        raise TypeError(f"{name} must be an array, got {type(mask).__name__}")
    xp = array_namespace(mask)
    if mask.dtype != xp.bool and not (floating and xp.isdtype(mask.dtype, "real floating")):
        raise TypeError(f"{name} must be boolean (True = attend){' or floating (added)' * floating}, got {mask.dtype}")
    if mask.ndim > len(shape) or any(m not in (1, n) for m, n in zip(mask.shape[::-1], shape[::-1], strict=False)):
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to {shape_doc} {shape}")


def check_attention(query: Any, key: Any, value: Any, attn_mask: Any = None, enable_gqa: Any = False,
                    names: tuple[str, str, str] = ("query", "key", "value")) -> None:
    """The inputs of scaled dot-product attention: query (..., Hq, L, E), key (..., H, S, E) and
    value (..., H, S, Ev) of one floating dtype and one rank, the same leading dimensions, H = Hq
    (or, with ``enable_gqa``, H dividing Hq), and a mask that broadcasts to (..., Hq, L, S).
    ``names`` are the arguments' names in the messages."""
    q, k, v = names
    for name, x in zip(names, (query, key, value), strict=True):
        check_float_array(name, x, 2, "(..., L, E)")
    check_same_dtype(f"{q}, {k} and {v}", query, key, value)
    check_bool("enable_gqa", enable_gqa)
    shapes = f"{q} {tuple(query.shape)}, {k} {tuple(key.shape)}, {v} {tuple(value.shape)}"
    if not query.ndim == key.ndim == value.ndim:
        raise ValueError(f"{q}, {k} and {v} must have the same rank, got {shapes}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"{q} and {k} must share the feature size E, got {shapes}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"{k} and {v} must share (..., S), got {shapes}")
    hq, h = (query.shape[-3], key.shape[-3]) if query.ndim > 2 else (1, 1)
    if query.shape[:-3] != key.shape[:-3] or (hq != h and not (enable_gqa and h > 0 and hq % h == 0)):
        raise ValueError(f"{q} and {k} must have the same batch and heads, or with enable_gqa=True "
                         f"{q} heads that are a multiple of the {k}/{v} heads; got {shapes}")
    if attn_mask is not None:
        check_mask("attn_mask", attn_mask, (*query.shape[:-1], key.shape[-2]), "(..., Hq, L, S)")


def check_gradients(query: Any, value: Any, out: Any, lse: Any, grad_out: Any) -> None:
    """The saved forward results and the incoming gradient of attention's backward pass: out = O
    and grad_out = dO (..., Hq, L, Ev) of query's dtype, lse = λ (..., Hq, L) floating."""
    for name, x, shape in (("out", out, (*query.shape[:-1], value.shape[-1])),
                           ("grad_out", grad_out, (*query.shape[:-1], value.shape[-1])),
                           ("lse", lse, tuple(query.shape[:-1]))):
        check_float_array(name, x)
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for query {tuple(query.shape)} and value "
                             f"{tuple(value.shape)}, got {tuple(x.shape)}")
    check_same_dtype("query, out and grad_out", query, out, grad_out)


def check_bool(name: str, value: Any) -> bool:
    """True or False (a NumPy bool too), never a string or a number."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_int(name: str, value: Any, minimum: int = 0) -> int:
    """An int ≥ ``minimum`` (a NumPy integer too; never a bool or a float), as a Python int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_real(name: str, value: Any, default: float | None = None) -> float:
    """A real number (a NumPy one too; never a bool or a string), or ``default`` for None."""
    if value is None and default is not None:
        return default
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of the strings ``choices``."""
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_window(window: Any) -> tuple[int | None, int | None]:
    """None or a pair (left, right) of ints ≥ 0 or None (unbounded on that side)."""
    if window is None:
        return None, None
    if not isinstance(window, (tuple, list)):
        raise TypeError(f"window must be a pair (left, right) of ints or None, got {window!r}")
    if len(window) != 2:
        raise ValueError(f"window must be a pair (left, right), got {window!r}")
    return tuple(None if w is None else check_int(f"window {side}", w) for side, w in zip(("left", "right"), window, strict=True))
