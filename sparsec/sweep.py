"""Sweep: compile several pass specs, then time them all against the original side by side.

Each candidate is compiled (and verified) like ``sparsec compile``; the original and every
candidate are then timed interleaved in one process (median of repeats after warm-up), so the
speedups are comparable. The points and their Pareto front (no other point is both faster and
more faithful) go into a table and, as a plot, into an HTML report.
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
    speedup: float
    median_ms: float
    output_bytes: int
    metrics: dict[str, Any] = field(default_factory=dict)
    params_removed: int = 0
    pareto: bool = False


@dataclass
class Sweep:
    model: str
    inputs: str
    threads: int
    repeats: int
    points: list[SweepPoint]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> list[str]:
        head = "| config | fidelity (min cos) | task metrics | speedup | median ms | size MiB | Pareto |"
        lines = [head, "|---|---|---|---|---|---|---|"]
        for p in self.points:
            metrics = ", ".join(f"{k} {v:.4g}" for k, v in p.metrics.items() if isinstance(v, float))
            lines.append(f"| {p.label} | {p.fidelity:.4f} | {metrics or '-'} | {p.speedup:.2f}x | {p.median_ms:.2f}"
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
    from sparsec.model_io import load_model
    from sparsec.models import entry_for
    from sparsec.runtime.bench import time_models
    from sparsec.verify import input_specs, random_feeds

    progress = progress or silent()
    threads = threads or os.cpu_count() or 1
    loaded = load_model(model)
    entry = entry_for(loaded.model.metadata_props)
    if entry is not None and entry.real_inputs is not None:
        feed, note = entry.real_inputs(1)[0], entry.inputs_note
    else:
        feed, note = random_feeds(input_specs(loaded.model), samples=1)[0], "random inputs"
    input_bytes = loaded.total_bytes
    rows = []
    with tempfile.TemporaryDirectory(prefix="sparsec-sweep-") as tmp:
        paths = {"original": loaded.path}
        for i, spec in enumerate(specs):
            result = compile(loaded.path, target=target, passes=spec, output=Path(tmp) / f"c{i}.onnx",
                             report=Path(tmp) / f"c{i}.json", progress=progress, **compile_options)
            verdict = result.verdicts.get("real") or result.verdicts["random"]
            removed = sum(s.details.get("params_removed", 0) for r in result.records for s in r.changed)
            rows.append((spec, verdict.min_cosine, dict(verdict.metrics), result.sizes["output_bytes"], removed))
            paths[spec] = result.output
        with progress.task(f"timing {len(paths)} models side by side"):
            timings = time_models(paths, feed, repeats=repeats, threads=threads)
    base = timings["original"].median_ms
    points = [SweepPoint("original", 1.0, base / base, base, input_bytes)]
    for spec, fidelity, metrics, size, removed in rows:
        t = timings[spec].median_ms
        points.append(SweepPoint(spec, fidelity, base / t, t, size, metrics, removed))
    mark_pareto(points)
    return Sweep(str(loaded.path), note, threads, repeats, points)
