"""The instrumented IO counts equal their closed forms, and the runs compute the right results."""

import math

import numpy as np
import pytest

from attention_ref import scaled_dot_product_attention
from attention_ref.flash import attention_backward, flash_attention
from attention_ref.io_model import (
    io_closed_form,
    io_flash_backward,
    io_flash_forward,
    io_standard_backward,
    io_standard_forward,
    sram_block_sizes,
)

CASES = [  # (L, S, d, dv, M): square, L ≠ S, blocks that do not divide the lengths, M = d, large M
    (16, 16, 4, 4, 64),
    (13, 17, 4, 3, 40),
    (7, 29, 5, 6, 5),
    (50, 20, 3, 3, 200),
    (33, 33, 8, 8, 1000),
]


@pytest.mark.parametrize("L, S, d, dv, M", CASES)
def test_counts_equal_closed_forms_and_results_are_exact(rng, L, S, d, dv, M):
    q, k, v = rng.standard_normal((L, d)), rng.standard_normal((S, d)), rng.standard_normal((S, dv))
    do = rng.standard_normal((L, dv))
    out, lse = flash_attention(q, k, v, return_lse=True)
    grads = attention_backward(q, k, v, do)

    run = io_standard_forward(q, k, v)
    assert (run.reads, run.writes) == io_closed_form("standard_forward", L, S, d, dv)
    np.testing.assert_allclose(run.result, out, rtol=1e-12)
    run = io_standard_backward(q, k, v, do)
    assert (run.reads, run.writes) == io_closed_form("standard_backward", L, S, d, dv)
    for g, r in zip(run.result, grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-11, atol=1e-13)
    for algorithm in ("fa1", "fa2"):
        run = io_flash_forward(q, k, v, M, algorithm=algorithm)
        assert (run.reads, run.writes) == io_closed_form(f"{algorithm}_forward", L, S, d, dv, M)
        np.testing.assert_allclose(run.result[0], out, rtol=1e-12)
        np.testing.assert_allclose(run.result[1], lse, rtol=1e-12)
        run = io_flash_backward(q, k, v, out, lse, do, M, algorithm=algorithm)
        assert (run.reads, run.writes) == io_closed_form(f"{algorithm}_backward", L, S, d, dv, M)
        for g, r in zip(run.result, grads, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-11, atol=1e-13)


def test_standard_counts_by_hand():
    # N = 4, d = 2: S = QKᵀ (read 8 + 8, write 16), P (read 16, write 16), O = PV (read 16 + 8, write 8)
    q = np.zeros((4, 2))
    run = io_standard_forward(q, q, q)
    assert (run.reads, run.writes, run.total) == (56, 40, 96)
    np.testing.assert_allclose(run.result, scaled_dot_product_attention(q, q, q))


def test_fa1_counts_by_hand():
    # N = 8, d = 2, M = 16: B_c = ⌈16/8⌉ = 2, B_r = min(2, 2) = 2, T_c = T_r = 4.
    # line 2 writes O, ℓ, m: 8·2 + 8 + 8 = 32; K_j, V_j: 32 reads; per tile Q_i, O_i, ℓ_i, m_i:
    # 2·(2 + 2 + 1 + 1) = 12 reads and 2·(2 + 1 + 1) = 8 writes, 16 tiles.
    q = np.ones((8, 2))
    run = io_flash_forward(q, q, q, 16, algorithm="fa1")
    assert (run.block_q, run.block_k) == (2, 2)
    assert (run.reads, run.writes) == (32 + 16 * 12, 32 + 16 * 8)


def test_block_sizes_follow_the_paper():
    assert sram_block_sizes(1024, 16) == (16, 16)  # B_c = ⌈1024/64⌉ = 16, B_r = min(16, 16)
    assert sram_block_sizes(4096, 16) == (16, 64)  # B_r capped at d
    assert sram_block_sizes(4096, 16, outer="q") == (64, 16)
    assert sram_block_sizes(10, 16) == (1, 1)
    with pytest.raises(ValueError, match="outer"):
        sram_block_sizes(64, 4, outer="rows")
    with pytest.raises(ValueError, match="sram_size"):
        sram_block_sizes(0, 4)


def test_theorem_2_scaling():
    d = 64
    for kind in ("fa1_forward", "fa2_forward", "fa1_backward", "fa2_backward"):
        # against N at fixed M: quadratic, like N²d²/M
        a, b = (sum(io_closed_form(kind, N, N, d, d, 100_000)) for N in (4096, 8192))
        assert 3.3 < b / a < 4.4
        # against M at fixed N: a 4× larger SRAM cuts the traffic by about 4× (while N²d²/M ≫ Nd)
        a, b = (sum(io_closed_form(kind, 8192, 8192, d, d, M)) for M in (4 * d * 8, 4 * d * 32))
        assert 3.0 < a / b < 4.4
        # and with a 100 KB-sized SRAM flash moves far fewer elements than standard attention
        assert sum(io_closed_form(kind, 8192, 8192, d, d, 100_000)) < sum(
            io_closed_form(kind.replace("fa1", "standard").replace("fa2", "standard"), 8192, 8192, d, d)
        )
    assert math.isclose(sum(io_closed_form("standard_forward", 8192, 8192, d, d)), 4 * 8192**2 + 4 * 8192 * d)


def test_bad_arguments_raise(rng):
    q = rng.standard_normal((2, 4, 3))
    with pytest.raises(ValueError, match="2-D"):
        io_standard_forward(q, q, q)
    with pytest.raises(ValueError, match="algorithm"):
        io_flash_forward(q[0], q[0], q[0], 16, algorithm="fa3")
    with pytest.raises(ValueError, match="sram_size"):
        io_closed_form("fa1_forward", 4, 4, 3)
    with pytest.raises(ValueError, match="kind"):
        io_closed_form("fa9", 4, 4, 3, sram_size=64)
