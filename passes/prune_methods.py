"""How a pruning pass scores and prunes one weight: magnitude, Wanda, SparseGPT.

All three work on a weight in canonical matrix form W (rows, K) and a :class:`Layout`:

* magnitude -- keep the largest |W| (layer-wise for unstructured, as usually published);
* Wanda (Sun et al. 2023) -- keep the largest |W_ij| * ||X_j||, comparing weights of the same
  output row; X are the layer's calibration inputs, ||X_j|| the norm of input feature j;
* SparseGPT (Frantar & Alistarh 2023) -- optimal-brain-surgeon pruning with the Hessian
  H = X^T X: columns are swept left to right in blocks, the mask is chosen adaptively per block
  (per group of M for N:M), and the error of each pruned weight is pushed onto the weights not
  yet visited, so the layer's output is reconstructed. Dampening adds ``damp * mean(diag H)``.

Two options apply on top of any method (the options ``refine`` and ``rank`` / ``rank_ratio`` of
the pruning passes):

* DSnoT mask refinement (:mod:`sparsec.passes.refine`) -- grow/prune swaps within rows (N:M
  groups) that lower the layer's error on the calibration inputs; needs the Gram matrix H;
* sparse + low-rank (OATS, :mod:`sparsec.passes.lowrank`) -- W ~ S + U V: the low-rank term
  is found first, then the method prunes W - U V.

The heavy math of SparseGPT (Hessian accumulation, the Cholesky solves, the sweep) runs in
torch, on CUDA when present, else on the CPU; Wanda and magnitude are numpy.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sparsec.errors import InputError
from sparsec.sparsity import BlockLayout, Layout, NMLayout, UnstructuredLayout

from .patterns import Code, LinearWeight, MatchFailure

METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")  # methods that need calibration data


@dataclass
class PruneResult:
    """A keep-mask in canonical form, new values when the method reconstructs (SparseGPT) or
    prunes a residual (low-rank), the low-rank factors (canonical W ~ values + u @ v), and
    figures of the refinement."""

    mask: np.ndarray
    values: np.ndarray | None = None
    u: np.ndarray | None = None
    v: np.ndarray | None = None
    figures: dict | None = None


def needs_calibration(method: str) -> bool:
    return method in CALIBRATED


# --- calibration statistics ------------------------------------------------------------------

def supports(site: LinearWeight, method: str) -> MatchFailure | None:
    """Calibration methods need the layer's inputs as a (tokens, K) matrix; say when we cannot."""
    if not needs_calibration(method):
        return None
    rank = len(site.weight.shape)
    if site.op == "MatMul" and (site.input_index == 0 or rank != 2):
        return MatchFailure(Code.METHOD_UNSUPPORTED, f"{method} supports 2-D MatMul weights on the right"
                            " (X @ W) only; this one is batched or on the left", site.node)
    if site.op == "Conv":
        group = site.node.attributes.get("group")
        if (group is not None and int(group.value) != 1) or rank != 4:
            return MatchFailure(Code.METHOD_UNSUPPORTED, f"{method} supports 2-D convolutions with"
                                " group=1 only", site.node)
    readers = site.weight.readers
    if len(readers) > 1:
        return MatchFailure(Code.SHARED_WEIGHT, f"{method} needs one reader per weight;"
                            f" '{site.weight.name}' has {len(readers)}", site.node)
    return None


def _conv_columns(site: LinearWeight, x: np.ndarray) -> np.ndarray:
    """im2col of a Conv input in canonical column order (kh, kw, c_in)."""
    import torch
    import torch.nn.functional as F

    attrs = site.node.attributes
    kh, kw = site.weight.shape[2:]

    def ints(name: str, default: list[int]) -> list[int]:
        attr = attrs.get(name)
        return list(attr.value) if attr is not None else default

    pads = ints("pads", [0, 0, 0, 0])
    if attrs.get("auto_pad") is not None and attrs["auto_pad"].value not in ("NOTSET", b"NOTSET"):
        raise InputError(f"{site.node.name}: auto_pad convolutions are not supported for calibration")
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t = F.pad(t, (pads[1], pads[3], pads[0], pads[2]))
    cols = F.unfold(t, (kh, kw), dilation=ints("dilations", [1, 1]), stride=ints("strides", [1, 1]))
    b, _, length = cols.shape
    cin = site.weight.shape[1]
    cols = cols.reshape(b, cin, kh * kw, length).permute(0, 3, 2, 1).reshape(-1, kh * kw * cin)
    return cols.numpy()


