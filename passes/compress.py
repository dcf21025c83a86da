"""Compressed storage: sparse weights saved as their non-zero values plus a bit mask.

Before: an initializer ``W`` (shape S, float) with many zeros.
After:  two initializers, ``W.values`` (a 0, then the non-zeros in row-major order) and
``W.mask`` (one bit per element, packed into uint8), and a subgraph that rebuilds ``W``
bit-exactly::

    bits = Slice(Reshape(Cast<int32>(Mod(BitShift<RIGHT>(Reshape(W.mask, [-1, 1]), [7..0]), 2)), [-1]), 0, n)
    W = Reshape(Gather(W.values, CumSum(bits) * bits), S)

Every input of that subgraph is a constant, so ONNX Runtime folds it once when the session is
created (graph optimizations on, the default): the model runs exactly as before, the file
holds ``nnz * itemsize + n / 8`` bytes instead of ``n * itemsize`` (2:4 fp32: 53%; 90%
unstructured fp32: 13%). Exact: the rebuilt weights equal the pruned ones bit for bit.

Quantized weights: int8/uint8 codes read by a quantized operator (DequantizeLinear, MatMulInteger,
ConvInteger, QLinearMatMul, QLinearConv) whose zero point is one constant value are packed the
same way with that zero point as the fill: a pruned code is the zero point (passes/quantized.py),
so ``values`` starts with the zero point instead of 0 and the mask marks codes that differ from
it. The rebuilt codes are constants again after folding, so ORT's quantized kernels see (and
prepack) an initializer as before. Zero points that differ per channel or per block
(ZERO_POINTS_VARY), 4-bit and 2-bit codes (Gather has no 4-bit kernel) and MatMulNBits' packed
blobs are left as they are.

Skipped: weights below ``min_sparsity`` or ``min_params`` (TOO_DENSE / TOO_SMALL: compression
would not pay), non-float weights, initializers that are graph inputs, weights inside
subgraphs, models with a default-domain opset below 11 (OPSET_TOO_OLD).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sparsec.graph import add_constant, mark_changed, mark_packed, register_codec
from sparsec.pipeline import Kind, Pass, PassContext, PassOptions, PassRecord, SiteRecord, option, register
from sparsec.sparsity import zero_fraction

from . import patterns
from .patterns import Code, MatchFailure

MIN_OPSET = 11  # BitShift, ScatterND


@dataclass(frozen=True)
class CompressOptions(PassOptions):
    min_sparsity: float = option(0.3, "compress weights with at least this fraction of zeros", min=0.0, max=1.0)
    min_params: int = option(1024, "weights with fewer elements stay as they are", min=0)


def compressed_bytes(numel: int, nnz: int, itemsize: int) -> int:
    return nnz * itemsize + (numel + 7) // 8


def pack(array: np.ndarray, fill: int | float = 0) -> tuple[np.ndarray, np.ndarray]:
    """(the values other than ``fill`` in row-major order, packed bit mask) of ``array``."""
    flat = array.reshape(-1)
    keep = flat != fill
    return flat[keep], np.packbits(keep)


def unpack(values: np.ndarray, mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The numpy twin of the ONNX subgraph: rebuild the dense array from stored values
    (with their leading fill: 0, or a quantized weight's zero point) and the packed mask."""
    numel = int(np.prod(shape, dtype=np.int64))
    bits = np.unpackbits(mask)[:numel].astype(np.int64)
    return values[np.cumsum(bits) * bits].reshape(shape)


CODEC = "compress"  # the packed-constant codec: data "values_name,mask_name"


def _decode(node: ir.Node, data: str) -> ir.Tensor:
    """The dense weight behind a rebuild subgraph ending in ``node`` (graph.unpack_constant)."""
    graph = node.graph
    values_name, mask_name = data.split(",")
    values = graph.initializers[values_name].const_value.numpy()
    mask = graph.initializers[mask_name].const_value.numpy()
    shape = tuple(int(d) for d in graph.initializers[node.inputs[1].name].const_value.numpy())
    return ir.Tensor(unpack(values, mask, shape), name=node.outputs[0].name)


register_codec(CODEC, _decode)


