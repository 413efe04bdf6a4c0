"""Stage 04: multi-head attention (Vaswani et al. 2017, §3.2.2) with grouped-query (GQA, Ainslie
et al. 2023) and multi-query (MQA, Shazeer 2019) variants.

    MultiHead(Q, K, V) = Concat(head_1, …, head_H) W^O,   head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

The H projections W_i^Q are stored side by side as one (d_model, H·E) matrix, so projecting
once and splitting the last axis into heads is the same as H separate projections.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from array_api_compat import array_namespace

from .contract import check_bool, check_choice, check_float_arrays, check_int
from .dot_product import scaled_dot_product_attention
from .self_attention import AttentionParams, glorot_params, project

Array = Any


def split_heads(x: Array, num_heads: int) -> Array:
    """Split the feature axis into heads: (..., L, H·E) → (..., H, L, E).

    Export with ``python -m attention_ref.export split_heads``.
    """
    check_float_arrays(2, "(..., L, H·E)", x=x)
    num_heads = check_int("num_heads", num_heads, 1)
    *batch, L, width = x.shape
    if width % num_heads != 0:
        raise ValueError(f"num_heads={num_heads} does not divide the feature size {width} of shape {tuple(x.shape)}")
    xp = array_namespace(x)
    return xp.moveaxis(xp.reshape(x, (*batch, L, num_heads, width // num_heads)), -2, -3)


def merge_heads(x: Array) -> Array:
    """Concatenate the heads back along the features: (..., H, L, E) → (..., L, H·E).

    Export with ``python -m attention_ref.export merge_heads``.
    """
    check_float_arrays(3, "(..., H, L, E)", x=x)
    *batch, H, L, E = x.shape
    xp = array_namespace(x)
    return xp.reshape(xp.moveaxis(x, -3, -2), (*batch, L, H * E))


def init_multi_head_params(
    rng: Any, d_model: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
    kdim: int | None = None, vdim: int | None = None, bias: bool = True, dtype: Any = None,
) -> AttentionParams:
    """Random parameters for multi-head attention (Glorot uniform weights, zero biases).

    W_q: (d_model, H·E), W_k: (kdim, Hkv·E), W_v: (vdim, Hkv·E), W_o: (H·E, d_model) with
    E = head_dim (default d_model // H) and Hkv = num_kv_heads (default H; 1 gives MQA).
    rng is a ``numpy.random.Generator``; arrays are NumPy of ``dtype`` (float64 by default).
    Export with ``python -m attention_ref.export init_multi_head_params``.
    """
    d_model, num_heads = check_int("d_model", d_model, 1), check_int("num_heads", num_heads, 1)
    num_kv_heads = _check_kv_heads(num_heads, num_kv_heads)
    if head_dim is None and d_model % num_heads != 0:
        raise ValueError(f"num_heads={num_heads} does not divide d_model={d_model}; pass head_dim")
    E = d_model // num_heads if head_dim is None else check_int("head_dim", head_dim, 1)
    kdim, vdim = (d_model if n is None else check_int(name, n, 1) for name, n in (("kdim", kdim), ("vdim", vdim)))
    H, Hkv = num_heads, num_kv_heads
    shapes = ((d_model, H * E), (kdim, Hkv * E), (vdim, Hkv * E), (H * E, d_model))
    check_bool(bias=bias)
    return glorot_params(rng, shapes, bias, dtype)


def _check_kv_heads(num_heads: int, num_kv_heads: Any) -> int:
    """Hkv (default H) must be a positive divisor of H."""
    num_kv_heads = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads, 1)
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_kv_heads={num_kv_heads} must be a positive divisor of num_heads={num_heads}")
    return num_kv_heads


def _check_multi_head(query: Array, key: Array, value: Array, num_heads: Any, num_kv_heads: Any,
                      attn_mask: Any, is_causal: Any, return_weights: Any, attention: Any) -> tuple[int, int]:
    """The checks of multi_head_attention that step 3's attention cannot make; returns (H, Hkv)."""
    check_float_arrays(2, "(..., L, features)", query=query, key=key, value=value)
    num_heads = check_int("num_heads", num_heads, 1)
    check_choice("attention", attention, ("sdpa", "flash"))
    check_bool(is_causal=is_causal, return_weights=return_weights)
    if is_causal and attn_mask is not None:
        raise ValueError("pass either attn_mask or is_causal=True, not both")
    if return_weights and attention == "flash":
        raise ValueError("attention='flash' never forms the weights; use attention='sdpa' for them")
    return num_heads, _check_kv_heads(num_heads, num_kv_heads)


def multi_head_attention(
    query: Array, key: Array, value: Array, params: AttentionParams, num_heads: int, *,
    num_kv_heads: int | None = None, attn_mask: Array | None = None, is_causal: bool = False,
    return_weights: bool = False, attention: str = "sdpa",
) -> Array | tuple[Array, Array]:
    """Multi-head attention with optional GQA/MQA (Vaswani et al. 2017, §3.2.2).

    query (..., L, d_model), key (..., S, kdim), value (..., S, vdim); params from
    init_multi_head_params or multi_head_params_from_torch. Query head i attends with key/value head
    i // (H / Hkv): Hkv = H is MHA, Hkv = 1 MQA, in between GQA. attn_mask (A or Δ) broadcasts to
    (..., H, L, S), e.g. (L, S) or a padding mask (B, 1, 1, S); not with is_causal. attention="flash":
    step 3 by flash_attention (no weights). Returns (..., L, d_model), and the weights (..., H, L, S)
    with return_weights. Export with ``python -m attention_ref.export multi_head_attention``.
    """
    H, Hkv = _check_multi_head(query, key, value, num_heads, num_kv_heads, attn_mask, is_causal,
                               return_weights, attention)
    xp = array_namespace(query, key, value)
    # 1. project once, all heads side by side                        # (..., L, H·E), (..., S, Hkv·E)
    q = project(query, params.W_q, params.b_q, "query (W_q)")
    k = project(key, params.W_k, params.b_k, "key (W_k)")
    v = project(value, params.W_v, params.b_v, "value (W_v)")
    # 2. split the features into heads                               # (..., H, L, E), (..., Hkv, S, E)
    q, k, v = split_heads(q, H), split_heads(k, Hkv), split_heads(v, Hkv)
    # 3. attend: query head i with key/value head i // (H / Hkv)      # (..., H, L, E), (..., H, L, S)
    if attention == "flash":  # export: omit
        from .flash import flash_attention

        heads = flash_attention(q, k, v, attn_mask, is_causal, enable_gqa=Hkv != H)
        return xp.astype(project(merge_heads(heads), params.W_o, params.b_o, "output (W_o)"), query.dtype)
    heads, weights = scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal, enable_gqa=Hkv != H,
                                                  return_weights=True)
    # 4. concatenate the heads and 5. project: Concat(head_1, …, head_H) W_o + b_o    # (..., L, d_model)
    out = xp.astype(project(merge_heads(heads), params.W_o, params.b_o, "output (W_o)"), query.dtype)
    return (out, xp.astype(weights, query.dtype)) if return_weights else out


