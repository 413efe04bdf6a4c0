"""The attention explorer as a Jupyter widget (anywidget); made by :func:`attention_ref.explore`.

Imports anywidget (the ``widget`` extra), so :mod:`attention_ref.explorer` keeps it out of the
way of the HTML export and the static fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anywidget
import traitlets

from .explorer import DIRECTIONS, VIEWS, explorer_state, static_png, summary, write_html

_STATIC = Path(__file__).resolve().parent / "static"


class AttentionExplorer(anywidget.AnyWidget):
    """Pick a layer and head, hover or click a token, see what it attends to (runs in the browser).

    Traits (synced with the page both ways): tokens, weights (P as float32 little-endian bytes,
    shape [layers, H, N, N]), shape, layer, head, view ("head" | "average" | "grid"), direction
    ("query" | "key"), hide_sinks, sinks, selected (-1 for none), title, layer_names, head_names.
    Build it with :func:`attention_ref.explore`, which checks the inputs.
    """

    _esm = _STATIC / "explorer.js"
    _css = _STATIC / "explorer.css"

    tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
    weights = traitlets.Bytes().tag(sync=True)
    shape = traitlets.List(traitlets.Int(), minlen=4, maxlen=4, default_value=[1, 1, 0, 0]).tag(sync=True)
    layer = traitlets.Int(0).tag(sync=True)
    head = traitlets.Int(0).tag(sync=True)
    view = traitlets.Enum(VIEWS, default_value="head").tag(sync=True)
    direction = traitlets.Enum(DIRECTIONS, default_value="query").tag(sync=True)
    hide_sinks = traitlets.Bool(False).tag(sync=True)
    sinks = traitlets.List(traitlets.Int()).tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)
    title = traitlets.Unicode("").tag(sync=True)
    layer_names = traitlets.List(traitlets.Unicode()).tag(sync=True)
    head_names = traitlets.List(traitlets.Unicode()).tag(sync=True)

    @traitlets.validate("layer", "head", "selected")
    def _check_index(self, proposal: Any) -> int:
        name, value = proposal["trait"].name, proposal["value"]
        size = {"layer": self.shape[0], "head": self.shape[1], "selected": self.shape[2]}[name]
        low = -1 if name == "selected" else 0
        if not low <= value < max(size, 1):
            raise traitlets.TraitError(f"{name} must lie in [{low}, {size}) for shape {self.shape}, got {value}")
        return value

    def state(self) -> dict[str, Any]:
        """The explorer's current state, as :func:`attention_ref.explorer.explorer_state` makes it."""
        keys = explorer_state.__kwdefaults__.keys() | {"tokens", "weights", "shape"}
        return {key: getattr(self, key) for key in keys}

    def update(self, tokens: Sequence[str], weights: Any, **options: Any) -> None:
        """Show other tokens and weights (a new sentence, say), checked like :func:`explore`, in
        one message to the page. Options (layer, head, view, ...) default to the current ones
        where they still fit, else to the first layer and head and no pinned token."""
        current = {key: getattr(self, key) for key in explorer_state.__kwdefaults__}
        current["selected"] = None if self.selected < 0 else self.selected
        current["layer_names"] = current["layer_names"] or None
        current["head_names"] = current["head_names"] or None
        current["sinks"] = None  # found again in the new tokens unless given
        try:
            state = explorer_state(tokens, weights, **{**current, **options})
        except ValueError:
            fresh = {"layer": 0, "head": 0, "selected": None, "layer_names": None, "head_names": None}
            state = explorer_state(tokens, weights, **{**current, **fresh, **options})
        with self.hold_sync(), self.hold_trait_notifications():
            for key, value in state.items():
                setattr(self, key, value)

    def to_html(self, path: str | Path) -> Path:
        """Write the current view as a self-contained HTML page; returns the path."""
        return write_html(self.state(), path)

    def __repr__(self) -> str:
        return summary(self.state())

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is None:
            return None
        data, metadata = bundle
        # Where widgets cannot run (GitHub, nbviewer, nbconvert) frontends show the PNG instead.
        data = {**data, "text/plain": summary(self.state()), "image/png": static_png(self.state())}
        return data, metadata
