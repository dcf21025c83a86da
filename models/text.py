"""Real English text, offline: Python's own documentation topics (``pydoc_data.topics``).

The text is split once, deterministically: the first half is for calibration, the second half
for evaluation, so a fidelity figure is never measured on text a pass calibrated on.
"""

from __future__ import annotations

import re
from functools import lru_cache

SPLITS = ("calibration", "evaluation")


@lru_cache(maxsize=1)
def _corpus() -> str:
    import pydoc_data.topics as topics

    return "\n".join(topics.topics[key] for key in sorted(topics.topics))


def text(split: str) -> str:
    """The raw text of one split: ``calibration`` (first half) or ``evaluation`` (second)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    corpus = _corpus()
    middle = corpus.index("\n", len(corpus) // 2)
    return corpus[:middle] if split == "calibration" else corpus[middle + 1:]


def sentences(split: str, count: int, *, min_words: int = 8, max_words: int = 40) -> list[str]:
    """The first ``count`` prose sentences of a split (code-like fragments left out)."""
    flat = " ".join(text(split).split())
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+", flat):
        words = len(sentence.split())
        prose = sum(c.isalpha() or c == " " for c in sentence) / max(len(sentence), 1)
        if min_words <= words <= max_words and prose > 0.9:
            out.append(sentence)
            if len(out) == count:
                break
    if len(out) < count:
        raise ValueError(f"only {len(out)} sentences in the {split} split, {count} asked")
    return out
