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


# --- Layouts -------------------------------------------------------------------------------
# A layout works on a weight in canonical matrix form: (rows, K), one row per output feature,
# the reduction axis K last (see LinearWeight.to_matrix). Masks are True where a weight stays.


class Layout:
    """A sparsity layout: what shapes admit it, how to test compliance, how to choose a mask."""

    name = "layout"
    group = 1  # columns a SparseGPT sweep must treat together

    def admits(self, rows: int, cols: int) -> str | None:
        """None when a (rows, cols) matrix can take the layout, else why not."""
        return None

    def complies(self, matrix: np.ndarray) -> bool:
        raise NotImplementedError

    def mask(self, scores: np.ndarray, per_row: bool = False) -> np.ndarray:
        """Keep-mask from non-negative scores (higher = more important)."""
        raise NotImplementedError

    def sparsity(self) -> float:
        raise NotImplementedError


class NMLayout(Layout):
    """At most N non-zeros in every M consecutive weights along K."""

    def __init__(self, n: int, m: int) -> None:
        self.n, self.m = n, m
        self.name = f"{n}:{m}"
        self.group = m

    def admits(self, rows: int, cols: int) -> str | None:
        return None if cols % self.m == 0 else f"reduction size {cols} is not divisible by m={self.m}"

    def complies(self, matrix: np.ndarray) -> bool:
        return is_nm(matrix, self.n, self.m, axis=1)

    def mask(self, scores: np.ndarray, per_row: bool = False) -> np.ndarray:
        return nm_mask(scores, self.n, self.m, axis=1)

    def sparsity(self) -> float:
        return 1 - self.n / self.m


def _keep_top(scores: np.ndarray, keep: int) -> np.ndarray:
    """Mask of the ``keep`` largest entries of a 1-D array (ties: lower index first)."""
    mask = np.zeros(scores.shape, dtype=bool)
    if keep > 0:
        order = np.argsort(-scores, kind="stable")
        mask[order[:keep]] = True
    return mask


class UnstructuredLayout(Layout):
    """A fraction of zeros anywhere."""

    def __init__(self, sparsity: float) -> None:
        self.target = sparsity
        self.name = f"{sparsity:.0%} unstructured"

    def complies(self, matrix: np.ndarray) -> bool:
        # Masks round the number of zeros per layer or per row: allow that rounding.
        return zero_fraction(matrix) >= self.target - 0.5 / matrix.shape[-1] - 1e-9

    def mask(self, scores: np.ndarray, per_row: bool = False) -> np.ndarray:
        if per_row:  # Wanda: compare weights of the same output only
            keep = scores.shape[1] - int(round(self.target * scores.shape[1]))
            return np.stack([_keep_top(row, keep) for row in scores])
        keep = scores.size - int(round(self.target * scores.size))
        return _keep_top(scores.ravel(), keep).reshape(scores.shape)

    def sparsity(self) -> float:
        return self.target


class BlockLayout(Layout):
    """Whole (block_rows x block_cols) tiles are zero; a fraction of the tiles."""

    def __init__(self, block_rows: int, block_cols: int, sparsity: float) -> None:
        self.br, self.bc, self.target = block_rows, block_cols, sparsity
        self.name = f"{block_rows}x{block_cols} blocks {sparsity:.0%}"
        self.group = block_cols

    def admits(self, rows: int, cols: int) -> str | None:
        if rows % self.br or cols % self.bc:
            return f"shape {rows}x{cols} is not divisible into {self.br}x{self.bc} blocks"
        return None

    def tiles(self, matrix: np.ndarray) -> np.ndarray:
        """(rows/br, cols/bc, br, bc) view of the tiles."""
        r, c = matrix.shape
        return matrix.reshape(r // self.br, self.br, c // self.bc, self.bc).swapaxes(1, 2)

    def complies(self, matrix: np.ndarray) -> bool:
        if self.admits(*matrix.shape):
            return False
        zero_tiles = ~np.any(self.tiles(matrix) != 0, axis=(2, 3))
        return zero_tiles.mean() >= self.target - 1e-9

    def mask(self, scores: np.ndarray, per_row: bool = False) -> np.ndarray:
        tile_scores = self.tiles(scores).sum(axis=(2, 3))
        layout = UnstructuredLayout(self.target)
        keep_tiles = layout.mask(tile_scores, per_row=per_row)
        full = np.repeat(np.repeat(keep_tiles, self.br, axis=0), self.bc, axis=1)
        return full

    def sparsity(self) -> float:
        return self.target
