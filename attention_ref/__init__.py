"""attention_ref: a readable, tested NumPy reference implementation of attention.

The course builds up one stage at a time; every public function lives in the module of its
stage and is importable from here:

====================  =====================================================
module                stage
====================  =====================================================
``bahdanau``          01 additive (Bahdanau) and Luong attention
``date_translator``   01 a trained toy translator whose alignments you can see
``softmax``           02 stable softmax, logsumexp, masked and online softmax
``masks``             02 boolean masks (True = attend)
``dot_product``       02 scaled dot-product attention (Vaswani et al. 2017)
``self_attention``    03 positional encoding, self- and cross-attention
``multi_head``        04 multi-head attention with GQA / MQA
``flash``             05 tiled FlashAttention (FA-1, FA-2), backward, IO counts
``flash_numba``       06 Numba-jitted tiled kernels (optional dependency)
``kv_cache``          07 KV-cache decoding, split-KV (Flash-Decoding)
``bert``              08 a real pretrained encoder (MiniLM) in NumPy
``positions``         09 rotary position embeddings (RoPE) and ALiBi
``llama``             09 a real pretrained decoder (SmolLM2, Llama architecture) in NumPy
``ring``              10 ring attention across MPI processes, and its simulator
``plotting``          heatmaps of attention weights used by every notebook
``explorer``          interactive explorer (Jupyter widget, offline HTML page)
``backends``          choosing NumPy or CuPy for the notebooks
``check``             homework: check a student's function, diagnose its mistake
``exercises``         student versions of the notebooks (``make exercises``)
``contract``          the input checks every public function shares
``export``            ``python -m attention_ref.export NAME``: a function as a NumPy-only file
====================  =====================================================

The core stages (02–04) are imported eagerly; everything else is resolved lazily, so
``import attention_ref`` needs only NumPy and array-api-compat, and optional dependencies (Numba,
matplotlib, tokenizers) are imported when first used. (``attention_ref.softmax`` and
``attention_ref.self_attention`` are the functions; their modules are reached with
``from attention_ref.softmax import ...``. Likewise ``attention_ref.generate`` is stage 09's
function; its command-line module runs as ``python -m attention_ref.generate``.)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it
_EXPORTS: dict[str, str] = {
    # backends
    "get_array_module": "backends",
    "to_numpy": "backends",
    # softmax (stage 02, reused by stage 05)
    "softmax": "softmax",
    "logsumexp": "softmax",
    "masked_softmax": "softmax",
    "softmax_stats": "softmax",
    "merge_softmax_stats": "softmax",
    "online_softmax": "softmax",
    # masks (stage 02)
    "causal_mask": "masks",
    "sliding_window_mask": "masks",
    "padding_mask": "masks",
    # scaled dot-product attention (stage 02)
    "scaled_dot_product_attention": "dot_product",
    # self- and cross-attention (stage 03)
    "sinusoidal_positional_encoding": "self_attention",
    "AttentionParams": "self_attention",
    "init_attention_params": "self_attention",
    "self_attention": "self_attention",
    "cross_attention": "self_attention",
    # multi-head attention (stage 04)
    "split_heads": "multi_head",
    "merge_heads": "multi_head",
    "init_multi_head_params": "multi_head",
    "multi_head_attention": "multi_head",
    "multi_head_params_from_torch": "multi_head",
    # plotting
    "plot_attention": "plotting",
    "plot_heads": "plotting",
    "save_figure": "plotting",
    # --- stage 01: Bahdanau (issue 3) ---
    "additive_score": "bahdanau",
    "additive_attention": "bahdanau",
    "luong_dot_score": "bahdanau",
    "luong_general_score": "bahdanau",
    "luong_concat_score": "bahdanau",
    "luong_score": "bahdanau",
    "luong_attention": "bahdanau",
    "luong_attentional_state": "bahdanau",
    "DateTranslator": "date_translator",
    "DATE_FORMATS": "date_translator",
    "format_date": "date_translator",
    "make_date_dataset": "date_translator",
    "init_date_translator": "date_translator",
    "load_date_translator": "date_translator",
    "save_date_translator": "date_translator",
    "translate": "date_translator",
    "exact_match_accuracy": "date_translator",
    "train_date_translator": "train_bahdanau",
    # --- stage 05: flash (issue 4) ---
    "flash_attention": "flash",
    "flash_attention_backward": "flash",
    "forward_fa2": "flash",
    "forward_fa1": "flash",
    "backward_fa2": "flash",
    "attention_backward": "flash",
    "merge_attention_partials": "flash",
    "attention_weights_from_lse": "flash",
    "expand_block_mask": "flash",
    "TileStats": "flash",
    "io_standard_forward": "io_model",
    "io_standard_backward": "io_model",
    "io_flash_forward": "io_model",
    "io_flash_backward": "io_model",
    "io_closed_form": "io_model",
    "sram_block_sizes": "io_model",
    "IOCount": "io_model",
    "SlowMemory": "io_model",
    # --- stage 07: KV cache ---
    "KVCache": "kv_cache",
    "empty_kv_cache": "kv_cache",
    "append_kv": "kv_cache",
    "truncate_kv": "kv_cache",
    "decode_step": "kv_cache",
    "split_kv_attention": "kv_cache",
    # --- stage 06: numba (issue 5) ---
    "numba_flash_forward": "flash_numba",
    "numba_flash_backward": "flash_numba",
    # --- stage 08: bert (issue 7) ---
    "load_bert": "bert",
    "encode": "bert",
    "encode_ids": "bert",
    "sentence_embedding": "bert",
    "tokenize": "bert",
    "mean_pooling": "bert",
    "bert_embeddings": "bert",
    "bert_layer": "bert",
    "layer_norm": "bert",
    "gelu": "bert",
    "BertConfig": "bert",
    "BertLayerParams": "bert",
    "BertModel": "bert",
    "BertOutput": "bert",
    # --- stage 09: positions and a real decoder (issue 14) ---
    "rope": "positions",
    "rope_frequencies": "positions",
    "rope_permutation": "positions",
    "alibi_slopes": "positions",
    "alibi_bias": "positions",
    "load_llama": "llama",
    "llama_forward": "llama",
    "llama_attention": "llama",
    "rope_decode_step": "llama",
    "generate": "llama",
    "apply_chat_template": "llama",
    "encode_prompt": "llama",
    "sample_token": "llama",
    "rms_norm": "llama",
    "silu": "llama",
    "swiglu": "llama",
    "GeneratedToken": "llama",
    "LlamaConfig": "llama",
    "LlamaLayerParams": "llama",
    "LlamaModel": "llama",
    # --- stage 10: ring attention (mpi4py is imported only by the command-line demo) ---
    "shard_spans": "ring",
    "shard": "ring",
    "local_shard": "ring",
    "unshard": "ring",
    "visible_chunk_pairs": "ring",
    "ring_attention_step": "ring",
    "ring_attention_backward_step": "ring",
    "ring_attention_sendrecv": "ring",
    "ring_attention": "ring",
    "ring_attention_backward": "ring",
    "simulate_ring_attention": "ring",
    "simulate_ring_attention_backward": "ring",
    "RingEvent": "ring",
    "RingStats": "ring",
    # --- attention explorer (issue 16): widget, static fallback, offline HTML ---
    "explore": "explorer",
    "export_html": "explorer",
    "explorer_html": "explorer",
    "StaticAttentionView": "explorer",
    "AttentionExplorer": "explorer_widget",
}

__all__ = sorted(_EXPORTS)

# Eager imports of the core. Binding the functions after the submodules load keeps
# ``attention_ref.softmax`` / ``attention_ref.self_attention`` the functions, not the modules.
from .backends import get_array_module, to_numpy  # noqa: E402
from .dot_product import scaled_dot_product_attention  # noqa: E402
from .masks import causal_mask, padding_mask, sliding_window_mask  # noqa: E402
from .multi_head import (  # noqa: E402
    init_multi_head_params,
    merge_heads,
    multi_head_attention,
    multi_head_params_from_torch,
    split_heads,
)
from .self_attention import (  # noqa: E402
    AttentionParams,
    cross_attention,
    init_attention_params,
    self_attention,
    sinusoidal_positional_encoding,
)
from .softmax import (  # noqa: E402
    logsumexp,
    masked_softmax,
    merge_softmax_stats,
    online_softmax,
    softmax,
    softmax_stats,
)


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'attention_ref' has no attribute {name!r}")
    module = importlib.import_module(f".{module_name}", __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
