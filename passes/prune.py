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
* calibration-aware methods (wanda, sparsegpt) need a layer input they can read as a matrix;
* with ``rank`` / ``rank_ratio`` (sparse + low-rank) the weight must be one a low-rank term can
  be lowered beside (:func:`sparsec.passes.lowrank.supports`); factors added by an earlier
  run stay dense (``LOWRANK_FACTOR``).

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
from sparsec.graph import all_nodes, mark_changed, return_free_memory
from sparsec.pipeline import Kind, Pass, PassContext, PassOptions, PassRecord, SiteRecord, option
from sparsec.sparsity import Layout, zero_fraction

from . import lowrank, patterns, prune_methods
from .patterns import LINEAR_OPS, Code, LinearWeight, MatchFailure
from .quantized import EncodedWeight

# Rows of a weight measured at once (their float64 bytes) by _damage.
DAMAGE_BLOCK_BYTES = 16 << 20


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
    damp: float = option(0.01, "sparsegpt and reconstruct=block: dampening, as a fraction of the mean"
                         " Hessian diagonal", min=0.0, max=1.0)
    device: str = option("auto", "sparsegpt: where the math runs (auto: cuda when present)",
                         choices=("auto", "cpu", "cuda"))
    targets: str = option("pruned", "sparsegpt: reconstruct each layer's output on the pruned"
                          " model's inputs (pruned, as published) or the dense model's outputs"
                          " (dense: also corrects earlier layers' error; twice the forward work)",
                          choices=("pruned", "dense"))
    reconstruct: str = option("none", "block: after each FFN / attention block is pruned, refit the kept"
                              " weights of its exit layer (down / output projection) by least squares to"
                              " the dense block's output on the same input; the mask is kept (needs --calib)",
                              choices=("none", "block"), calibrated=("block",))
    refine: str = option("none", "mask refinement after the method: dsnot (grow/prune swaps within"
                         " rows or N:M groups that lower the layer's error on the calibration"
                         " inputs; needs --calib)", choices=("none", "dsnot"), calibrated=("dsnot",))
    refine_iters: int = option(50, "dsnot: at most this many swaps per row", min=1, max=100000)
    rank: int = option(0, "sparse + low-rank (OATS): rank of a low-rank term added beside each pruned"
                       " weight as two thin MatMuls (0: none)", min=0)
    rank_ratio: float = option(0.0, "sparse + low-rank: per-layer rank whose factors hold this fraction"
                               " of the weight's parameters, r = ratio*rows*K/(rows+K) (0: none)",
                               min=0.0, max=1.0)
    lowrank_iters: int = option(20, "sparse + low-rank: alternating threshold / truncated-SVD iterations",
                                min=1, max=1000)

    def validate(self) -> None:
        if self.reconstruct == "block" and self.targets == "dense":
            raise OptionError("reconstruct=block fits exit layers to the dense block already; use it with"
                              " targets=pruned")
        if self.reconstruct == "block" and self.with_lowrank:
            # The refit would have to fit around the low-rank term; it fits the sparse weight alone.
            raise OptionError("reconstruct=block does not combine with rank / rank_ratio")
        if self.rank and self.rank_ratio:
            raise OptionError(f"give rank or rank_ratio, not both (got rank={self.rank},"
                              f" rank_ratio={self.rank_ratio})")
        if self.refine == "dsnot" and self.targets == "dense":
            raise OptionError("refine=dsnot refines against the layer's own inputs; it does not"
                              " combine with targets=dense")
        if self.with_lowrank and self.targets == "dense":
            # The dense run shares the graph, which then holds the low-rank terms too.
            raise OptionError("rank / rank_ratio do not combine with targets=dense")

    @property
    def with_lowrank(self) -> bool:
        return bool(self.rank or self.rank_ratio)


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
        calibrated = self._calibrated()
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
                lambda: lowrank.is_factor(site),
                lambda: self._compressed(site),
                lambda: patterns.select(site, opts.include, opts.exclude),
                lambda: self._size_check(site, opts.min_params),
                lambda: self._admits(site, layout),
                lambda: patterns.check_shared_weight(site),
                lambda: self._output_layer(site, model) if opts.keep_output_layers else None,
                lambda: prune_methods.supports(site, opts.method),
                lambda: lowrank.supports(site) if opts.with_lowrank else None,
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

    def _calibrated(self) -> bool:
        """Whether the sites are pruned from captured calibration statistics (sequentially)."""
        opts: PruneOptions = self.options  # type: ignore[assignment]
        return (prune_methods.needs_calibration(opts.method) or opts.refine != "none"
                or opts.reconstruct == "block")

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
                   else "reconstruct=block needs the blocks' activations" if opts.reconstruct == "block"
                   else "refine=dsnot needs the layers' inputs" if opts.refine != "none"
                   else "allocation=owl needs activation statistics")
            raise OptionError(f"{self.id}: {why}; give --calib (a .npz, a text file with --tokenizer,"
                              " or 'builtin' for the example models)")
        if getattr(opts, "permute", False):
            self._permute(model, sites, ctx, record)
        layouts = {id(site): self.layout() for site in sites}
        if getattr(opts, "allocation", "uniform") == "owl":
            layouts = self._owl_layouts(model, sites, ctx, record)
        if not self._calibrated():
            for site in ctx.progress.track(sites, f"{self.id}: pruning {len(sites)} weights", total=len(sites)):
                self.apply(site, ctx, record, layout=layouts[id(site)])
        else:
            self._run_sequential(model, sites, ctx, record, layouts)
        _summarise(record, opts)
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

    def _permute(self, model: ir.Model, sites: list[LinearWeight], ctx: PassContext, record: PassRecord) -> None:
        """Permute the input channels of every site whose producer absorbs it (exact), before
        pruning; the others are recorded as PERMUTATION_UNABSORBED and pruned as they are.
        Calibration-aware methods score channels with ||X_j|| of the dense model."""
        from .permute import absorber_permutation, apply_permutation, kept_score, match_absorber

        opts = self.options
        layout = self.layout()
        absorbers = []
        for site in sites:
            found = match_absorber(site, model)
            if not found:
                _skip(record, found, site)
            else:
                absorbers.append(found)
        norms: dict[int, np.ndarray] = {}
        if absorbers and prune_methods.needs_calibration(opts.method):
            runner = ctx.runner.staged(model, ctx.calibration.feeds, progress=ctx.progress)
            chosen = [a.site for a in absorbers]
            for value, group in ctx.progress.track(list(_groups(chosen).items()), f"{self.id}: permutation statistics"):
                stats = prune_methods.group_statistics(group, ctx.calibration.feeds, runner.capture(value),
                                                       prune_methods.ColumnNorms)
                for site in group:
                    norms[id(site)] = np.sqrt(stats[prune_methods.statistic_key(site)].sq)
        table = []
        for i, absorber in enumerate(ctx.progress.track(absorbers, f"{self.id}: permuting {len(absorbers)} weights")):
            site = absorber.site
            score = np.abs(site.to_matrix(site.weight.numpy())).astype(np.float32)
            if id(site) in norms:
                score *= norms[id(site)].astype(np.float32)[None, :]
            perm = absorber_permutation(absorber, score, layout.n, layout.m, rounds=opts.permute_rounds,
                                        seed=ctx.seed + i)
            before, after = kept_score(score, layout.n, layout.m), kept_score(score[:, perm], layout.n, layout.m)
            total = float(score.sum(dtype=np.float64)) or 1.0
            row = {"site": site.label, "producer": absorber.kind, "kept_before": before / total,
                   "kept_after": after / total, "moved": int(np.count_nonzero(perm != np.arange(len(perm))))}
            table.append(row)
            if after > before:
                apply_permutation(absorber, perm, self.id, f"input channels of '{site.weight.name}' permuted"
                                  f" for {layout.name} (kept score {before / total:.4f} -> {after / total:.4f})")
            else:
                row["moved"] = 0
        record.extra["permutation"] = table
        record.notes.append(f"permutation: {sum(r['moved'] > 0 for r in table)} of {len(sites)} weights permuted")

    def _run_sequential(self, model: ir.Model, sites: list[LinearWeight], ctx: PassContext,
                        record: PassRecord, layouts: dict[int, Layout]) -> None:
        from sparsec.engine import as_engine

        from .reconstruct import BlockTarget, downstream, match_block_exit

        opts: PruneOptions = self.options  # type: ignore[assignment]
        device = prune_methods.resolve_device(opts.device)
        engine = as_engine(ctx.engine)
        groups = _groups(sites)
        moved: dict[ir.Value, ir.Value] = {}  # outputs a low-rank term now follows
        gram = opts.refine != "none" or (opts.with_lowrank and opts.method == "sparsegpt")
        feeds = ctx.calibration.feeds
        runner = ctx.runner.staged(model, feeds, progress=ctx.progress)
        originals = {s.weight.value: s.weight.tensor for s in sites}
        dense = None
        if opts.method == "sparsegpt" and opts.targets == "dense":
            # The same graph with the original weights: the dense model, run in lock-step.
            dense = ctx.runner.staged(model, feeds, overrides=originals)
        exits = {}
        if opts.reconstruct == "block":
            exits = {id(s): e for s in sites if (e := match_block_exit(s, model)) is not None}

        def make(k: int):
            if opts.method == "magnitude" and not gram:
                return prune_methods.ColumnNorms(k)  # only counts tokens: magnitude reads no data
            return prune_methods.new_statistic(opts.method, k, device, gram=gram)

        tokens = 0
        for value, group in ctx.progress.track(list(groups.items()), f"{self.id}: {opts.method},"
                                               f" {len(sites)} weights in {len(groups)} groups", total=len(groups)):
            value = moved.get(value, value)  # a low-rank term's sum stands for the output
            block_exits = [exits[id(s)] for s in group if id(s) in exits]
            targets, maker = None, make
            if dense is not None:
                targets = dense.capture(value)
            elif block_exits and len(group) > 1:
                record.notes.append(f"reconstruct=block: '{value.name}' is read by {len(group)} pruned weights;"
                                    " their block is not refit")
            elif block_exits:
                # The dense block on the same (pruned upstream) input: this runner's frontier,
                # every block entry back at its original weights, values computed from them forgotten.
                entries = [e for b in block_exits for e in b.entries]
                forget = downstream([e.node.outputs[0] for e in entries], runner.computed)
                fork = runner.fork({e.weight.value: originals.get(e.weight.value, e.weight.tensor) for e in entries},
                                   forget)
                targets = fork.capture(value)
                weight = block_exits[0].site
                maker = lambda k: BlockTarget(make(k), k, weight.to_matrix(weight.weight.numpy()))  # noqa: E731
            elif opts.method == "magnitude" and not gram:  # reconstruct=block, not a block exit: nothing to capture
                for site in group:
                    self.apply(site, ctx, record, layout=layouts[id(site)])
                continue
            stats = prune_methods.group_statistics(group, feeds, runner.capture(value), maker, targets)
            targets = fork = None  # the fork's frontier and captures go before the next capture
            # Once a stage is captured its sites' solves are independent: engine units (threads
            # here, Ray tasks with --ray); written back in site order, as if one after the other.
            jobs = [self._job(site, layouts[id(site)], stats[prune_methods.statistic_key(site)]) for site in group]
            solved = engine.map(solve_site, jobs, labels=[site.weight.name for site in group],
                                what=f"{self.id} solve", shared=self._solve_options(),
                                num_gpus=1 if device == "cuda" else 0, threads=ctx.jobs)
            for site, job, result in zip(group, jobs, solved):
                tokens = max(tokens, job.statistic.tokens)
                old = site.node.outputs[0]
                new = self.write(site, record, job, result)
                if new is not None:
                    moved[old] = new
            # This stage's statistics and solves go before the next stage is captured, and their
            # memory back to the OS (a streamed compile is bounded by one stage's, not by the sum).
            stats = jobs = solved = job = result = None
            return_free_memory()
        record.notes.append(f"{opts.method}: statistics over {tokens} tokens per layer, math on {device}")
        if exits:
            record.notes.append(f"reconstruct=block: {len(exits)} block exits refit to the dense blocks")

    def apply(self, site: LinearWeight, ctx: PassContext, record: PassRecord, statistic=None, *,
              layout: Layout) -> ir.Value | None:
        """Prune one site in place into ``layout`` and record it; with a low-rank term, return
        the value that now stands for the node's output."""
        job = self._job(site, layout, statistic)
        return self.write(site, record, job, solve_site(job, **self._solve_options()))

    def _job(self, site: LinearWeight, layout: Layout, statistic) -> SolveJob:
        opts: PruneOptions = self.options  # type: ignore[assignment]
        matrix = site.to_matrix(site.weight.numpy())
        return SolveJob(matrix, layout, statistic, measure=not isinstance(site.weight, EncodedWeight),
                        rank=lowrank.layer_rank(*matrix.shape, opts.rank, opts.rank_ratio))

    def _solve_options(self) -> dict:
        opts: PruneOptions = self.options  # type: ignore[assignment]
        return {"method": opts.method, "blocksize": opts.blocksize, "damp": opts.damp, "refine": opts.refine,
                "refine_iters": opts.refine_iters, "lowrank_iters": opts.lowrank_iters}

    def write(self, site: LinearWeight, record: PassRecord, job: SolveJob, solved: Solved | None) -> ir.Value | None:
        """Write one solved site back into the model and record it (None: already in the layout);
        with a low-rank term, return the value that now stands for the node's output."""
        opts: PruneOptions = self.options  # type: ignore[assignment]
        matrix, layout, rank = job.matrix, job.layout, job.rank
        if solved is None:  # with a non-uniform allocation, known only now
            _skip(record, MatchFailure(Code.ALREADY_SPARSE, f"already {layout.name}; left as it is", site.node), site)
            return None
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
            figures = {**figures, **_damage(matrix, solved.effective(new_matrix),
                                            getattr(job.statistic, "inner", job.statistic))}
        after = zero_fraction(pruned)
        reason = (f"{layout.name} {opts.method} pruning of '{site.weight.name}'"
                  f" along axis {site.reduce_axis}: {after:.1%} zeros")
        out = None
        if solved.u is not None:
            rows, cols = matrix.shape
            reason += f", plus a rank-{rank} term"
            figures["lowrank"] = {"rank": rank, "extra_params": rank * (rows + cols),
                                  "extra_flops_per_token": 2 * rank * (rows + cols),
                                  "dense_flops_per_token": 2 * rows * cols}
            out = lowrank.lower(site, solved.u, solved.v, self.id, reason)
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
        return out



