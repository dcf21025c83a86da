"""Non-uniform sparsity: outlier-weighted layer-wise allocation (OWL, Yin et al. 2023).

Layers whose Wanda scores (|W| * ||X||) hold more outliers -- scores above ``m`` times the
layer's mean -- are more sensitive, so they keep more weights. With outlier ratios D_l
normalized to [0, 2*lam], each layer keeps ``(1 - target) + D_l - mean(D)``: the mean sparsity
over layers stays ``target`` and each layer's stays within ``target +- lam``.

A layer is a transformer block (the module path up to its index, e.g. ``model.layers.3``);
weights outside numbered blocks form their own layer each.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from .patterns import LinearWeight

_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_of(label: str) -> str:
    """``m.encoder.layer.3.attention.self.query`` -> ``m.encoder.layer.3``."""
    match = _BLOCK.match(label)
    return match.group(1) if match else label


def outlier_ratio(scores: list[np.ndarray], m: float) -> float:
    """Fraction of scores above ``m`` times their mean (over all of a layer's weights)."""
    flat = np.concatenate([s.reshape(-1) for s in scores])
    return float(np.mean(flat > m * flat.mean())) if flat.size else 0.0


def owl_sparsities(ratios: dict[str, float], target: float, lam: float) -> dict[str, float]:
    """Per-layer sparsity from per-layer outlier ratios (OWL)."""
    names = list(ratios)
    d = np.array([ratios[n] for n in names])
    spread = d.max() - d.min()
    norm = (d - d.min()) / spread * 2 * lam if spread > 0 else np.zeros_like(d)
    keep = norm - norm.mean() + (1 - target)
    return {n: float(np.clip(1 - k, 0.0, 0.99)) for n, k in zip(names, keep)}


def owl_allocation(sites: list[LinearWeight], norms: dict[int, np.ndarray], target: float,
                   lam: float, m: float) -> tuple[dict[int, float], dict[str, dict[str, float]]]:
    """Sparsity per site (keyed by id) and per layer (ratio, sparsity) from Wanda input norms
    (``norms[id(site)]``: sqrt of the summed squares of each input feature)."""
    by_layer: dict[str, list[np.ndarray]] = defaultdict(list)
    for site in sites:
        matrix = site.to_matrix(site.weight.numpy()).astype(np.float32)
        by_layer[layer_of(site.label)].append(np.abs(matrix) * norms[id(site)][None, :])
    ratios = {layer: outlier_ratio(scores, m) for layer, scores in by_layer.items()}
    sparsity = owl_sparsities(ratios, target, lam)
    per_site = {id(site): sparsity[layer_of(site.label)] for site in sites}
    table = {layer: {"outlier_ratio": ratios[layer], "sparsity": sparsity[layer]} for layer in ratios}
    return per_site, table
