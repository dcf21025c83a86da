"""Equivalence and fidelity checks: seeded inputs, both models in ORT, statistics, verdicts.

Compare semantics follow Polygraphy: an element fails only where BOTH ``|a - b| > atol`` and
``|a - b| > rtol * |b|`` (``b`` the reference); NaN or Inf in the candidate where the reference
is finite fails; shapes must match; a verdict over zero compared outputs fails. Tolerances are
explicit and per dtype (:data:`DEFAULT_TOLERANCES`). Statistics are accumulated over every
input set without holding all outputs in memory.

Results are data (:class:`OutputStats`, :class:`Verdict`); printing only displays them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from sparsec.errors import InputError
from sparsec.graph import constant_ref
from sparsec.metrics import Metric
from sparsec.progress import Progress, silent

# (atol, rtol) per output dtype for exact rewrites. Integers and booleans must match exactly.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-8, 1e-7),
    "float32": (1e-5, 1e-4),
    "float16": (1e-3, 1e-2),
    "bfloat16": (1e-2, 5e-2),
}
# Symbolic dimensions default to 1 when their name says batch, else to this.
DEFAULT_DIM = 16
_SAMPLE_LIMIT = 200_000  # abs differences kept per output for the median / p99


@dataclass(frozen=True)
class InputSpec:
    """A graph input and how to fill it with valid random data."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str | None, ...]
    fill: str  # normal | randint | ones | zeros | arange | bool
    high: int = 2  # exclusive upper bound for randint


def _np_dtype(dtype: ir.DataType) -> np.dtype:
    return np.dtype(dtype.numpy())


def _index_range(value: ir.Value, depth: int = 3) -> int | None:
    """Rows of the table an integer input indexes (Gather indices), following cheap ops."""
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for use in v.uses():
                node = use.node
                if node.op_type == "Gather" and use.idx == 1:
                    table = constant_ref(node.inputs[0])
                    if table is not None:
                        axis_attr = node.attributes.get("axis")
                        axis = int(axis_attr.value) if axis_attr is not None else 0
                        return table.shape[axis]
                if node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"):
                    nxt.extend(node.outputs)
        frontier = nxt
    return None


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller must feed (initializer-backed inputs have defaults and are left out)."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        if value.dtype is None or value.shape is None:
            raise InputError(f"graph input '{value.name}' has no type or shape; cannot make inputs for it")
        dtype = _np_dtype(value.dtype)
        dims = tuple(d if isinstance(d, int) else (d.value if d.value is not None else None)
                     for d in value.shape)
        lname = (value.name or "").lower()
        high = 2
        if dtype == np.bool_:
            fill = "bool"
        elif np.issubdtype(dtype, np.integer):
            if "mask" in lname:
                fill = "ones"
            elif "position" in lname:
                fill = "arange"
            elif "token_type" in lname or "segment" in lname:
                fill = "zeros"
            else:
                fill = "randint"
                high = _index_range(value) or 2
        else:
            fill = "normal"
        specs.append(InputSpec(value.name or "", dtype.name, dims, fill, high))
    return specs


def parse_dims(items: Iterable[str]) -> dict[str, int]:
    """``["seq=128", "batch=2"]`` -> ``{"seq": 128, "batch": 2}``."""
    dims = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name or not re.fullmatch(r"\d+", raw.strip()) or int(raw) <= 0:
            raise InputError(f"--dim expects NAME=POSITIVE_INT, got '{item}'")
        dims[name.strip()] = int(raw)
    return dims


def resolve_shape(spec: InputSpec, dims: Mapping[str, int]) -> tuple[int, ...]:
    shape = []
    for i, d in enumerate(spec.shape):
        if isinstance(d, int):
            shape.append(d)
        elif d is not None and d in dims:
            shape.append(dims[d])
        elif d is not None and "batch" in d.lower():
            shape.append(1)
        else:
            shape.append(dims.get(f"{spec.name}.{i}", DEFAULT_DIM))
    return tuple(shape)


def random_feeds(specs: Sequence[InputSpec], *, seed: int = 0, dims: Mapping[str, int] | None = None,
                 samples: int = 1) -> list[dict[str, np.ndarray]]:
    """Seeded, valid random inputs: the same seed gives the same arrays."""
    dims = dims or {}
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(samples):
        feed = {}
        for spec in specs:
            shape = resolve_shape(spec, dims)
            dtype = np.dtype(spec.dtype)
            if spec.fill == "normal":
                arr = rng.standard_normal(shape).astype(dtype)
            elif spec.fill == "randint":
                arr = rng.integers(0, spec.high, size=shape).astype(dtype)
            elif spec.fill == "ones":
                arr = np.ones(shape, dtype=dtype)
            elif spec.fill == "zeros":
                arr = np.zeros(shape, dtype=dtype)
            elif spec.fill == "arange":
                arr = np.broadcast_to(np.arange(shape[-1] if shape else 1, dtype=dtype), shape).copy()
            else:
                arr = rng.integers(0, 2, size=shape).astype(bool)
            feed[spec.name] = arr
        feeds.append(feed)
    return feeds


