"""plot_attention writes each annotation in the colour that reads on its own cell."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")


def test_annotation_colour_follows_the_colour_scale_not_the_data_maximum():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attention_ref.plotting import plot_attention

    # With vmax = 1 and the largest weight 0.3, every cell is dark purple in viridis: the old rule
    # (black above 0.6 × the data maximum) wrote black on dark purple.
    weights = np.array([[0.05, 0.3], [0.2, 0.1]])
    ax = plot_attention(weights, annotate=True, vmax=1.0)
    assert {text.get_color() for text in ax.texts} == {"white"}
    ax = plot_attention(np.array([[0.95, 0.02]]), annotate=True, vmax=1.0)
    assert [text.get_color() for text in ax.texts] == ["black", "white"]
    plt.close("all")


def test_save_figure_writes_nothing_when_told_not_to(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attention_ref.plotting import save_figure

    fig, _ = plt.subplots()
    monkeypatch.setenv("ATTENTION_REF_SAVE_FIGURES", "0")
    assert not save_figure(fig, tmp_path / "a.png").exists()
    monkeypatch.setenv("ATTENTION_REF_SAVE_FIGURES", "1")
    first = save_figure(fig, tmp_path / "b.png").read_bytes()
    assert save_figure(fig, tmp_path / "c.png").read_bytes() == first  # byte-stable
    plt.close(fig)