def activation_matrix(site: LinearWeight, x: np.ndarray, feed: Mapping[str, np.ndarray]) -> np.ndarray:
    """The layer's input as (tokens, K), matching the canonical weight columns.

    Padding tokens (attention_mask == 0 in the input set) are dropped.
    """
    if site.op == "Conv":
        return _conv_columns(site, x)
    if site.op == "Gemm":
        trans_a = site.node.attributes.get("transA")
        return (x.T if trans_a is not None and int(trans_a.value) else x).astype(np.float32)
    mask = feed.get("attention_mask")
    k = x.shape[-1]
    if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
        return x[mask.astype(bool)].reshape(-1, k).astype(np.float32)
    return x.reshape(-1, k).astype(np.float32)


def statistic_key(site: LinearWeight) -> object:
    """Sites reading one value with the same key see the same activation matrix."""
    if site.op == "Conv":
        return id(site.node)
    if site.op == "Gemm":
        trans_a = site.node.attributes.get("transA")
        return ("Gemm", int(trans_a.value) if trans_a is not None else 0)
    return "MatMul"


def group_statistics(group: list[LinearWeight], feeds, inputs, make, dense_inputs=None) -> dict[object, object]:
    """Accumulate one statistic per :func:`statistic_key` over the input sets of a group of
    sites reading one value; ``make(k)`` creates a statistic for K input features.

    ``inputs`` (and ``dense_inputs``, the same value in the dense model) yield that value per
    input set, in the order of ``feeds``.
    """
    stats: dict[object, object] = {}
    dense = dense_inputs if dense_inputs is not None else iter(lambda: None, 0)
    for feed, x, x_dense in zip(feeds, inputs, dense):
        done = set()
        for site in group:
            key = statistic_key(site)
            if key in done:
                continue
            done.add(key)
            cols = activation_matrix(site, x, feed)
            stat = stats.setdefault(key, make(cols.shape[1]))
            if x_dense is None:
                stat.add(cols)
            else:
                stat.add(cols, activation_matrix(site, x_dense, feed))
    return stats


class ColumnNorms:
    """Wanda's statistic: the squared L2 norm of each input feature over all tokens."""

    def __init__(self, k: int) -> None:
        self.sq = np.zeros(k, dtype=np.float64)
        self.tokens = 0

    def add(self, x: np.ndarray) -> None:
        self.sq += np.einsum("tk,tk->k", x, x, dtype=np.float64)
        self.tokens += x.shape[0]