def load_feeds(path: str | os.PathLike, specs: Sequence[InputSpec]) -> list[dict[str, np.ndarray]]:
    """Input sets from a .npz: keys are input names (one set) or ``K/name`` (set K).

    Raises:
        InputError: unreadable file, unknown or missing inputs, wrong dtype or rank.
    """
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
        arrays = {k: archive[k] for k in archive.files}
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0][:200]})") from None
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        set_name, _, name = key.rpartition("/")
        groups.setdefault(set_name, {})[name] = arr
    by_name = {s.name: s for s in specs}
    feeds = []
    for set_name in sorted(groups, key=lambda k: (len(k), k)):
        feed = groups[set_name]
        for name, arr in feed.items():
            if name not in by_name:
                raise InputError(f"{path}: '{name}' is not an input of the model (inputs: {', '.join(by_name)})")
            spec = by_name[name]
            expected = tuple(d if isinstance(d, int) else (d or "?") for d in spec.shape)
            if arr.dtype != np.dtype(spec.dtype):
                raise InputError(f"{path}: input '{name}' is {arr.dtype}, the model expects {spec.dtype} {list(expected)}")
            if arr.ndim != len(spec.shape) or any(isinstance(d, int) and d != a for d, a in zip(spec.shape, arr.shape)):
                raise InputError(f"{path}: input '{name}' has shape {list(arr.shape)}, the model expects {list(expected)}")
        missing = [n for n in by_name if n not in feed]
        if missing:
            raise InputError(f"{path}: no array for input '{missing[0]}'")
        feeds.append(feed)
    if not feeds:
        raise InputError(f"{path}: contains no arrays")
    return feeds


def tolerances_for(dtype: np.dtype, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """Explicit tolerances win; otherwise the per-dtype defaults; exact for integers."""
    default = DEFAULT_TOLERANCES.get(np.dtype(dtype).name, (0.0, 0.0))
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
    error: str = ""  # a shape or presence mismatch

    @property
    def passed(self) -> bool:
        return not self.error and self.elements > 0 and self.failing == 0 and self.nonfinite == 0

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


class _Accumulator:
    def __init__(self, name: str, dtype: np.dtype, atol: float, rtol: float, seed: int) -> None:
        self.stats = OutputStats(name, np.dtype(dtype).name, atol=atol, rtol=rtol)
        self.sum_abs = 0.0
        self.sq_diff = 0.0
        self.sq_ref = 0.0
        self.sq_cand = 0.0
        self.dot = 0.0
        self.row_cos: list[np.ndarray] = []
        self.samples: list[np.ndarray] = []
        self.rng = np.random.default_rng(seed)

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        s = self.stats
        if s.error:
            return
        if ref.shape != cand.shape:
            s.error = f"shape {list(cand.shape)} != reference {list(ref.shape)}"
            return
        if ref.dtype != cand.dtype:
            s.error = f"dtype {cand.dtype} != reference {ref.dtype}"
            return
        s.shape = list(ref.shape)
        a = ref.astype(np.float64).ravel()
        b = cand.astype(np.float64).ravel()
        finite = np.isfinite(a)
        bad = finite & ~np.isfinite(b)
        s.nonfinite += int(bad.sum())
        ok = finite & np.isfinite(b)
        a, b = a[ok], b[ok]
        diff = np.abs(a - b)
        s.failing += int(np.count_nonzero((diff > s.atol) & (diff > s.rtol * np.abs(a))))
        s.elements += int(ref.size)
        if diff.size:
            s.max_abs = max(s.max_abs, float(diff.max()))
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                rel = np.where(diff == 0, 0.0, diff / np.abs(a))
            s.max_rel = max(s.max_rel, float(rel.max()))
            self.sum_abs += float(diff.sum())
            take = min(diff.size, _SAMPLE_LIMIT)
            self.samples.append(diff if take == diff.size else self.rng.choice(diff, take, replace=False))
        self.sq_diff += float(np.dot(a - b, a - b))
        self.sq_ref += float(np.dot(a, a))
        self.sq_cand += float(np.dot(b, b))
        self.dot += float(np.dot(a, b))
        if ref.ndim >= 2 and np.issubdtype(ref.dtype, np.floating):
            ra = ref.astype(np.float64).reshape(-1, ref.shape[-1])
            rb = cand.astype(np.float64).reshape(-1, ref.shape[-1])
            den = np.linalg.norm(ra, axis=1) * np.linalg.norm(rb, axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                cos = np.where(den > 0, (ra * rb).sum(axis=1) / np.where(den > 0, den, 1), 1.0)
            self.row_cos.append(cos[np.isfinite(cos)])

    def finish(self) -> OutputStats:
        s = self.stats
        if s.error or not s.elements:
            return s
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
    results: Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], Mapping[str, np.ndarray]]],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    inputs: str = "",
    exact: bool = True,
    metrics: Sequence[Metric] = (),
    seed: int = 0,
) -> Verdict:
    """Accumulate (feed, reference outputs, candidate outputs) triples into a verdict."""
    accs: dict[str, _Accumulator] = {}
    count = 0
    for feed, ref, cand in results:
        count += 1
        for name, r in ref.items():
            if name not in accs:
                a, rt = tolerances_for(r.dtype, atol, rtol)
                accs[name] = _Accumulator(name, r.dtype, a, rt, seed)
            if name not in cand:
                accs[name].stats.error = "missing from the candidate's outputs"
                continue
            accs[name].add(np.asarray(r), np.asarray(cand[name]))
        for metric in metrics:
            metric.add(feed, ref, cand)
    figures: dict[str, Any] = {}
    for metric in metrics:
        figures.update(metric.result())
    return Verdict([acc.finish() for acc in accs.values()], count, inputs, exact, figures)


