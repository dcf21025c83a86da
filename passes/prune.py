"""Shared machinery of the weight-pruning passes: site selection, the site loop, records.

A weight-pruning pass (``nm``, ``unstructured``, ``block``) only says which layout it makes.
This module finds the sites, applies the common skip rules, runs the method, and records
everything:

* the op is one of ``op_types`` and :func:`~sparsec.passes.patterns.match_linear_weight` matches;
* include / exclude patterns select it (module path, node name or weight name);
* the weight has at least ``min_params`` elements and its shape admits the layout;
* a weight read by several nodes is pruned only when every reader sums over the same axis;
* layers feeding a graph output directly (classifier heads, lm_head) stay dense unless
  ``keep_output_layers=false``;
* calibration-aware methods (wanda, sparsegpt) need a layer input they can read as a matrix.

A weight stored quantized (DequantizeLinear, com.microsoft MatMulNBits) or in another precision
(read through Cast) is pruned as the float matrix the op multiplies by and written back encoded
(:mod:`sparsec.passes.quantized`): a pruned entry gets its zero point as code, so it decodes to
exactly 0.0; the layout is checked again on the decoded result.

Calibration-aware methods run sequentially: the sites are grouped by the value they read, in
graph order; each group's input is captured with the weights pruned so far (one stage of
:class:`~sparsec.runtime.staged.StagedRunner`), its statistics accumulated, and its weights
pruned before the next group is captured.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sparsec.errors import OptionError, PassError
from sparsec.graph import all_nodes, mark_changed
from sparsec.pipeline import Kind, Pass, PassContext, PassOptions, PassRecord, SiteRecord, option
from sparsec.sparsity import Layout, zero_fraction

from . import patterns, prune_methods
from .patterns import LINEAR_OPS, Code, LinearWeight, MatchFailure
from .quantized import EncodedWeight


@dataclass(frozen=True)
class PruneOptions(PassOptions):
    method: str = option("magnitude", "how weights are chosen: magnitude |W|; wanda |W|*||X||;"
                         " sparsegpt (OBS with reconstruction); wanda and sparsegpt need --calib",
                         choices=prune_methods.METHODS, search=prune_methods.METHODS,
                         calibrated=prune_methods.CALIBRATED, calibrated_default="sparsegpt")
    op_types: tuple[str, ...] = option(LINEAR_OPS, "op types whose constant weight is pruned",
                                       choices=LINEAR_OPS)
    include: tuple[str, ...] = option((), "glob patterns over module path, node name, weight name,"
                                      " op type or weight shape (e.g. 384x1536); when given, only"
                                      " matching sites are pruned")
    exclude: tuple[str, ...] = option((), "glob patterns of sites left dense")
    min_params: int = option(4096, "weights with fewer elements are left dense", min=0)
    keep_output_layers: bool = option(True, "leave layers that feed a graph output directly"
                                      " (classifier heads, lm_head) dense")
    blocksize: int = option(128, "sparsegpt: columns per lazy-update block", min=1)
    damp: float = option(0.01, "sparsegpt: dampening, as a fraction of the mean Hessian diagonal",
                         min=0.0, max=1.0)
    device: str = option("auto", "sparsegpt: where the math runs (auto: cuda when present)",
                         choices=("auto", "cpu", "cuda"))
    targets: str = option("pruned", "sparsegpt: reconstruct each layer's output on the pruned"
                          " model's inputs (pruned, as published) or the dense model's outputs"
                          " (dense: also corrects earlier layers' error; twice the forward work)",
                          choices=("pruned", "dense"))


@dataclass(frozen=True)
class AllocationOptions(PruneOptions):
    allocation: str = option("uniform", "sparsity per layer: uniform, or owl (outlier-weighted;"
                             " needs --calib)", choices=("uniform", "owl"), search=("uniform", "owl"),
                             calibrated=("owl",))
    owl_lambda: float = option(0.08, "owl: layers' sparsity stays within sparsity +- lambda", min=0.0, max=0.5)
    owl_m: float = option(5.0, "owl: a score is an outlier above m times its layer's mean", min=1.0)


def _skip(record: PassRecord, failure: MatchFailure, site: LinearWeight) -> None:
    record.skip(failure, site=site.label, node=site.node, weight=site.weight.name, shape=site.weight.shape)


class WeightPrunePass(Pass):
    """Base of the passes that zero weights of linear ops in a given layout."""

    Options = PruneOptions
    kinds = (Kind.LOSSY,)

    @abc.abstractmethod
    def layout(self, sparsity: float | None = None) -> Layout:
        """The layout this pass makes (with another sparsity, for non-uniform allocation)."""

    def match(self, model: ir.Model, ctx: PassContext, record: PassRecord) -> list[LinearWeight]:
        return self.select_sites(model, record)

    def select_sites(self, model: ir.Model, record: PassRecord) -> list[LinearWeight]:
        """Every site this pass will prune; the others go into ``record`` as skipped."""
        opts: PruneOptions = self.options  # type: ignore[assignment]
        layout = self.layout()
        calibrated = prune_methods.needs_calibration(opts.method)
        uniform = getattr(opts, "allocation", "uniform") == "uniform"
        chosen: list[LinearWeight] = []
        seen_weights: set[ir.Value] = set()
        for node in all_nodes(model):
            if node.op_type not in opts.op_types:
                continue
            site = patterns.match_linear_weight(node)
            if not site:
                record.skip(site, node=node)
                continue
            if site.weight.value in seen_weights:
                continue  # a shared weight accepted through another reader: pruned once
            # Failures are falsy: take the first check that returns one (not `or`).
            checks = (
                lambda: self._compressed(site),
                lambda: patterns.select(site, opts.include, opts.exclude),
                lambda: self._size_check(site, opts.min_params),
                lambda: self._admits(site, layout),
                lambda: patterns.check_shared_weight(site),
                lambda: self._output_layer(site, model) if opts.keep_output_layers else None,
                lambda: prune_methods.supports(site, opts.method),
                lambda: self._in_subgraph(site, model) if calibrated else None,
                lambda: self._already(site, layout) if uniform else None,
            )
            failure = next((f for f in (check() for check in checks) if f is not None), None)
            if failure is not None:
                _skip(record, failure, site)
                continue
            seen_weights.add(site.weight.value)
            chosen.append(site)
        return chosen

    @staticmethod
    def _compressed(site: LinearWeight) -> MatchFailure | None:
        if site.weight.packed is not None:
            return MatchFailure(Code.COMPRESSED, f"'{site.weight.name}' is stored compressed;"
                                " run pruning passes before compress", site.node)
        return None

    @staticmethod
    def _size_check(site: LinearWeight, min_params: int) -> MatchFailure | None:
        params = int(np.prod(site.weight.shape))
        if params < min_params:
            return MatchFailure(Code.TOO_SMALL, f"{params} weights < min_params={min_params}", site.node)
        return None

    @staticmethod
    def _admits(site: LinearWeight, layout: Layout) -> MatchFailure | None:
        reason = layout.admits(*site.matrix_shape)
        if reason:
            return MatchFailure(Code.NOT_DIVISIBLE, f"'{site.weight.name}': {reason}", site.node)
        return None

    @staticmethod
    def _already(site: LinearWeight, layout: Layout) -> MatchFailure | None:
        """A weight already in the layout is left bit-identical (and costs no calibration)."""
        if layout.complies(site.to_matrix(site.weight.numpy())):
            return MatchFailure(Code.ALREADY_SPARSE, f"already {layout.name}; left as it is", site.node)
        return None

    @staticmethod
    def _output_layer(site: LinearWeight, model: ir.Model) -> MatchFailure | None:
        if patterns.feeds_graph_output(site.node, model):
            return MatchFailure(
                Code.OUTPUT_LAYER,
                "feeds a graph output directly (head layer); set keep_output_layers=false to prune it",
                site.node,
            )
        return None

    @staticmethod
    def _in_subgraph(site: LinearWeight, model: ir.Model) -> MatchFailure | None:
        if site.node.graph is not model.graph:
            return MatchFailure(Code.IN_SUBGRAPH, "calibration cannot capture inputs inside"
                                " an If/Loop/Scan body", site.node)
        return None

    def run(self, model: ir.Model, ctx: PassContext) -> PassRecord:
        record = self.new_record()
        sites = self.select_sites(model, record)
        opts: PruneOptions = self.options  # type: ignore[assignment]
        if self.needs_calibration() and ctx.calibration is None:
            why = (f"method '{opts.method}' is calibration-aware" if prune_methods.needs_calibration(opts.method)
                   else "allocation=owl needs activation statistics")
            raise OptionError(f"{self.id}: {why}; give --calib (a .npz, a text file with --tokenizer,"
                              " or 'builtin' for the example models)")
        layouts = {id(site): self.layout() for site in sites}
        if getattr(opts, "allocation", "uniform") == "owl":
            layouts = self._owl_layouts(model, sites, ctx, record)
        if not prune_methods.needs_calibration(opts.method):
            for site in ctx.progress.track(sites, f"{self.id}: pruning {len(sites)} weights", total=len(sites)):
                self.apply(site, ctx, record, layout=layouts[id(site)])
        else:
            self._run_sequential(model, sites, ctx, record, layouts)
        if ctx.calibration is not None:
            record.notes.append(f"calibration: {ctx.calibration.source}")
        return record

    def _owl_layouts(self, model: ir.Model, sites: list[LinearWeight], ctx: PassContext,
                     record: PassRecord) -> dict[int, Layout]:
        """OWL: per-layer sparsity from the outliers of Wanda scores on the dense model."""
        from .allocation import owl_allocation

        opts = self.options
        runner = ctx.runner.staged(model, ctx.calibration.feeds, progress=ctx.progress)
        norms: dict[int, np.ndarray] = {}
        for value, group in ctx.progress.track(list(_groups(sites).items()), f"{self.id}: OWL statistics"):
            stats = prune_methods.group_statistics(group, ctx.calibration.feeds, runner.capture(value),
                                                   prune_methods.ColumnNorms)
            for site in group:
                norms[id(site)] = np.sqrt(stats[prune_methods.statistic_key(site)].sq)
        per_site, table = owl_allocation(sites, norms, opts.sparsity, opts.owl_lambda, opts.owl_m)
        record.extra["allocation"] = {"method": "owl", "lambda": opts.owl_lambda, "m": opts.owl_m, "layers": table}
        return {key: self.layout(sparsity) for key, sparsity in per_site.items()}

    def _run_sequential(self, model: ir.Model, sites: list[LinearWeight], ctx: PassContext,
                        record: PassRecord, layouts: dict[int, Layout]) -> None:
        from sparsec.engine import as_engine

        opts: PruneOptions = self.options  # type: ignore[assignment]
        device = prune_methods.resolve_device(opts.device)
        engine = as_engine(ctx.engine)
        groups = _groups(sites)
        feeds = ctx.calibration.feeds
        runner = ctx.runner.staged(model, feeds, progress=ctx.progress)
        dense = None
        if opts.method == "sparsegpt" and opts.targets == "dense":
            # The same graph with the original weights: the dense model, run in lock-step.
            dense = ctx.runner.staged(model, feeds, overrides={s.weight.value: s.weight.tensor for s in sites})
        tokens = 0
        for value, group in ctx.progress.track(list(groups.items()), f"{self.id}: {opts.method},"
                                               f" {len(sites)} weights in {len(groups)} groups", total=len(groups)):
            stats = prune_methods.group_statistics(
                group, feeds, runner.capture(value),
                lambda k: prune_methods.new_statistic(opts.method, k, device),
                dense.capture(value) if dense is not None else None)
            # Once a stage is captured its sites' solves are independent: engine units (threads
            # here, Ray tasks with --ray); written back in site order, as if one after the other.
            jobs = [(site.to_matrix(site.weight.numpy()), layouts[id(site)],
                     stats[prune_methods.statistic_key(site)], not isinstance(site.weight, EncodedWeight))
                    for site in group]
            solved = engine.map(solve_site, jobs, labels=[site.weight.name for site in group],
                                what=f"{self.id} solve", shared={"method": opts.method, "blocksize": opts.blocksize,
                                                                 "damp": opts.damp},
                                num_gpus=1 if device == "cuda" else 0, threads=ctx.jobs)
            for site, (matrix, layout, stat, _), result in zip(group, jobs, solved):
                tokens = max(tokens, stat.tokens)
                self.write(site, record, matrix, result, stat, layout=layout)
        record.notes.append(f"{opts.method}: statistics over {tokens} tokens per layer, math on {device}")

    def apply(self, site: LinearWeight, ctx: PassContext, record: PassRecord, statistic=None, *,
              layout: Layout) -> None:
        """Prune one site in place into ``layout`` and record it."""
        opts: PruneOptions = self.options  # type: ignore[assignment]
        matrix = site.to_matrix(site.weight.numpy())
        result = solve_site((matrix, layout, statistic, not isinstance(site.weight, EncodedWeight)),
                            method=opts.method, blocksize=opts.blocksize, damp=opts.damp)
        self.write(site, record, matrix, result, statistic, layout=layout)

    def write(self, site: LinearWeight, record: PassRecord, matrix: np.ndarray, solved: Solved | None,
              statistic, *, layout: Layout) -> None:
        """Write one solved site back into the model and record it (None: already in ``layout``)."""
        opts: PruneOptions = self.options  # type: ignore[assignment]
        if solved is None:  # with a non-uniform allocation, known only now
            _skip(record, MatchFailure(Code.ALREADY_SPARSE, f"already {layout.name}; left as it is", site.node), site)
            return
        array = site.weight.numpy()
        before = zero_fraction(array)
        pruned = np.ascontiguousarray(site.from_matrix(solved.matrix))
        site.weight.replace(pruned, **{"sparsec.layout": layout.name})
        figures = solved.figures
        if isinstance(site.weight, EncodedWeight):
            # What the readers now multiply by: pruned entries decode to exactly 0; values a
            # method changed (SparseGPT) were quantized again, so the layout is checked here.
            pruned = site.weight.numpy()
            new_matrix = site.to_matrix(pruned)
            if not layout.complies(new_matrix):
                raise PassError(f"{self.id}: '{site.weight.name}' ({site.weight.form}) is not {layout.name}"
                                " after re-encoding")
            figures = _damage(matrix, new_matrix, statistic)
        after = zero_fraction(pruned)
        reason = (f"{layout.name} {opts.method} pruning of '{site.weight.name}'"
                  f" along axis {site.reduce_axis}: {after:.1%} zeros")
        readers = site.weight.readers
        for reader in readers:
            mark_changed(reader, self.id, reason)
        record.sites.append(SiteRecord(
            site=site.label, node=site.node.name or "", action="changed",
            weight=site.weight.name, shape=site.weight.shape, params=int(array.size),
            sparsity_before=before, sparsity_after=after, message=reason,
            details={"op": site.op, "reduce_axis": site.reduce_axis, "layout": layout.name, **figures,
                     **({"stored": site.weight.form} if isinstance(site.weight, EncodedWeight) else {}),
                     **({"readers": [r.name for r in readers]} if len(readers) > 1 else {})},
        ))


@dataclass
class Solved:
    """One site's pruned matrix (canonical form, the weight's dtype) and how far it moved."""

    matrix: np.ndarray
    figures: dict[str, float]


def solve_site(job: tuple[np.ndarray, Layout, object, bool], *, method: str, blocksize: int,
               damp: float) -> Solved | None:
    """Prune one canonical matrix (an engine unit: pure, so sites of a stage run in parallel).
    ``job`` is (matrix, layout, statistic, whether to measure the damage here); None when the
    matrix already complies with the layout."""
    matrix, layout, statistic, measure = job
    if layout.complies(matrix):
        return None
    result = prune_methods.prune_matrix(method, matrix.astype(np.float32), layout, statistic,
                                        blocksize=blocksize, damp=damp)
    if result.values is None:  # a mask only: survivors keep their exact bits
        new_matrix = np.where(result.mask, matrix, np.zeros((), dtype=matrix.dtype))
    else:
        new_matrix = result.values.astype(matrix.dtype)
    return Solved(new_matrix, _damage(matrix, new_matrix, statistic) if measure else {})


def _damage(before: np.ndarray, after: np.ndarray, statistic) -> dict[str, float]:
    """How far one weight moved: ||W - W'|| / ||W||, and with a Hessian (SparseGPT's statistic)
    the relative L2 error of the layer's output on the calibration inputs."""
    w = before.astype(np.float64)
    delta = w - after.astype(np.float64)
    norm = float(np.linalg.norm(w))
    figures = {"weight_change": float(np.linalg.norm(delta)) / norm if norm else 0.0}
    error = getattr(statistic, "relative_output_error", None)
    if error is not None:
        figures["output_error"] = error(w, delta)
    return figures


def _groups(sites: list[LinearWeight]) -> dict[ir.Value, list[LinearWeight]]:
    """Sites by the value they read (their activation input), in graph order."""
    groups: dict[ir.Value, list[LinearWeight]] = {}
    for site in sites:
        groups.setdefault(site.node.inputs[1 - site.input_index], []).append(site)
    return groups
