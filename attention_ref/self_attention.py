"""Stage 03: positions, self-attention and cross-attention with explicit parameters.

Weights are stored as (in_features, out_features), so a projection reads ``x @ W + b`` exactly
as the equations do. (PyTorch's ``nn.Linear`` stores the transpose, (out, in).) :func:`project`
and :func:`glorot_params` are the projection helpers stage 04's multi-head attention reuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from .contract import check_bool, check_float_arrays, check_int
from .dot_product import scaled_dot_product_attention

Array = Any


def sinusoidal_positional_encoding(
    num_positions: int, d_model: int, *, base: float = 10000.0, dtype: Any = None, xp: ModuleType | None = None,
) -> Array:
    """Sinusoidal positional encoding (Vaswani et al. 2017, §3.5):

        PE(pos, 2i) = sin(pos / base^(2i / d_model)),  PE(pos, 2i+1) = cos(pos / base^(2i / d_model)).

    Returns a (num_positions, d_model) array (float64 unless ``dtype`` says otherwise; created with
    NumPy unless ``xp`` names another array module). An odd d_model drops the last cosine column.
    Export with ``python -m attention_ref.export sinusoidal_positional_encoding``.
    """
    num_positions, d_model = check_int("num_positions", num_positions), check_int("d_model", d_model, 1)
    if xp is None:
        import numpy as xp
    dtype = xp.float64 if dtype is None else dtype
    pos = xp.reshape(xp.arange(num_positions, dtype=dtype), (num_positions, 1))
    two_i = xp.arange(0, d_model, 2, dtype=dtype)  # the even feature indices 2i
    angle = pos / (base ** (two_i / d_model))  # (num_positions, ceil(d_model / 2))
    pe = xp.stack([xp.sin(angle), xp.cos(angle)], axis=-1)  # interleave sin, cos
    return xp.reshape(pe, (num_positions, 2 * angle.shape[1]))[:, :d_model]


@dataclass(frozen=True)
class AttentionParams:
    """Parameters of one attention layer (single- or multi-head), stored as (in, out) matrices.

    W_q: (d_model, H·E), W_k: (kdim, Hkv·E), W_v: (vdim, Hkv·Ev), W_o: (H·Ev, d_out) (one head:
    H = Hkv = 1); biases b_q, b_k, b_v, b_o are 1-D (out,) or None.
    """

    W_q: Array
    W_k: Array
    W_v: Array
    W_o: Array
    b_q: Array | None = None
    b_k: Array | None = None
    b_v: Array | None = None
    b_o: Array | None = None


def glorot_params(rng: Any, shapes: tuple[tuple[int, int], ...], bias: bool, dtype: Any) -> AttentionParams:
    """W_q, W_k, W_v, W_o of the four (in, out) ``shapes`` drawn uniformly from ±√(6 / (in + out))
    (Glorot & Bengio 2010: the variance of x @ W stays near that of x), and zero biases (None
    without ``bias``), as NumPy arrays of ``dtype`` (float64 by default)."""
    dtype = np.float64 if dtype is None else dtype
    weights = []
    for fan_in, fan_out in shapes:
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        weights.append(rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(dtype))
    return AttentionParams(*weights, *(np.zeros(w.shape[1], dtype=dtype) if bias else None for w in weights))


def init_attention_params(
    rng: Any, d_model: int, d_k: int | None = None, d_v: int | None = None, *, kdim: int | None = None,
    vdim: int | None = None, d_out: int | None = None, bias: bool = True, dtype: Any = None,
) -> AttentionParams:
    """Random parameters for a single-head attention layer (Glorot/Xavier uniform weights,
    zero biases).

    rng: a ``numpy.random.Generator``. Query projection (d_model → E), key (kdim → E), value
    (vdim → Ev), output (Ev → d_out), with E = d_k and Ev = d_v. Each size defaults to d_model.
    Returns NumPy arrays of ``dtype`` (float64 by default).
    Export with ``python -m attention_ref.export init_attention_params``.
    """
    d_model = check_int("d_model", d_model, 1)
    d_k, d_v, kdim, vdim, d_out = (d_model if n is None else check_int(name, n, 1) for name, n in (
        ("d_k", d_k), ("d_v", d_v), ("kdim", kdim), ("vdim", vdim), ("d_out", d_out)))
    check_bool(bias=bias)
    return glorot_params(rng, ((d_model, d_k), (kdim, d_k), (vdim, d_v), (d_v, d_out)), bias, dtype)


def project(x: Array, W: Array, b: Array | None, name: str) -> Array:
    """x @ W + b, a projection with W stored (in, out); a mismatch names the projection and shapes."""
    if x.ndim < 1 or W.ndim != 2 or x.shape[-1] != W.shape[0]:
        raise ValueError(f"{name}: input has {x.shape[-1] if x.ndim else 0} features but the weight expects "
                         f"{W.shape[0] if W.ndim else 0} (input {tuple(x.shape)}, weight {tuple(W.shape)})")
    y = x @ W
    return y if b is None else y + b


def cross_attention(
    x: Array, context: Array, params: AttentionParams, *, attn_mask: Array | None = None,
    is_causal: bool = False, return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    """Single-head cross-attention: queries from ``x``, keys and values from ``context``.

        Q = x W_q + b_q,  K = c W_k + b_k,  V = c W_v + b_v,
        out = softmax(Q Kᵀ / √E) V W_o + b_o        (Vaswani et al. 2017, eq. 1).

    x: (..., L, d_model), context: (..., S, d_ctx). ``attn_mask`` broadcasts to (..., L, S)
    (True = attend). Returns (..., L, d_out), and the weights (..., L, S) with ``return_weights``.
    Export with ``python -m attention_ref.export cross_attention``.
    """
    check_float_arrays(2, "(..., L, d_model)", x=x)
    check_float_arrays(2, "(..., S, d_ctx)", context=context)
    check_float_arrays(x=x, context=context)
    check_bool(return_weights=return_weights)
    xp = array_namespace(x, context)
    q = project(x, params.W_q, params.b_q, "query projection W_q")
    k = project(context, params.W_k, params.b_k, "key projection W_k")
    v = project(context, params.W_v, params.b_v, "value projection W_v")
    out, weights = scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal, return_weights=True)
    out = xp.astype(project(out, params.W_o, params.b_o, "output projection W_o"), x.dtype)
    return (out, xp.astype(weights, x.dtype)) if return_weights else out


def self_attention(
    x: Array, params: AttentionParams, *, attn_mask: Array | None = None, is_causal: bool = False,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    """Single-head self-attention: cross-attention of a sequence with itself.

    x: (..., L, d_model). Returns (..., L, d_out), and the weights (..., L, L) with
    ``return_weights``. Without positional information the result is permutation-equivariant:
    permuting the tokens permutes the output rows the same way.
    Export with ``python -m attention_ref.export self_attention``.
    """
    return cross_attention(x, x, params, attn_mask=attn_mask, is_causal=is_causal, return_weights=return_weights)
