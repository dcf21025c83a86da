"""Sweep: compile several pass specs, then time them all against the original side by side.

Each candidate is compiled (and verified) like ``sparsec compile`` with ``best_effort`` (so a
candidate below its budget is still measured, and marked); the original and every candidate
are then timed interleaved in one process (:func:`sparsec.runtime.bench.compare_speed`), so
the speedups are comparable. The points and their Pareto front (no other point is both faster
and more faithful) go into a table and, as a plot, into an HTML report.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparsec.progress import Progress, silent


@dataclass
class SweepPoint:
    label: str
    fidelity: float  # min output cosine against the original (real inputs when the model has some)
    speedup: float  # median of original time / candidate time over rounds
    median_ms: float
    output_bytes: int
    metrics: dict[str, Any] = field(default_factory=dict)
    params_removed: int = 0
    pareto: bool = False
    verdict: str = ""  # EXACT | WITHIN BUDGET | BELOW BUDGET | FAILED
    speedup_p10: float = 0.0
    speedup_p90: float = 0.0


@dataclass
class Sweep:
    model: str
    inputs: str
    threads: int
    repeats: int
    points: list[SweepPoint]
    stable: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> list[str]:
        head = ("| config | verdict | fidelity (min cos) | task metrics | speedup (p10-p90) | median ms | size MiB"
                " | Pareto |")
        lines = [head, "|---|---|---|---|---|---|---|---|"]
        for p in self.points:
            metrics = ", ".join(f"{k} {v:.4g}" for k, v in p.metrics.items() if isinstance(v, float))
            lines.append(f"| {p.label} | {p.verdict or '-'} | {p.fidelity:.4f} | {metrics or '-'} | {p.speedup:.2f}x"
                         f" ({p.speedup_p10:.2f}-{p.speedup_p90:.2f}) | {p.median_ms:.2f}"
                         f" | {p.output_bytes / 2**20:.1f} | {'*' if p.pareto else ''} |")
        return lines


def mark_pareto(points: list[SweepPoint]) -> None:
    for p in points:
        p.pareto = not any(q is not p and q.speedup >= p.speedup and q.fidelity >= p.fidelity and
                           (q.speedup > p.speedup or q.fidelity > p.fidelity) for q in points)


def sweep(model: str | os.PathLike, specs: list[str], *, target: str = "cpu", threads: int | None = None,
          repeats: int = 15, progress: Progress | None = None, **compile_options: Any) -> Sweep:
    """Compile ``specs`` and time them against the original (see the module docstring)."""
    from sparsec.compiler import compile
    from sparsec.data import timing_feed
    from sparsec.model_io import load_model
    from sparsec.runtime.bench import compare_speed
    from sparsec.targets import get_target

    progress = progress or silent()
    runner = get_target(target).runner(threads)
    loaded = load_model(model)
    feed, note = timing_feed(loaded.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sparsec-sweep-") as tmp:
        paths = {"original": loaded.path}
        for i, spec in enumerate(specs):
            result = compile(loaded.path, target=target, passes=spec, output=Path(tmp) / f"c{i}.onnx",
                             report=Path(tmp) / f"c{i}.json", progress=progress, best_effort=True,
                             threads=threads, **compile_options)
            verdict = result.verdicts.get("real") or result.verdicts.get("random")  # None: nothing changed
            removed = sum(s.details.get("params_removed", 0) for r in result.records for s in r.changed)
            rows.append((spec, verdict.min_cosine if verdict else 1.0, dict(verdict.metrics) if verdict else {},
                         result.sizes["output_bytes"], removed, result.judgement.status))
            paths[spec] = result.output
        with progress.task(f"timing {len(paths)} models side by side"):
            speed = compare_speed(paths, feed, runner=runner, threads=threads, min_repeats=repeats)
    base = speed.timings["original"].median_ms
    points = [SweepPoint("original", 1.0, 1.0, base, loaded.total_bytes, speedup_p10=1.0, speedup_p90=1.0)]
    for spec, fidelity, metrics, size, removed, status in rows:
        r = speed.ratios[spec]
        points.append(SweepPoint(spec, fidelity, r.median, speed.timings[spec].median_ms, size, metrics, removed,
                                 verdict=status, speedup_p10=r.p10, speedup_p90=r.p90))
    mark_pareto(points)
    return Sweep(str(loaded.path), note, speed.threads, speed.repeats, points, speed.stable)
