"""An interactive attention explorer: pick a layer and a head, hover a token, see what it attends to.

Works offline everywhere: the JavaScript and CSS ship inside the package
(``attention_ref/static/explorer.js`` and ``explorer.css``) and load from no URL.

* ``explore(tokens, weights)`` — in a Jupyter kernel an ``anywidget`` widget (tested in
  JupyterLab 4.6), :class:`attention_ref.explorer_widget.AttentionExplorer`; elsewhere (no anywidget, no
  kernel, or ``ATTENTION_REF_EXPLORER=static`` in the environment) a :class:`StaticAttentionView`,
  a PNG of the same view drawn with :mod:`attention_ref.plotting`.
* ``export_html(tokens, weights, "out.html")`` — one self-contained HTML file (data, script and
  style inline; a Content-Security-Policy that forbids every request) that opens offline in a
  current browser (tested in Chromium) and runs the same script as the widget. From the shell:
  ``python -m attention_ref.show_heads "A sentence." --html out.html``.

weights: P of shape (layers, H, N, N), (H, N, N) or (N, N) — rows are queries, columns keys, each
row sums to 1 — from any backend (NumPy, CuPy); tokens: N strings.

The page and the widget offer: a layer menu; one head, the average of the layer's heads, or all
heads as small heatmaps; hover or click (to pin) a token to draw lines to the tokens it attends to
(width and colour by weight; "query → key" picks a query and shows its row of P, "key ← query"
picks a key and shows its column); the exact weight of a pair on hover; and hiding the sink tokens
([CLS], [SEP], BOS, …). Hidden sinks are *renormalised away*: their rows and columns are dropped and
each remaining row is divided by 1 − its weight on the sinks, because sinks often hold most of a
row's weight and would leave every other line too faint to read; the readout still gives the true
p_ij. The page says so wherever sinks are hidden.

Notebook recipe (what keeps nbval stable)
-----------------------------------------
End a cell with the explorer, nothing else in the cell's output::

    from attention_ref.explorer import explore

    explore(tokens, W, layer=3, head=1, selected=tokens.index("it"), title=sentence)

Its display bundle always holds three entries, whether it is the widget or the static fallback:

* ``text/plain`` — one fixed line, e.g. ``<attention explorer: 6 layers × 12 heads × 16 tokens;
  showing layer 3 · head 1, query → key>``. It depends only on the shapes and the options you
  passed — no numbers computed from the weights, no object address — so nbval compares it
  across machines and BLAS builds with no ``# NBVAL_IGNORE_OUTPUT`` and no sanitiser.
* ``image/png`` — the static picture of the initial view; nbval never compares PNGs, and
  GitHub, nbviewer and ``nbconvert`` (which cannot run widgets) show it.
* ``application/vnd.jupyter.widget-view+json`` (widget only) — a model id that is new on every
  run; nbval skips this MIME type by design, so it needs no marker either.

So: do not print the explorer object elsewhere in the cell, and do not put it in a cell whose other
output varies. Sizes, for MiniLM's 6 × 12 heads and 16 tokens: the PNG in the output is 20–70 kB
(one head; the grid of a layer). The output holds a random model id, so a re-executed notebook
changes on that line. ``nbclient`` (``make course``) also stores the widget state in the notebook's
metadata by default — the script and style (27 kB) and the weights as base64 (5.3 bytes per weight:
98 kB for MiniLM) per explorer; with it, JupyterLab shows a working explorer in a saved notebook
without running it (the explorer needs no kernel once drawn). ``NotebookClient(...,
store_widget_state=False)`` keeps notebooks small instead; JupyterLab then shows the explorer once
the cell is run. Pass only the layers a cell is about to keep notebooks small
(``explore(tokens, W[2:4], layer_names=["layer 2", "layer 3"])``). Keep N ≤ 60 tokens for readable
labels. The same recipe works for a decoder's causal weights (its BOS token is a sink: ``sinks=[0]``
if its token string is not one of :data:`SINK_TOKENS`) and for one head's (N, N) matrix.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .backends import to_numpy

Array = Any

VIEWS = ("head", "average", "grid")
DIRECTIONS = ("query", "key")
#: Token strings treated as attention sinks when ``sinks`` is not given.
SINK_TOKENS = frozenset({
    "[CLS]", "[SEP]", "[BOS]", "[EOS]", "<s>", "</s>", "<bos>", "<eos>", "<BOS>", "<EOS>",
    "<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>", "<|bos|>", "<|eos|>",
})
#: Weights above this many numbers are refused: the page would be too large to be useful.
MAX_WEIGHTS = 1 << 24
_ENV_STATIC = "ATTENTION_REF_EXPLORER"


def static_file(name: str) -> str:
    """The text of one of the explorer's bundled files (``explorer.js`` or ``explorer.css``)."""
    return resources.files("attention_ref").joinpath("static", name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- one contract


def _weights_as_4d(weights: Array) -> tuple[np.ndarray, np.ndarray]:
    """P on the host and as (layers, H, N, N); TypeError/ValueError naming ``weights``'s shape."""
    w = to_numpy(weights)
    if not isinstance(w, np.ndarray) or w.dtype.kind != "f":
        dtype = getattr(w, "dtype", type(w).__name__)
        raise TypeError(f"weights must be a real floating-point array, got dtype {dtype}")
    if w.ndim not in (2, 3, 4):
        raise ValueError(
            f"weights must have shape (layers, H, N, N), (H, N, N) or (N, N), got shape {w.shape}"
        )
    w4 = w.reshape((1,) * (4 - w.ndim) + w.shape)
    if w4.shape[-2] != w4.shape[-1]:
        raise ValueError(f"weights must be square in the last two axes (N, N), got shape {w.shape}")
    if w4.size > MAX_WEIGHTS:
        raise ValueError(
            f"weights has {w4.size} numbers (shape {w.shape}); the explorer takes at most "
            f"{MAX_WEIGHTS}: pass fewer layers or a shorter text"
        )
    if not np.all(np.isfinite(w4)) or (w4.size and float(w4.min()) < 0):
        raise ValueError("weights must be finite and non-negative (attention weights P)")
    return w, w4


def _index(value: int, size: int, name: str, shape: tuple[int, ...]) -> int:
    """An integer in [0, size) (a NumPy integer too, never a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not 0 <= value < size:
        raise ValueError(f"{name} must lie in [0, {size}) for weights of shape {shape}, got {value}")
    return int(value)


def _labels(values: Sequence[str] | None, size: int, name: str, shape: tuple[int, ...]) -> list[str]:
    """``size`` label strings, or [] for none."""
    if values is None:
        return []
    values = [str(v) for v in values]
    if len(values) != size:
        raise ValueError(f"{name} has {len(values)} entries but weights {shape} have {size}")
    return values


def explorer_state(
    tokens: Sequence[str],
    weights: Array,
    *,
    layer: int = 0,
    head: int = 0,
    view: str = "head",
    direction: str = "query",
    hide_sinks: bool = False,
    sinks: Sequence[int] | None = None,
    selected: int | None = None,
    title: str = "",
    layer_names: Sequence[str] | None = None,
    head_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Check the explorer's inputs and return its state: the widget's traits, the page's data.

    weights: (layers, H, N, N), (H, N, N) or (N, N), real floating point, finite, non-negative;
    tokens: N strings. ``weights`` in the result is P as float32 little-endian bytes (C order) and
    ``shape`` its 4-D shape; ``selected`` is -1 for no pinned token. Raises TypeError or ValueError
    naming the argument and the shapes seen.
    """
    w, w4 = _weights_as_4d(weights)
    num_layers, num_heads, n, _ = w4.shape
    if isinstance(tokens, str):
        raise TypeError("tokens must be a sequence of N token strings, not one string")
    tokens = [str(t) for t in tokens]
    if len(tokens) != n:
        raise ValueError(f"tokens has {len(tokens)} entries but weights {w.shape} have N = {n}")
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if sinks is None:
        sink_ids = [i for i, t in enumerate(tokens) if t in SINK_TOKENS]
    else:
        sink_ids = sorted({_index(i, n, "sinks", w.shape) for i in sinks})
    return {
        "tokens": tokens,
        "weights": np.ascontiguousarray(w4, dtype="<f4").tobytes(),
        "shape": [num_layers, num_heads, n, n],
        "layer": _index(layer, num_layers, "layer", w.shape),
        "head": _index(head, num_heads, "head", w.shape),
        "view": view,
        "direction": direction,
        "hide_sinks": bool(hide_sinks),
        "sinks": sink_ids,
        "selected": -1 if selected is None else _index(selected, n, "selected", w.shape),
        "title": str(title),
        "layer_names": _labels(layer_names, num_layers, "layer_names", w.shape),
        "head_names": _labels(head_names, num_heads, "head_names", w.shape),
    }


def state_weights(state: dict[str, Any]) -> np.ndarray:
    """P as a float32 array of shape (layers, H, N, N), read back from an explorer state."""
    return np.frombuffer(state["weights"], dtype="<f4").reshape(state["shape"])


def view_matrix(state: dict[str, Any]) -> tuple[np.ndarray, list[int]]:
    """The N' × N' matrix the explorer shows for the state's layer and head (or head average),
    and the token indices it keeps (all but the sinks when they are hidden; then each row is
    divided by its sum over the kept keys). The same rule as ``viewMatrix`` in explorer.js."""
    w = state_weights(state)[state["layer"]].astype(np.float64)
    m = w.mean(axis=0) if state["view"] != "head" else w[state["head"]]
    hidden = set(state["sinks"]) if state["hide_sinks"] else set()
    keep = [i for i in range(m.shape[0]) if i not in hidden]
    m = m[np.ix_(keep, keep)]
    if hidden:
        total = m.sum(axis=-1, keepdims=True)
        m = np.divide(m, total, out=np.zeros_like(m), where=total > 0)
    return m, keep


def _view_label(state: dict[str, Any]) -> str:
    num_layers, num_heads = state["shape"][:2]
    parts = []
    if state["layer_names"]:  # named layers are named even when only one is passed
        parts.append(state["layer_names"][state["layer"]])
    elif num_layers > 1:
        parts.append(f"layer {state['layer']}")
    if state["view"] == "grid" and num_heads > 1:
        parts.append("all heads")
    elif state["view"] == "average" and num_heads > 1:
        parts.append(f"average of {num_heads} heads")
    elif num_heads > 1:
        parts.append(state["head_names"][state["head"]] if state["head_names"] else f"head {state['head']}")
    return " · ".join(parts) or "the only head"


def summary(state: dict[str, Any]) -> str:
    """One line that names the explorer and its first view: the ``text/plain`` of its output.

    It depends on shapes and options only (never on the values of the weights), so a notebook's
    stored output is the same on every machine."""
    num_layers, num_heads, n, _ = state["shape"]
    arrow = "query → key" if state["direction"] == "query" else "key ← query"
    extra = ", sinks hidden" if state["hide_sinks"] and state["sinks"] else ""
    if state["selected"] >= 0:
        extra += f", token {state['selected']} pinned"
    return (f"<attention explorer: {num_layers} layer{'s' * (num_layers != 1)} × {num_heads} "
            f"head{'s' * (num_heads != 1)} × {n} tokens; showing {_view_label(state)}, {arrow}{extra}>")


# ----------------------------------------------------------------------------- static picture


def static_figure(state: dict[str, Any]) -> Any:
    """A matplotlib Figure of the state's view, drawn with :func:`attention_ref.plotting.plot_attention`
    on one colour scale from 0 to 1 — one head or the head average, or every head of the layer in a
    grid ("grid"). Not registered with pyplot, so a notebook does not show it a second time."""
    from matplotlib.figure import Figure

    from .plotting import plot_attention

    tokens = state["tokens"]
    num_heads = state["shape"][1]
    if state["view"] == "grid" and num_heads > 1:
        names = state["head_names"] or [f"head {h}" for h in range(num_heads)]
        panels = [view_matrix({**state, "view": "head", "head": h}) for h in range(num_heads)]
        keep = panels[0][1]
        labels = [tokens[i] for i in keep] if len(keep) <= 24 else None
        ncols = min(num_heads, 4)
        nrows = -(-num_heads // ncols)
        fig = Figure(figsize=(2.7 * ncols + 0.8, 2.6 * nrows + 0.6), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for h, ax in enumerate(axes.flat):
            if h >= num_heads:
                ax.axis("off")
                continue
            plot_attention(panels[h][0], labels, labels, ax=ax, title=names[h], colorbar=False, vmax=1.0)
            ax.title.set_fontsize(9)
            ax.tick_params(labelsize=6)
            if h % ncols:
                ax.set_ylabel("")
                ax.set_yticklabels([])
            if h < num_heads - ncols:
                ax.set_xlabel("")
                ax.set_xticklabels([])
        bar = fig.colorbar(axes.flat[0].images[0], ax=axes, shrink=0.6)
        bar.set_label("attention weight p" + (" (rescaled)" if state["hide_sinks"] and state["sinks"] else ""))
        fig.suptitle(_static_title(state), fontsize=10)
        return fig
    m, keep = view_matrix(state)
    labels = [tokens[i] for i in keep]
    size = min(0.3 * len(keep) + 2.2, 12.0)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    plot_attention(m, labels, labels, ax=ax, title=_static_title(state), vmax=1.0)
    fig.axes[-1].set_ylabel("attention weight p" + (" (rescaled)" if state["hide_sinks"] and state["sinks"] else ""))
    if state["selected"] in keep:
        from matplotlib.patches import Rectangle

        r = keep.index(state["selected"])
        box = ((-0.5, r - 0.5), len(keep), 1) if state["direction"] == "query" else ((r - 0.5, -0.5), 1, len(keep))
        ax.add_patch(Rectangle(*box, fill=False, edgecolor="#d95f02", linewidth=2))
    return fig


def _static_title(state: dict[str, Any]) -> str:
    title = _view_label(state)
    if state["hide_sinks"] and state["sinks"]:
        title += "\n(sinks hidden, rows rescaled to sum to 1)"
    if state["title"]:
        title = f"{state['title']}\n{title}"
    return title


def static_png(state: dict[str, Any], *, dpi: int = 80) -> bytes:
    """The static picture of the state's view as PNG bytes (byte-stable: no software stamp)."""
    fig = static_figure(state)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


class StaticAttentionView:
    """What :func:`explore` returns where widgets do not run: a PNG of the explorer's first view.

    Displays in a notebook as that PNG with the same ``text/plain`` line as the widget, so a
    notebook's stored outputs do not depend on whether anywidget was installed. ``figure()``
    returns the matplotlib Figure, ``save(path)`` writes the PNG, ``to_html(path)`` the page.
    """

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def figure(self) -> Any:
        return static_figure(self.state)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(static_png(self.state))
        return path

    def to_html(self, path: str | Path) -> Path:
        return write_html(self.state, path)

    def __repr__(self) -> str:
        return summary(self.state)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return {"text/plain": summary(self.state), "image/png": static_png(self.state)}


# ----------------------------------------------------------------------------- public API


def widgets_available() -> bool:
    """True inside a Jupyter kernel with anywidget installed, unless the environment variable
    ``ATTENTION_REF_EXPLORER=static`` asks for pictures (e.g. for a PDF build)."""
    if os.environ.get(_ENV_STATIC, "").strip().lower() == "static":
        return False
    try:
        import anywidget  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def explore(
    tokens: Sequence[str],
    weights: Array,
    *,
    layer: int = 0,
    head: int = 0,
    view: str = "head",
    direction: str = "query",
    hide_sinks: bool = False,
    sinks: Sequence[int] | None = None,
    selected: int | None = None,
    title: str = "",
    layer_names: Sequence[str] | None = None,
    head_names: Sequence[str] | None = None,
    static: bool | None = None,
) -> Any:
    """Explore attention weights P interactively; a static PNG where widgets cannot run.

    tokens: N strings; weights: (layers, H, N, N), (H, N, N) or (N, N), rows = queries.
    layer, head: the first view; view: "head" (one head), "average" (mean of the layer's heads)
    or "grid" (every head of the layer as a small heatmap); direction: "query" (pick a query, see
    the keys it attends to — a row of P) or "key" (pick a key, see the queries that attend to it —
    a column); hide_sinks: start with the sink tokens hidden and rows renormalised; sinks: their
    indices (default: tokens such as [CLS], [SEP], <s>, <|endoftext|>); selected: a token to pin;
    layer_names, head_names: labels. ``static=None`` returns the widget inside a Jupyter kernel
    with anywidget installed and a :class:`StaticAttentionView` otherwise; True or False forces it.

    Returns an :class:`~attention_ref.explorer_widget.AttentionExplorer` (its traits are the
    state: set ``w.layer = 2`` from Python, read ``w.selected`` after clicking) or a
    :class:`StaticAttentionView`.
    """
    state = explorer_state(
        tokens, weights, layer=layer, head=head, view=view, direction=direction,
        hide_sinks=hide_sinks, sinks=sinks, selected=selected, title=title,
        layer_names=layer_names, head_names=head_names,
    )
    if static is None:
        static = not widgets_available()
    if static:
        return StaticAttentionView(state)
    from .explorer_widget import AttentionExplorer

    return AttentionExplorer(**state)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>
body {{ margin: 16px; background: #ffffff; }}
{css}
</style>
</head>
<body>
<div id="attention-explorer"></div>
<noscript>This page needs JavaScript to draw the attention explorer.</noscript>
<script type="application/json" id="attention-explorer-data">{data}</script>
<script type="module">
{js}
// ---- this page's stand-in for anywidget's model: the same get / set / on / save_changes ----
const data = JSON.parse(document.getElementById("attention-explorer-data").textContent);
const bytes = Uint8Array.from(atob(data.weights), (c) => c.charCodeAt(0));
const state = {{ ...data, weights: new DataView(bytes.buffer) }};
const listeners = new Map();
const pageModel = {{
  get: (key) => state[key],
  set(key, value) {{
    if (state[key] === value) return;
    state[key] = value;
    for (const callback of listeners.get(`change:${{key}}`) || []) callback();
  }},
  on(name, callback) {{ listeners.set(name, [...(listeners.get(name) || []), callback]); }},
  off(name, callback) {{ listeners.set(name, (listeners.get(name) || []).filter((f) => f !== callback)); }},
  save_changes() {{}},
  send() {{}},
}};
window.attentionExplorerModel = pageModel;  // for scripted checks (tests) and the console
render({{ model: pageModel, el: document.getElementById("attention-explorer") }});
</script>
</body>
</html>
"""


def _json_for_script(value: Any) -> str:
    # Inside <script>, "</script>" or "<!--" in a token would end the block: escape every "<".
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c")


def page_html(state: dict[str, Any]) -> str:
    """The self-contained HTML page of an explorer state (see :func:`explorer_state`)."""
    data = {**state, "weights": base64.b64encode(state["weights"]).decode("ascii")}
    title = state["title"] or "attention explorer"
    return _PAGE.format(
        title=html.escape(title), css=static_file("explorer.css"), js=static_file("explorer.js"),
        data=_json_for_script(data),
    )


def write_html(state: dict[str, Any], path: str | Path) -> Path:
    """Write :func:`page_html` of ``state`` to ``path`` (creating its folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page_html(state), encoding="utf-8")
    return path


def explorer_html(tokens: Sequence[str], weights: Array, **options: Any) -> str:
    """The explorer as one self-contained HTML page (a string); options as for :func:`explore`."""
    return page_html(explorer_state(tokens, weights, **options))


def export_html(tokens: Sequence[str], weights: Array, path: str | Path, **options: Any) -> Path:
    """Write the explorer to ``path`` as one self-contained HTML file and return the path.

    Data, script and style are inline and the page's Content-Security-Policy forbids every
    request, so it opens offline in a current browser and behaves like the widget. Options as for
    :func:`explore` (layer, head, view, direction, hide_sinks, sinks, selected, title,
    layer_names, head_names)."""
    return write_html(explorer_state(tokens, weights, **options), path)
