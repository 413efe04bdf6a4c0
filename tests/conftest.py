"""Shared fixtures: array backends and random generators.

``xp`` runs a test on NumPy, on array-api-strict (a CPU stand-in that rejects non-portable
code) and on CuPy when CuPy and a CUDA device are present (marked ``gpu``; skipped otherwise
with the reason shown).
"""

from __future__ import annotations

import numpy as np
import pytest


def _cupy_skip_reason() -> str | None:
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'attention_ref[gpu]')"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as exc:  # CUDA driver missing or broken
        return f"no usable CUDA device: {exc}"
    return None


BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("array_api_strict", id="strict"),
    pytest.param(
        "cupy",
        id="cupy",
        marks=[pytest.mark.gpu],
    ),
]


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array namespace under test."""
    name = request.param
    if name == "numpy":
        return np
    if name == "array_api_strict":
        return pytest.importorskip("array_api_strict")
    reason = _cupy_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    import cupy

    return cupy


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
