"""Task metrics for fidelity: what a user of the model cares about, on real inputs.

Each metric accumulates over input sets (``add(feed, reference, candidate)``) and reports a
flat dict of figures (``result()``), so large outputs never pile up in memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np


class Metric(Protocol):
    def add(self, feed: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
            candidate: Mapping[str, np.ndarray]) -> None: ...

    def result(self) -> dict[str, Any]: ...


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the tokens the attention mask keeps, then L2-normalized (sentence-transformers)."""
    m = mask.astype(np.float64)[..., None]
    pooled = (hidden.astype(np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class SentenceEmbeddingCosine:
    """Cosine between the reference's and the candidate's sentence embeddings (mean pooling)."""

    def __init__(self, output: str, mask_input: str = "attention_mask") -> None:
        self.output, self.mask_input = output, mask_input
        self.cosines: list[np.ndarray] = []

    def add(self, feed, reference, candidate) -> None:
        a = mean_pool(reference[self.output], feed[self.mask_input])
        b = mean_pool(candidate[self.output], feed[self.mask_input])
        self.cosines.append((a * b).sum(axis=-1))

    def result(self) -> dict[str, Any]:
        cos = np.concatenate(self.cosines) if self.cosines else np.zeros(0)
        if not cos.size:
            return {}
        return {"sentences": int(cos.size), "embedding_cosine_mean": float(cos.mean()),
                "embedding_cosine_min": float(cos.min())}


def _nll_sum(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens."""
    x = logits[:, :-1].astype(np.float64)
    target = ids[:, 1:]
    x = x - x.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(x).sum(axis=-1))
    picked = np.take_along_axis(x, target[..., None], axis=-1)[..., 0]
    return float((logz - picked).sum()), int(target.size)


class Perplexity:
    """Next-token perplexity of the reference and of the candidate on the same token windows."""

    def __init__(self, output: str = "logits", ids_input: str = "input_ids") -> None:
        self.output, self.ids_input = output, ids_input
        self.nll = {"reference": 0.0, "candidate": 0.0}
        self.tokens = 0

    def add(self, feed, reference, candidate) -> None:
        ids = feed[self.ids_input]
        ref_nll, count = _nll_sum(reference[self.output], ids)
        cand_nll, _ = _nll_sum(candidate[self.output], ids)
        self.nll["reference"] += ref_nll
        self.nll["candidate"] += cand_nll
        self.tokens += count

    def result(self) -> dict[str, Any]:
        if not self.tokens:
            return {}
        ref = math.exp(self.nll["reference"] / self.tokens)
        cand = math.exp(self.nll["candidate"] / self.tokens)
        return {"tokens": self.tokens, "perplexity_reference": ref, "perplexity_candidate": cand,
                "perplexity_ratio": cand / ref}
