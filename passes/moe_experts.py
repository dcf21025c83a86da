"""The numbers behind MoEfication: splitting neurons into experts, shared neurons, routers.

All functions are numpy on one FFN:

* :func:`balanced_kmeans` -- k-means whose clusters all have the same size (a greedy balanced
  assignment after each update), so every expert holds the same number of neurons;
* :func:`activation_rates` -- how often each neuron is among the ones a per-token oracle would
  keep at the target density: the shared-neuron criterion of CMoE (Pei et al. 2025);
* :func:`expert_mass` -- each expert's contribution ||h_e W2_e|| per token: what routing should
  keep (the oracle picks the k largest);
* :func:`fit_linear_router` -- MoEfication's predictor (Zhang et al. 2022): a least-squares
  linear map from the FFN input to the experts' masses;
* :func:`centroid_router` -- parameter-free: each expert's mean (normalized) first-layer row;
* :func:`router_quality` -- top-k recall against the oracle and the experts' load.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _normalize(rows: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norm > 0, norm, 1.0)


def _balanced_assign(distance: np.ndarray, clusters: int) -> np.ndarray:
    """Each row to a cluster, every cluster taking len(rows) / clusters rows: greedily, the
    globally closest (row, cluster) pairs first."""
    n = distance.shape[0]
    capacity = np.full(clusters, n // clusters)
    labels = np.full(n, -1)
    order = np.argsort(distance, axis=None, kind="stable")
    for flat in order:
        row, cluster = divmod(int(flat), clusters)
        if labels[row] < 0 and capacity[cluster] > 0:
            labels[row] = cluster
            capacity[cluster] -= 1
    return labels


def balanced_kmeans(features: np.ndarray, clusters: int, *, iterations: int = 15, seed: int = 0) -> np.ndarray:
    """Labels (0..clusters-1) of ``features`` rows; ``len(features)`` must divide by ``clusters``.
    Deterministic for a seed."""
    n = features.shape[0]
    if n % clusters:
        raise ValueError(f"{n} rows do not divide into {clusters} equal clusters")
    x = _normalize(features.astype(np.float64))
    rng = np.random.default_rng(seed)
    centers = x[rng.choice(n, clusters, replace=False)]
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        distance = 1.0 - x @ centers.T  # cosine distance on normalized rows
        new = _balanced_assign(distance, clusters)
        if np.array_equal(new, labels):
            break
        labels = new
        centers = _normalize(np.stack([x[labels == c].mean(axis=0) for c in range(clusters)]))
    return labels


def activation_rates(hidden: np.ndarray, density: float) -> np.ndarray:
    """Per neuron, the fraction of tokens on which it is among the ``density`` fraction of
    neurons with the largest |activation| (what a per-token oracle at that density keeps)."""
    tokens, neurons = hidden.shape
    keep = max(1, int(round(density * neurons)))
    top = np.argpartition(-np.abs(hidden), keep - 1, axis=1)[:, :keep]
    counts = np.bincount(top.reshape(-1), minlength=neurons)
    return counts / tokens


def expert_mass(hidden: np.ndarray, down: np.ndarray, experts: list[np.ndarray]) -> np.ndarray:
    """(tokens, E): the L2 norm of each expert's contribution h_e @ W2_e to the FFN output.
    ``down`` is the exit weight as (neurons, out)."""
    return np.stack([np.linalg.norm(hidden[:, idx] @ down[idx], axis=1) for idx in experts], axis=1)


def fit_linear_router(x: np.ndarray, mass: np.ndarray, *, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """(W (H, E), b (E,)) minimizing ||[x, 1] [W; b] - mass||^2 + ridge * mean(diag) * ||W||^2."""
    x64 = np.concatenate([x.astype(np.float64), np.ones((x.shape[0], 1))], axis=1)
    gram = x64.T @ x64
    gram[np.diag_indices_from(gram)] += ridge * np.mean(np.diag(gram))
    solution = np.linalg.solve(gram, x64.T @ mass.astype(np.float64))
    return solution[:-1].astype(np.float32), solution[-1].astype(np.float32)


def centroid_router(rows: np.ndarray, experts: list[np.ndarray]) -> np.ndarray:
    """(H, E): each expert's mean normalized first-layer row (rows: (neurons, H))."""
    x = _normalize(rows.astype(np.float64))
    return np.stack([x[idx].mean(axis=0) for idx in experts], axis=1).astype(np.float32)


def routed_mask(logits: np.ndarray, k: int, experts: list[np.ndarray], shared: np.ndarray,
                neurons: int) -> np.ndarray:
    """(tokens, neurons) booleans: the neurons a token computes (shared, and its k experts')."""
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    keep = np.zeros((len(logits), neurons), dtype=bool)
    keep[:, shared] = True
    for e, idx in enumerate(experts):
        rows = np.any(chosen == e, axis=1)
        keep[np.ix_(rows, idx)] = True
    return keep


def refit_down(hidden: np.ndarray, keep: np.ndarray, down: np.ndarray, damp: float
               ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Down weights (neurons, out) and a bias (out,) that best reproduce the dense output
    ``hidden @ down`` from the routed hidden units ``hidden * keep`` (least squares, dampened
    by ``damp`` times the mean Gram diagonal); and the relative output error before and after."""
    target = hidden.astype(np.float64) @ down.astype(np.float64)
    routed = np.where(keep, hidden, 0.0).astype(np.float64)
    design = np.concatenate([routed, np.ones((len(routed), 1))], axis=1)
    gram = design.T @ design
    gram[np.diag_indices_from(gram)] += damp * np.mean(np.diag(gram)) + 1e-12
    solution = np.linalg.solve(gram, design.T @ target)
    norm = np.linalg.norm(target) or 1.0
    before = float(np.linalg.norm(target - routed @ down.astype(np.float64)) / norm)
    after = float(np.linalg.norm(target - design @ solution) / norm)
    return solution[:-1].astype(down.dtype), solution[-1].astype(down.dtype), (before, after)


@dataclass
class RouterQuality:
    recall: float  # mean fraction of the oracle's top-k experts the router picks
    load: list[float]  # fraction of token-slots each expert receives (sums to 1)

    @property
    def imbalance(self) -> float:
        """The busiest expert's load over the mean load (1 is perfectly balanced)."""
        return max(self.load) * len(self.load) if self.load else 0.0


def router_quality(logits: np.ndarray, mass: np.ndarray, k: int) -> RouterQuality:
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    oracle = np.argsort(-mass, axis=1, kind="stable")[:, :k]
    hits = [len(np.intersect1d(a, b)) for a, b in zip(chosen, oracle)]
    load = np.bincount(chosen.reshape(-1), minlength=logits.shape[1]) / chosen.size
    return RouterQuality(float(np.mean(hits)) / k, load.tolist())
