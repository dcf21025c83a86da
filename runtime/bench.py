"""Side-by-side timing of models in ONNX Runtime: the one way sparsec measures speed.

Models are timed interleaved (A, B, C, A, B, C, ...) after warm-up runs, so machine noise hits
every model alike. Speed is reported as ratios against a baseline: for each round, the
baseline's time over the model's time; the ratio's median and its p10-p90 spread over rounds.
:func:`compare_speed` repeats rounds until the spread of every ratio is within ``tolerance`` of
its median (or ``max_repeats`` is reached, and then says that the ratio is not stable).
Absolute times from a shared machine are reported but never the point.

The sessions do not spin-wait for work: with ORT's default, a session's idle threads keep
spinning after its run and take the cores from the next session timed (measured here: one
SwiGLU FFN against its MoE rewrite, 2,048 tokens, 2 cores: 4.2x interleaved with spinning
threads, 6.5x without, and 6.5x timed one model after the other).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .session import Runner, cpu_runner


@dataclass
class Timing:
    label: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    load_ms: float  # session creation (graph optimizations, constant folding)


@dataclass
class Ratio:
    """Baseline time / model time, per round."""

    label: str
    median: float
    p10: float
    p90: float

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative width of the ratio's middle 80%."""
        return (self.p90 - self.p10) / self.median if self.median else float("inf")


@dataclass
class SpeedComparison:
    baseline: str
    timings: dict[str, Timing]
    ratios: dict[str, Ratio]
    repeats: int
    stable: bool  # every ratio's spread within the tolerance
    tolerance: float
    threads: int
    providers: list[str] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)  # ms per round

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("samples")
        return data

    def ratio(self, label: str, against: str) -> Ratio:
        """``against``'s time / ``label``'s time per round (any model, not only the baseline):
        its median and p10-p90 over the same interleaved rounds."""
        med, p10, p90 = _quantiles([b / v for b, v in zip(self.samples[against], self.samples[label])])
        return Ratio(label, med, p10, p90)

    def line(self, label: str) -> str:
        r, t, b = self.ratios[label], self.timings[label], self.timings[self.baseline]
        stable = "" if self.stable else f"; NOT STABLE: spread above {self.tolerance:.0%} after {self.repeats} rounds"
        return (f"{r.median:.2f}x (p10-p90 {r.p10:.2f}-{r.p90:.2f}x over {self.repeats} rounds{stable};"
                f" {b.median_ms:.2f} -> {t.median_ms:.2f} ms median, {self.threads} threads)")


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10)
    return statistics.median(values), q[0], q[-1]