def multi_head_params_from_torch(state_dict: Mapping[str, Any], num_heads: int) -> AttentionParams:
    """Parameters of a ``torch.nn.MultiheadAttention`` from its state_dict given as NumPy arrays.

    Reads ``in_proj_weight`` (3·d_model, d_model) packing W_q, W_k, W_v in that order (or
    ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` when kdim/vdim differ from d_model),
    ``in_proj_bias`` (3·d_model,), ``out_proj.weight`` (d_model, d_model) and ``out_proj.bias``
    (d_model,); PyTorch calls d_model embed_dim. PyTorch stores (out, in); these are transposed
    to our (in, out). torch is never imported.

    With the result, ``multi_head_attention(q, k, v, params, num_heads)`` reproduces the module
    called with ``batch_first=True`` (and per-head weights with ``average_attn_weights=False``).
    Mind the masks: MultiheadAttention's boolean masks mean True = **ignore**, ours True = attend,
    so pass ``~key_padding_mask[:, None, None, :]`` or ``~attn_mask``.
    ``add_bias_kv`` (bias_k, bias_v) is not supported and raises ValueError.
    Export with ``python -m attention_ref.export multi_head_params_from_torch``.
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
            raise ValueError(f"in_proj_weight must be (3·embed_dim, embed_dim) = {(3 * embed_dim, embed_dim)}, "
                             f"got {w.shape}")
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