def _rebuild_nodes(graph: ir.Graph, name: str, values: ir.Value, mask: ir.Value, numel: int,
                   shape: tuple[int, ...], dtype: ir.DataType) -> list[ir.Node]:
    """The subgraph that turns (values, mask) back into the dense weight (last node: Reshape).

    Every shape in it is static (no NonZero), so ONNX Runtime's constant folding removes it.
    ``values`` starts with one 0: position i takes values[cumsum(bits)[i] * bits[i]].
    """
    c = lambda suffix, arr: add_constant(graph, f"{name}.{suffix}", arr)  # noqa: E731
    col = ir.node("Reshape", [mask, c("col_shape", np.array([-1, 1], np.int64))])
    bits = ir.node("BitShift", [col.outputs[0], c("shifts", np.arange(7, -1, -1, dtype=np.uint8))],
                   attributes={"direction": "RIGHT"})
    low = ir.node("Mod", [bits.outputs[0], c("two", np.array(2, np.uint8))])
    # int32 indices halve the transient memory of the rebuild; int64 only for huge tensors.
    index_type = ir.DataType.INT32 if numel < 2**31 - 1 else ir.DataType.INT64
    wide = ir.node("Cast", [low.outputs[0]], attributes={"to": index_type})
    flat = ir.node("Reshape", [wide.outputs[0], c("flat_shape", np.array([-1], np.int64))])
    cut = ir.node("Slice", [flat.outputs[0], c("starts", np.array([0], np.int64)),
                            c("ends", np.array([numel], np.int64))])
    rank = ir.node("CumSum", [cut.outputs[0], c("axis", np.array(0, np.int64))])
    index = ir.node("Mul", [rank.outputs[0], cut.outputs[0]])
    gather = ir.node("Gather", [values, index.outputs[0]], attributes={"axis": 0})
    dense = ir.node("Reshape", [gather.outputs[0], c("shape", np.array(shape, np.int64))])
    nodes = [col, bits, low, wide, flat, cut, rank, index, gather, dense]
    # Typed outputs: later stages (staged runs, shape inference) need no inference over them.
    types = [ir.DataType.UINT8] * 3 + [index_type] * 5 + [dtype] * 2
    for i, (node, out_type) in enumerate(zip(nodes, types)):
        node.name = f"{name}.rebuild.{i}"
        for j, out in enumerate(node.outputs):
            out.name = f"{name}.rebuild.{i}.{j}"
            out.type = ir.TensorType(out_type)
    dense.outputs[0].shape = ir.Shape(shape)
    return nodes


@register
class CompressPass(Pass):
    """Store sparse weights as values plus a bit mask, rebuilt by a constant-folded subgraph."""

    id = "compress"
    summary = "compressed storage of sparse weights (values + bit mask, rebuilt at session load)"
    kinds = (Kind.EXACT,)
    matches = "float initializers of the main graph with enough zeros"
    Options = CompressOptions
    order = 2  # last: it packs the final weights, quantized ones included

    def sparse_form(self) -> str:
        return "storage"

    def match(self, model: ir.Model, ctx: PassContext, record: PassRecord) -> list[PackSite]:
        """Main-graph float initializers sparse enough to pack. Dense, small and non-float weights
        are passed over without a record: they are not candidates."""
        opts: CompressOptions = self.options  # type: ignore[assignment]
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        sites = []
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            found = _check(value, opts, opset)
            if isinstance(found, MatchFailure):
                record.skip(found, site=value.name or "", node=found.node, weight=value.name or "",
                            shape=tuple(int(d) for d in tensor.shape))
            elif found is not None:
                sites.append(found)
        return sites

    def run(self, model: ir.Model, ctx: PassContext) -> PassRecord:
        record = self.new_record()
        graph = model.graph
        sites = self.match(model, ctx, record)
        for site in ctx.progress.track(sites, "compress: packing sparse weights", total=len(sites)):
            value, tensor = site.value, site.value.const_value
            array = tensor.numpy()
            values, mask = pack(array, site.fill)
            before, after = array.nbytes, compressed_bytes(array.size, values.size, array.dtype.itemsize)
            name = value.name or "weight"
            padded = np.concatenate([np.full(1, site.fill, values.dtype), values])
            stored_values = add_constant(graph, f"{name}.values", padded)
            stored_mask = add_constant(graph, f"{name}.mask", mask)
            nodes = _rebuild_nodes(graph, name, stored_values, stored_mask, array.size, array.shape, tensor.dtype)
            # Rebuilds only read initializers: at the top of the graph they are always in order.
            graph.insert_before(graph[0], nodes)
            rebuilt = nodes[-1].outputs[0]
            value.replace_all_uses_with(rebuilt)
            if value in graph.outputs:
                graph.outputs[graph.outputs.index(value)] = rebuilt
            graph.initializers.pop(value.name)
            rebuilt.name = name
            kept = "values" if site.fill == 0 and tensor.dtype in patterns.FLOAT_TYPES else \
                f"codes other than the zero point {site.fill}"
            reason = f"stored as {values.size} {kept} + bit mask: {after} of {before} bytes ({after / before:.1%})"
            for node in nodes:
                mark_changed(node, self.id, reason)
            mark_packed(nodes, CODEC, f"{stored_values.name},{stored_mask.name}")
            record.sites.append(SiteRecord(
                site=name, node=nodes[-1].name or "", action="changed", message=reason, weight=name,
                shape=tuple(array.shape), params=int(array.size), sparsity_before=site.zeros,
                sparsity_after=site.zeros, details={"bytes_before": before, "bytes_after": after}))
        changed = record.changed
        if changed:
            before = sum(s.details["bytes_before"] for s in changed)
            after = sum(s.details["bytes_after"] for s in changed)
            record.notes.append(f"{len(changed)} weights: {before} -> {after} bytes ({after / before:.1%})")
        return record