class Hessian:
    """SparseGPT's statistic: H = 2/n * sum x x^T, accumulated in torch (float32) on ``device``.

    With dense targets it also accumulates C = 2/n * sum x x_dense^T, the cross term between
    the pruned model's inputs x and the dense model's inputs x_dense of the same layer.
    """

    def __init__(self, k: int, device: str) -> None:
        import torch

        self.device = torch.device(device)
        self.h = torch.zeros(k, k, dtype=torch.float32, device=self.device)
        self.cross = None
        self.tokens = 0

    def add(self, x: np.ndarray, x_dense: np.ndarray | None = None) -> None:
        import torch

        if not x.shape[0]:
            return
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        n = self.tokens + x.shape[0]
        # Running mean, as in the SparseGPT reference, so H stays well scaled.
        scale = (2.0 / n) ** 0.5
        self.h *= self.tokens / n
        self.h += (t * scale).T @ (t * scale)
        if x_dense is not None:
            d = torch.from_numpy(np.ascontiguousarray(x_dense)).to(self.device)
            if self.cross is None:
                self.cross = torch.zeros_like(self.h)
            self.cross *= self.tokens / n
            self.cross += (t * scale).T @ (d * scale)
        self.tokens = n

    def output_energy(self, w: np.ndarray, delta: np.ndarray) -> tuple[float, float]:
        """(sum of dW H dW^T, sum of W H W^T) over some rows of W: the squared norms of X dW^T
        and X W^T over the calibration inputs X, up to H's common factor. In double, a band of
        H's rows at a time (a whole double copy of an 8192^2 H is 512 MiB)."""
        import torch

        wt = torch.from_numpy(np.ascontiguousarray(w)).to(self.device).double()
        dt = torch.from_numpy(np.ascontiguousarray(delta)).to(self.device).double()
        num = den = 0.0
        for i in range(0, self.h.shape[0], 1024):
            band = self.h[i:i + 1024].double()
            num += float(((dt[:, i:i + 1024] @ band) * dt).sum())
            den += float(((wt[:, i:i + 1024] @ band) * wt).sum())
        return num, den


def new_statistic(method: str, k: int, device: str, gram: bool = False):
    """The statistic ``method`` needs; ``gram``: a Hessian (X^T X) anyway (for refinement)."""
    return ColumnNorms(k) if method == "wanda" and not gram else Hessian(k, device)