def timed_calls(runner: Runner, sessions: Mapping[str, Any], feed: Mapping[str, np.ndarray],
           feeds: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """One timed call per session (on ``feeds[label]`` where given, else ``feed``). On a GPU
    provider the inputs live on the device (copied once) and the outputs stay there: IOBinding,
    so host-device copies are not timed."""
    from .kvcache import KVCache, is_past, present_of

    if not runner.on_gpu:
        def one_buffer(session, f) -> dict[str, str]:  # SparseAttention's cache: past and present one buffer
            return {n: present_of(n) for n in f if is_past(n)} if KVCache.of_session(session).shared else {}

        return {label: (lambda s=session, f=feeds.get(label, feed): runner.run(s, f, shared=one_buffer(s, f)))
                for label, session in sessions.items()}
    import onnxruntime as ort

    def device(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
        return {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", 0) for name, a in inputs.items()}

    shared = device(feed)
    calls = {}
    for label, session in sessions.items():
        binding = session.io_binding()
        inputs = device(feeds[label]) if label in feeds else shared
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        # a bounded or shared KV cache on the GPU: past and present are one buffer
        one = {} if KVCache.of_session(session).plain else {present_of(n): v for n, v in inputs.items()}
        for output in session.get_outputs():
            if output.name in one:
                binding.bind_ortvalue_output(output.name, one[output.name])
            else:
                binding.bind_output(output.name, "cuda", 0)

        def call(s=session, b=binding) -> None:
            s.run_with_iobinding(b)
            b.synchronize_outputs()

        calls[label] = call
    return calls


def interleaved_medians(calls: Sequence[Callable[[], Any]], *, warmup: int = 3, rounds: int = 7,
                        round_seconds: float = 0.02, min_calls: int = 5,
                        clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds per call of each of ``calls`` (from :func:`timed_calls`), measured interleaved:
    ``rounds`` rounds, each timing every call in turn for about ``round_seconds`` (at least
    ``min_calls`` times) and keeping that round's median; each call's result is its median over
    the rounds.

    A burst of other work on a shared machine then lands on one round of every call, not on every
    repeat of one: timed one after the other (20 calls each), three calibrations of this 2-core
    machine put the same int8 product at 4.2x, 11.1x and 5.2x the float one's rate.
    """
    counts = []
    for call in calls:
        for _ in range(warmup):
            call()
        start = clock()
        call()
        counts.append(max(min_calls, int(round_seconds / max(clock() - start, 1e-7)) + 1))
    medians: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, count, out in zip(calls, counts, medians):
            times = []
            for _ in range(count):
                start = clock()
                call()
                times.append(clock() - start)
            out.append(statistics.median(times))
    return [statistics.median(values) for values in medians]


def compare_speed(models: Mapping[str, str | os.PathLike], feed: Mapping[str, np.ndarray], *,
                  baseline: str | None = None, runner: Runner | None = None, threads: int | None = None,
                  warmup: int = 3, min_repeats: int = 15, max_repeats: int = 60, tolerance: float = 0.2,
                  batch: int = 5, feeds: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> SpeedComparison:
    """Time ``models`` interleaved on ``feed``; ratios against ``baseline`` (default: the first).
    ``feeds`` gives some models inputs of their own (a bounded KV cache takes a shorter past).

    Rounds are added ``batch`` at a time after ``min_repeats`` until every ratio's p10-p90 spread
    is at most ``tolerance`` times its median, or ``max_repeats`` rounds were run.
    """
    runner = runner or cpu_runner()
    threads = threads or runner.threads or os.cpu_count() or 1
    baseline = baseline or next(iter(models))
    sessions, load = {}, {}
    for label, path in models.items():
        start = time.perf_counter()
        sessions[label] = runner.session(path, threads=threads, spin=False)
        load[label] = (time.perf_counter() - start) * 1e3
    calls = timed_calls(runner, sessions, feed, feeds or {})
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {label: [] for label in sessions}

    def one_round() -> None:
        for label, call in calls.items():
            start = time.perf_counter()
            call()
            samples[label].append((time.perf_counter() - start) * 1e3)

    def ratios() -> dict[str, Ratio]:
        base = samples[baseline]
        out = {}
        for label, values in samples.items():
            med, p10, p90 = _quantiles([b / v for b, v in zip(base, values)])
            out[label] = Ratio(label, med, p10, p90)
        return out

    for _ in range(min_repeats):
        one_round()
    current = ratios()
    while any(r.spread > tolerance for r in current.values()) and len(samples[baseline]) < max_repeats:
        for _ in range(batch):
            one_round()
        current = ratios()
    timings = {}
    for label, values in samples.items():
        med, p10, p90 = _quantiles(values)
        timings[label] = Timing(label, med, p10, p90, load[label])
    stable = all(r.spread <= tolerance for r in current.values())
    return SpeedComparison(baseline, timings, current, len(samples[baseline]), stable, tolerance, threads,
                           runner.provider_names, samples)


def time_models(models: Mapping[str, str | os.PathLike], feeds: Mapping[str, np.ndarray], *,
                warmup: int = 3, repeats: int = 15, threads: int | None = None) -> dict[str, Timing]:
    """Median latency of each model on the same ``feeds``, measured interleaved (fixed rounds)."""
    result = compare_speed(models, feeds, threads=threads, warmup=warmup, min_repeats=repeats,
                           max_repeats=repeats)
    return result.timings


def time_session_creation(models: Mapping[str, str | os.PathLike], *, repeats: int = 5,
                          threads: int | None = None) -> dict[str, float]:
    """Median session-creation time in ms per model, interleaved."""
    runner = cpu_runner(threads)
    samples: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(repeats):
        for label, path in models.items():
            start = time.perf_counter()
            runner.session(path)
            samples[label].append((time.perf_counter() - start) * 1e3)
    return {label: statistics.median(v) for label, v in samples.items()}


def ratio_table(timings, baseline: str) -> list[str]:
    base = next(t for t in timings if t.label == baseline).median_ms
    lines = ["| model | median ms | p10-p90 ms | speedup |", "|---|---|---|---|"]
    for t in timings:
        lines.append(f"| {t.label} | {t.median_ms:.2f} | {t.p10_ms:.2f}-{t.p90_ms:.2f} | {base / t.median_ms:.2f}x |")
    return lines
