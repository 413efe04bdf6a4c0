"""Pictures of attention weights, used by every notebook: a labelled heatmap and a grid of heads.

matplotlib is imported when a function is called, so the rest of the package never needs it.
Arrays from any backend (CuPy included) are copied to the host first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .backends import to_numpy

Array = Any


def plot_attention(
    weights: Array,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    *,
    ax: Any = None,
    title: str | None = None,
    annotate: bool = False,
    cmap: str = "viridis",
    colorbar: bool = True,
    vmin: float | None = 0.0,
    vmax: float | None = None,
) -> Any:
    """Heatmap of one weight matrix: rows = queries, columns = keys, with a colour bar.

    weights: (L, S). ``query_labels`` (L) and ``key_labels`` (S) name the ticks (tokens);
    ``annotate`` writes each weight in its cell (for small matrices). Returns the Axes.
    """
    import matplotlib.pyplot as plt

    w = to_numpy(weights)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D (queries, keys), got shape {w.shape}")
    if ax is None:
        L, S = w.shape
        _, ax = plt.subplots(figsize=(min(1.2 + 0.35 * S, 12), min(1.0 + 0.35 * L, 10)))
    image = ax.imshow(w, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    for labels, set_ticks, set_labels, n, name in (
        (query_labels, ax.set_yticks, ax.set_yticklabels, w.shape[0], "query_labels"),
        (key_labels, ax.set_xticks, ax.set_xticklabels, w.shape[1], "key_labels"),
    ):
        if labels is not None:
            if len(labels) != n:
                raise ValueError(f"{name} has {len(labels)} entries but weights have {n} along that axis")
            set_ticks(range(n))
            set_labels(list(labels), rotation=90 if set_ticks == ax.set_xticks else 0)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title)
    if annotate:
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color=_text_colour_on(image.cmap(image.norm(w[i, j]))))
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return ax


def _text_colour_on(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on the cell's own colour (its relative luminance,
    WCAG 2), so the choice follows the colour scale actually drawn, not the data's maximum."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if luminance > 0.179 else "white"


def plot_heads(
    weights: Array,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    *,
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    figsize: tuple[float, float] | None = None,
    cmap: str = "viridis",
) -> Any:
    """Grid of attention heads.

    weights: (H, L, S) — one panel per head, ``ncols`` per row — or (layers, H, L, S) — one row
    per layer, one column per head. Tick labels are drawn when there is room. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    w = to_numpy(weights)
    if w.ndim == 3:
        n = w.shape[0]
        ncols = ncols or min(n, 4)
        nrows = math.ceil(n / ncols)
        panels = [w[h] for h in range(n)]
        default_titles = [f"head {h}" for h in range(n)]
    elif w.ndim == 4:
        nrows, ncols = w.shape[0], w.shape[1]
        panels = [w[layer, h] for layer in range(nrows) for h in range(ncols)]
        default_titles = [f"L{layer} H{h}" for layer in range(nrows) for h in range(ncols)]
    else:
        raise ValueError(f"weights must be (H, L, S) or (layers, H, L, S), got shape {w.shape}")
    titles = list(titles) if titles is not None else default_titles
    if figsize is None:
        figsize = (2.6 * ncols, 2.4 * nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    show_labels = ncols <= 4 and panels[0].shape[1] <= 16
    for index, ax in enumerate(axes.flat):
        if index >= len(panels):
            ax.axis("off")
            continue
        ax.imshow(panels[index], cmap=cmap, vmin=0.0, aspect="auto", interpolation="nearest")
        ax.set_title(titles[index], fontsize=8)
        if show_labels and key_labels is not None:
            ax.set_xticks(range(len(key_labels)))
            ax.set_xticklabels(key_labels, rotation=90, fontsize=6)
        else:
            ax.set_xticks([])
        if show_labels and query_labels is not None and index % ncols == 0:
            ax.set_yticks(range(len(query_labels)))
            ax.set_yticklabels(query_labels, fontsize=6)
        else:
            ax.set_yticks([])
    fig.tight_layout()
    return fig


SAVE_FIGURES_ENV_VAR = "ATTENTION_REF_SAVE_FIGURES"


def save_figure(fig: Any, path: str | Path, *, dpi: int = 110, force: bool = False) -> Path:
    """Save a figure as PNG with byte-stable metadata (no software/date stamp), so re-running a
    notebook does not rewrite an unchanged figure in git. Creates the folder. Returns the path.

    With the environment variable ``ATTENTION_REF_SAVE_FIGURES=0`` nothing is written: ``make
    test`` sets it, so running the notebooks under nbval never rewrites the committed figures
    (some show measured times or memory, which differ from run to run). ``force=True`` writes
    anyway: for a file a user asked for by name (``show_heads --output``)."""
    path = Path(path)
    if not force and os.environ.get(SAVE_FIGURES_ENV_VAR, "1").strip() == "0":
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path
