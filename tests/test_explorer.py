"""The attention explorer, Python side: one input contract, the state the page and the widget share,
the static fallback, the self-contained HTML page, the command line, and the notebook recipe's
stability under nbval. The page itself is driven in Chromium by tests/test_explorer_browser.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from attention_ref import softmax
from attention_ref.explorer import (
    MAX_WEIGHTS,
    StaticAttentionView,
    explore,
    explorer_html,
    explorer_state,
    export_html,
    page_html,
    state_weights,
    static_file,
    summary,
    view_matrix,
)

TOKENS = ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "[SEP]"]
PNG = b"\x89PNG\r\n\x1a\n"


def random_weights(rng, shape, dtype=np.float64):
    return softmax(rng.normal(size=shape) * 2).astype(dtype)


@pytest.fixture
def weights(rng):
    return random_weights(rng, (3, 4, len(TOKENS), len(TOKENS)))


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("shape", [(8, 8), (4, 8, 8), (3, 4, 8, 8)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_state_accepts_2d_3d_4d_weights_of_any_float_dtype(rng, shape, dtype):
    w = random_weights(rng, shape, dtype)
    before = w.copy()
    state = explorer_state(TOKENS, w)
    four_d = (1,) * (4 - len(shape)) + shape
    assert state["shape"] == list(four_d)
    np.testing.assert_array_equal(state_weights(state), w.astype(np.float32).reshape(four_d))
    np.testing.assert_array_equal(w, before)  # inputs are never modified
    assert state["sinks"] == [0, 7] and state["selected"] == -1 and state["tokens"] == TOKENS


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"weights": np.ones((8, 8), dtype=np.int64)}, TypeError, r"weights.*floating.*int64"),
        ({"weights": np.ones((8, 8), dtype=np.complex128)}, TypeError, r"weights.*complex128"),
        ({"weights": np.full((2, 3, 4, 8, 8), 1 / 8)}, ValueError, r"weights.*\(2, 3, 4, 8, 8\)"),
        ({"weights": np.full((8,), 1 / 8)}, ValueError, r"weights.*\(8,\)"),
        ({"weights": np.full((2, 8, 7), 1 / 7)}, ValueError, r"square.*\(2, 8, 7\)"),
        ({"weights": np.full((8, 8), np.nan)}, ValueError, r"finite and non-negative"),
        ({"weights": np.full((8, 8), -0.1)}, ValueError, r"finite and non-negative"),
        ({"tokens": TOKENS[:-1]}, ValueError, r"tokens has 7 entries.*N = 8"),
        ({"tokens": "the cat"}, TypeError, r"tokens must be a sequence"),
        ({"layer": 3}, ValueError, r"layer must lie in \[0, 3\).*\(3, 4, 8, 8\), got 3"),
        ({"head": -1}, ValueError, r"head must lie in \[0, 4\)"),
        ({"head": 1.0}, TypeError, r"head must be an integer"),
        ({"selected": 8}, ValueError, r"selected must lie in \[0, 8\)"),
        ({"sinks": [9]}, ValueError, r"sinks must lie in \[0, 8\)"),
        ({"view": "matrix"}, ValueError, r"view must be one of"),
        ({"direction": "both"}, ValueError, r"direction must be one of"),
        ({"layer_names": ["a", "b"]}, ValueError, r"layer_names has 2 entries.*have 3"),
        ({"head_names": ["a"]}, ValueError, r"head_names has 1 entries.*have 4"),
    ],
)
def test_bad_input_gets_the_same_clear_error_from_every_entry_point(weights, tmp_path, kwargs, error, match):
    kwargs = {"tokens": TOKENS, "weights": weights, **kwargs}
    tokens, w = kwargs.pop("tokens"), kwargs.pop("weights")
    for call in (
        lambda: explorer_state(tokens, w, **kwargs),
        lambda: explore(tokens, w, static=True, **kwargs),
        lambda: explorer_html(tokens, w, **kwargs),
        lambda: export_html(tokens, w, tmp_path / "x.html", **kwargs),
    ):
        with pytest.raises(error, match=match):
            call()
    assert not (tmp_path / "x.html").exists()


def test_too_many_weights_are_refused_before_anything_is_copied():
    huge = np.broadcast_to(np.float32(0.5), (MAX_WEIGHTS // 4 + 1, 2, 2))  # no memory behind it
    with pytest.raises(ValueError, match=r"at most \d+: pass fewer layers"):
        explorer_state(["a", "b"], huge)


def test_sinks_default_to_known_sink_tokens_and_can_be_given(weights):
    assert explorer_state(["a", "b"], np.full((2, 2), 0.5))["sinks"] == []
    gpt = ["<|endoftext|>", "Hello", "<s>", "</s>"]
    assert explorer_state(gpt, np.full((4, 4), 0.25))["sinks"] == [0, 2, 3]
    assert explorer_state(TOKENS, weights, sinks=[3, 0, 3])["sinks"] == [0, 3]
    assert explorer_state(TOKENS, weights, sinks=[])["sinks"] == []


# ----------------------------------------------------------------------------- what is shown


def test_view_matrix_is_the_head_the_average_or_the_renormalised_rows(weights):
    state = explorer_state(TOKENS, weights, layer=2, head=1)
    w32 = weights.astype(np.float32).astype(np.float64)
    m, keep = view_matrix(state)
    assert keep == list(range(8))
    np.testing.assert_allclose(m, w32[2, 1], rtol=0, atol=0)
    m, _ = view_matrix({**state, "view": "average"})
    np.testing.assert_allclose(m, w32[2].mean(0), rtol=1e-15)
    m, keep = view_matrix({**state, "hide_sinks": True})
    assert keep == [1, 2, 3, 4, 5, 6]
    block = w32[2, 1][np.ix_(keep, keep)]
    np.testing.assert_allclose(m, block / block.sum(-1, keepdims=True), rtol=1e-14)
    np.testing.assert_allclose(m.sum(-1), 1.0, rtol=1e-14)  # every shown row sums to 1 again


def test_a_row_entirely_on_the_sinks_shows_zeros_not_nan():
    w = np.zeros((3, 3))
    w[:, 0] = 1.0  # every query attends only to the sink
    m, keep = view_matrix(explorer_state(["[CLS]", "a", "b"], w, hide_sinks=True))
    assert keep == [1, 2] and np.array_equal(m, np.zeros((2, 2)))


def test_summary_names_shapes_and_options_but_no_weight_values(weights, rng):
    state = explorer_state(TOKENS, weights, layer=2, head=1)
    assert summary(state) == "<attention explorer: 3 layers × 4 heads × 8 tokens; showing layer 2 · head 1, query → key>"
    other = explorer_state(TOKENS, random_weights(rng, weights.shape), layer=2, head=1)
    assert summary(other) == summary(state)  # the text nbval compares never depends on the numbers
    assert summary(explorer_state(TOKENS, weights[0, 0], direction="key", hide_sinks=True, selected=2)) == (
        "<attention explorer: 1 layer × 1 head × 8 tokens; showing the only head, key ← query, "
        "sinks hidden, token 2 pinned>")
    named = explorer_state(TOKENS, weights, view="grid", layer_names=["first", "second", "third"])
    assert "showing first · all heads" in summary(named)
    assert "average of 4 heads" in summary(explorer_state(TOKENS, weights, view="average"))


@pytest.mark.parametrize("options", [{}, {"view": "grid"}, {"view": "average", "hide_sinks": True},
                                     {"selected": 3, "direction": "key"}])
def test_static_view_is_a_png_with_the_same_text_as_the_widget(weights, options):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures_before = plt.get_fignums()
    view = explore(TOKENS, weights, static=True, title="a title", **options)
    assert isinstance(view, StaticAttentionView)
    bundle = view._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "image/png"}
    assert bundle["text/plain"] == summary(view.state) == repr(view)
    assert bundle["image/png"].startswith(PNG)
    assert bundle["image/png"] == view._repr_mimebundle_()["image/png"]  # byte-stable
    assert plt.get_fignums() == figures_before  # nothing left for the inline backend to show twice


def test_static_view_saves_png_and_html(weights, tmp_path):
    pytest.importorskip("matplotlib")
    view = explore(TOKENS, weights, static=True)
    assert view.save(tmp_path / "sub" / "v.png").read_bytes().startswith(PNG)
    assert "attention-explorer-data" in view.to_html(tmp_path / "v.html").read_text()


def test_explore_outside_a_kernel_or_when_asked_gives_the_static_view(weights, monkeypatch):
    assert isinstance(explore(TOKENS, weights), StaticAttentionView)  # pytest is no Jupyter kernel
    monkeypatch.setenv("ATTENTION_REF_EXPLORER", "static")
    from attention_ref.explorer import widgets_available

    assert not widgets_available()


# ----------------------------------------------------------------------------- the widget


def test_widget_traits_hold_the_state_and_validate_indices(weights):
    pytest.importorskip("anywidget")
    import traitlets

    from attention_ref.explorer_widget import AttentionExplorer

    w = explore(TOKENS, weights, layer=1, head=2, selected=3, static=False, title="t")
    assert isinstance(w, AttentionExplorer)
    assert w.shape == [3, 4, 8, 8] and w.layer == 1 and w.head == 2 and w.selected == 3
    assert w.sinks == [0, 7] and w.tokens == TOKENS and w.title == "t"
    np.testing.assert_array_equal(state_weights(w.state()), weights.astype(np.float32))
    assert w.state() == explorer_state(TOKENS, weights, layer=1, head=2, selected=3, title="t")
    w.layer, w.head, w.selected, w.view = 2, 3, -1, "grid"
    for name, bad in [("layer", 3), ("head", 4), ("selected", 8), ("selected", -2), ("view", "x")]:
        with pytest.raises(traitlets.TraitError):
            setattr(w, name, bad)
    assert (w.layer, w.head, w.selected, w.view) == (2, 3, -1, "grid")
    # the script and style the front end receives are the package's bundled files
    assert w._esm == static_file("explorer.js") and w._css == static_file("explorer.css")


def test_widget_update_swaps_tokens_and_weights_in_one_step(weights, rng):
    pytest.importorskip("anywidget")
    w = explore(TOKENS, weights, layer=2, head=3, selected=6, view="average", static=False)
    messages = []
    w.comm.send = lambda data=None, **kw: messages.append(data)  # what would go to the page
    short = ["<s>", "a", "b"]
    w.update(short, random_weights(rng, (2, 2, 3, 3)))  # layer 2, head 3, token 6 no longer fit
    assert (w.tokens, w.shape, w.layer, w.head, w.selected) == (short, [2, 2, 3, 3], 0, 0, -1)
    assert w.view == "average" and w.sinks == [0]
    (message,) = messages  # one message: the page never sees new tokens with old weights
    assert {"tokens", "shape", "layer"} <= set(message["state"]) and message["buffer_paths"] == [["weights"]]
    w.update(TOKENS, weights, head=1, hide_sinks=True)  # options still fit: kept or given
    assert (w.layer, w.head, w.hide_sinks, w.sinks) == (0, 1, True, [0, 7])
    with pytest.raises(ValueError, match="tokens has 3 entries"):
        w.update(short, weights)
    assert w.tokens == TOKENS  # a refused update changes nothing


def test_widget_synced_state_carries_the_weights_as_one_binary_buffer(weights):
    pytest.importorskip("anywidget")
    from ipywidgets.widgets.widget import _remove_buffers

    w = explore(TOKENS, weights, static=False)
    state, buffer_paths, buffers = _remove_buffers(w.get_state())
    assert buffer_paths == [["weights"]]
    assert bytes(buffers[0]) == weights.astype("<f4").tobytes()
    json.dumps(state)  # everything else is plain JSON


def test_widget_output_is_the_widget_plus_the_static_fallback(weights):
    pytest.importorskip("anywidget")
    pytest.importorskip("matplotlib")
    w = explore(TOKENS, weights, layer=2, head=1, static=False)
    data, _ = w._repr_mimebundle_()
    assert set(data) == {"text/plain", "image/png", "application/vnd.jupyter.widget-view+json"}
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == w.model_id
    static = explore(TOKENS, weights, layer=2, head=1, static=True)._repr_mimebundle_()
    assert data["text/plain"] == static["text/plain"] == repr(w)
    assert data["image/png"] == static["image/png"]


# ----------------------------------------------------------------------------- the HTML page


def test_page_is_self_contained_and_runs_the_packaged_script(weights):
    page = explorer_html(TOKENS, weights, title="A <b>title</b>")
    assert static_file("explorer.js") in page and static_file("explorer.css") in page
    assert "default-src 'none'" in page  # the page's CSP forbids every request
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)  # no external resource
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page)  # the SVG namespace is a name
    assert "<title>A &lt;b&gt;title&lt;/b&gt;</title>" in page


def test_page_data_round_trips_and_cannot_break_out_of_its_script_block(weights):
    tokens = ["</script><script>alert(1)</script>", "<!--", "ok", "&amp;", "é", "中", '"', "\\"]
    page = explorer_html(tokens, weights, sinks=[])
    block = re.search(r'<script type="application/json" id="attention-explorer-data">(.*?)</script>', page, re.S)
    data = json.loads(block.group(1))
    assert data["tokens"] == tokens and "<" not in block.group(1)
    import base64

    assert base64.b64decode(data["weights"]) == weights.astype("<f4").tobytes()
    assert page.count("</script>") == 2  # only the data block and the module end a script


def test_bundled_script_is_plain_es_module_without_imports_or_urls():
    js = static_file("explorer.js")
    assert "export default { render }" in js
    assert not re.search(r"^\s*import\b|\bimport\(|\bfetch\(|XMLHttpRequest|WebSocket", js, re.M)
    assert "</script" not in js  # safe to inline
    assert len(js) < 40_000 and len(static_file("explorer.css")) < 10_000


def test_export_html_writes_the_page(weights, tmp_path):
    path = export_html(TOKENS, weights, tmp_path / "deep" / "p.html", view="grid")
    assert path == tmp_path / "deep" / "p.html"
    assert path.read_text(encoding="utf-8") == page_html(explorer_state(TOKENS, weights, view="grid"))


# ----------------------------------------------------------------------------- command line


def test_command_line_writes_the_html_page_for_a_sentence(tmp_path, rng):
    pytest.importorskip("tokenizers")
    from test_bert import _write_tiny_checkpoint

    from attention_ref.show_heads import main, sentence_attention

    _write_tiny_checkpoint(tmp_path / "tiny", rng)
    out = tmp_path / "page.html"
    assert main(["The cat sat on the mat.", "--html", str(out), "--checkpoint", str(tmp_path / "tiny"),
                 "--layers", "1"]) == 0
    assert not (tmp_path / "heads.png").exists() and not list(tmp_path.glob("*.png"))
    page = out.read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="attention-explorer-data">(.*?)</script>', page, re.S).group(1))
    tokens, w, layers = sentence_attention("The cat sat on the mat.", checkpoint=tmp_path / "tiny", layers=[1])
    assert data["tokens"] == tokens and data["layer_names"] == ["layer 1"] and layers == [1]
    assert data["shape"] == list(w.shape) and data["title"] == "The cat sat on the mat."
    with pytest.raises(SystemExit):
        main(["x", "--html", str(out), "--checkpoint", str(tmp_path / "tiny"), "--layers", "7"])


# ----------------------------------------------------------------------------- packaging


def test_explorer_imports_neither_anywidget_nor_matplotlib_until_needed():
    code = (
        "import sys, attention_ref; from attention_ref.explorer import explorer_html; "
        "import numpy as np; explorer_html(['a', 'b'], np.full((2, 2), 0.5)); "
        "bad = [m for m in ('anywidget', 'ipywidgets', 'matplotlib') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_static_files_are_package_data():
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    root = Path(__file__).resolve().parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for name in ("explorer.js", "explorer.css"):
        assert any((root / "attention_ref").glob(p) for p in patterns["attention_ref"] if p.startswith("static/"))
        assert any(Path("static", name).match(p) for p in patterns["attention_ref"]), name


# ----------------------------------------------------------------------------- notebooks


RECIPE = [
    "import numpy as np\n"
    "from attention_ref import softmax\n"
    "from attention_ref.explorer import explore\n"
    "tokens = ['[CLS]', 'the', 'cat', 'sat', '[SEP]']\n"
    "W = softmax(np.random.default_rng(0).normal(size=(2, 3, 5, 5)))",
    "explore(tokens, W, layer=1, head=2, selected=tokens.index('cat'), title='recipe')",
    "explore(tokens, W, view='grid', hide_sinks=True)",
]


@pytest.mark.slow
def test_notebook_recipe_is_stable_under_nbval_with_and_without_widgets(tmp_path):
    """Execute the module docstring's recipe as ``make course`` does (nbclient, widget state
    stored), then check it with nbval as ``make test`` does — once with widgets, once on a
    machine where they fall back to the static picture."""
    pytest.importorskip("anywidget")
    pytest.importorskip("matplotlib")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("nbval")

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in RECIPE])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    path = tmp_path / "recipe.ipynb"
    nbformat.write(nb, path)

    for cell in nb.cells[1:]:
        (output,) = cell.outputs
        assert output.output_type == "execute_result"
        assert set(output.data) == {"text/plain", "image/png", "application/vnd.jupyter.widget-view+json"}
    assert nb.cells[1].outputs[0].data["text/plain"] == (
        "<attention explorer: 2 layers × 3 heads × 5 tokens; showing layer 1 · head 2, query → key, "
        "token 2 pinned>")
    widget_state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert any(s["model_name"] == "AnyModel" for s in widget_state.values())

    for env in ({}, {"ATTENTION_REF_EXPLORER": "static"}):
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
             "--nbval-current-env", "--rootdir", str(tmp_path), str(path)],
            capture_output=True, text=True, cwd=tmp_path, env={**_environ(), **env}, timeout=300,
        )
        assert result.returncode == 0, f"{env}\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
        assert "3 passed" in result.stdout


def _environ() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "ATTENTION_REF_EXPLORER"}