@dataclass(frozen=True)
class PackSite:
    """A weight worth packing."""

    value: ir.Value
    zeros: float  # the fraction of elements equal to ``fill``
    fill: int | float = 0  # what a pruned element holds: 0, or a quantized weight's zero point

    @property
    def label(self) -> str:
        return self.value.name or ""

    @property
    def node(self) -> ir.Node | None:
        return next((use.node for use in self.value.uses()), None)


def _check(value: ir.Value, opts: CompressOptions, opset: int) -> PackSite | MatchFailure | None:
    """A weight to pack, a failure to record, or None for weights that are not candidates."""
    tensor = value.const_value
    numel = int(np.prod(tensor.shape.numpy(), dtype=np.int64))
    if numel < opts.min_params:
        return None
    fill: int | float = 0
    if tensor.dtype not in patterns.FLOAT_TYPES:
        if tensor.dtype not in CODE_TYPES:
            return None
        found = _zero_point(value)
        if not isinstance(found, int):
            return found
        fill = found
    array = tensor.numpy()
    zeros = float(np.mean(array == fill)) if fill else zero_fraction(array)
    if zeros == 0:
        return None
    reader = next((use.node for use in value.uses()), None)
    if value.is_graph_input():
        return MatchFailure(Code.GRAPH_INPUT, "initializer is also a graph input (overridable;"
                            " --constant-initializers treats it as a constant)", reader)
    if opset < MIN_OPSET:
        return MatchFailure(Code.OPSET_TOO_OLD, f"opset {opset} < {MIN_OPSET} (BitShift, ScatterND)", reader)
    if zeros < opts.min_sparsity:
        return MatchFailure(Code.TOO_DENSE, f"{zeros:.1%} zeros < min_sparsity={opts.min_sparsity}", reader)
    return PackSite(value, zeros, fill)


CODE_TYPES = frozenset({ir.DataType.INT8, ir.DataType.UINT8})
# quantized operators: (the input index of the integer weight, the input index of its zero point)
CODE_READERS = {"DequantizeLinear": (0, 2), "MatMulInteger": (1, 3), "ConvInteger": (1, 3),
                "QLinearMatMul": (3, 5), "QLinearConv": (3, 5)}


def _zero_point(value: ir.Value) -> int | MatchFailure | None:
    """The one zero point every reader of the integer weight ``value`` decodes it with (what a
    pruned code holds), a failure when they differ, or None when ``value`` is not a quantized
    weight (every reader must be a quantized operator reading it as its weight)."""
    from sparsec.graph import constant_ref

    points = set()
    for use in value.uses():
        node = use.node
        slots = CODE_READERS.get(node.op_type) if node.domain in patterns.STANDARD_DOMAINS else None
        if slots is None or use.idx != slots[0]:
            return None
        zp = node.inputs[slots[1]] if len(node.inputs) > slots[1] else None
        if zp is None:
            points.add(0)
            continue
        ref = constant_ref(zp)
        if ref is None:
            return MatchFailure(Code.NOT_CONSTANT, f"the zero point of '{value.name}' is computed at run time", node)
        points.update(np.unique(ref.numpy()).tolist())
    if not points:
        return None
    if len(points) > 1:
        return MatchFailure(Code.ZERO_POINTS_VARY, f"'{value.name}' has {len(points)} different zero points (per"
                            " channel or block); the bit mask stores one fill value", None)
    return int(points.pop())