@dataclass
class SolveJob:
    """One site's canonical matrix and what its solve needs (an engine unit's input)."""

    matrix: np.ndarray
    layout: Layout
    statistic: object
    measure: bool  # the damage is measured on this matrix (not after re-encoding)
    rank: int = 0


@dataclass
class Solved:
    """One site's pruned matrix (canonical form, the weight's dtype), its low-rank factors and
    how far it moved."""

    matrix: np.ndarray
    figures: dict
    u: np.ndarray | None = None
    v: np.ndarray | None = None

    def lowrank(self) -> np.ndarray | float:
        return self.u @ self.v if self.u is not None else 0.0

    def effective(self, matrix: np.ndarray) -> np.ndarray:
        """What readers multiply by when ``matrix`` is stored: it plus the low-rank term (no copy
        without one)."""
        return matrix if self.u is None else matrix + self.lowrank()


def solve_site(job: SolveJob, *, method: str, blocksize: int, damp: float, refine: str = "none",
               refine_iters: int = 50, lowrank_iters: int = 20) -> Solved | None:
    """Prune one canonical matrix (an engine unit: pure, so sites of a stage run in parallel);
    None when the matrix already complies with the layout. A block-exit statistic
    (reconstruct=block) also refits the kept weights to the dense block's output."""
    matrix, layout, statistic = job.matrix, job.layout, job.statistic
    if layout.complies(matrix):
        return None
    inner = getattr(statistic, "inner", statistic)  # reconstruct=block wraps the method's statistic
    result = prune_methods.prune_matrix(method, matrix.astype(np.float32, copy=False), layout, inner,
                                        blocksize=blocksize, damp=damp, refine=refine,
                                        refine_iters=refine_iters, rank=job.rank, lowrank_iters=lowrank_iters)
    if result.values is None:  # a mask only: survivors keep their exact bits
        new_matrix = np.where(result.mask, matrix, np.zeros((), dtype=matrix.dtype))
    else:
        new_matrix = result.values.astype(matrix.dtype, copy=False)
    block = None
    if hasattr(statistic, "refit"):  # reconstruct=block: this site ends a block
        refit = np.where(result.mask, statistic.refit(result.mask, damp), 0.0)
        block = {"block_error_method": statistic.error(new_matrix), "block_error": statistic.error(refit)}
        if block["block_error"] < block["block_error_method"]:  # dampening can make it worse: then keep
            new_matrix = refit.astype(matrix.dtype)
        else:
            block["block_error"] = block["block_error_method"]
    solved = Solved(new_matrix, {}, result.u, result.v)
    if job.measure:
        solved.figures.update(_damage(matrix, solved.effective(new_matrix), inner))
    if result.figures:
        solved.figures["refine"] = result.figures
    if block is not None:
        solved.figures.update(block)
    return solved


