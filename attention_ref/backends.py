"""Choosing the array module (NumPy or CuPy), bringing arrays back to the host, and naming the
CPU the code runs on (every recorded timing quotes it).

The math in attention_ref never imports NumPy for its computations: it asks its inputs for their
namespace. The two array helpers are the only places that name a concrete array library.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np

BACKEND_ENV_VAR = "ATTENTION_REF_BACKEND"


def get_array_module(name: str | None = None) -> ModuleType:
    """Return the array module a notebook or script should create its inputs with.

    ``name`` is ``"numpy"`` or ``"cupy"``; when omitted, the environment variable
    ``ATTENTION_REF_BACKEND`` decides, and NumPy is the default. Asking for CuPy on a machine
    without it raises ``ImportError`` with the install hint.
    """
    name = (name or os.environ.get(BACKEND_ENV_VAR) or "numpy").strip().lower()
    if name == "numpy":
        return np
    if name == "cupy":
        try:
            import cupy
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise ImportError(
                f"{BACKEND_ENV_VAR}=cupy needs CuPy: pip install 'attention_ref[gpu]' "
                "(cupy-cuda12x) or cupy-cuda13x for CUDA 13"
            ) from exc
        return cupy
    raise ValueError(f"{BACKEND_ENV_VAR} must be 'numpy' or 'cupy', got {name!r}")


def to_numpy(x: Any) -> np.ndarray:
    """Copy any array (NumPy, CuPy, array-api-strict) to a NumPy array on the host.

    This is the one deliberate device-to-host transfer in the package: plotting and printing use
    it; the math never does.
    """
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        return x.get()
    try:
        return np.from_dlpack(x)
    except (TypeError, RuntimeError, AttributeError, BufferError):
        return np.asarray(x)


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
