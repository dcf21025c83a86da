"""Structured pruning: physically remove FFN neurons, attention heads (KV groups) or channels.

Before: an FFN with I hidden neurons (GELU/ReLU, or SwiGLU's gate and up projections), an
attention block with H heads on G KV groups, or a Conv -> Conv chain with C channels.
After:  the same subgraph with smaller dense weights: the entry weights lose the removed units'
columns, the exit weight their rows, biases and per-unit constants their entries, and shape
constants that count heads are rewritten. Every execution provider runs the smaller matrices
faster; no special kernel is involved.

Units are ranked by a score: ``magnitude`` (product of the unit's weight norms) or
``activation`` (the norm of the unit's activations on calibration data times its exit weight
norm, sequentially layer by layer). With calibration, ``reconstruct`` refits the exit weight
by least squares so the kept units stand in for the removed ones.

Lossy. The kept count is rounded up to ``multiple`` units. Regions are matched by
:mod:`sparsec.passes.structured_patterns`; what does not match is left as it is (codes
ESCAPES, UNKNOWN_LAYOUT in the record).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from sparsec.errors import OptionError, PassError
from sparsec.graph import add_constant, constant_ref, fresh_name, mark_changed
from sparsec.pipeline import Kind, Pass, PassContext, PassOptions, PassRecord, SiteRecord, option, register
from sparsec.targets import STRUCTURED

from . import structured_patterns as sp
from .patterns import Code, MatchFailure, select


@dataclass(frozen=True)
class StructuredOptions(PassOptions):
    ratio: float = option(0.25, "fraction of units removed in each region", min=0.0, max=0.95,
                          search=(0.125, 0.25, 0.375, 0.5))
    method: str = option("magnitude", "unit scores: magnitude (weight norms) or activation"
                         " (activation norms on calibration data x exit weight norms)",
                         choices=("magnitude", "activation"), calibrated=("activation",),
                         calibrated_default="activation")
    multiple: int = option(8, "kept units are rounded up to a multiple of this", min=1)
    reconstruct: bool = option(True, "activation method: refit the exit weight by least squares")
    damp: float = option(0.01, "reconstruct: dampening as a fraction of the mean Gram diagonal",
                         min=0.0, max=1.0)
    include: tuple[str, ...] = option((), "glob patterns over the region's module path or exit node name")
    exclude: tuple[str, ...] = option((), "glob patterns of regions left as they are")


@dataclass(frozen=True)
class HeadOptions(StructuredOptions):
    multiple: int = option(1, "kept KV groups are rounded up to a multiple of this", min=1)


def _keep_count(units: int, ratio: float, multiple: int) -> int:
    keep = units - int(round(ratio * units))
    keep = min(units, max(multiple, math.ceil(keep / multiple) * multiple))
    return max(1, keep)


def _unit_index(kept: np.ndarray, unit: int) -> np.ndarray:
    return (kept[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)


class StructuredPass(Pass):
    """Base: find regions, score units, remove the lowest-scoring ones, record."""

    kinds = (Kind.LOSSY,)
    exit_ops: ClassVar[tuple[str, ...]] = ("MatMul",)
    Options = StructuredOptions

    def sparse_form(self) -> str:
        return STRUCTURED

    def match_region(self, node: ir.Node, model: ir.Model) -> sp.Region | MatchFailure:
        raise NotImplementedError

    def match(self, model: ir.Model, ctx: PassContext, record: PassRecord) -> list[sp.Region]:
        """Every region whose units can go; the other candidate exits are recorded with a code."""
        opts: StructuredOptions = self.options  # type: ignore[assignment]
        found = []
        for node in model.graph:
            if node.op_type not in self.exit_ops:
                continue
            region = self.match_region(node, model)
            if not region:
                record.skip(region, node=node)
                continue
            packed = next((t.ref for t in region.tensors() if t.ref.packed is not None), None)
            # (a MatchFailure is falsy: it cannot be chained with `or`)
            failure = select(region, opts.include, opts.exclude)
            if failure is None and packed is not None:
                failure = MatchFailure(Code.COMPRESSED, f"'{packed.name}' is stored compressed; run structured"
                                       " passes before compress", node)
            if failure is not None:
                record.skip(failure, site=region.label, node=node)
                continue
            found.append(region)
        if not found and record.skipped:
            common = Counter(s.code for s in record.skipped).most_common(3)
            record.notes.append(f"no region matched among {len(record.skipped)} {'/'.join(self.exit_ops)} nodes;"
                                f" codes: {', '.join(f'{code} x {n}' for code, n in common)}")
        return found

    def run(self, model: ir.Model, ctx: PassContext) -> PassRecord:
        opts: StructuredOptions = self.options  # type: ignore[assignment]
        record = self.new_record()
        regions = self.match(model, ctx, record)
        if opts.method == "magnitude":
            for region in ctx.progress.track(regions, f"{self.id}: {len(regions)} regions", total=len(regions)):
                self.apply(region, self.magnitude_scores(region), None, record)
            return record
        if ctx.calibration is None:
            raise OptionError(f"{self.id}: method 'activation' needs --calib")
        known = ctx.extras.get(DENSE_STATISTICS, {})
        runner = None
        for region in ctx.progress.track(regions, f"{self.id}: {len(regions)} regions", total=len(regions)):
            if region.exit_input.name in known:
                sq, gram = known[region.exit_input.name]
            else:
                runner = runner or ctx.runner.staged(model, ctx.calibration.feeds, progress=ctx.progress)
                sq, gram = _statistics(region, runner.capture(region.exit_input), opts.reconstruct, self.id)
            per_unit = sq.reshape(region.units, -1).sum(1)
            scores = np.sqrt(per_unit) * self._exit_norms(region)
            kept = self.apply(region, scores, gram, record)
            if kept is not None:  # what is already computed of the exit input loses those units
                index = _unit_index(kept, region.exit_unit)
                axis = 1 if region.kind == "channels" else -1
                if runner is not None:
                    runner.transform(region.exit_input, lambda arr: np.take(arr, index, axis=axis))
        record.notes.append(f"calibration: {ctx.calibration.source}")
        return record

    @staticmethod
    def _exit_norms(region: sp.Region) -> np.ndarray:
        w = np.moveaxis(region.exit.ref.numpy().astype(np.float64), region.exit.axis, 0)
        return np.sqrt((w.reshape(region.units, -1) ** 2).sum(1))

    def magnitude_scores(self, region: sp.Region) -> np.ndarray:
        score = np.log(self._exit_norms(region) + 1e-30)
        for s in region.entries:
            w = np.moveaxis(s.ref.numpy().astype(np.float64), s.axis, 0)
            score += np.log(np.sqrt((w.reshape(region.units, -1) ** 2).sum(1)) + 1e-30)
        return score

    def apply(self, region: sp.Region, scores: np.ndarray, gram: np.ndarray | None,
              record: PassRecord) -> np.ndarray | None:
        """Remove the lowest-scoring units of ``region``; return the kept unit indices."""
        opts: StructuredOptions = self.options  # type: ignore[assignment]
        keep = _keep_count(region.units, opts.ratio, opts.multiple)
        if keep >= region.units:
            record.skip(MatchFailure(Code.NOTHING_TO_REMOVE, f"keeps all {region.units} units", region.exit_node),
                        site=region.label)
            return None
        kept = np.sort(np.argsort(-scores, kind="stable")[:keep])
        params_before = sum(int(np.prod(s.ref.shape)) for s in region.tensors())
        exit_index = _unit_index(kept, region.exit_unit)
        new_exit = np.take(region.exit.ref.numpy(), exit_index, axis=region.exit.axis)
        output_error = None
        if gram is not None:
            new_exit = _refit(region, gram, exit_index, opts.damp).astype(new_exit.dtype)
            output_error = _exit_error(region, gram, exit_index, new_exit)
        reason = f"{self.id}: kept {keep} of {region.units} {self.unit_name} ({opts.method} scores)"
        keep_units(region, kept, new_exit, self.id, reason)
        params_after = sum(int(np.prod(s.ref.shape)) for s in region.tensors())
        record.sites.append(SiteRecord(
            site=region.label, node=region.exit_node.name or "", action="changed", message=reason,
            weight=region.exit.ref.name, params=params_before, sparsity_before=0.0,
            sparsity_after=1 - params_after / params_before,
            details={"kind": region.kind, "units_before": region.units, "units_after": keep,
                     **({"output_error": output_error} if output_error is not None else {}),
                     "params_removed": params_before - params_after, "reconstructed": gram is not None,
                     "removed_units": sorted(set(range(region.units)) - set(kept.tolist()))},
        ))
        return kept

    unit_name = "units"


def keep_units(region: sp.Region, kept: np.ndarray, new_exit: np.ndarray, pass_id: str, reason: str) -> None:
    """Shrink ``region`` to the units ``kept`` (sorted indices): the exit weight becomes
    ``new_exit`` (already sliced, perhaps refit), every other per-unit tensor is sliced, shape
    constants and attributes that count units are rewritten, and every touched node is tagged."""
    region.exit.ref.replace(np.ascontiguousarray(new_exit), resize=True)
    for s in [*region.entries, *region.others]:
        if s.shared:  # an exporter merged identical constants: this region gets its own copy
            clone = add_constant(region.exit_node.graph, f"{s.ref.name}.{region.exit_node.name}", s.ref.numpy())
            for node, index in s.readers:
                node.replace_input_with(index, clone)
            s.ref = constant_ref(clone)
        s.ref.replace(np.ascontiguousarray(np.take(s.ref.numpy(), _unit_index(kept, s.unit), axis=s.axis)),
                      resize=True)
    for fix in region.shape_fixes:
        _fix_shape(fix, fix.per_unit * len(kept))
    for fix in region.attr_fixes:
        fix.node.attributes[fix.name] = ir.AttrInt64(fix.name, fix.per_unit * len(kept))
    for value in region.internal:
        value.shape = None  # smaller now; ORT infers it
    touched = {region.exit_node} | {u.node for s in region.tensors() for u in s.ref.value.uses()}
    touched |= {fix.node for fix in region.shape_fixes} | {fix.node for fix in region.attr_fixes}
    for node in touched:
        mark_changed(node, pass_id, reason)


DENSE_STATISTICS = "structured.dense_statistics"  # PassContext.extras key, see dense_statistics


def _statistics(region: sp.Region, arrays, gram: bool, who: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(per-feature sums of squares, Gram matrix or None) of the exit input over ``arrays``."""
    features = region.exit.ref.shape[region.exit.axis]
    sq, g = None, None
    for x in arrays:
        a = _features(region, x)
        sq = (a.astype(np.float64) ** 2).sum(0) + (0 if sq is None else sq)
        if gram and region.kind != "channels":
            g = a.T.astype(np.float64) @ a + (0 if g is None else g)
    if sq is None or sq.shape != (features,):
        raise PassError(f"{who}: captured {None if sq is None else sq.shape} features at '{region.exit_input.name}',"
                        f" expected ({features},)")
    return sq, g


