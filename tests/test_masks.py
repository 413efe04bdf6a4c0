import numpy as np
import pytest
from arrays import namespace_name, to_numpy

from attention_ref import causal_mask, padding_mask, sliding_window_mask


@pytest.mark.parametrize("L,S", [(1, 1), (4, 4), (3, 7), (7, 3), (1, 5)])
def test_causal_alignments_match_tril(L, S):
    np.testing.assert_array_equal(causal_mask(L, S), np.tril(np.ones((L, S), bool)))
    np.testing.assert_array_equal(
        causal_mask(L, S, "bottom_right"), np.tril(np.ones((L, S), bool), k=S - L)
    )


def test_masks_in_other_namespace(xp):
    m = causal_mask(3, 5, xp=xp)
    assert namespace_name(m) == namespace_name(xp.asarray([1]))
    w = sliding_window_mask(3, 5, 1, 1, xp=xp)
    assert w.dtype == xp.bool
    p = padding_mask(xp.asarray([2, 5]), 5, xp=xp)
    assert tuple(p.shape) == (2, 1, 1, 5)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("left,right", [(None, 0), (2, 0), (1, 1), (0, 0), (None, None), (3, None)])
def test_sliding_window_definition(alignment, left, right):
    L, S = 5, 8
    got = sliding_window_mask(L, S, left, right, alignment)
    offset = 0 if alignment == "top_left" else S - L
    for i in range(L):
        for j in range(S):
            p = i + offset
            ok = (left is None or j >= p - left) and (right is None or j <= p + right)
            assert got[i, j] == ok


def test_sliding_window_none_zero_is_causal():
    np.testing.assert_array_equal(sliding_window_mask(6, 9, None, 0, "bottom_right"), causal_mask(6, 9, "bottom_right"))


def test_padding_mask_values():
    got = padding_mask(np.array([0, 2, 4]), 4)
    assert got.shape == (3, 1, 1, 4)
    np.testing.assert_array_equal(to_numpy(got)[:, 0, 0], [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: causal_mask(3, 4, "diagonal"), ValueError, "alignment"),
        (lambda: causal_mask(-1, 4), ValueError, "L must"),
        (lambda: sliding_window_mask(3, 4, -1, 0), ValueError, "left"),
        (lambda: padding_mask(np.array([1, 5]), 4), ValueError, "lengths"),
        (lambda: padding_mask(np.array([[1]]), 4), ValueError, "1-D"),
        (lambda: padding_mask(np.array([1.5]), 4), TypeError, "integers"),
    ],
)
def test_mask_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_numpy_integers_accepted_and_bools_rejected():
    np.testing.assert_array_equal(causal_mask(np.int64(3), np.int32(4)), causal_mask(3, 4))
    with pytest.raises(TypeError, match="left"):
        sliding_window_mask(3, 4, True, 0)
