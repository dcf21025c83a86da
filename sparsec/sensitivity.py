"""Per-layer sensitivity: how far the model's outputs move when one layer alone is pruned.

For every layer (a transformer block, or each weight with ``by="site"``) and every sparsity
level, that layer's linear weights are pruned (magnitude or Wanda masks, unstructured) and the
model is run on calibration inputs; the drop is ``1 - cosine`` of the outputs against the dense
model (and the relative L2 error). One ONNX Runtime session serves every variant: the weights
under study become overridable graph inputs and each variant feeds its pruned copies.

With Wanda statistics it also reports the OWL allocation for a target sparsity: the non-uniform
per-layer sparsity ``unstructured:allocation=owl`` would use.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from sparsec.data import Calibration
from sparsec.engine import Engine, as_engine
from sparsec.model_io import stage_model
from sparsec.pipeline import PassRecord
from sparsec.progress import Progress, silent
from sparsec.runtime.session import Runner
from sparsec.sparsity import UnstructuredLayout


@dataclass
class LayerSensitivity:
    layer: str
    params: int
    drop: dict[str, float]  # level -> 1 - cosine
    rel_l2: dict[str, float]


@dataclass
class Sensitivity:
    method: str
    levels: list[float]
    inputs: str
    layers: list[LayerSensitivity]
    allocation: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        from sparsec.report import format_table, human_count

        out = [f"sensitivity ({self.method} masks, unstructured), outputs vs dense on {self.inputs}:",
               "drop = 1 - cosine of the outputs when only that layer is pruned", ""]
        rows = []
        for layer in self.layers:
            row = {"layer": layer.layer, "params": human_count(layer.params)}
            row.update({f"{float(k):.0%}": f"{v:.2e}" for k, v in layer.drop.items()})
            if self.allocation:
                alloc = self.allocation["layers"].get(layer.layer)
                if alloc:
                    row["outliers"] = f"{alloc['outlier_ratio']:.2%}"
                    row[f"OWL@{self.allocation['target']:.0%}"] = f"{alloc['sparsity']:.1%}"
            rows.append(row)
        columns = list(rows[0]) if rows else ["layer"]
        out.extend(format_table(rows, columns))
        out.extend(f"note: {n}" for n in self.notes)
        return out


def _compare(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray]) -> tuple[float, float]:
    a = np.concatenate([ref[k].astype(np.float64).ravel() for k in sorted(ref)])
    b = np.concatenate([cand[k].astype(np.float64).ravel() for k in sorted(ref)])
    cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))
    return 1.0 - cos, float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-300))


def layer_sensitivity(model: ir.Model, calibration: Calibration, *, levels=(0.3, 0.5, 0.7),
                      method: str = "magnitude", by: str = "layer", target: float = 0.5,
                      owl_lambda: float = 0.08, owl_m: float = 5.0, sets: int = 2,
                      runner: Runner | None = None, progress: Progress | None = None,
                      engine: Engine | None = None) -> Sensitivity:
    """Measure per-layer sensitivity on ``calibration`` (the first ``sets`` input sets); each
    layer is a unit of ``engine`` (:mod:`sparsec.engine`; default in this process)."""
    from sparsec.passes import prune_methods
    from sparsec.passes.allocation import layer_of, owl_allocation
    from sparsec.passes.quantized import EncodedWeight
    from sparsec.passes.unstructured_prune import UnstructuredPrunePass
    from sparsec.runtime.session import cpu_runner

    runner = runner or cpu_runner()
    progress = progress or silent()
    probe = UnstructuredPrunePass(min_params=1)
    record = PassRecord("sensitivity", "analysis", {})
    sites = [s for s in probe.select_sites(model, record) if s.weight.constant_node is None]
    # Weights read through DequantizeLinear, MatMulNBits or Cast would be fed to ORT in their
    # stored types (int4, packed, bf16), which it does not take as plain inputs: measured dense.
    encoded = [s for s in sites if isinstance(s.weight, EncodedWeight)]
    sites = [s for s in sites if not isinstance(s.weight, EncodedWeight)]
    notes = [f"{len(encoded)} weights stored quantized or cast (QDQ, MatMulNBits, Cast) are not"
             " measured"] if encoded else []
    feeds = calibration.feeds[:sets]
    norms: dict[int, np.ndarray] = {}
    allocation = None
    if method == "wanda":
        capturer = runner.staged(model, calibration.feeds, progress=progress)
        groups: dict[ir.Value, list] = defaultdict(list)
        for site in sites:
            groups[site.node.inputs[1 - site.input_index]].append(site)
        for value, group in progress.track(list(groups.items()), "sensitivity: Wanda statistics"):
            stats = prune_methods.group_statistics(group, calibration.feeds, capturer.capture(value),
                                                   prune_methods.ColumnNorms)
            for site in group:
                norms[id(site)] = np.sqrt(stats[prune_methods.statistic_key(site)].sq)
        _, table = owl_allocation(sites, norms, target, owl_lambda, owl_m)
        allocation = {"target": target, "lambda": owl_lambda, "m": owl_m, "layers": table}
    by_layer: dict[str, list] = defaultdict(list)
    for site in sites:
        by_layer[layer_of(site.label) if by == "layer" else site.weight.name].append(site)

    overridable = [s.weight.value for s in sites if s.weight.value not in model.graph.inputs]
    model.graph.inputs.extend(overridable)
    engine = as_engine(engine)
    try:
        with tempfile.TemporaryDirectory(prefix="sparsec-sensitivity-") as tmp:
            with stage_model(model, Path(tmp) / "model.onnx", external_data=True) as staged:
                session = runner.session(staged.path)
                reference = [runner.run(session, feed) for feed in feeds]
                _SESSION.clear()
                _SESSION[(str(staged.path), repr(runner))] = session  # in this process: reused
                layers = []
                work = [(name, group) for name, group in by_layer.items()]
                # Layers are engine units; a few at a time, as each carries its pruned weights.
                size = 1 if engine.workers == 1 else 2 * engine.workers
                shared = {"path": str(staged.path), "runner": runner, "feeds": feeds, "reference": reference}
                for start in progress.track(range(0, len(work), size), "sensitivity: pruning one layer at a time",
                                            total=-(-len(work) // size)):
                    part = work[start:start + size]
                    jobs = [{str(level): _pruned(group, UnstructuredLayout(level), method, norms) for level in levels}
                            for _, group in part]
                    measured = engine.map(layer_drops, jobs, labels=[name for name, _ in part],
                                          what="sensitivity of layer", shared=shared)
                    for (name, group), (drop, rel) in zip(part, measured):
                        layers.append(LayerSensitivity(name, sum(int(np.prod(s.weight.shape)) for s in group),
                                                       drop, rel))
    finally:
        _SESSION.clear()
        for value in overridable:
            model.graph.inputs.remove(value)
    return Sensitivity(method, list(levels), calibration.source, layers, allocation, notes)


def _pruned(group: list, layout: UnstructuredLayout, method: str,
            norms: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights of one layer pruned into ``layout`` (magnitude or Wanda masks), by name."""
    override = {}
    for site in group:
        matrix = site.to_matrix(site.weight.numpy()).astype(np.float32)
        scores = np.abs(matrix) * (norms[id(site)][None, :] if method == "wanda" else 1.0)
        mask = layout.mask(scores, per_row=method == "wanda")
        override[site.weight.name] = np.ascontiguousarray(
            site.from_matrix(np.where(mask, matrix, 0).astype(matrix.dtype))).astype(site.weight.numpy().dtype)
    return override


_SESSION: dict[tuple[str, str], Any] = {}  # one session per process: the model under study


def layer_drops(overrides: dict[str, dict[str, np.ndarray]], *, path: str, runner: Runner, feeds: list,
                reference: list) -> tuple[dict[str, float], dict[str, float]]:
    """One layer (an engine unit): the mean drop and relative L2 error per level, the model at
    ``path`` run with that level's pruned weights fed over the originals."""
    key = (path, repr(runner))
    if key not in _SESSION:
        _SESSION.clear()
        _SESSION[key] = runner.session(path)
    session = _SESSION[key]
    drop, rel = {}, {}
    for level, override in overrides.items():
        d, r = zip(*(_compare(ref, runner.run(session, {**feed, **override})) for feed, ref in zip(feeds, reference)))
        drop[level], rel[level] = float(np.mean(d)), float(np.mean(r))
    return drop, rel