def dense_statistics(model: ir.Model, regions: list[sp.Region], ctx: PassContext) -> dict:
    """The exit-input statistics of every region of the unpruned ``model``, captured in one
    staged run, by exit-input name. Put under ``ctx.extras[DENSE_STATISTICS]``, a structured pass
    on a copy of the model takes every region's statistics from there instead of capturing them
    layer by layer: the planner fits each option from one capture. (So an option that prunes
    several regions fits the later ones on the unpruned upstream; a compile refits them on the
    pruned one.)"""
    order = {node: i for i, node in enumerate(model.graph)}
    runner = ctx.runner.staged(model, ctx.calibration.feeds, progress=ctx.progress)
    out = {}
    for region in sorted(regions, key=lambda r: order[r.exit_node]):
        if region.exit_input.name not in out:
            out[region.exit_input.name] = _statistics(region, runner.capture(region.exit_input), True, "planner")
    return out


def _features(region: sp.Region, x: np.ndarray) -> np.ndarray:
    """The exit input as (tokens, features)."""
    if region.kind == "channels":
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _refit(region: sp.Region, gram: np.ndarray, kept: np.ndarray, damp: float) -> np.ndarray:
    """Exit weight on the kept features that best reproduces the full layer: solve
    (G_kk + damp * mean(diag) I) W' = G_k: W."""
    w = region.exit.ref.numpy().astype(np.float64)  # (features, out) for MatMul exits
    g_kk = gram[np.ix_(kept, kept)]
    g_kk[np.diag_indices_from(g_kk)] += damp * np.mean(np.diag(gram)) + 1e-12
    return np.linalg.solve(g_kk, gram[kept] @ w)


