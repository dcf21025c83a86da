"""Shared machinery of the weight-pruning passes: site selection, the site loop, records.

A weight-pruning pass (N:M, unstructured, block) only says which layouts it makes: whether a
weight's shape admits the layout, whether it already complies, and how to prune it. This
module finds the sites, applies the common skip rules and records everything:

* the op is one of ``op_types`` and :func:`~sparsec.passes.patterns.match_linear_weight` matches;
* include / exclude patterns select it (module path, node name or weight name);
* the weight has at least ``min_params`` elements;
* the layout admits the weight's shape (e.g. K divisible by M);
* a weight read by several nodes is pruned only when every reader sums over the same axis;
* layers feeding a graph output directly (classifier heads, lm_head) stay dense unless
  ``keep_output_layers=false``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sparsec.graph import all_nodes, mark_changed
from sparsec.pipeline import Pass, PassContext, PassOptions, PassRecord, SiteRecord, option
from sparsec.sparsity import zero_fraction

from . import patterns
from .patterns import LINEAR_OPS, LinearWeight, MatchFailure


@dataclass(frozen=True)
class PruneOptions(PassOptions):
    method: str = option("magnitude", "how weights are scored: magnitude |W|", choices=("magnitude",))
    op_types: tuple[str, ...] = option(LINEAR_OPS, "op types whose constant weight is pruned",
                                       choices=LINEAR_OPS)
    include: tuple[str, ...] = option((), "glob patterns over module path, node or weight name;"
                                      " when given, only matching sites are pruned")
    exclude: tuple[str, ...] = option((), "glob patterns of sites left dense")
    min_params: int = option(4096, "weights with fewer elements are left dense", min=0)
    keep_output_layers: bool = option(True, "leave layers that feed a graph output directly"
                                      " (classifier heads, lm_head) dense")


def skip(record: PassRecord, failure: MatchFailure, site: LinearWeight | None = None) -> None:
    """Record a skipped site from a matcher failure."""
    node = failure.node
    record.sites.append(SiteRecord(
        site=site.label if site else (patterns.node_label(node) if node else ""),
        node=node.name if node else "",
        action="skipped",
        code=failure.code,
        message=failure.message,
        weight=site.weight.name if site else "",
        shape=site.weight.shape if site else (),
    ))


class WeightPrunePass(Pass):
    """Base of the passes that zero weights of linear ops in a given layout."""

    Options = PruneOptions

    @abc.abstractmethod
    def layout(self) -> str:
        """The layout this pass makes, as shown in reports (e.g. ``2:4``)."""

    @abc.abstractmethod
    def admits(self, site: LinearWeight) -> MatchFailure | None:
        """None when the weight's shape admits the layout; a failure otherwise."""

    @abc.abstractmethod
    def complies(self, site: LinearWeight, array: np.ndarray) -> bool:
        """True when ``array`` is already in the layout (the site is left as it is)."""

    @abc.abstractmethod
    def prune(self, site: LinearWeight, array: np.ndarray, ctx: PassContext) -> np.ndarray:
        """Return the pruned weight, same shape and dtype."""

    def select_sites(self, model: ir.Model, record: PassRecord) -> list[LinearWeight]:
        """Every site this pass will prune; the others go into ``record`` as skipped."""
        opts: PruneOptions = self.options  # type: ignore[assignment]
        chosen: list[LinearWeight] = []
        seen_weights: dict[ir.Value, LinearWeight] = {}
        for node in all_nodes(model):
            if node.op_type not in opts.op_types:
                continue
            site = patterns.match_linear_weight(node)
            if not site:
                skip(record, site)
                continue
            if site.weight.value in seen_weights:
                # Shared weight already accepted through another reader: pruned once.
                continue
            # Failures are falsy: take the first check that returns one (not `or`).
            checks = (
                lambda: patterns.select(site, opts.include, opts.exclude),
                lambda: self._size_check(site, opts.min_params),
                lambda: self.admits(site),
                lambda: patterns.check_shared_weight(site),
                lambda: self._output_layer(site, model) if opts.keep_output_layers else None,
            )
            failure = next((f for f in (check() for check in checks) if f is not None), None)
            if failure is not None:
                skip(record, failure, site)
                continue
            seen_weights[site.weight.value] = site
            chosen.append(site)
        return chosen

    @staticmethod
    def _size_check(site: LinearWeight, min_params: int) -> MatchFailure | None:
        params = int(np.prod(site.weight.shape))
        if params < min_params:
            return MatchFailure(patterns.TOO_SMALL, f"{params} weights < min_params={min_params}", site.node)
        return None

    @staticmethod
    def _output_layer(site: LinearWeight, model: ir.Model) -> MatchFailure | None:
        if patterns.feeds_graph_output(site.node, model):
            return MatchFailure(
                patterns.OUTPUT_LAYER,
                "feeds a graph output directly (head layer); set keep_output_layers=false to prune it",
                site.node,
            )
        return None

    def run(self, model: ir.Model, ctx: PassContext) -> PassRecord:
        record = self.new_record()
        sites = self.select_sites(model, record)
        for site in ctx.progress.track(sites, f"{self.id}: pruning {len(sites)} weights", total=len(sites)):
            self.apply(site, ctx, record)
        return record

    def apply(self, site: LinearWeight, ctx: PassContext, record: PassRecord) -> None:
        """Prune one site in place and record it."""
        array = site.weight.numpy()
        before = zero_fraction(array)
        if self.complies(site, array):
            skip(record, MatchFailure(
                patterns.ALREADY_SPARSE, f"already {self.layout()}; left as it is", site.node), site)
            return
        pruned = self.prune(site, array, ctx)
        assert pruned.shape == array.shape and pruned.dtype == array.dtype
        after = zero_fraction(pruned)
        reason = (f"{self.layout()} {self.options.method} pruning of '{site.weight.name}'"  # type: ignore[attr-defined]
                  f" along axis {site.reduce_axis}: {after:.1%} zeros")
        site.weight.replace(pruned, **{"sparsec.layout": self.layout()})
        readers = [user for user, _ in site.weight.users]
        for reader in readers:
            mark_changed(reader, self.id, reason)
        record.sites.append(SiteRecord(
            site=site.label, node=site.node.name or "", action="changed",
            weight=site.weight.name, shape=site.weight.shape, params=int(array.size),
            sparsity_before=before, sparsity_after=after, message=reason,
            details={"op": site.op, "reduce_axis": site.reduce_axis, "layout": self.layout(),
                     **({"readers": [r.name for r in readers]} if len(readers) > 1 else {})},
        ))
