"""Choosing the array module for notebooks, and bringing arrays back to the host."""

import numpy as np
import pytest

from attention_ref import get_array_module, to_numpy


def test_default_is_numpy(monkeypatch):
    monkeypatch.delenv("ATTENTION_REF_BACKEND", raising=False)
    assert get_array_module() is np


def test_environment_variable_is_read(monkeypatch):
    monkeypatch.setenv("ATTENTION_REF_BACKEND", "NumPy")
    assert get_array_module() is np
    monkeypatch.setenv("ATTENTION_REF_BACKEND", "jax")
    with pytest.raises(ValueError, match="ATTENTION_REF_BACKEND"):
        get_array_module()


def test_to_numpy_from_every_backend(xp):
    x = xp.asarray([[1.0, 2.0]])
    y = to_numpy(x)
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, [[1.0, 2.0]])


@pytest.mark.gpu
def test_cupy_backend_selected_by_environment(monkeypatch):
    cupy = pytest.importorskip("cupy")
    monkeypatch.setenv("ATTENTION_REF_BACKEND", "cupy")
    assert get_array_module() is cupy
