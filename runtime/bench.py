"""Side-by-side timing of models in ONNX Runtime: the one way sparsec measures speed.

Models are timed interleaved (model A run, model B run, ... repeated), after warm-up runs, and
reported as the median of the repeats, so machine noise hits every model alike. Ratios are
what to report, never absolute times from a shared machine.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .session import create_session, run


@dataclass
class Timing:
    label: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    load_ms: float  # session creation (graph optimizations, constant folding)


def time_models(models: Mapping[str, str | os.PathLike], feeds: Mapping[str, np.ndarray], *,
                warmup: int = 3, repeats: int = 15, threads: int | None = None) -> dict[str, Timing]:
    """Median latency of each model on the same ``feeds``, measured interleaved."""
    sessions, load = {}, {}
    for label, path in models.items():
        start = time.perf_counter()
        sessions[label] = create_session(path, threads=threads)
        load[label] = (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        for session in sessions.values():
            run(session, feeds)
    samples: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(repeats):
        for label, session in sessions.items():
            start = time.perf_counter()
            run(session, feeds)
            samples[label].append((time.perf_counter() - start) * 1e3)
    out = {}
    for label, values in samples.items():
        q = statistics.quantiles(values, n=10) if len(values) >= 2 else [values[0]] * 9
        out[label] = Timing(label, statistics.median(values), q[0], q[-1], load[label])
    return out


def time_session_creation(models: Mapping[str, str | os.PathLike], *, repeats: int = 5,
                          threads: int | None = None) -> dict[str, float]:
    """Median session-creation time in ms per model, interleaved."""
    samples: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(repeats):
        for label, path in models.items():
            start = time.perf_counter()
            create_session(path, threads=threads)
            samples[label].append((time.perf_counter() - start) * 1e3)
    return {label: statistics.median(v) for label, v in samples.items()}


def ratio_table(timings: Sequence[Timing], baseline: str) -> list[str]:
    base = next(t for t in timings if t.label == baseline).median_ms
    lines = ["| model | median ms | p10-p90 ms | speedup |", "|---|---|---|---|"]
    for t in timings:
        lines.append(f"| {t.label} | {t.median_ms:.2f} | {t.p10_ms:.2f}-{t.p90_ms:.2f} | {base / t.median_ms:.2f}x |")
    return lines