def run_pair(reference: str | os.PathLike, candidate: str | os.PathLike,
             feeds: Iterable[Mapping[str, np.ndarray]], *, threads: int | None = None,
             progress: Progress | None = None, total: int | None = None):
    """Yield (feed, reference outputs, candidate outputs) per input set, both run in ORT."""
    from sparsec.runtime import session as rt

    ref_sess = rt.create_session(reference, threads=threads)
    cand_sess = rt.create_session(candidate, threads=threads)
    ref_names = [o.name for o in ref_sess.get_outputs()]
    cand_names = {o.name for o in cand_sess.get_outputs()}
    missing = [n for n in ref_names if n not in cand_names]
    if missing:
        raise InputError(f"the candidate has no output '{missing[0]}' (reference outputs: {', '.join(ref_names)})")
    progress = progress or silent()
    for feed in progress.track(feeds, "running reference and candidate", total=total):
        yield feed, rt.run(ref_sess, feed), rt.run(cand_sess, feed, ref_names)


def verify_models(reference: str | os.PathLike, candidate: str | os.PathLike,
                  feeds: Sequence[Mapping[str, np.ndarray]], *, atol: float | None = None,
                  rtol: float | None = None, inputs: str = "", exact: bool = True,
                  metrics: Sequence[Metric] = (), threads: int | None = None,
                  progress: Progress | None = None) -> Verdict:
    """Run both models on ``feeds`` and compare every output of the reference."""
    return compare(run_pair(reference, candidate, feeds, threads=threads, progress=progress,
                            total=len(feeds)),
                   atol=atol, rtol=rtol, inputs=inputs, exact=exact, metrics=metrics)


def _weight_bytes(value: ir.Value) -> int:
    """Bytes of a constant as a stage holds it (a packed weight counts unpacked)."""
    if value.shape is not None and value.dtype is not None and all(isinstance(d, int) for d in value.shape):
        return int(int(np.prod(list(value.shape), dtype=np.int64)) * value.dtype.itemsize)
    ref = constant_ref(value)
    return ref.tensor.nbytes if ref is not None else 0


def _cuts(model: ir.Model, budget_bytes: int) -> list[ir.Value]:
    """Values to stop at so that each stage reads at most about ``budget_bytes`` of weights."""
    from sparsec.graph import PROVENANCE_PASS

    counted: set[ir.Value] = set()
    cuts, acc = [], 0
    for node in model.graph:
        if node.metadata_props.get(PROVENANCE_PASS) == "compress":
            continue  # rebuilds of packed weights: stages take their weights unpacked
        for v in node.inputs:
            if v is not None and v not in counted and constant_ref(v) is not None:
                counted.add(v)
                acc += _weight_bytes(v)
        if acc >= budget_bytes and node.outputs:
            cuts.append(node.outputs[0])
            acc = 0
    return cuts


def staged_outputs(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], *, budget_bytes: int,
                   progress: Progress | None = None) -> list[dict[str, np.ndarray]]:
    """The model's outputs for ``feeds``, computed stage by stage with bounded weights in memory."""
    from sparsec.calib import StagedRunner

    runner = StagedRunner(model, [dict(f) for f in feeds], progress=progress)
    cuts = _cuts(model, budget_bytes)
    for cut in (progress or silent()).track(cuts, "running in stages", total=len(cuts)):
        for _ in runner.capture(cut):
            pass
    outputs: list[dict[str, np.ndarray]] = [{} for _ in feeds]
    for value in model.graph.outputs:
        for i, array in enumerate(runner.capture(value)):
            outputs[i][value.name] = array
    return outputs


def verify_staged(reference: ir.Model, candidate: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], *,
                  budget_bytes: int = 256 << 20, inputs: str = "", exact: bool = True,
                  progress: Progress | None = None) -> Verdict:
    """:func:`verify_models` for models too large to hold twice in memory: both run in stages."""
    ref = staged_outputs(reference, feeds, budget_bytes=budget_bytes, progress=progress)
    cand = staged_outputs(candidate, feeds, budget_bytes=budget_bytes, progress=progress)
    return compare(zip(feeds, ref, cand), inputs=f"{inputs}; run in stages of <= {budget_bytes >> 20} MiB of weights",
                   exact=exact)
