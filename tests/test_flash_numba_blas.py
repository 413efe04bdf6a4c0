"""The BLAS behind the fast kernels' tile products (stage 06): MKL when the ``mkl`` package is
installed and its code is as wide as Numba's, else SciPy's OpenBLAS, or what ``ATTENTION_REF_BLAS``
names. Every choice gives the
float64 reference's answer, forward and backward."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("scipy")

from attention_ref import flash_numba as fn  # noqa: E402
from attention_ref.dot_product import scaled_dot_product_attention  # noqa: E402
from attention_ref.flash import attention_backward  # noqa: E402

HAVE_MKL = fn._mkl() is not None
BLAS = ["openblas", pytest.param("mkl", marks=pytest.mark.skipif(
    not HAVE_MKL, reason="the mkl package is not installed (pip install attention_ref[mkl])"))]


@pytest.fixture
def blas(request, monkeypatch):
    monkeypatch.setenv("ATTENTION_REF_BLAS", request.param)
    return request.param


@pytest.mark.parametrize("blas", BLAS, indirect=True)
def test_cpu_info_names_the_blas_in_use(blas):
    assert fn.cpu_info()["blas"].startswith(blas)
    assert blas in fn.tile_sizes(np.float32)["machine"]


@pytest.mark.parametrize("blas", BLAS, indirect=True)
@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_backward_match_the_float64_reference(blas, dtype, tol, causal):
    rng = np.random.default_rng(7)
    # sizes that divide no tile; GQA (4 query heads on 2 KV heads); E != Ev
    q = rng.standard_normal((2, 4, 300, 24)).astype(dtype)
    k = rng.standard_normal((2, 2, 333, 24)).astype(dtype)
    v = rng.standard_normal((2, 2, 333, 40)).astype(dtype)
    do = rng.standard_normal((2, 4, 300, 40)).astype(dtype)
    out, lse = fn.numba_flash_forward(q, k, v, is_causal=causal, enable_gqa=True)
    grads = fn.numba_flash_backward(q, k, v, out, lse, do, is_causal=causal, enable_gqa=True)
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, do))
    ref_out = scaled_dot_product_attention(q64, k64, v64, is_causal=causal, enable_gqa=True)
    ref_grads = attention_backward(q64, k64, v64, do64, is_causal=causal, enable_gqa=True)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 10)


def test_unknown_choice_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("ATTENTION_REF_BLAS", "atlas")
    with pytest.raises(ValueError, match="ATTENTION_REF_BLAS.*'atlas'"):
        fn.numba_flash_forward(*(np.ones((1, 8, 4), np.float32),) * 3)


def test_mkl_asked_for_but_missing(monkeypatch):
    monkeypatch.setattr(fn, "_mkl", lambda: None)
    monkeypatch.setattr(fn, "_BLAS", None)
    monkeypatch.setenv("ATTENTION_REF_BLAS", "mkl")
    with pytest.raises(ValueError, match="pip install mkl"):
        fn.cpu_info()
    monkeypatch.setenv("ATTENTION_REF_BLAS", "auto")
    monkeypatch.setattr(fn, "_BLAS", None)
    info = fn.cpu_info()
    assert info["blas"].startswith("openblas") and "not installed" in info["blas_why"]
    monkeypatch.setattr(fn, "_BLAS", None)  # forget the choice made without MKL


@pytest.mark.parametrize("mkl_path, isa, keeps_up", [
    ("AVX-512", "avx512", True), ("AVX2", "avx2", True), ("AVX-512", "avx2", True),
    ("AVX2", "avx512", False), ("generic", "avx512", False), ("generic", "avx2", False),
    ("AVX", "avx2", False), ("generic", "sse", True)])
def test_mkl_is_used_only_where_its_code_is_as_wide_as_numbas(mkl_path, isa, keeps_up):
    assert fn._mkl_keeps_up(mkl_path, isa) is keeps_up


@pytest.mark.parametrize("mkl_path", ["generic", "AVX-512"])
def test_auto_skips_an_mkl_that_runs_narrower_code(monkeypatch, mkl_path):
    # MKL on a CPU it has no code path for (AMD's) runs its generic code: OpenBLAS instead
    fake = {"name": f"mkl-0.0:{mkl_path}", "path": mkl_path, "one_thread": True,
            "float32": 0, "float64": 0}
    monkeypatch.setattr(fn, "_mkl", lambda: fake)
    monkeypatch.setattr(fn, "_target_cpu", lambda: ("znver5", "avx512"))
    monkeypatch.setattr(fn, "_BLAS", None)
    monkeypatch.setenv("ATTENTION_REF_BLAS", "auto")
    info = fn.cpu_info()
    if mkl_path == "generic":
        assert info["blas"].startswith("openblas")
        assert "generic" in info["blas_why"] and "OpenBLAS" in info["blas_why"]
    else:
        assert info["blas"] == fake["name"] and "AVX-512" in info["blas_why"]
    monkeypatch.setenv("ATTENTION_REF_BLAS", "mkl")  # asked for by name: used whatever its code
    assert fn.cpu_info()["blas"] == fake["name"]
    assert fn.cpu_info()["blas_why"] == "ATTENTION_REF_BLAS=mkl"
    monkeypatch.setattr(fn, "_BLAS", None)  # forget the fake


def test_scipys_openblas_is_told_apart_from_numpys():
    # NumPy's wheel ships its OpenBLAS as numpy.libs/libscipy_openblas64_*.so: a match on the
    # file name "scipy" took either library for SciPy's, whichever threadpoolctl listed last
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import scipy.linalg.cython_blas  # noqa: F401  (loads SciPy's BLAS)

    infos = threadpoolctl.threadpool_info()
    scipy_blas = fn._package_blas("scipy", infos)
    numpy_blas = fn._package_blas("numpy", infos)
    assert scipy_blas is not None
    assert "numpy" not in scipy_blas["filepath"].rsplit("site-packages", 1)[-1]
    if numpy_blas is not None:
        assert numpy_blas["filepath"] != scipy_blas["filepath"]
    assert fn._package_blas("attention_ref", infos) is None  # ships no BLAS
    # in reversed order the same library is found
    assert fn._package_blas("scipy", infos[::-1])["filepath"] == scipy_blas["filepath"]
