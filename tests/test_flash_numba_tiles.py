"""Tile sizes of the fast Numba kernels (stage 06): the rule, the environment override, the
autotune stored on disk per machine and dtype, and how to see and reset the choice."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("numba")

from attention_ref import flash_numba  # noqa: E402
from attention_ref.dot_product import scaled_dot_product_attention  # noqa: E402
from attention_ref.flash_numba import (  # noqa: E402
    cpu_info,
    numba_flash_forward,
    reset_tile_sizes,
    tile_sizes,
    tune_tile_sizes,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets an empty tile cache of its own and no override."""
    monkeypatch.setenv("ATTENTION_REF_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ATTENTION_REF_TILES", raising=False)
    flash_numba._TILE_MEMO.clear()
    yield
    flash_numba._TILE_MEMO.clear()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rule_gives_power_of_two_tiles_that_fit_the_l2(dtype):
    choice = tile_sizes(dtype)
    bq, bk = choice["block_q"], choice["block_k"]
    assert choice["source"] == "rule" and "L2" in choice["reason"]
    assert bk >= 32 and bk & (bk - 1) == 0 and 16 <= bq <= 256
    assert np.dtype(dtype).name in choice["machine"]
    l2 = cpu_info()["l2_kib"] * 1024
    item = np.dtype(dtype).itemsize
    assert item * bq * bk <= flash_numba._L2_BUDGET * l2  # the logit tile alone fits the budget


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("override", [None, "48x128"])
def test_the_backward_pass_runs_on_the_forwards_tiles(dtype, override, monkeypatch):
    if override:
        monkeypatch.setenv("ATTENTION_REF_TILES", override)
    forward, backward = tile_sizes(dtype, "forward"), tile_sizes(dtype, "backward")
    assert (backward["block_q"], backward["block_k"]) == (forward["block_q"], forward["block_k"])
    assert backward["source"] == forward["source"] and backward["machine"] == forward["machine"]
    assert backward["reason"].startswith("the forward pass's tiles")
    assert backward["reason"].endswith(forward["reason"])


def test_rule_adapts_to_the_cache_size():
    big = flash_numba._tile_rule(np.float32, 2 * 1024**2, "avx512")
    small = flash_numba._tile_rule(np.float32, 256 * 1024, "avx2")
    assert big[:2] == (256, 512)
    assert small[0] * small[1] < big[0] * big[1]
    f32 = flash_numba._tile_rule(np.float32, 512 * 1024, "avx512")
    f64 = flash_numba._tile_rule(np.float64, 512 * 1024, "avx512")
    assert f64[0] * f64[1] < f32[0] * f32[1]  # twice the bytes per number: a smaller tile
    # a 1 MiB L2 (AMD Zen 4-5) takes the float64 forward's 256 x 512 tile: 1.8 MB, within twice it
    assert flash_numba._tile_rule(np.float64, 1024**2, "avx512")[:2] == (256, 512)


def test_cpu_info_names_the_machine():
    info = cpu_info()
    assert set(info) == {"cpu", "llvm_cpu", "isa", "blas", "blas_why", "vector_bits", "l2_kib", "threads"}
    assert info["isa"] in ("avx512", "avx2", "sse") and info["l2_kib"] > 0
    assert info["vector_bits"] == 256 or info["isa"] == "avx512"


def test_environment_fixes_the_tiles(monkeypatch):
    monkeypatch.setenv("ATTENTION_REF_TILES", "48x128")
    choice = tile_sizes(np.float32)
    assert (choice["block_q"], choice["block_k"], choice["source"]) == (48, 128, "environment")
    monkeypatch.setenv("ATTENTION_REF_TILES", "64x100")  # B_k must be a power of two
    with pytest.raises(ValueError, match="ATTENTION_REF_TILES"):
        tile_sizes(np.float32)


def test_bad_arguments():
    with pytest.raises(TypeError, match="dtype"):
        tile_sizes(np.int32)
    with pytest.raises(ValueError, match="direction"):
        tile_sizes(np.float32, "sideways")


def _rule(dtype=np.float32):
    return flash_numba._tile_rule(np.dtype(dtype), flash_numba._l2_bytes(), cpu_info()["isa"])[:2]


def test_autotune_is_stored_used_and_reset(tmp_path, monkeypatch):
    monkeypatch.setattr(flash_numba, "_AUTOTUNE_TILES", [(32, 64), (64, 128)])
    result = tune_tile_sizes(np.float32, seq_len=256, repeats=1)
    chosen = (result["block_q"], result["block_k"])
    assert chosen in {(32, 64), (64, 128), _rule()}
    assert result["ms"] == pytest.approx(result["forward_ms"] + result["backward_ms"])
    assert 0 < result["ms"] <= result["rule_ms"] < float("inf")  # the rule's tiles are timed too
    assert "the rule's {}x{}".format(*_rule()) in result["summary"]
    stored = json.loads((tmp_path / "tiles.json").read_text())
    key = tile_sizes(np.float32)["machine"]
    assert key in stored and stored[key]["tiles"]["block_q"] == result["block_q"]
    for direction in ("forward", "backward"):  # one choice for both passes
        choice = tile_sizes(np.float32, direction)
        assert choice["source"] == "autotune"
        assert (choice["block_q"], choice["block_k"]) == chosen
    assert tile_sizes(np.float64)["source"] == "rule"  # stored per dtype
    # the kernels run with the stored tiles and stay correct
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 150, 16)).astype(np.float32) for _ in range(3))
    out, _ = numba_flash_forward(q, k, v, is_causal=True)
    ref = scaled_dot_product_attention(q.astype(float), k.astype(float), v.astype(float),
                                       is_causal=True)
    assert np.max(np.abs(out - ref)) < 1e-5
    reset_tile_sizes()
    assert tile_sizes(np.float32)["source"] == "rule"
    assert key not in json.loads((tmp_path / "tiles.json").read_text())


def test_autotune_candidates_cover_the_scans_winners():
    # the fastest forward tiles benchmarks/scan_tiles.py found on the machines measured
    assert {(256, 512), (256, 1024)} <= set(flash_numba._AUTOTUNE_TILES)


def test_autotune_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setattr(flash_numba, "_AUTOTUNE_TILES", [(32, 64)])
    monkeypatch.setattr(flash_numba, "_AUTOTUNE_SEQ_LEN", 128)
    monkeypatch.setenv("ATTENTION_REF_TILES", "autotune")
    choice = tile_sizes(np.float32)
    assert choice["source"] == "autotune"
    assert (choice["block_q"], choice["block_k"]) in {(32, 64), _rule()}
    assert os.path.exists(tmp_path / "tiles.json")
