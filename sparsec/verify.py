"""Equivalence and fidelity checks: both models in ORT, statistics, verdicts, and the judge.

Compare semantics follow Polygraphy: an element fails only where BOTH ``|a - b| > atol`` and
``|a - b| > rtol * |b|`` (``b`` the reference); NaN or Inf in the candidate where the reference
is finite fails; shapes must match; a verdict over zero compared outputs fails. Tolerances are
explicit and per dtype (:data:`DEFAULT_TOLERANCES`). Statistics are accumulated over every
input set without holding all outputs in memory. String tensors, empty tensors, sequences and
optional outputs compare equal when they are equal.

Results are data (:class:`OutputStats`, :class:`Verdict`); printing only displays them.
:func:`judge` is the one place that turns verdicts and a fidelity :class:`Budget` into a
:class:`Judgement` (EXACT, WITHIN BUDGET, BELOW BUDGET or FAILED): compile, verify, sweep and
:mod:`sparsec.testing` all use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from sparsec.errors import InputError
from sparsec.metrics import Metric
from sparsec.progress import Progress, silent

if TYPE_CHECKING:
    from sparsec.runtime.session import Runner

# (atol, rtol) per output dtype for exact rewrites. Integers and booleans must match exactly.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-8, 1e-7),
    "float32": (1e-5, 1e-4),
    "float16": (1e-3, 1e-2),
    "bfloat16": (1e-2, 5e-2),
}
_SAMPLE_LIMIT = 200_000  # abs differences kept per output for the median / p99
_CHUNK = 1 << 20  # elements compared at a time


def tolerances_for(dtype: np.dtype, atol: float | None, rtol: float | None,
                   floor: tuple[float, float] | None = None) -> tuple[float, float]:
    """Explicit tolerances win; otherwise the per-dtype defaults, raised to ``floor`` for
    floating outputs when a rewrite sums in another order (see ``Pass.reorder_tolerance``);
    exact for integers."""
    default = DEFAULT_TOLERANCES.get(np.dtype(dtype).name, (0.0, 0.0))
    if floor is not None and np.issubdtype(np.dtype(dtype), np.floating):
        default = (max(default[0], floor[0]), max(default[1], floor[1]))
    return (default[0] if atol is None else atol, default[1] if rtol is None else rtol)


@dataclass
class OutputStats:
    """Differences between a reference and a candidate output over all input sets."""

    name: str
    dtype: str
    shape: list[int] = field(default_factory=list)
    elements: int = 0
    atol: float = 0.0
    rtol: float = 0.0
    failing: int = 0
    nonfinite: int = 0
    max_abs: float = 0.0
    mean_abs: float = 0.0
    median_abs: float = 0.0
    p99_abs: float = 0.0
    max_rel: float = 0.0
    rel_l2: float = 0.0
    cosine: float = 1.0
    row_cosine_mean: float | None = None
    row_cosine_min: float | None = None
    error: str = ""  # a shape, type or presence mismatch
    compared: int = 0  # input sets on which the output was compared

    @property
    def passed(self) -> bool:
        """Within tolerance on every input set (an empty tensor equal to an empty reference is)."""
        return not self.error and self.compared > 0 and self.failing == 0 and self.nonfinite == 0

    def line(self, exact: bool = True) -> str:
        if self.error:
            return f"FAILED | output '{self.name}' | {self.error}"
        cos = f"cos {self.cosine:.6f}"
        if self.row_cosine_mean is not None:
            cos += f" (rows: mean {self.row_cosine_mean:.4f}, min {self.row_cosine_min:.4f})"
        diff = f"max_abs {self.max_abs:.2e}, max_rel {self.max_rel:.2e}, rel_l2 {self.rel_l2:.2e}"
        if not exact:
            return f"FIDELITY | output '{self.name}' | {cos} | {diff}"
        verdict = "PASSED" if self.passed else "FAILED"
        beyond = (f"{self.failing} of {self.elements} elements beyond atol {self.atol:g} and rtol {self.rtol:g}"
                  + (f", {self.nonfinite} non-finite" if self.nonfinite else ""))
        return f"{verdict} | output '{self.name}' | {diff}; {beyond} | {cos}"


def _flatten(value: Any, name: str) -> list[tuple[str, Any]]:
    """An output as (label, array or None) leaves: sequences become their elements."""
    if isinstance(value, (list, tuple)):
        out = [(f"{name}[#len]", np.asarray(len(value), np.int64))]
        for i, item in enumerate(value):
            out.extend(_flatten(item, f"{name}[{i}]"))
        return out
    if value is None:
        return [(name, None)]
    return [(name, np.asarray(value))]


class _Accumulator:
    def __init__(self, name: str, atol: float | None, rtol: float | None, seed: int,
                 floor: tuple[float, float] | None = None) -> None:
        self.stats = OutputStats(name, "")
        self.atol, self.rtol, self.floor = atol, rtol, floor
        self.sum_abs = 0.0
        self.sq_diff = 0.0
        self.sq_ref = 0.0
        self.sq_cand = 0.0
        self.dot = 0.0
        self.row_cos: list[np.ndarray] = []
        self.samples: list[np.ndarray] = []
        self.rng = np.random.default_rng(seed)

    def add(self, ref: Any, cand: Any) -> None:
        s = self.stats
        if s.error:
            return
        refs, cands = _flatten(ref, s.name), _flatten(cand, s.name)
        if [label for label, _ in refs] != [label for label, _ in cands]:
            s.error = f"sequence of {len(cands) - 1} items != reference's {len(refs) - 1}" \
                if isinstance(ref, (list, tuple)) else "not the same kind of value as the reference"
            return
        s.compared += 1
        for (label, r), (_, c) in zip(refs, cands):
            if (r is None) != (c is None):
                s.error = f"{label}: {'absent' if c is None else 'present'} where the reference's is not"
                return
            if r is not None:
                self._add_array(label, r, c)

    def _add_array(self, label: str, ref: np.ndarray, cand: np.ndarray) -> None:
        s = self.stats
        if not s.dtype:
            s.dtype = ref.dtype.name
            s.atol, s.rtol = tolerances_for(ref.dtype, self.atol, self.rtol, self.floor)
        if ref.shape != cand.shape:
            s.error = f"{label}: shape {list(cand.shape)} != reference {list(ref.shape)}"
            return
        if ref.dtype != cand.dtype:
            s.error = f"{label}: dtype {cand.dtype} != reference {ref.dtype}"
            return
        if label == s.name:
            s.shape = list(ref.shape)
        if not (np.issubdtype(ref.dtype, np.number) or ref.dtype == np.bool_):
            # Strings and objects: equal or not, element by element.
            unequal = int(np.count_nonzero(ref != cand)) if ref.size else 0
            s.failing += unequal
            s.elements += int(ref.size)
            self.sq_ref += float(ref.size)
            self.dot += float(ref.size - unequal)
            self.sq_cand += float(ref.size)
            self.sq_diff += float(unequal)
            return
        s.elements += int(ref.size)
        rows = ref.ndim >= 2 and ref.size and np.issubdtype(ref.dtype, np.floating)
        # in chunks of about a million elements: a decoder's logits (25M values a window) are
        # otherwise copied to float64 several times over, which costs more than the model's run
        width = ref.shape[-1] if rows else 1
        ref2, cand2 = ref.reshape(-1, width), cand.reshape(-1, width)
        step = max(1, _CHUNK // max(width, 1))
        for i in range(0, ref2.shape[0], step):
            self._add_chunk(ref2[i:i + step], cand2[i:i + step], bool(rows), _SAMPLE_LIMIT / ref.size)

    def _add_chunk(self, ref: np.ndarray, cand: np.ndarray, rows: bool, share: float) -> None:
        """Add a chunk; ``share``: the fraction of its absolute differences kept as a sample."""
        s = self.stats
        a, b = ref.astype(np.float64), cand.astype(np.float64)
        finite_a, finite_b = np.isfinite(a), np.isfinite(b)
        if rows:
            den = np.sqrt(np.einsum("ij,ij->i", a, a) * np.einsum("ij,ij->i", b, b))
            with np.errstate(invalid="ignore", divide="ignore"):
                cos = np.where(den > 0, np.einsum("ij,ij->i", a, b) / np.where(den > 0, den, 1), 1.0)
            self.row_cos.append(cos[np.isfinite(cos)])
        a, b = a.ravel(), b.ravel()
        if not (finite_a.all() and finite_b.all()):
            s.nonfinite += int(np.count_nonzero(finite_a & ~finite_b))
            ok = (finite_a & finite_b).ravel()
            a, b = a[ok], b[ok]
        if not a.size:
            return
        diff = a - b
        self.sq_diff += float(np.dot(diff, diff))
        self.sq_ref += float(np.dot(a, a))
        self.sq_cand += float(np.dot(b, b))
        self.dot += float(np.dot(a, b))
        np.abs(diff, out=diff)
        np.abs(a, out=a)
        s.failing += int(np.count_nonzero((diff > s.atol) & (diff > s.rtol * a)))
        s.max_abs = max(s.max_abs, float(diff.max()))
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            s.max_rel = max(s.max_rel, float(np.max(np.where(diff == 0, 0.0, diff / a))))
        self.sum_abs += float(diff.sum())
        # a uniform sample, at most _SAMPLE_LIMIT per array; with replacement (drawing
        # without it permutes the whole chunk)
        self.samples.append(diff if share >= 1 else diff[self.rng.integers(0, diff.size, max(1, round(share * diff.size)))])

    def finish(self) -> OutputStats:
        s = self.stats
        if s.error:
            s.cosine = 0.0  # an output that is not comparable has no fidelity
            return s
        if not s.compared:
            return s
        if s.elements:
            s.mean_abs = self.sum_abs / s.elements
        if self.samples:
            sample = np.concatenate(self.samples)
            s.median_abs = float(np.median(sample))
            s.p99_abs = float(np.quantile(sample, 0.99))
        s.rel_l2 = math.sqrt(self.sq_diff / self.sq_ref) if self.sq_ref > 0 else math.sqrt(self.sq_diff)
        den = math.sqrt(self.sq_ref * self.sq_cand)
        s.cosine = self.dot / den if den > 0 else (1.0 if self.sq_diff == 0 else 0.0)
        if self.row_cos:
            rows = np.concatenate(self.row_cos)
            if rows.size:
                s.row_cosine_mean = float(rows.mean())
                s.row_cosine_min = float(rows.min())
        return s


@dataclass
class Verdict:
    """The comparison of a candidate with a reference over some input sets."""

    outputs: list[OutputStats]
    input_sets: int
    inputs: str  # where the inputs came from, e.g. "random (seed 0)"
    exact: bool = True  # judged by tolerance (True) or only reported as fidelity (False)
    metrics: dict[str, Any] = field(default_factory=dict)  # task metrics (e.g. embedding cosine)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    @property
    def min_cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=0.0)

    def lines(self) -> list[str]:
        out = [o.line(self.exact) for o in self.outputs]
        n = len(self.outputs)
        if self.exact:
            ok = sum(o.passed for o in self.outputs)
            word = "PASSED" if self.passed else "FAILED"
            out.append(f"{word}: {ok} of {n} outputs within tolerance over {self.input_sets}"
                       f" input set(s), {self.inputs}")
        else:
            out.append(f"fidelity over {self.input_sets} input set(s), {self.inputs}:"
                       f" min output cosine {self.min_cosine:.6f}")
        for key, value in self.metrics.items():
            out.append(f"metric | {key} | {value:.6g}" if isinstance(value, float) else f"metric | {key} | {value}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "exact": self.exact, "input_sets": self.input_sets,
                "inputs": self.inputs, "metrics": self.metrics,
                "outputs": [{**asdict(o), "passed": o.passed} for o in self.outputs]}


def compare(
    results: Iterable[tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]]],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    inputs: str = "",
    exact: bool = True,
    metrics: Sequence[Metric] = (),
    seed: int = 0,
    floor: tuple[float, float] | None = None,
    outputs: bool = True,
) -> Verdict:
    """Accumulate (feed, reference outputs, candidate outputs) triples into a verdict
    (``outputs=False``: the task metrics only, no per-output comparison)."""
    accs: dict[str, _Accumulator] = {}
    count = 0
    for feed, ref, cand in results:
        count += 1
        for name, r in ref.items() if outputs else ():
            if name not in accs:
                accs[name] = _Accumulator(name, atol, rtol, seed, floor)
            if name not in cand:
                accs[name].stats.error = "missing from the candidate's outputs"
                continue
            accs[name].add(r, cand[name])
        for metric in metrics:
            metric.add(feed, ref, cand)
    figures: dict[str, Any] = {}
    for metric in metrics:
        figures.update(metric.result())
    return Verdict([acc.finish() for acc in accs.values()], count, inputs, exact, figures)


def run_pair(reference: str | os.PathLike, candidate: str | os.PathLike,
             feeds: Iterable[Mapping[str, np.ndarray]], *, runner: Runner | None = None,
             progress: Progress | None = None, total: int | None = None, sessions=None):
    """Yield (feed, reference outputs, candidate outputs) per input set, both run in ORT
    (``sessions``: what :func:`open_pair` gave, else opened here)."""
    from sparsec.runtime.kvcache import KVCache

    runner, ref_sess, cand_sess, ref_names = sessions or open_pair(reference, candidate, runner)
    kv = KVCache.of_session(cand_sess)
    inputs = cand_sess.get_inputs()
    progress = progress or silent()
    for feed in progress.track(feeds, "running reference and candidate", total=total):
        ref = runner.run(ref_sess, feed)
        cand_feed, shared = kv.feed(feed, inputs)
        cand = runner.run(cand_sess, cand_feed, ref_names, shared=shared)
        yield feed, *kv.view(ref, cand, KVCache.total(feed))


def reference_outputs(reference: str | os.PathLike, feeds: Sequence[Mapping[str, np.ndarray]], *,
                      runner: Runner | None = None, max_bytes: int | None = None) -> list[dict[str, Any]]:
    """The reference's outputs on each of ``feeds``, kept for comparing several candidates
    against (:func:`verify_against`); with ``max_bytes``, only as many sets as fit (at least one)."""
    from sparsec.runtime.session import cpu_runner

    runner = runner or cpu_runner()
    session = runner.session(reference)
    out, total = [], 0
    for feed in feeds:
        if out and max_bytes is not None and total * (len(out) + 1) / len(out) > max_bytes:
            break  # another set of the same size would not fit
        outputs = runner.run(session, feed)
        total += sum(v.nbytes for v in outputs.values() if isinstance(v, np.ndarray))
        out.append(outputs)
    return out


class StoredOutputs(Sequence):
    """A model's outputs on input sets, one ``.npz`` file per set in a folder, read when indexed
    (so comparing against them holds one set at a time). Arrays are stored by position and the
    output names beside them (``names.json``): an output may have any name, ``file`` included."""

    def __init__(self, folder: Path, count: int) -> None:
        self.folder, self.count = folder, count
        self.names = json.loads((folder / "names.json").read_text())

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if not isinstance(i, int):
            raise TypeError("StoredOutputs is indexed by one input set's number")
        if not -self.count <= i < self.count:
            raise IndexError(i)
        with np.load(self.folder / f"{i % self.count}.npz") as z:
            return {name: z[f"arr_{j}"] for j, name in enumerate(self.names[i % self.count])}


def _feeds_digest(feeds: Sequence[Mapping[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for feed in feeds:
        for name, value in feed.items():
            array = np.ascontiguousarray(value)
            h.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
            h.update(array.tobytes())
    return h.hexdigest()


def shared_reference_outputs(reference: str | os.PathLike, feeds: Sequence[Mapping[str, np.ndarray]],
                             folder: str | os.PathLike, *, model_key: str, runner: Runner | None = None,
                             outputs: Sequence[Mapping[str, Any]] | None = None) -> Sequence[Mapping[str, Any]]:
    """The reference's outputs on ``feeds``, kept in ``folder`` for other verifications of the
    same model on the same inputs to read instead of running it again (a sweep's candidates).

    Stored under a key of ``model_key`` (the reference's fingerprint), the input sets' bytes and
    the runner (providers, threads), which decide the outputs' bits; when absent they are
    computed (or taken from ``outputs``, when the caller has them already) and written whole or
    not at all, so concurrent writers of one key leave one complete copy. Outputs that are not
    plain arrays (sequences, optionals) are not stored: they are returned from memory.
    """
    from sparsec.runtime.session import cpu_runner

    runner = runner or cpu_runner()
    key = hashlib.sha256(f"{model_key}|{_feeds_digest(feeds)}|{runner.providers!r}|{runner.threads}"
                         f"|{runner.optimize}".encode()).hexdigest()[:24]
    final = Path(folder) / key
    if final.is_dir():
        return StoredOutputs(final, len(feeds))
    computed = list(outputs) if outputs is not None else reference_outputs(reference, feeds, runner=runner)
    if not all(isinstance(v, np.ndarray) for out in computed for v in out.values()):
        return computed
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
    try:
        for i, out in enumerate(computed):
            with open(tmp / f"{i}.npz", "wb") as f:
                np.savez(f, *out.values())
        (tmp / "names.json").write_text(json.dumps([list(out) for out in computed]))
        os.rename(tmp, final)
    except OSError:  # another writer got there first (or the folder is full): ours is not needed
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            return computed
    return StoredOutputs(final, len(feeds))


def verify_against(references: Sequence[Mapping[str, Any]], candidate: str | os.PathLike,
                   feeds: Sequence[Mapping[str, np.ndarray]], *, exact: bool = True, inputs: str = "",
                   metrics: Sequence[Metric] = (), runner: Runner | None = None, outputs: bool = True,
                   progress: Progress | None = None, floor: tuple[float, float] | None = None) -> Verdict:
    """:func:`verify_models` against the reference outputs of :func:`reference_outputs` (the
    first ``len(references)`` of ``feeds``): only the candidate runs. ``floor`` defaults to
    what the candidate records, as there."""
    from sparsec.runtime.kvcache import KVCache
    from sparsec.runtime.session import cpu_runner

    runner = runner or cpu_runner()
    session = runner.session(candidate)
    names = list(references[0]) if references else []
    have = {o.name for o in session.get_outputs()}
    missing = [n for n in names if n not in have]
    if missing:
        raise InputError(f"the candidate has no output '{missing[0]}' (reference outputs: {', '.join(names)})")
    kv = KVCache.of_session(session)

    progress = progress or silent()
    count = min(len(feeds), len(references))

    def triples():
        for feed, ref in progress.track(zip(feeds, references), "running the candidate", total=count):
            cand_feed, shared = kv.feed(feed, session.get_inputs())
            cand = runner.run(session, cand_feed, names, shared=shared)
            yield feed, *kv.view(ref, cand, KVCache.total(feed))

    if floor is None:
        floor = recorded_floor(session.get_modelmeta().custom_metadata_map)
    return compare(triples(), inputs=inputs, exact=exact, metrics=metrics, outputs=outputs, floor=floor)


def open_pair(reference: str | os.PathLike, candidate: str | os.PathLike, runner: Runner | None = None):
    """(runner, reference session, candidate session, the reference's output names); the
    candidate must have every output of the reference."""
    from sparsec.runtime.session import cpu_runner

    runner = runner or cpu_runner()
    ref_sess = runner.session(reference)
    cand_sess = runner.session(candidate)
    ref_names = [o.name for o in ref_sess.get_outputs()]
    cand_names = {o.name for o in cand_sess.get_outputs()}
    missing = [n for n in ref_names if n not in cand_names]
    if missing:
        raise InputError(f"the candidate has no output '{missing[0]}' (reference outputs: {', '.join(ref_names)})")
    return runner, ref_sess, cand_sess, ref_names


TOLERANCE_FLOOR_KEY = "sparsec.tolerance_floor"  # metadata: "atol,rtol" its exact rewrites need at least
MAX_POSITIONS_KEY = "sparsec.max_positions"  # metadata: the fused rotary tables' length (positions 0..N-1)


def recorded_floor(metadata: Mapping[str, str]) -> tuple[float, float] | None:
    """The tolerance floor a compiled model records in its metadata, if any."""
    try:
        atol, rtol = (float(v) for v in metadata[TOLERANCE_FLOOR_KEY].split(","))
    except (KeyError, ValueError):
        return None
    return atol, rtol


def verify_models(reference: str | os.PathLike, candidate: str | os.PathLike,
                  feeds: Sequence[Mapping[str, np.ndarray]], *, atol: float | None = None,
                  rtol: float | None = None, inputs: str = "", exact: bool = True,
                  metrics: Sequence[Metric] = (), runner: Runner | None = None,
                  progress: Progress | None = None, floor: tuple[float, float] | None = None) -> Verdict:
    """Run both models on ``feeds`` and compare every output of the reference. ``floor``
    defaults to what the candidate's metadata records (``sparsec.tolerance_floor``: a fused
    kernel that sums in another order)."""
    sessions = open_pair(reference, candidate, runner)
    if floor is None:
        floor = recorded_floor(sessions[2].get_modelmeta().custom_metadata_map)
    return compare(run_pair(reference, candidate, feeds, progress=progress, total=len(feeds), sessions=sessions),
                   atol=atol, rtol=rtol, inputs=inputs, exact=exact, metrics=metrics, floor=floor)


def verify_staged(reference: ir.Model, candidate: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], *,
                  budget_bytes: int | None = None, inputs: str = "", exact: bool = True,
                  metrics: Sequence[Metric] = (), runner: Runner | None = None,
                  progress: Progress | None = None, floor: tuple[float, float] | None = None,
                  reference_outputs: Sequence[Mapping[str, np.ndarray]] | None = None) -> Verdict:
    """:func:`verify_models` for models too large to hold twice in memory: both run in stages
    (the reference only when its outputs on ``feeds`` are not given)."""
    from sparsec.runtime.kvcache import KVCache
    from sparsec.runtime.staged import STAGE_BYTES, staged_outputs

    budget_bytes = budget_bytes or STAGE_BYTES
    ref = reference_outputs or staged_outputs(reference, feeds, budget_bytes=budget_bytes, runner=runner,
                                              progress=progress)
    kv = KVCache.of(candidate.metadata_props)
    if kv.shared is not None:
        raise InputError("a model whose KV cache is one shared buffer cannot run in stages; verify it whole")
    floor = floor or recorded_floor(candidate.metadata_props)
    cand = staged_outputs(candidate, [kv.feed(f)[0] for f in feeds], budget_bytes=budget_bytes,
                          runner=runner, progress=progress)
    pairs = ((feed, *kv.view(r, c)) for feed, r, c in zip(feeds, ref, cand))
    return compare(pairs, inputs=f"{inputs}; run in stages of <= {budget_bytes >> 20} MiB of weights",
                   exact=exact, metrics=metrics, floor=floor)


# --- the judge -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """How far a lossy result may move from the original (None: not part of this budget).

    ``min_cosine`` holds for every output (on real inputs when the model has some, else on
    random inputs); the task criteria need the model's task metric: ``min_embedding_cosine``
    (mean sentence-embedding cosine, encoders) and ``max_ppl_ratio`` (perplexity against the
    original's, decoders). ``max_rel_err`` bounds every output's relative error, in the L2 sense:
    ``||candidate - original|| / ||original||`` over all its elements and input sets (an
    element-wise relative error explodes where the original is near zero). ``origin`` says who
    set it: "user", "recipe" or "default".
    """

    min_cosine: float | None = None
    min_embedding_cosine: float | None = None
    max_ppl_ratio: float | None = None
    max_rel_err: float | None = None
    origin: str = "user"

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.min_cosine, self.min_embedding_cosine, self.max_ppl_ratio,
                                       self.max_rel_err))

    @property
    def reads_outputs(self) -> bool:
        """Whether a criterion compares every output itself (not only a task metric)."""
        return self.min_cosine is not None or self.max_rel_err is not None

    def describe(self) -> str:
        parts = []
        if self.min_cosine is not None:
            parts.append(f"every output's cosine >= {self.min_cosine:g}")
        if self.min_embedding_cosine is not None:
            parts.append(f"mean sentence-embedding cosine >= {self.min_embedding_cosine:g}")
        if self.max_ppl_ratio is not None:
            parts.append(f"perplexity <= {self.max_ppl_ratio:g}x the original's")
        if self.max_rel_err is not None:
            parts.append(f"every output's relative L2 error <= {self.max_rel_err:g}")
        return " and ".join(parts) or "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


EXACT = "EXACT"
WITHIN = "WITHIN BUDGET"
BELOW = "BELOW BUDGET"
FAILED = "FAILED"


@dataclass
class Check:
    """One criterion of a judgement, with its figure."""

    status: str  # EXACT | WITHIN BUDGET | BELOW BUDGET | FAILED
    what: str
    value: float | None = None
    threshold: str = ""
    inputs: str = ""
    kind: str = "budget"  # tolerance | budget | broken

    @property
    def ok(self) -> bool:
        return self.status in (EXACT, WITHIN)

    def line(self) -> str:
        figure = f" {self.value:.6g}" if self.value is not None else ""
        bound = f" {self.threshold}" if self.threshold else ""
        where = f" | {self.inputs}" if self.inputs else ""
        return f"{self.status} | {self.what}{figure}{bound}{where}"


@dataclass
class Judgement:
    """Whether a candidate may stand in for the original: the one verdict of sparsec."""

    status: str  # EXACT | WITHIN BUDGET | BELOW BUDGET | FAILED
    checks: list[Check]
    budget: Budget | None = None

    @property
    def passed(self) -> bool:
        return self.status in (EXACT, WITHIN)

    @property
    def failure(self) -> str:
        """One line: the first check that failed, '' when passed."""
        bad = next((c for c in self.checks if not c.ok), None)
        if bad is None:
            return ""
        if bad.status == BELOW:
            return f"fidelity below the budget: {bad.what} {bad.value:.6g} {bad.threshold} ({bad.inputs})"
        if bad.kind == "tolerance":
            return f"exact rewrite changed the outputs: {bad.what} {bad.value:.6g} ({bad.inputs})"
        return f"{bad.what}{f' {bad.value:.6g}' if bad.value is not None else ''} {bad.threshold}".strip() \
            + (f" ({bad.inputs})" if bad.inputs else "")

    def lines(self) -> list[str]:
        return [c.line() for c in self.checks]

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "passed": self.passed, "failure": self.failure,
                "budget": self.budget.to_dict() if self.budget else None,
                "checks": [asdict(c) for c in self.checks]}


def unchanged_judgement() -> Judgement:
    """No pass changed anything: the output is the input as sparsec writes it (names given to
    unnamed nodes, topological order), nothing to run."""
    return Judgement(EXACT, [Check(EXACT, "no pass changed the model: written without running it",
                                   kind="tolerance")])


def _broken(verdict: Verdict) -> list[Check]:
    """Outputs that cannot be compared at all: missing, reshaped, non-finite; no output."""
    if not verdict.outputs:
        return [Check(FAILED, "no outputs were compared", inputs=verdict.inputs, kind="broken")]
    checks = []
    for o in verdict.outputs:
        if o.error:
            checks.append(Check(FAILED, f"output '{o.name}': {o.error}", inputs=verdict.inputs, kind="broken"))
        elif not o.compared:
            checks.append(Check(FAILED, f"output '{o.name}' was not compared", inputs=verdict.inputs, kind="broken"))
        elif o.nonfinite:
            checks.append(Check(FAILED, f"output '{o.name}': {o.nonfinite} non-finite values where the"
                                " reference is finite", inputs=verdict.inputs, kind="broken"))
    return checks


def judge(verdicts: Mapping[str, Verdict], budget: Budget | None = None, *, exact: bool) -> Judgement:
    """The one verdict: EXACT when ``exact`` and every output is within tolerance on every input
    set; else WITHIN / BELOW BUDGET against ``budget`` on the primary verdict (real inputs when
    there are some). An output that is missing, changed shape or went non-finite is FAILED
    whatever the budget, and so is a judgement over no outputs.
    """
    checks: list[Check] = []
    if not verdicts:
        return Judgement(FAILED, [Check(FAILED, "nothing was verified")], budget)
    for verdict in verdicts.values():
        checks.extend(_broken(verdict))
    if checks:
        return Judgement(FAILED, checks, budget)
    if exact:
        for verdict in verdicts.values():
            for o in verdict.outputs:
                if o.passed:
                    checks.append(Check(EXACT, f"output '{o.name}' max_abs", o.max_abs,
                                        f"(atol {o.atol:g}, rtol {o.rtol:g})", verdict.inputs, "tolerance"))
                else:
                    checks.append(Check(FAILED, f"output '{o.name}': {o.failing} of {o.elements} elements"
                                        f" beyond atol {o.atol:g} and rtol {o.rtol:g}; max_abs", o.max_abs,
                                        "", verdict.inputs, "tolerance"))
    primary = verdicts.get("real") or next(iter(verdicts.values()))
    if budget is not None:
        if budget.min_cosine is not None:
            for o in primary.outputs:
                ok = o.cosine >= budget.min_cosine
                checks.append(Check(WITHIN if ok else BELOW, f"output '{o.name}' cosine", o.cosine,
                                    f"{'>=' if ok else '<'} min_cosine {budget.min_cosine}", primary.inputs))
        if budget.max_rel_err is not None:
            for o in primary.outputs:
                ok = o.rel_l2 <= budget.max_rel_err
                checks.append(Check(WITHIN if ok else BELOW, f"output '{o.name}' relative L2 error", o.rel_l2,
                                    f"{'<=' if ok else '>'} max_rel_err {budget.max_rel_err}", primary.inputs))
        for key, bound, label, higher in (
                ("embedding_cosine_mean", budget.min_embedding_cosine, "sentence-embedding cosine (mean)", True),
                ("perplexity_ratio", budget.max_ppl_ratio, "perplexity ratio", False)):
            if bound is None:
                continue
            value = primary.metrics.get(key)
            if value is None:
                checks.append(Check(FAILED, f"{label} was not measured: it needs the model's real inputs"
                                    " and task metric", inputs=primary.inputs, kind="broken"))
                continue
            ok = value >= bound if higher else value <= bound
            sign = (">=" if ok else "<") if higher else ("<=" if ok else ">")
            checks.append(Check(WITHIN if ok else BELOW, label, float(value), f"{sign} {bound}", primary.inputs))
    if any(c.status == FAILED for c in checks):
        return Judgement(FAILED, checks, budget)
    if any(c.status == BELOW for c in checks):
        return Judgement(BELOW, checks, budget)
    if exact:
        return Judgement(EXACT, checks, budget)
    if budget is None or budget.empty:
        return Judgement(BELOW, checks + [Check(BELOW, "a lossy result with no fidelity budget")], budget)
    return Judgement(WITHIN, checks, budget)
