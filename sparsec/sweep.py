"""Sweep: compile several pass specs, then time them all against the original side by side.

Each candidate is compiled (and verified) like ``sparsec compile`` with ``best_effort`` (so a
candidate below its budget is still measured, and marked); the original and every candidate
are then timed interleaved in one process (:func:`sparsec.runtime.bench.compare_speed`), so
the speedups are comparable. The candidates share the original's outputs on the verification
inputs (a folder of the sweep's: the first compile that needs them runs the original, the others
read them). The compiles are independent units of an engine
(:mod:`sparsec.engine`: in this process, or Ray tasks with ``--ray``); the timing is one unit
that has a node's cores to itself. The points and their Pareto front (no other point is both faster
and more faithful) go into a table and, as a plot, into an HTML report.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparsec.engine import Engine, InProcess, as_engine
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
          repeats: int = 15, progress: Progress | None = None, engine: Engine | None = None,
          **compile_options: Any) -> Sweep:
    """Compile ``specs`` and time them against the original (see the module docstring).

    The candidates' compiles are independent units of ``engine`` (default: in this process, one
    after the other); the timing of all of them is one unit that has a node's cores to itself.
    """
    from sparsec.data import timing_feed
    from sparsec.model_io import load_model

    progress = progress or silent()
    engine = as_engine(engine)
    loaded = load_model(model)
    feed, note = timing_feed(loaded.model)
    with tempfile.TemporaryDirectory(prefix="sparsec-sweep-") as tmp:
        jobs = [(spec, Path(tmp) / f"c{i}") for i, spec in enumerate(specs)]
        with progress.task(f"compiling {len(specs)} candidates ({engine.name})"):
            rows = engine.map(compile_candidate, jobs, labels=specs, what="sweep candidate",
                              shared={"source": str(loaded.path), "target": target, "threads": threads,
                                      "options": compile_options, "references": str(Path(tmp) / "references"),
                                      # a Ray worker has no terminal to show progress on
                                      "progress": progress if isinstance(engine, InProcess) else None})
        paths = {"original": loaded.path, **{row["spec"]: row["output"] for row in rows}}
        with progress.task(f"timing {len(paths)} models side by side"):
            speed = engine.timed(time_models, paths, feed, target, threads, repeats,
                                 threads=threads or os.cpu_count() or 1, label="the sweep's models side by side")
    base = speed.timings["original"].median_ms
    points = [SweepPoint("original", 1.0, 1.0, base, loaded.total_bytes, speedup_p10=1.0, speedup_p90=1.0)]
    for row in rows:
        r = speed.ratios[row["spec"]]
        points.append(SweepPoint(row["spec"], row["fidelity"], r.median, speed.timings[row["spec"]].median_ms,
                                 row["output_bytes"], row["metrics"], row["params_removed"], verdict=row["status"],
                                 speedup_p10=r.p10, speedup_p90=r.p90))
    mark_pareto(points)
    return Sweep(str(loaded.path), note, speed.threads, speed.repeats, points, speed.stable)


def compile_candidate(job: tuple[str, Path], *, source: str, target: str, threads: int | None,
                      options: dict[str, Any], progress: Progress | None = None,
                      references: str | None = None) -> dict[str, Any]:
    """One candidate: compiled (best effort) and verified like ``sparsec compile``; its figures.
    ``references``: the folder where candidates share the original's outputs (on a node that
    cannot see the driver's folder, the first candidate there fills its own)."""
    from sparsec.compiler import compile

    spec, stem = job
    result = compile(source, target=target, passes=spec, output=stem.with_suffix(".onnx"),
                     report=stem.with_suffix(".json"), best_effort=True, threads=threads, progress=progress,
                     shared_references=references, **options)
    verdict = result.verdicts.get("real") or result.verdicts.get("random")  # None: nothing changed
    return {"spec": spec, "output": str(result.output), "fidelity": verdict.min_cosine if verdict else 1.0,
            "metrics": dict(verdict.metrics) if verdict else {}, "output_bytes": result.sizes["output_bytes"],
            "params_removed": sum(s.details.get("params_removed", 0) for r in result.records for s in r.changed),
            "status": result.judgement.status}


def time_models(paths: dict[str, Any], feed, target: str, threads: int | None, repeats: int):
    """The original and every candidate timed interleaved in one process (one engine unit)."""
    from sparsec.runtime.bench import compare_speed
    from sparsec.targets import get_target

    runner = get_target(target).runner(threads)
    return compare_speed(paths, feed, runner=runner, threads=threads, min_repeats=repeats)