def _summarise(record: PassRecord, opts: PruneOptions) -> None:
    """Totals of the low-rank terms and the refinement, in the record and its notes."""
    terms = [s.details["lowrank"] for s in record.changed if "lowrank" in s.details]
    if terms:
        dense = sum(s.params for s in record.changed)
        extra = sum(t["extra_params"] for t in terms)
        flops = sum(t["extra_flops_per_token"] for t in terms)
        dense_flops = sum(t["dense_flops_per_token"] for t in terms)
        ranks = sorted({t["rank"] for t in terms})
        record.extra["lowrank"] = {"sites": len(terms), "ranks": ranks, "extra_params": extra,
                                   "pruned_weights_params": dense, "extra_flops_per_token": flops,
                                   "dense_flops_per_token": dense_flops}
        record.notes.append(
            f"sparse + low-rank: {len(terms)} weights with rank {ranks[0]}"
            + (f"..{ranks[-1]}" if len(ranks) > 1 else "")
            + f"; the factors add {extra} parameters ({extra / dense:.1%} of the pruned weights' dense"
              f" storage, which S still occupies unless compressed) and {flops} FLOPs per token"
              f" ({flops / dense_flops:.1%} of the dense layers')")
    refined = [s.details["refine"] for s in record.changed if "refine" in s.details]
    if refined:
        before = sum(r["objective_before"] for r in refined)
        after = sum(r["objective_after"] for r in refined)
        swaps = sum(r["swaps"] for r in refined)
        record.extra["refine"] = {"method": opts.refine, "swaps": swaps, "objective_before": before,
                                  "objective_after": after}
        record.notes.append(f"{opts.refine}: {swaps} swaps; calibration objective"
                            f" {after / before if before else 1.0:.3f}x the starting mask's")


