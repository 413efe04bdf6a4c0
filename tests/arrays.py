"""Helpers the tests share for comparing arrays of any tested backend (NumPy, array-api-strict,
CuPy). A plain module, not conftest.py: the repository has two conftest files, so importing one
by name would be ambiguous."""


def to_numpy(x):
    """Bring an array of any tested backend back to NumPy for comparison."""
    from attention_ref.backends import to_numpy as _to_numpy

    return _to_numpy(x)


def namespace_name(x) -> str:
    """'numpy', 'array_api_strict' or 'cupy': which library an array belongs to."""
    return type(x).__module__.split(".")[0]
