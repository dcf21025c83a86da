"""Mask refinement without training (DSnoT, Zhang et al. 2023): swap weights within a row.

Starting from a pruned weight (a Wanda or SparseGPT mask and its values), each step grows one
pruned weight of a row back to its target value and prunes one kept weight of the same row (of
the same N:M group for N:M), when the swap lowers the row's reconstruction error on the
calibration inputs X:

    err(row) = || X (t - v) ||^2 = (t - v)^T G (t - v),   G = X^T X (the layer's Gram matrix)

t the target row (the dense weights, or the dense weights less a low-rank term), v the pruned
row. DSnoT chooses the pair to swap from the mean and variance of each input feature (an
estimate of this error); here the change of the error is computed exactly from G, which the
calibrated passes already accumulate for SparseGPT: for growing j and pruning k,

    delta = -2 e_j g_j + e_j^2 G_jj + 2 v_k g_k + v_k^2 G_kk - 2 e_j v_k G_jk,   g = G (t - v),

and a swap is made only when delta < 0. Unstructured: j is the pruned weight whose growth alone
lowers the error most, k the best partner for it; N:M: every (pruned, kept) pair of every group
is scored and the best taken, so each group keeps N non-zeros. Every row swaps at most
``iters`` times and stops when no swap helps. A last check recomputes each row's error from
scratch and keeps the starting row wherever refinement did not lower it (rounding in the
incremental updates), so the result is never worse than the start on this objective.
"""

from __future__ import annotations

import numpy as np

from sparsec.sparsity import Layout, NMLayout, UnstructuredLayout


def row_errors(target, values, gram):
    """Per row, (t - v)^T G (t - v) (torch tensors in, a float64 tensor out)."""
    e = target - values
    return (e.double() * (e @ gram.to(e.dtype)).double()).sum(dim=1)


def dsnot(target: np.ndarray, values: np.ndarray, mask: np.ndarray, gram, layout: Layout, *,
          iters: int = 50) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Refine a pruned (rows, K) matrix; returns (values, keep-mask, figures).

    ``gram`` is G = c X^T X for any c > 0 (a torch tensor, e.g. SparseGPT's Hessian); ``values``
    is zero outside ``mask``. Grown weights take their value in ``target``. ``figures`` holds the
    calibration objective before and after (summed over rows) and the swaps made.
    """
    import torch

    if not isinstance(layout, (NMLayout, UnstructuredLayout)):
        raise ValueError(f"dsnot refines N:M and unstructured masks, not {layout.name}")
    device = gram.device
    G = gram.to(torch.float32)
    T = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)).to(device)
    V = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(device) * \
        torch.from_numpy(np.ascontiguousarray(mask)).to(device)
    M = torch.from_numpy(np.ascontiguousarray(mask)).to(device).clone()
    start_v, start_m = V.clone(), M.clone()
    rows, cols = T.shape
    diag = torch.diagonal(G)
    g = (T - V) @ G
    before = ((T - V).double() * g.double()).sum(dim=1)
    scale = before.to(torch.float32).clamp_min(1e-30)
    if isinstance(layout, NMLayout):
        block = torch.arange(cols, device=device).reshape(-1, layout.m)
        gb = G[block[:, :, None], block[:, None, :]]  # (groups, M, M)
    active = torch.ones(rows, dtype=torch.bool, device=device)
    swaps = 0
    ar = torch.arange(rows, device=device)
    for _ in range(iters):
        idx = ar[active]
        if not idx.numel():
            break
        e, v, m, gi = T[idx] - V[idx], V[idx], M[idx], g[idx]
        grow = -2 * e * gi + e * e * diag  # error change of growing each weight alone
        prune = 2 * v * gi + v * v * diag  # ... of pruning each weight alone
        if isinstance(layout, NMLayout):
            j, k, delta = _best_nm_pair(e, v, m, grow, prune, gb, layout)
        else:
            grow = torch.where(m, torch.full_like(grow, float("inf")), grow)
            j = torch.argmin(grow, dim=1)
            ej = e.gather(1, j[:, None])[:, 0]
            cross = -2 * ej[:, None] * v * G[j]  # G[j] (n, K): row j of G per refined row
            partner = torch.where(m, prune + cross, torch.full_like(prune, float("inf")))
            k = torch.argmin(partner, dim=1)
            delta = grow.gather(1, j[:, None])[:, 0] + partner.gather(1, k[:, None])[:, 0]
        # Relative threshold: rounding noise never counts as a gain.
        better = delta < -1e-6 * scale[idx]
        active[idx[~better]] = False
        if not bool(better.any()):
            break
        r, j, k = idx[better], j[better], k[better]
        ej = T[r, j] - V[r, j]
        vk = V[r, k].clone()
        V[r, j] = T[r, j]
        M[r, j] = True
        V[r, k] = 0
        M[r, k] = False
        g[r] += -ej[:, None] * G[j] + vk[:, None] * G[k]
        swaps += int(r.numel())
    after = row_errors(T, V, G)
    worse = after > before
    V[worse], M[worse] = start_v[worse], start_m[worse]
    after = torch.where(worse, before, after)
    figures = {"objective_before": float(before.sum()), "objective_after": float(after.sum()), "swaps": swaps}
    return V.cpu().numpy(), M.cpu().numpy(), figures


def _best_nm_pair(e, v, m, grow, prune, gb, layout: NMLayout):
    """For each row, the (pruned j, kept k) pair of one N:M group whose swap lowers the error
    most: indices j, k (global columns) and the change of the error. ``gb`` (groups, M, M)
    holds the diagonal blocks of G (the cross terms of pairs within a group)."""
    import torch

    n, cols = e.shape
    group, keep = layout.m, layout.n
    blocks = cols // group
    shape = (n, blocks, group)
    m3 = m.reshape(shape)
    # Kept positions first: (n, blocks, N) kept and (n, blocks, M - N) pruned, local indices.
    order = torch.argsort(m3.to(torch.int8), dim=2, descending=True, stable=True)
    kept, pruned = order[..., :keep], order[..., keep:]
    take = lambda a, i: a.reshape(shape).gather(2, i)  # noqa: E731
    ej, vk = take(e, pruned), take(v, kept)
    local = pruned[..., :, None] * group + kept[..., None, :]  # (n, blocks, M-N, N)
    cross = gb.reshape(1, blocks, group * group).expand(n, -1, -1).gather(2, local.reshape(n, blocks, -1))
    pair = (take(grow, pruned)[..., :, None] + take(prune, kept)[..., None, :]
            - 2 * ej[..., :, None] * vk[..., None, :] * cross.reshape(local.shape))
    # A group with other than N kept weights (none from the N:M methods) offers no valid pair.
    valid = (~take(m, pruned))[..., :, None] & take(m, kept)[..., None, :]
    pair = torch.where(valid, pair, torch.full_like(pair, float("inf"))).reshape(n, -1)
    best = torch.argmin(pair, dim=1)
    delta = pair.gather(1, best[:, None])[:, 0]
    per_block = (group - keep) * keep
    block, rest = best // per_block, best % per_block
    rows = torch.arange(n, device=e.device)
    j = block * group + pruned[rows, block, rest // keep]
    k = block * group + kept[rows, block, rest % keep]
    return j, k, delta