def _damage(before: np.ndarray, after: np.ndarray, statistic) -> dict[str, float]:
    """How far one weight moved: ||W - W'|| / ||W||, and with a Hessian (SparseGPT's statistic)
    the relative L2 error of the layer's output on the calibration inputs. In double, a block of
    rows at a time: whole double copies of W and W - W' would take four times the weight's
    float32 bytes, more than the solve itself at a streamed model's sizes."""
    energy = getattr(statistic, "output_energy", None)
    step = max(1, DAMAGE_BLOCK_BYTES // (8 * before.shape[1]))
    sums = np.zeros(4)  # ||W||^2, ||dW||^2, output error's numerator and denominator
    for r in range(0, before.shape[0], step):
        w = before[r:r + step].astype(np.float64)
        delta = w - after[r:r + step]
        sums[:2] += float(np.einsum("ij,ij->", w, w)), float(np.einsum("ij,ij->", delta, delta))
        if energy is not None:
            sums[2:] += energy(w, delta)
    figures = {"weight_change": float(np.sqrt(sums[1] / sums[0])) if sums[0] else 0.0}
    if energy is not None:
        figures["output_error"] = float(np.sqrt(max(sums[2], 0.0) / sums[3])) if sums[3] > 0 else 0.0
    return figures


def _groups(sites: list[LinearWeight]) -> dict[ir.Value, list[LinearWeight]]:
    """Sites by the value they read (their activation input), in graph order."""
    groups: dict[ir.Value, list[LinearWeight]] = {}
    for site in sites:
        groups.setdefault(site.node.inputs[1 - site.input_index], []).append(site)
    return groups
