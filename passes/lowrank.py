"""Sparse + low-rank weights (OATS, Zhang et al. 2024): W ~ S + U V, and its lowering.

**Decomposition.** W (rows, K) is scaled by the activation norms D = diag(||X_j||) (the norm of
each input feature over the calibration tokens; D = I without calibration), and the scaled
matrix split by alternating minimisation, ``iters`` times:

    L = truncated SVD of rank r of (W D - S)
    S = (W D - L) thresholded into the layout (per row, as Wanda compares weights)

and unscaled (U V = L D^-1). The pruning method then prunes W - U V into the layout (Wanda's
threshold is OATS's last step; SparseGPT also reconstructs the kept values of W - U V). The
truncated SVD is a block power iteration with 8 extra columns, warm-started from the previous
iteration's right singular vectors (the first from a seeded Gaussian), so it is deterministic
and costs O(rows K r) per iteration.

**Rank.** ``rank=R`` gives every layer rank R; ``rank_ratio=f`` gives each layer the rank whose
factors hold f of its own parameters, r = floor(f rows K / (rows + K)) (a fixed fraction of
each layer's parameters, so the whole model's budget is the same fraction).

**Lowering.** ``Y = X @ W`` (MatMul, W (K, N) on the right) becomes
``Y = X @ S + (X @ V^T) @ U^T``; a Gemm (``transA=0``; any ``transB``, ``alpha``, ``beta``, bias)
keeps its node with S as B, and ``alpha (A @ V^T) @ U^T`` is added to its output. The factors
are new initializers; the two thin MatMuls carry the node metadata ``sparsec.lowrank`` (the
pruned weight's name), so the pruning passes leave them dense (``LOWRANK_FACTOR``), also in a
saved and reloaded model (tensor metadata does not survive external data). Skipped with ``METHOD_UNSUPPORTED``: Conv, batched or left-hand MatMul
weights, Gemm with ``transA=1``, weights stored quantized or cast; ``SHARED_WEIGHT``: a weight
with several readers.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sparsec.sparsity import Layout

from .patterns import Code, LinearWeight, MatchFailure
from .quantized import EncodedWeight
from .rewrite import Builder, redirect

FACTOR_TAG = "sparsec.lowrank"
OVERSAMPLE = 8


def layer_rank(rows: int, cols: int, rank: int, rank_ratio: float) -> int:
    """The rank of one layer's low-rank term under ``rank`` or the parameter budget ``rank_ratio``."""
    r = rank if rank else int(rank_ratio * rows * cols / (rows + cols))
    return max(0, min(r, rows, cols))


def supports(site: LinearWeight) -> MatchFailure | None:
    """Whether the low-rank term of ``site`` can be lowered as two thin MatMuls beside it."""
    name = site.weight.name
    if isinstance(site.weight, EncodedWeight):
        return MatchFailure(Code.METHOD_UNSUPPORTED, f"sparse + low-rank needs a float weight stored as"
                            f" it is; '{name}' is {site.weight.form}", site.node)
    if site.op == "Conv":
        return MatchFailure(Code.METHOD_UNSUPPORTED, "sparse + low-rank lowers MatMul and Gemm only", site.node)
    if site.op == "MatMul" and (site.input_index != 1 or len(site.weight.shape) != 2):
        return MatchFailure(Code.METHOD_UNSUPPORTED, f"sparse + low-rank supports 2-D MatMul weights on the"
                            f" right (X @ W); '{name}' has shape {list(site.weight.shape)} at input"
                            f" {site.input_index}", site.node)
    if site.op == "Gemm":
        trans_a = site.node.attributes.get("transA")
        if trans_a is not None and int(trans_a.value):
            return MatchFailure(Code.METHOD_UNSUPPORTED, "sparse + low-rank supports Gemm with transA=0", site.node)
    readers = site.weight.readers
    if len(readers) > 1:
        return MatchFailure(Code.SHARED_WEIGHT, f"sparse + low-rank adds a term beside one reader;"
                            f" '{name}' has {len(readers)}", site.node)
    return None


def is_factor(site: LinearWeight) -> MatchFailure | None:
    """A factor this module added stays dense (and a second run leaves it as it is)."""
    of = site.node.metadata_props.get(FACTOR_TAG)
    if of is not None:
        return MatchFailure(Code.LOWRANK_FACTOR, f"'{site.weight.name}' is a low-rank factor of"
                            f" '{of}'; left dense", site.node)
    return None


def decompose(matrix: np.ndarray, layout: Layout, rank: int, scale: np.ndarray | None, *,
              per_row: bool = True, iters: int = 20, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """OATS: factors (U (rows, r), V (r, K)) of the low-rank part of ``matrix`` ~ S + U V."""
    import torch

    rows, cols = matrix.shape
    d = np.ones(cols, np.float32) if scale is None else np.asarray(scale, np.float32)
    # A feature never active carries no information: keep its column unscaled.
    d = np.where(d > 0, d, 1.0).astype(np.float32)
    W = torch.from_numpy(np.ascontiguousarray(matrix * d[None, :], dtype=np.float32)).to(device)
    width = min(rank + OVERSAMPLE, rows, cols)
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(cols, width, generator=gen).to(device)).Q
    S = torch.zeros_like(W)
    for _ in range(iters):
        u, v, basis = _truncated_svd(W - S, basis, rank)
        R = (W - u @ v).cpu().numpy()
        keep = layout.mask(np.abs(R), per_row=per_row)
        S = torch.from_numpy(np.where(keep, R, 0.0).astype(np.float32)).to(device)
    u, v, _ = _truncated_svd(W - S, basis, rank)
    return u.cpu().numpy(), (v.cpu().numpy() / d[None, :]).astype(np.float32)


def _truncated_svd(a, basis, rank: int, steps: int = 2):
    """Rank-``rank`` factors (U S, V^T) of ``a`` by block power iteration from ``basis`` (K, p)."""
    import torch

    q = basis
    for _ in range(steps):
        q = torch.linalg.qr(a.T @ torch.linalg.qr(a @ q).Q).Q
    ub, s, vbt = torch.linalg.svd(a @ q, full_matrices=False)
    v = vbt @ q.T  # (p, K), rows orthonormal
    return ub[:, :rank] * s[:rank], v[:rank], q


def lower(site: LinearWeight, u: np.ndarray, v: np.ndarray, pass_id: str, reason: str) -> ir.Value:
    """Add ``(X @ V^T) @ U^T`` (canonical U (rows, r), V (r, K)) to the output of ``site``'s
    node, whose weight already holds S; returns the value now read in place of its output."""
    node = site.node
    graph = node.graph
    dtype = site.weight.numpy().dtype
    ut = np.ascontiguousarray(u.T)
    if site.op == "Gemm":
        alpha = node.attributes.get("alpha")
        if alpha is not None:
            ut = ut * float(alpha.value)
    x = node.inputs[1 - site.input_index]
    opset = graph.opset_imports.get("", 17)
    b = Builder(graph, f"{node.name or site.weight.name}.lowrank", pass_id, reason, opset)
    vt = b.const("v", np.ascontiguousarray(v.T).astype(dtype))
    ut_value = b.const("u", ut.astype(dtype))
    thin = b.one("MatMul", [b.one("MatMul", [x, vt]), ut_value])
    for factor in b.nodes:
        factor.metadata_props[FACTOR_TAG] = site.weight.name
    out = node.outputs[0]
    total = b.one("Add", [out, thin])
    total.type, total.shape = out.type, out.shape
    graph.insert_after(node, b.nodes)
    redirect(graph, out, total, keep=b.nodes[-1])
    return total
