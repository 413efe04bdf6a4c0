"""Stage 09's checker batteries (``rope``, ``rope_decode_step``): the library passes, and each
classic mistake, written as a student would, fails with that mistake's diagnosis."""

from __future__ import annotations

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.check import check


def _rope_halves(x, positions, theta, *, exponent=2.0, sign=1.0, plus=False):
    E = x.shape[-1]
    i = np.arange(E // 2)
    angle = sign * np.asarray(positions)[:, None] * theta ** (-exponent * i / E)
    c, s = np.cos(angle), np.sin(angle)
    a, b = x[..., : E // 2], x[..., E // 2 :]
    first = a * c + b * s if plus else a * c - b * s
    return np.concatenate([first, b * c + a * s], -1).astype(x.dtype)


def test_a_students_rope_passes():
    def rope(x, positions, theta=10000.0):
        return _rope_halves(x, positions, theta)

    assert check(rope, "rope").passed


ROPE_MISTAKES = {
    "neighbouring pairs (2f, 2f + 1) rotated instead of the halves":
        lambda x, positions, theta=10000.0: ar.rope(x, positions, theta=theta, interleaved=True),
    "rotated the wrong way": lambda x, positions, theta=10000.0: _rope_halves(x, positions, theta, sign=-1.0),
    "the minus sign of the rotation is missing": lambda x, positions, theta=10000.0: _rope_halves(x, positions, theta, plus=True),
    "frequencies θ^(−f/E) instead of θ^(−2f/E)": lambda x, positions, theta=10000.0: _rope_halves(x, positions, theta, exponent=1.0),
    "positions ignored": lambda x, positions, theta=10000.0: _rope_halves(x, np.arange(len(positions)), theta),
}


@pytest.mark.parametrize("title", sorted(ROPE_MISTAKES))
def test_rope_mistakes_are_diagnosed(title):
    result = check(ROPE_MISTAKES[title], "rope")
    assert not result.passed
    assert title in result.report(), result.report()


def _positions(cache, q_new, start=None):
    t = cache.length if start is None else start
    return np.arange(t, t + q_new.shape[-2])


def step_from_zero(q_new, k_new, v_new, cache, theta=10000.0, enable_gqa=False):
    pos = _positions(cache, q_new, start=0)
    return ar.decode_step(ar.rope(q_new, pos, theta=theta), ar.rope(k_new, pos, theta=theta), v_new, cache,
                          enable_gqa=enable_gqa)


def step_caches_unrotated_keys(q_new, k_new, v_new, cache, theta=10000.0, enable_gqa=False):
    pos = _positions(cache, q_new)
    out, _ = ar.decode_step(ar.rope(q_new, pos, theta=theta), ar.rope(k_new, pos, theta=theta), v_new, cache,
                            enable_gqa=enable_gqa)
    return out, ar.append_kv(cache, k_new, v_new)


def step_rotates_the_cache_again(q_new, k_new, v_new, cache, theta=10000.0, enable_gqa=False):
    old = ar.KVCache(ar.rope(cache.keys, np.arange(cache.length), theta=theta), cache.values)
    pos = _positions(cache, q_new)
    return ar.decode_step(ar.rope(q_new, pos, theta=theta), ar.rope(k_new, pos, theta=theta), v_new, old,
                          enable_gqa=enable_gqa)


@pytest.mark.parametrize("fn, title", [
    (step_from_zero, "the new tokens are rotated as if at positions 0, 1, …"),
    (step_caches_unrotated_keys, "the keys are cached before they are rotated"),
    (step_rotates_the_cache_again, "the cached keys are rotated again"),
])
def test_rope_decode_step_mistakes_are_diagnosed(fn, title):
    result = check(fn, "rope_decode_step")
    assert not result.passed
    assert title in result.report(), result.report()


def test_a_students_rope_decode_step_passes():
    def rope_decode_step(q_new, k_new, v_new, cache, theta=10000.0):
        pos = _positions(cache, q_new)
        return ar.decode_step(ar.rope(q_new, pos, theta=theta), ar.rope(k_new, pos, theta=theta), v_new, cache)

    result = check(rope_decode_step, "rope_decode_step")
    assert result.passed, result.report()
