"""Every notebook has a text twin (jupytext py:percent) that reviews read as a diff; the two must
hold the same cells. `make course` rewrites both; after editing a notebook by hand run
`.venv/bin/jupytext --sync notebooks/NAME.ipynb`."""

from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9]*.ipynb"))


def _cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in nb.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_the_text_twin_holds_the_same_cells(path):
    twin = path.with_suffix(".py")
    assert twin.exists(), f"{twin.name} is missing: run jupytext --sync {path.name}"
    notebook = nbformat.read(path, as_version=4)
    assert notebook.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
    text = jupytext.read(twin)
    assert _cells(text) == _cells(notebook), (
        f"{path.name} and {twin.name} differ: run `.venv/bin/jupytext --sync notebooks/{path.name}`"
    )
