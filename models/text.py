"""Real English text, offline: Python's own documentation topics (``pydoc_data.topics``).

The text is split once, deterministically: the first half is for calibration, the second half
for evaluation, so a fidelity figure is never measured on text a pass calibrated on.

A third text, ``docstrings`` (the docstrings of 57 standard-library modules and their public
members, about 45,000 words), is read by the benchmarks only: no builder, test, calibration or
compile-time check reads it, so the figures measured on it are not flattered by text that
shaped or checked a rewrite.
"""

from __future__ import annotations

import re
from functools import lru_cache

SPLITS = ("calibration", "evaluation", "docstrings")
DOCSTRING_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "concurrent.futures", "configparser", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "ftplib", "functools",
    "gettext", "heapq", "http.client", "imaplib", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox",
    "multiprocessing", "numbers", "optparse", "os", "pathlib", "pickle", "pprint", "queue", "random", "shutil",
    "smtplib", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "xml.dom.minidom", "zipfile",
)


@lru_cache(maxsize=1)
def _corpus() -> str:
    import pydoc_data.topics as topics

    return "\n".join(topics.topics[key] for key in sorted(topics.topics))


@lru_cache(maxsize=1)
def _docstrings() -> str:
    import importlib
    import inspect

    parts = []
    for name in DOCSTRING_MODULES:
        module = importlib.import_module(name)
        members = [module, *(getattr(module, m) for m in sorted(dir(module)) if not m.startswith("_"))]
        for obj in members:
            if obj is not module and getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(doc)
    return "\n".join(parts)


def text(split: str) -> str:
    """The raw text of one split: ``calibration`` (first half of the pydoc topics),
    ``evaluation`` (second half) or ``docstrings`` (benchmarks only)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    if split == "docstrings":
        return _docstrings()
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
