import numpy as np
import pytest
from arrays import namespace_name, to_numpy

from attention_ref import (
    logsumexp,
    masked_softmax,
    merge_softmax_stats,
    online_softmax,
    softmax,
    softmax_stats,
)


def test_softmax_matches_definition_and_is_stable(xp, rng):
    x = rng.standard_normal((3, 7)) * 5
    got = softmax(xp.asarray(x))
    assert namespace_name(got) == namespace_name(xp.asarray(x))
    expected = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-12)
    big = softmax(xp.asarray(x + 1e4))  # exp(1e4) overflows without the max shift
    np.testing.assert_allclose(to_numpy(big), expected, rtol=1e-9)


def test_softmax_axis_and_float32(xp, rng):
    x = rng.standard_normal((4, 5)).astype(np.float32)
    got = softmax(xp.asarray(x), axis=0)
    assert got.dtype == xp.float32
    np.testing.assert_allclose(to_numpy(got).sum(0), 1.0, rtol=1e-6)


def test_logsumexp(xp, rng):
    x = rng.standard_normal((2, 9)) * 30
    got = to_numpy(logsumexp(xp.asarray(x)))
    np.testing.assert_allclose(got, np.log(np.exp(x).sum(-1)), rtol=1e-12)
    row = np.full((1, 4), -np.inf)
    assert to_numpy(logsumexp(xp.asarray(row)))[0] == -np.inf
    assert to_numpy(logsumexp(xp.asarray(x), keepdims=True)).shape == (2, 1)


def test_masked_softmax_zero_outside_mask_and_empty_rows(xp, rng):
    x = rng.standard_normal((3, 6))
    mask = rng.random((3, 6)) < 0.5
    mask[0] = False
    mask[1, 2] = True
    got = to_numpy(masked_softmax(xp.asarray(x), xp.asarray(mask)))
    assert np.all(got[~mask] == 0.0)
    np.testing.assert_array_equal(got[0], 0.0)
    for i in (1, 2):
        expected = np.exp(x[i][mask[i]]) / np.exp(x[i][mask[i]]).sum()
        np.testing.assert_allclose(got[i][mask[i]], expected, rtol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 64])
def test_online_softmax_equals_softmax(xp, rng, chunk):
    x = rng.standard_normal((5, 10)) * 4
    np.testing.assert_allclose(
        to_numpy(online_softmax(xp.asarray(x), chunk)), to_numpy(softmax(xp.asarray(x))), rtol=1e-12
    )


def test_merge_rule_equals_whole_row(xp, rng):
    x = rng.standard_normal((4, 11)) * 3
    m1, l1 = softmax_stats(xp.asarray(x[:, :5]))
    m2, l2 = softmax_stats(xp.asarray(x[:, 5:]))
    m, ell = merge_softmax_stats(m1, l1, m2, l2)
    np.testing.assert_allclose(to_numpy(m)[:, 0], x.max(-1))
    np.testing.assert_allclose(to_numpy(ell)[:, 0], np.exp(x - x.max(-1, keepdims=True)).sum(-1), rtol=1e-12)


def test_merge_rule_with_empty_chunks(xp):
    neg = xp.asarray([[-np.inf]])
    zero = xp.asarray([[0.0]])
    m, ell = merge_softmax_stats(neg, zero, neg, zero)
    assert to_numpy(m)[0, 0] == -np.inf and to_numpy(ell)[0, 0] == 0.0
    m, ell = merge_softmax_stats(neg, zero, xp.asarray([[2.0]]), xp.asarray([[3.0]]))
    assert to_numpy(m)[0, 0] == 2.0 and to_numpy(ell)[0, 0] == 3.0


def test_online_softmax_rejects_bad_chunk():
    with pytest.raises(ValueError, match="chunk_size"):
        online_softmax(np.ones((2, 3)), 0)


def test_all_minus_inf_rows_give_zero_without_warning(xp):
    row = xp.asarray([[-np.inf, -np.inf, -np.inf], [0.0, 1.0, -np.inf]])
    for got in (softmax(row), online_softmax(row, 2)):
        got = to_numpy(got)
        np.testing.assert_array_equal(got[0], 0.0)
        np.testing.assert_allclose(got[1].sum(), 1.0)


def test_masked_softmax_with_no_keys(xp):
    got = masked_softmax(xp.zeros((3, 0)), xp.ones((3, 0), dtype=xp.bool))
    assert tuple(got.shape) == (3, 0)
