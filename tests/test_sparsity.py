import numpy as np
import pytest

from sparsec.sparsity import is_nm, nm_layouts, nm_mask, parse_nm, zero_fraction


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (4, 8), (8, 16), (3, 8)])
@pytest.mark.parametrize("axis", [0, 1])
def test_nm_mask_keeps_n_largest_per_group(n, m, axis):
    scores = np.random.default_rng(1).standard_normal((32, 48)) ** 2
    mask = nm_mask(scores, n, m, axis)
    groups = np.moveaxis(mask, axis, -1).reshape(*np.moveaxis(mask, axis, -1).shape[:-1], -1, m)
    assert np.all(groups.sum(-1) == n)
    # Every kept score is >= every dropped score of its group.
    s = np.moveaxis(scores, axis, -1).reshape(groups.shape)
    kept_min = np.where(groups, s, np.inf).min(-1)
    dropped_max = np.where(~groups, s, -np.inf).max(-1)
    assert np.all(kept_min >= dropped_max)


def test_nm_mask_ties_keep_lower_index():
    mask = nm_mask(np.ones((1, 4)), 2, 4, axis=1)
    assert mask.tolist() == [[True, True, False, False]]


def test_nm_mask_rejects_bad_layouts():
    with pytest.raises(ValueError):
        nm_mask(np.ones((4, 4)), 4, 4, 1)
    with pytest.raises(ValueError, match="not divisible"):
        nm_mask(np.ones((4, 6)), 2, 4, 1)


def test_is_nm_and_layouts():
    w = np.array([[1, 0, 2, 0, 0, 0, 0, 3]], dtype=np.float32)
    assert is_nm(w, 2, 4, axis=1)
    assert not is_nm(w, 1, 4, axis=1)
    assert nm_layouts(w, axis=1) == ["2:4", "4:8"]
    assert not is_nm(w, 2, 4, axis=0)  # axis 0 has size 1, not divisible by 4
    assert nm_layouts(np.ones((4, 4)), axis=1) == []


def test_zero_fraction_and_parse():
    assert zero_fraction(np.array([0.0, 1.0, 0.0, 2.0])) == 0.5
    assert zero_fraction(np.zeros(0)) == 0.0
    assert parse_nm("2:4") == (2, 4)
    with pytest.raises(ValueError):
        parse_nm("24")
