"""Sparsity layouts as numpy math: N:M masks, compliance checks, zero fractions.

N:M means: along the reduction axis, every group of M consecutive weights holds at most N
non-zeros (sparse tensor cores want 2:4 along the input-channel / K dimension). Masks keep the
N highest-scoring weights of each group; ties keep the lower index, so results are
deterministic.
"""

from __future__ import annotations

import numpy as np

# The N:M layouts `inspect` reports, tightest first.
KNOWN_NM = ((1, 4), (2, 4), (4, 8), (8, 16))


def zero_fraction(array: np.ndarray) -> float:
    """Fraction of exactly-zero entries."""
    if array.size == 0:
        return 0.0
    return float(np.count_nonzero(array == 0)) / array.size


def _groups(array: np.ndarray, m: int, axis: int) -> np.ndarray:
    """View ``array`` as (..., K // m, m) with the reduction axis last."""
    moved = np.moveaxis(array, axis, -1)
    k = moved.shape[-1]
    if k % m:
        raise ValueError(f"reduction size {k} is not divisible by M={m}")
    return moved.reshape(*moved.shape[:-1], k // m, m)


def nm_mask(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Boolean mask keeping the ``n`` largest ``scores`` in every group of ``m`` along ``axis``."""
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    axis = axis % scores.ndim
    groups = _groups(np.asarray(scores, dtype=np.float64), m, axis)
    # Stable sort of the negated scores: the largest first, ties by lower index.
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    moved_shape = np.moveaxis(scores, axis, -1).shape
    return np.moveaxis(keep.reshape(moved_shape), -1, axis)


def is_nm(array: np.ndarray, n: int, m: int, axis: int) -> bool:
    """True when every group of ``m`` along ``axis`` has at most ``n`` non-zeros."""
    axis = axis % array.ndim
    if array.shape[axis] % m:
        return False
    groups = _groups(array != 0, m, axis)
    return bool(np.all(groups.sum(axis=-1) <= n))


def nm_layouts(array: np.ndarray, axis: int) -> list[str]:
    """The known N:M layouts ``array`` complies with along ``axis``, e.g. ``["2:4", "4:8"]``."""
    return [f"{n}:{m}" for n, m in KNOWN_NM if is_nm(array, n, m, axis)]


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``."""
    n, sep, m = text.partition(":")
    if not sep:
        raise ValueError(f"expected N:M, got '{text}'")
    return int(n), int(m)
