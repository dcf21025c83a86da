"""Block-level reconstruction: refit the kept weights of a block's exit layer to the dense block.

Pruning a block's entry layers (Q/K/V, up/gate) changes the input of its exit layer (attention's
output projection, the FFN's down projection); each layer's own reconstruction (SparseGPT) only
matches the exit's output on that changed input. With ``reconstruct=block`` the pruning passes
also capture, for every block exit, the exit input the DENSE block computes from the same block
input (the output of the already pruned earlier blocks, so the correction is sequential), and
after the exit is pruned they solve, row by row on the kept weights only,

    min_w' || X_p w' - X_d w ||^2      (X_p: exit input of the pruned block, X_d: of the dense block,
                                        w: the row's dense weights, w' zero outside the row's mask)

from the Gram matrices X_p^T X_p and X_p^T X_d (K x K each; no activations are stored). The
mask is kept, so pruned weights stay exactly zero and N:M layouts hold. A solution that fits
the calibration target worse than the method's own values (dampening) is not taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .blocks import match_attention_block, match_ffn_block
from .patterns import LinearWeight


@dataclass
class BlockExit:
    """A pruned site that ends a block, and the linear layers (entries) feeding it."""

    site: LinearWeight
    kind: str  # ffn | attention
    entries: list[LinearWeight]


def match_block_exit(site: LinearWeight, model: ir.Model) -> BlockExit | None:
    """``site`` as the exit of an FFN or attention block (2-D MatMul weights only), else None."""
    if site.op != "MatMul" or site.input_index != 1 or len(site.weight.shape) != 2:
        return None
    ffn = match_ffn_block(site.node)
    if ffn:
        return BlockExit(site, "ffn", list(ffn.projections))
    attention = match_attention_block(site.node, model)
    if attention:
        return BlockExit(site, "attention", [p.site for p in (attention.q, attention.k, attention.v)])
    return None


def downstream(starts: list[ir.Value], within: set[ir.Value]) -> set[ir.Value]:
    """Values of ``within`` computed from any of ``starts`` (starts included)."""
    found: set[ir.Value] = set()
    stack = [v for v in starts if v in within]
    while stack:
        value = stack.pop()
        if value in found:
            continue
        found.add(value)
        for use in value.uses():
            stack.extend(o for o in use.node.outputs if o in within and o not in found)
    return found


class BlockTarget:
    """A layer statistic (``inner``, the method's own) plus the Gram matrices of the block
    target: ``hpp`` = X_p^T X_p, ``pd`` = X_p^T X_d, and ||X_d W^T||^2 for the figures.

    Added with ``add(x_pruned, x_dense)``; attribute reads go to ``inner`` so the pruning
    methods see the statistic they expect."""

    def __init__(self, inner, k: int, weight: np.ndarray) -> None:
        import torch

        self.inner = inner
        self.weight = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))  # (rows, K)
        self.hpp = torch.zeros(k, k, dtype=torch.float64)
        self.pd = torch.zeros(k, k, dtype=torch.float64)
        self.target_energy = 0.0

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)

    def add(self, x: np.ndarray, x_dense: np.ndarray) -> None:
        import torch

        if self.inner is not None:
            self.inner.add(x)
        if not x.shape[0]:
            return
        p = torch.from_numpy(np.ascontiguousarray(x))
        d = torch.from_numpy(np.ascontiguousarray(x_dense))
        self.hpp += (p.T @ p).double()
        self.pd += (p.T @ d).double()
        self.target_energy += float((d @ self.weight.T).double().square().sum())

    def error(self, values: np.ndarray) -> float:
        """||X_p W'^T - X_d W^T|| / ||X_d W^T|| over the calibration inputs."""
        import torch

        w_new = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
        w = self.weight.double()
        sq = float(torch.sum(w_new * (w_new @ self.hpp)) - 2 * torch.sum(w_new * (w @ self.pd.T))) + self.target_energy
        return (max(sq, 0.0) / self.target_energy) ** 0.5 if self.target_energy > 0 else 0.0

    def refit(self, mask: np.ndarray, damp: float, chunk: int = 8) -> np.ndarray:
        """Least-squares values on the keep-``mask`` (rows, K), each row on its own support."""
        import torch

        rows, k = mask.shape
        h = self.hpp.clone()
        h[torch.arange(k), torch.arange(k)] += damp * float(torch.mean(torch.diag(h))) + 1e-12
        rhs = self.pd @ self.weight.double().T  # (K, rows): X_p^T X_d w for every row
        keep = torch.from_numpy(np.ascontiguousarray(mask))
        counts = keep.sum(1)
        out = torch.zeros(rows, k, dtype=torch.float64)
        for r0 in range(0, rows, chunk):
            r1 = min(r0 + chunk, rows)
            width = int(counts[r0:r1].max()) if r1 > r0 else 0
            if width == 0:
                continue
            # Each row's kept indices, padded to one width; padding is an identity row with rhs 0.
            order = torch.argsort((~keep[r0:r1]).to(torch.int8), dim=1, stable=True)[:, :width]
            valid = torch.arange(width)[None, :] < counts[r0:r1, None]
            idx = torch.where(valid, order, torch.zeros_like(order))
            a = h[idx[:, :, None], idx[:, None, :]]  # (chunk, width, width): bounded memory
            a.mul_(valid[:, :, None]).mul_(valid[:, None, :])
            a.diagonal(dim1=1, dim2=2).add_((~valid).double())
            b = torch.where(valid, rhs[idx, torch.arange(r0, r1)[:, None]], torch.zeros((), dtype=a.dtype))
            # a is symmetric positive definite (a damped Gram block, identity padding): Cholesky.
            # (torch.linalg.solve's batched LU returned invalid pivots for such matrices inside a
            # compile process, see the issue notes; Cholesky has no pivots.)
            factor, info = torch.linalg.cholesky_ex(a)
            if bool((info > 0).any()):  # not positive definite after all (no damping): numpy's LU
                sol = torch.from_numpy(np.linalg.solve(a.numpy(), b.unsqueeze(-1).numpy())).squeeze(-1)
            else:
                sol = torch.cholesky_solve(b.unsqueeze(-1), factor).squeeze(-1)
            out[torch.arange(r0, r1)[:, None].expand_as(idx)[valid], idx[valid]] = sol[valid]
        return out.numpy()
