"""Stage 04: multi-head attention (Vaswani et al. 2017, §3.2.2) with grouped-query (GQA, Ainslie
et al. 2023) and multi-query (MQA, Shazeer 2019) variants.

    MultiHead(Q, K, V) = Concat(head_1, …, head_H) W^O,   head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

The H projections W_i^Q are stored side by side as one (d_model, H·d_head) matrix, so projecting
once and splitting the last axis into heads is the same as H separate projections.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from array_api_compat import array_namespace

from .dot_product import scaled_dot_product_attention
from .self_attention import AttentionParams

Array = Any


def split_heads(x: Array, num_heads: int) -> Array:
    """Split the feature axis into heads: (..., L, H·D) → (..., H, L, D)."""
    xp = array_namespace(x)
    if x.ndim < 2:
        raise ValueError(f"split_heads needs x of shape (..., L, H·D), got shape {tuple(x.shape)}")
    *batch, L, width = x.shape
    if num_heads < 1 or width % num_heads != 0:
        raise ValueError(
            f"num_heads={num_heads} does not divide the feature size {width} of shape {tuple(x.shape)}"
        )
    x = xp.reshape(x, (*batch, L, num_heads, width // num_heads))
    return xp.moveaxis(x, -2, -3)


def merge_heads(x: Array) -> Array:
    """Concatenate the heads back along the features: (..., H, L, D) → (..., L, H·D)."""
    xp = array_namespace(x)
    if x.ndim < 3:
        raise ValueError(f"merge_heads needs (..., H, L, D), got shape {tuple(x.shape)}")
    *batch, H, L, D = x.shape
    return xp.reshape(xp.moveaxis(x, -3, -2), (*batch, L, H * D))


def init_multi_head_params(
    rng: Any,
    d_model: int,
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    kdim: int | None = None,
    vdim: int | None = None,
    bias: bool = True,
    dtype: Any = None,
) -> AttentionParams:
    """Random parameters for multi-head attention (Glorot uniform weights, zero biases).

    W_q: (d_model, H·D), W_k: (kdim, Hkv·D), W_v: (vdim, Hkv·D), W_o: (H·D, d_model) with
    D = head_dim (default d_model // H) and Hkv = num_kv_heads (default H; 1 gives MQA).
    rng is a ``numpy.random.Generator``; arrays are NumPy of ``dtype`` (float64 by default).
    """
    import numpy as np

    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if head_dim is None:
        if d_model % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} does not divide d_model={d_model}; pass head_dim")
        head_dim = d_model // num_heads
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    kdim = d_model if kdim is None else kdim
    vdim = d_model if vdim is None else vdim
    dtype = np.float64 if dtype is None else dtype

    def glorot(fan_in: int, fan_out: int) -> np.ndarray:
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(dtype)

    def zeros(n: int) -> np.ndarray | None:
        return np.zeros(n, dtype=dtype) if bias else None

    return AttentionParams(
        W_q=glorot(d_model, num_heads * head_dim),
        W_k=glorot(kdim, num_kv_heads * head_dim),
        W_v=glorot(vdim, num_kv_heads * head_dim),
        W_o=glorot(num_heads * head_dim, d_model),
        b_q=zeros(num_heads * head_dim),
        b_k=zeros(num_kv_heads * head_dim),
        b_v=zeros(num_kv_heads * head_dim),
        b_o=zeros(d_model),
    )


def _project(x: Array, W: Array, b: Array | None, name: str) -> Array:
    """x @ W + b with a clear error when the feature sizes disagree."""
    if x.ndim < 2:
        raise ValueError(f"{name} input must be (..., L, features), got shape {tuple(x.shape)}")
    if x.shape[-1] != W.shape[0]:
        raise ValueError(
            f"{name}: input has {x.shape[-1]} features but the weight expects {W.shape[0]} "
            f"(input {tuple(x.shape)}, weight {tuple(W.shape)})"
        )
    y = x @ W
    return y if b is None else y + b


def multi_head_attention(
    query: Array,
    key: Array,
    value: Array,
    params: AttentionParams,
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    attn_mask: Array | None = None,
    is_causal: bool = False,
    return_weights: bool = False,
    attention: str = "sdpa",
) -> Array | tuple[Array, Array]:
    """Multi-head attention with optional GQA/MQA (Vaswani et al. 2017, §3.2.2).

    query: (..., L, d_model), key: (..., S, d_k), value: (..., S, d_v); ``params`` from
    :func:`init_multi_head_params` (or :func:`multi_head_params_from_torch`).

    1. Project once and split into heads: Q (..., H, L, D), K and V (..., Hkv, S, D).
    2. Each query head i attends with key/value head i // (H / Hkv) (Hkv = H: classic MHA,
       Hkv = 1: MQA, in between: GQA) through :func:`scaled_dot_product_attention`.
    3. Concatenate the heads and apply W_o.

    ``attn_mask`` (True = attend, or float added) broadcasts to (..., H, L, S): an (L, S)
    mask, or a padding mask (B, 1, 1, S). ``attention="flash"`` computes step 2 with
    ``flash_attention`` instead (same result, weights not available).
    Returns (..., L, d_model), and the per-head weights (..., H, L, S) with ``return_weights``.
    """
    xp = array_namespace(query, key, value)
    for name, arr in (("query", query), ("key", key), ("value", value)):
        if not xp.isdtype(arr.dtype, "real floating"):
            raise TypeError(f"{name} must have a real floating dtype, got {arr.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_kv_heads={num_kv_heads} must be a positive divisor of num_heads={num_heads}"
        )
    if attention not in ("sdpa", "flash"):
        raise ValueError(f"attention must be 'sdpa' or 'flash', got {attention!r}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            f"key and value must share (..., S), got key {tuple(key.shape)} and value {tuple(value.shape)}"
        )
    q = split_heads(_project(query, params.W_q, params.b_q, "query (W_q)"), num_heads)
    k = split_heads(_project(key, params.W_k, params.b_k, "key (W_k)"), num_kv_heads)
    v = split_heads(_project(value, params.W_v, params.b_v, "value (W_v)"), num_kv_heads)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"query heads have size {q.shape[-1]} but key heads {k.shape[-1]}: "
            f"W_q {tuple(params.W_q.shape)} / {num_heads} heads vs W_k {tuple(params.W_k.shape)} / {num_kv_heads}"
        )
    gqa = num_kv_heads != num_heads
    if attention == "flash":
        if return_weights:
            raise ValueError("attention='flash' never forms the weights; use attention='sdpa' for them")
        from .flash import flash_attention

        heads = flash_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=gqa)
        weights = None
    else:
        heads, weights = scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=gqa, return_weights=True
        )
    out = _project(merge_heads(heads), params.W_o, params.b_o, "output (W_o)")
    out = xp.astype(out, query.dtype)
    return (out, xp.astype(weights, query.dtype)) if return_weights else out


def multi_head_params_from_torch(state_dict: Mapping[str, Any], num_heads: int) -> AttentionParams:
    """Parameters of a ``torch.nn.MultiheadAttention`` from its state_dict given as NumPy arrays.

    Reads ``in_proj_weight`` (3E, E) packing W_q, W_k, W_v in that order (or
    ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` when kdim/vdim differ from E),
    ``in_proj_bias`` (3E,), ``out_proj.weight`` (E, E) and ``out_proj.bias`` (E,). PyTorch stores
    (out, in); these are transposed to our (in, out). torch is never imported.

    With the result, ``multi_head_attention(q, k, v, params, num_heads)`` reproduces the module
    called with ``batch_first=True`` (and per-head weights with ``average_attn_weights=False``).
    Mind the masks: MultiheadAttention's boolean masks mean True = **ignore**, ours True = attend,
    so pass ``~key_padding_mask[:, None, None, :]`` or ``~attn_mask``.
    ``add_bias_kv`` (bias_k, bias_v) is not supported and raises ValueError.
    """
    import numpy as np

    sd = {name: np.asarray(value) for name, value in state_dict.items()}
    if "bias_k" in sd or "bias_v" in sd:
        raise ValueError("state_dict has bias_k/bias_v (add_bias_kv=True), which is not supported")
    if "out_proj.weight" not in sd:
        raise ValueError(f"state_dict has no 'out_proj.weight'; keys: {sorted(sd)}")
    embed_dim = sd["out_proj.weight"].shape[0]
    if embed_dim % num_heads != 0:
        raise ValueError(f"num_heads={num_heads} does not divide embed_dim={embed_dim}")
    if "in_proj_weight" in sd:
        w = sd["in_proj_weight"]
        if w.shape != (3 * embed_dim, embed_dim):
            raise ValueError(f"in_proj_weight must be (3E, E) = {(3 * embed_dim, embed_dim)}, got {w.shape}")
        w_q, w_k, w_v = w[:embed_dim], w[embed_dim : 2 * embed_dim], w[2 * embed_dim :]
    else:
        missing = [n for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight") if n not in sd]
        if missing:
            raise ValueError(f"state_dict has neither in_proj_weight nor {missing}")
        w_q, w_k, w_v = sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]
    b_q = b_k = b_v = None
    if "in_proj_bias" in sd:
        b = sd["in_proj_bias"]
        b_q, b_k, b_v = b[:embed_dim], b[embed_dim : 2 * embed_dim], b[2 * embed_dim :]
    return AttentionParams(
        W_q=w_q.T.copy(),
        W_k=w_k.T.copy(),
        W_v=w_v.T.copy(),
        W_o=sd["out_proj.weight"].T.copy(),
        b_q=b_q,
        b_k=b_k,
        b_v=b_v,
        b_o=sd.get("out_proj.bias"),
    )