def _exit_error(region: sp.Region, gram: np.ndarray, kept: np.ndarray, new_exit: np.ndarray) -> float:
    """||A W - A_k W'|| / ||A W|| of the exit layer over the calibration inputs A (G = A^T A),
    W the original exit weight (features, out) and W' the refit one on the kept features."""
    w = region.exit.ref.numpy().astype(np.float64)
    w_new = new_exit.astype(np.float64)
    gw = gram @ w  # (features, out): three traces as matrix products, not a naive three-way einsum
    full = float(np.sum(w * gw))
    cross = float(np.sum(w_new * gw[kept]))
    kept_part = float(np.sum(w_new * (gram[np.ix_(kept, kept)] @ w_new)))
    return (max(full - 2 * cross + kept_part, 0.0) / full) ** 0.5 if full > 0 else 0.0


def _fix_shape(fix: sp.ShapeFix, new: int) -> None:
    """Give ``fix.node`` its own shape operand with entry ``fix.position`` set to ``new``.

    The original constant or Concat may be shared (the same [2] can be a head count and an
    axis elsewhere), so it is never edited in place.
    """
    graph = fix.node.graph
    base = f"{fix.node.name or fix.node.op_type}.shape"
    ref = constant_ref(fix.node.inputs[1])
    if ref is not None:
        array = ref.numpy().copy()
        array[fix.position] = new
        fix.node.replace_input_with(1, add_constant(graph, base, array))
        return
    concat = fix.node.inputs[1].producer()
    inputs, offset = list(concat.inputs), 0
    for i, inp in enumerate(inputs):
        piece = constant_ref(inp)
        size = int(np.prod(piece.shape, dtype=np.int64)) if piece is not None else 1
        if offset <= fix.position < offset + size:
            array = piece.numpy().copy().reshape(-1)
            array[fix.position - offset] = new
            inputs[i] = add_constant(graph, f"{base}.{i}", array.reshape(piece.shape))
            break
        offset += size
    new_concat = ir.node("Concat", inputs, attributes={"axis": 0}, name=fresh_name(graph, f"{base}.concat"))
    new_concat.outputs[0].name = fresh_name(graph, base)
    graph.insert_before(fix.node, new_concat)
    fix.node.replace_input_with(1, new_concat.outputs[0])


@register
class FfnNeuronsPass(StructuredPass):
    id = "ffn-neurons"
    summary = "structured: remove FFN hidden neurons (GELU/ReLU FFNs, SwiGLU gate/up/down)"
    matches = "MatMul(s) -> element-wise ops -> MatMul with constant weights, hidden values read nowhere else"
    unit_name = "neurons"

    def match_region(self, node, model):
        return sp.match_ffn(node)


@register
class AttentionHeadsPass(StructuredPass):
    id = "attention-heads"
    summary = "structured: remove attention heads (with grouped KV heads, whole KV groups)"
    matches = "Q/K/V MatMuls -> Reshape to heads -> attention -> Reshape -> output MatMul"
    unit_name = "KV groups (heads)"
    Options = HeadOptions

    def match_region(self, node, model):
        return sp.match_attention(node, model)


@register
class ConvChannelsPass(StructuredPass):
    id = "conv-channels"
    summary = "structured: remove output channels of a Conv and the matching inputs of the next"
    matches = "Conv -> [element-wise, BatchNormalization, depthwise Conv] -> Conv (group 1)"
    exit_ops = ("Conv",)
    unit_name = "channels"

    def match_region(self, node, model):
        return sp.match_conv_channels(node)