def column_norms(statistic) -> np.ndarray:
    """||X_j|| per input feature (up to one common factor) from either statistic."""
    if isinstance(statistic, ColumnNorms):
        return np.sqrt(statistic.sq).astype(np.float32)
    return np.sqrt(np.clip(statistic.h.diagonal().cpu().numpy(), 0, None)).astype(np.float32)


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when torch sees a GPU, else cpu. Call it before solves run in threads:
    on cuda it makes torch load its linear-algebra libraries here (:func:`warm_cuda_linalg`)."""
    if device == "auto":
        try:
            import torch
        except ImportError:
            return "cpu"
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        warm_cuda_linalg()
    return device


@functools.lru_cache(maxsize=1)
def warm_cuda_linalg() -> None:
    """One torch.linalg call on the GPU, in this thread. torch loads its CUDA linear-algebra
    libraries lazily and that first load is not thread-safe: SparseGPT solves of one stage started
    in threads on a fresh process failed with "lazy wrapper should be called at most once" (on an
    H200, 7 of 8 threads, every time; 0 after this call; pytorch issue 90613)."""
    import torch

    torch.linalg.cholesky(torch.eye(2, device="cuda"))


# --- the methods -----------------------------------------------------------------------------

def prune_matrix(method: str, matrix: np.ndarray, layout: Layout, statistic=None, *,
                 blocksize: int = 128, damp: float = 0.01, refine: str = "none", refine_iters: int = 50,
                 rank: int = 0, lowrank_iters: int = 20) -> PruneResult:
    """Prune a canonical (rows, K) float matrix into ``layout`` with ``method``; with ``rank``, as
    a sparse part plus a rank-``rank`` term (OATS); with ``refine="dsnot"``, refine the mask."""
    from . import lowrank as lowrank_mod
    from . import refine as refine_mod

    u = v = None
    target = matrix
    if rank:
        scale = column_norms(statistic) if statistic is not None else None
        device = statistic.h.device if isinstance(statistic, Hessian) else "cpu"
        u, v = lowrank_mod.decompose(matrix, layout, rank, scale, per_row=method != "magnitude",
                                     iters=lowrank_iters, device=device)
        target = (matrix - u @ v).astype(np.float32)
    result = _prune(method, target, layout, statistic, blocksize=blocksize, damp=damp)
    if refine == "dsnot":
        values = result.values if result.values is not None else np.where(result.mask, target, 0).astype(np.float32)
        values, mask, figures = refine_mod.dsnot(target, values, result.mask, statistic.h, layout,
                                                 iters=refine_iters)
        # Grown weights take their target value, so a mask-only method stays mask-only.
        result = PruneResult(mask, values if result.values is not None else None, figures=figures)
    if rank:
        values = result.values if result.values is not None else np.where(result.mask, target, 0)
        result = PruneResult(result.mask, values.astype(np.float32), u, v, result.figures)
    return result


def _prune(method: str, matrix: np.ndarray, layout: Layout, statistic, *, blocksize: int,
           damp: float) -> PruneResult:
    if method == "magnitude":
        return PruneResult(layout.mask(np.abs(matrix), per_row=False))
    if method == "wanda":
        norms = column_norms(statistic)
        return PruneResult(layout.mask(np.abs(matrix) * norms[None, :], per_row=True))
    if method == "sparsegpt":
        values, mask = sparsegpt(matrix, statistic.h, layout, blocksize=blocksize, damp=damp,
                                 cross=statistic.cross)
        return PruneResult(mask, values)
    raise ValueError(f"unknown method {method}")


def sparsegpt(matrix: np.ndarray, hessian, layout: Layout, *, blocksize: int = 128,
              damp: float = 0.01, cross=None) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT's blockwise OBS sweep; returns (new values, keep-mask), both (rows, K).

    With ``cross`` (C = X^T X_dense) the sweep starts from W* = W C^T H^-1, the dense weights
    that best map the pruned model's inputs X onto the dense model's outputs X_dense W^T, so
    the layer also corrects the error earlier pruned layers left in its inputs.
    """
    import torch

    device = hessian.device
    W = torch.tensor(matrix, dtype=torch.float32, device=device)
    H = hessian.clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    diag = torch.arange(cols, device=device)
    H[diag, diag] += damp * torch.mean(torch.diag(H))
    if cross is not None:
        W = torch.linalg.solve(H, cross @ W.T).T
        W[:, dead] = 0
    # The upper Cholesky factor of H^-1, one K x K step at a time, each input freed as soon as
    # the next exists: two K x K matrices alive at once besides the caller's Hessian, not three
    # (8192 x 8192 float32: 256 MiB each, the largest thing a solve holds).
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    del H
    group = layout.group
    blocksize = max(group, blocksize // group * group)
    prune_mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        mask1 = torch.zeros(W1.shape, dtype=torch.bool, device=device)
        if isinstance(layout, (UnstructuredLayout, BlockLayout)):
            # Adaptive mask selection: the lowest-scoring weights (tiles) of this block.
            _select_block(layout, mask1, W1 ** 2 / d[None, :] ** 2)
        for i in range(i2 - i1):
            if i % group == 0 and isinstance(layout, NMLayout):
                prune = torch.topk(W1[:, i:i + group] ** 2 / d[None, i:i + group] ** 2,
                                   layout.m - layout.n, dim=1, largest=False).indices
                mask1.scatter_(1, i + prune, True)
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        prune_mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    keep = ~prune_mask
    values = torch.where(keep, W, torch.zeros((), device=device))
    return values.cpu().numpy(), keep.cpu().numpy()


def _select_block(layout: Layout, mask1, score) -> None:
    """Mark the lowest-scoring ``sparsity`` fraction of weights (or tiles) of a column block."""
    import torch

    if isinstance(layout, BlockLayout):
        rows, cols = score.shape
        tiles = score.reshape(rows // layout.br, layout.br, cols // layout.bc, layout.bc).sum(dim=(1, 3))
        count = int(round(tiles.numel() * layout.target))
        if count:
            chosen = torch.zeros(tiles.numel(), dtype=torch.bool, device=score.device)
            chosen[torch.topk(tiles.flatten(), count, largest=False).indices] = True
            full = chosen.reshape(tiles.shape).repeat_interleave(layout.br, 0).repeat_interleave(layout.bc, 1)
            mask1 |= full
        return
    count = int(round(score.numel() * layout.target))
    if count:
        chosen = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
        chosen[torch.topk(score.flatten(), count, largest=False).indices] = True
        mask1 |= chosen.reshape(score.shape)
