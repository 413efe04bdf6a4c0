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
    vmax: float = 1.0,
) -> Any:
    """Grid of attention heads on one colour scale [0, vmax], with one colour bar for all panels.

    weights: (H, L, S) — one panel per head, ``ncols`` per row — or (layers, H, L, S) — one row
    per layer, one column per head. Query labels go down the left column and key labels along the
    bottom row (every panel shares them) when there are at most 40 of each. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    panels, titles, nrows, ncols = _head_panels(to_numpy(weights), titles, ncols)
    if figsize is None:
        figsize = (2.4 * ncols + 1.0, 2.3 * nrows + 0.6)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, layout="constrained")
    L, S = panels[0].shape
    for index, ax in enumerate(axes.flat):
        if index >= len(panels):
            ax.axis("off")
            continue
        image = ax.imshow(panels[index], cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto",
                          interpolation="nearest")
        ax.set_title(titles[index], fontsize=8)
        row, col = divmod(index, ncols)
        bottom = row == nrows - 1 or index + ncols >= len(panels)
        ax.set_xticks(range(S) if bottom and key_labels is not None and S <= 40 else [])
        if bottom and key_labels is not None and S <= 40:
            ax.set_xticklabels(key_labels, rotation=90, fontsize=6)
        ax.set_yticks(range(L) if col == 0 and query_labels is not None and L <= 40 else [])
        if col == 0 and query_labels is not None and L <= 40:
            ax.set_yticklabels(query_labels, fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight p (same scale in every panel)")
    return fig


def _head_panels(w: Any, titles: Sequence[str] | None, ncols: int | None) -> tuple[list, list, int, int]:
    """The (L, S) panels of an (H, L, S) or (layers, H, L, S) array, their titles and grid shape."""
    if w.ndim == 3:
        ncols = ncols or min(w.shape[0], 4)
        panels = [w[h] for h in range(w.shape[0])]
        default = [f"head {h}" for h in range(w.shape[0])]
    elif w.ndim == 4:
        ncols = w.shape[1]
        panels = [w[layer, h] for layer in range(w.shape[0]) for h in range(w.shape[1])]
        default = [f"layer {layer} head {h}" for layer in range(w.shape[0]) for h in range(w.shape[1])]
    else:
        raise ValueError(f"weights must be (H, L, S) or (layers, H, L, S), got shape {w.shape}")
    return panels, list(titles) if titles is not None else default, math.ceil(len(panels) / ncols), ncols


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
