"""Matchers for structured pruning: regions whose units (neurons, heads, channels) can go.

A :class:`Region` lists every tensor that holds one slice per unit -- the weights that produce
the units (entries), the weight that consumes them (exit), biases and per-unit constants in
between -- and the shape constants that encode the unit count. Removing a unit from every one
of them leaves a smaller model that computes exactly what the original computes with that
unit's exit contribution set to zero.

* :func:`match_ffn` -- MatMul(s) -> element-wise ops -> MatMul: a GELU/ReLU FFN, or SwiGLU
  (gate and up MatMuls reading the same input) -- units are hidden neurons;
* :func:`match_attention` -- Q/K/V projections -> Reshape to heads -> attention -> output
  projection; with grouped KV heads a unit is a whole group (its query heads and KV head);
* :func:`match_conv_channels` -- Conv -> [element-wise, BatchNormalization, depthwise Conv] ->
  Conv: units are the first convolution's output channels.

FFN and attention regions are built from the typed blocks of :mod:`.blocks`; this module adds
what removing units needs (every per-unit tensor, shape constants, nothing escaping). Failures
use the shared :class:`~sparsec.passes.patterns.MatchFailure` with stable codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from sparsec.graph import ConstantRef, constant_ref, node_label

from .blocks import (
    CORE_OPS, ELEMENTWISE, AttentionBlock, FfnBlock, allowed, match_attention_block,
    match_ffn_block, shape_pieces, walk_back,
)
from .patterns import Code, MatchFailure, match_linear_weight

_MS_CORE_OPS = frozenset({"FusedMatMul"})


@dataclass
class Slice:
    """A constant holding ``unit`` consecutive entries per unit along ``axis``.

    ``readers`` are the (node, input index) pairs inside the region that read a small constant
    (a bias, a per-unit scale); when other nodes read it too (an exporter merged identical
    constants), the pass gives the region its own copy before slicing (:meth:`shared`).
    """

    ref: ConstantRef
    axis: int
    unit: int = 1
    readers: tuple[tuple[ir.Node, int], ...] = ()

    @property
    def shared(self) -> bool:
        return bool(self.readers) and len(self.ref.users) > len(self.readers)


@dataclass
class ShapeFix:
    """Entry ``position`` of the shape operand of ``node`` (a Reshape or Expand) counts units:
    it becomes ``per_unit * kept`` after pruning."""

    node: ir.Node
    position: int
    per_unit: int


@dataclass
class AttrFix:
    """An integer attribute that counts units (a depthwise Conv's ``group``)."""

    node: ir.Node
    name: str
    per_unit: int


@dataclass
class Region:
    kind: str  # ffn | heads | channels
    label: str
    units: int
    exit_node: ir.Node
    exit: Slice  # the consuming weight, sliced along its input axis
    entries: list[Slice]
    others: list[Slice] = field(default_factory=list)
    shape_fixes: list[ShapeFix] = field(default_factory=list)
    attr_fixes: list[AttrFix] = field(default_factory=list)
    exit_unit: int = 1  # exit input features per unit
    internal: list[ir.Value] = field(default_factory=list)  # values whose shapes change

    def __bool__(self) -> bool:
        return True

    @property
    def exit_input(self) -> ir.Value:
        return self.exit_node.inputs[0]

    @property
    def node(self) -> ir.Node:
        return self.exit_node

    @property
    def names(self) -> tuple[str, ...]:
        return (self.label, self.exit_node.name or "")

    def tensors(self) -> list[Slice]:
        return [self.exit, *self.entries, *self.others]


def _uses_inside(value: ir.Value, inside: set[ir.Node]) -> bool:
    return all(use.node in inside for use in value.uses()) and not value.is_graph_output()


def _per_unit_const(ref: ConstantRef, units: int, axis: int, node: ir.Node) -> Slice | MatchFailure | None:
    """None for a scalar-like constant; a Slice for a (..., units) vector along ``axis``."""
    shape = ref.shape
    if int(np.prod(shape, dtype=np.int64)) == 1:
        return None
    rank = len(shape)
    ax = axis % rank if rank else 0
    if rank and shape[ax] == units and all(d == 1 for i, d in enumerate(shape) if i != ax):
        return Slice(ref, ax)
    return MatchFailure(Code.UNKNOWN_LAYOUT, f"constant '{ref.name}' of shape {list(shape)} does not"
                        " broadcast per unit", node)


def match_ffn(exit_node: ir.Node) -> Region | MatchFailure:
    """An FFN ending in ``exit_node`` whose hidden neurons can be removed."""
    block = match_ffn_block(exit_node)
    return ffn_region(block) if block else block


def ffn_region(block: FfnBlock) -> Region | MatchFailure:
    """Every tensor of ``block`` holding one slice per hidden neuron, if nothing escapes."""
    exit_node, units = block.down.node, block.hidden
    inside = set(block.nodes) | {exit_node}
    stops = [e.node.outputs[0] for e in block.entries]
    for v in [*(o for n in block.nodes for o in n.outputs), *stops]:
        if not _uses_inside(v, inside):
            return MatchFailure(Code.ESCAPES, f"'{v.name}' is also read outside the FFN", exit_node)
    slices = [Slice(e.weight, e.out_axis) for e in block.entries]
    for e in block.entries:
        if e.op == "Gemm" and len(e.node.inputs) > 2 and e.node.inputs[2] is not None:
            bias = constant_ref(e.node.inputs[2])
            per = _per_unit_const(bias, units, -1, e.node) if bias is not None else \
                MatchFailure(Code.NOT_CONSTANT, "Gemm bias is not constant", e.node)
            if isinstance(per, MatchFailure):
                return per
            if per is not None:
                slices.append(per)
    others: dict[ir.Value, Slice] = {}
    for node, i in block.consts:
        per = _per_unit_const(constant_ref(node.inputs[i]), units, -1, node)
        if isinstance(per, MatchFailure):
            return per
        if per is not None:  # one slice per constant, with every reader inside the region
            known = others.setdefault(per.ref.value, per)
            known.readers = (*known.readers, (node, i))
    for s in slices:
        if len(s.ref.users) != 1:
            return MatchFailure(Code.ESCAPES, f"weight '{s.ref.name}' is shared with other nodes", exit_node)
    internal = [o for n in block.nodes for o in n.outputs] + stops
    return Region("ffn", block.label, units, exit_node, Slice(block.down.weight, 0), slices, list(others.values()),
                  internal=internal)


# --- attention heads -------------------------------------------------------------------------

def _per_head_operand(node: ir.Node, core: set[ir.Node], heads: int, kv_heads: int,
                      projected: set[ir.Value]) -> MatchFailure | None:
    """A float operand from outside the core with a per-head axis (e.g. a (1, H, 1, 1) bias)
    would have to be sliced too; such layouts are refused."""
    if node.op_type in ("Reshape", "Expand", "Slice", "Unsqueeze", "Squeeze", "Shape"):
        return None
    for v in node.inputs:
        if v is None or v in projected or (v.producer() is not None and v.producer() in core) or v.dtype is None:
            continue
        if not v.dtype.is_floating_point():
            continue
        shape = v.shape
        if shape is None or len(shape) != 4:
            continue
        axis = shape[1]
        if isinstance(axis, int) and axis != 1 and axis in (heads, kv_heads):
            return MatchFailure(Code.UNKNOWN_LAYOUT, f"'{v.name}' of shape {list(shape)} has a per-head axis", node)
    return None


def match_attention(exit_node: ir.Node, model: ir.Model | None = None) -> Region | MatchFailure:
    """Attention whose output projection is ``exit_node``, with removable heads (KV groups)."""
    block = match_attention_block(exit_node, model)
    return attention_region(block) if block else block


def attention_region(block: AttentionBlock) -> Region | MatchFailure:
    """The per-head slices of ``block``: a unit is one KV group (its query heads and KV head)."""
    exit_node, heads, kv_heads, head_dim, group = block.o.node, block.heads, block.kv_heads, block.head_dim, block.group
    projections, core, reshape, transpose = block.projections, block.core, block.reshape, block.transpose
    fixes: list[ShapeFix] = []
    for node in core:
        if not allowed(node, CORE_OPS, _MS_CORE_OPS):
            return MatchFailure(Code.NOT_A_REGION, f"'{node.op_type}' node '{node.name}' inside attention", node)
        if node.op_type in ("Reshape", "Expand"):
            problem = _check_core_shape(node, head_dim, heads, kv_heads, group, fixes)
            if problem is not None:
                return problem
        if node.op_type == "Transpose":
            perm = tuple(node.attributes["perm"].value)
            if len(perm) == 4 and perm[1] != 1:
                return MatchFailure(Code.UNKNOWN_LAYOUT, f"Transpose {perm} moves the heads axis", node)
        problem = _per_head_operand(node, core, heads, kv_heads, {p.output for p in projections})
        if problem is not None:
            return problem
    projection_nodes: set[ir.Node] = set()
    for p in projections:
        projection_nodes |= p.nodes
    inside = core | projection_nodes | {reshape, transpose, exit_node}
    for node in core | projection_nodes:
        for v in node.outputs:
            if not _uses_inside(v, inside):
                return MatchFailure(Code.ESCAPES, f"'{v.name}' is also read outside the attention", node)
    for p in projections:
        per_unit = group if p is block.q else 1
        entry = p.pieces[2]
        if entry[1] != -1:
            if entry[0] is None or entry[1] != p.heads:
                return MatchFailure(Code.UNKNOWN_LAYOUT, "projection reshape has an unknown heads entry", p.reshape)
            fixes.append(ShapeFix(p.reshape, 2, per_unit))
    allowzero = reshape.attributes.get("allowzero")
    copies = (0,) if allowzero is None or int(allowzero.value) == 0 else ()  # 0 copies a dim
    for i, (_, v) in enumerate(shape_pieces(reshape.inputs[1]) or []):
        if v is not None and v == heads * head_dim:
            fixes.append(ShapeFix(reshape, i, group * head_dim))
        elif v is not None and v not in (-1, 1, *copies):
            return MatchFailure(Code.UNKNOWN_LAYOUT, f"output reshape entry {v} is not understood", reshape)
    entries, others = [], []
    for p in projections:
        unit = (group if p is block.q else 1) * head_dim
        entries.append(Slice(p.site.weight, 1, unit))
        if p.bias is not None:
            readers = tuple((u.node, u.idx) for u in p.bias.value.uses() if u.node in p.nodes)
            others.append(Slice(p.bias, len(p.bias.shape) - 1, unit, readers))
    for s in entries:
        if len(s.ref.users) != 1:
            return MatchFailure(Code.ESCAPES, f"'{s.ref.name}' is shared with other nodes", exit_node)
    internal = [o for n in core | projection_nodes | {reshape, transpose} for o in n.outputs]
    return Region("heads", block.label, kv_heads, exit_node, Slice(block.o.weight, 0, group * head_dim),
                  entries, others, shape_fixes=fixes, exit_unit=group * head_dim, internal=internal)


def _check_core_shape(node: ir.Node, head_dim: int, heads: int, kv_heads: int, group: int,
                      fixes: list[ShapeFix]) -> MatchFailure | None:
    """A Reshape / Expand inside attention: dynamic, or GQA's repeat of KV heads."""
    pieces = shape_pieces(node.inputs[1])
    if pieces is None:
        shape_src = node.inputs[1].producer()
        if shape_src is not None and shape_src.op_type in ("Shape", "Concat", "Slice"):
            return None
        return MatchFailure(Code.UNKNOWN_LAYOUT, f"{node.op_type} '{node.name}' has a shape that is not understood", node)
    constants = [(i, ref, v) for i, (ref, v) in enumerate(pieces) if ref is not None]
    if all(v in (-1, 1, head_dim) for _, _, v in constants):
        return None
    # repeat_kv: Expand to [b, kv_heads, group, s, d], then Reshape to [b, heads, s, d]
    if node.op_type == "Expand" and len(pieces) == 5 and pieces[1][1] == kv_heads and pieces[2][1] == group:
        fixes.append(ShapeFix(node, 1, 1))
        return None
    if node.op_type == "Reshape" and len(pieces) == 4 and pieces[1][1] == heads:
        fixes.append(ShapeFix(node, 1, group))
        return None
    return MatchFailure(Code.UNKNOWN_LAYOUT, f"{node.op_type} '{node.name}' has constant entries"
                        f" {[v for _, _, v in constants]}", node)


# --- conv channels ---------------------------------------------------------------------------

_CHANNEL_OPS = ELEMENTWISE | {"BatchNormalization", "Conv"}


def match_conv_channels(exit_node: ir.Node) -> Region | MatchFailure:
    """Conv -> [element-wise, BatchNormalization, depthwise Conv] -> ``exit_node`` (Conv, group 1)."""
    site = match_linear_weight(exit_node, decode=False)
    group = exit_node.attributes.get("group")
    if not site or site.op != "Conv" or (group is not None and int(group.value) != 1):
        return MatchFailure(Code.NOT_A_REGION, "not a Conv with group=1 and a constant weight", exit_node)
    units = site.weight.shape[1]

    def is_entry(value: ir.Value) -> bool:
        producer = value.producer()
        if producer is None or producer.op_type != "Conv":
            return False
        g = producer.attributes.get("group")
        entry = match_linear_weight(producer, decode=False)
        return bool(entry) and (g is None or int(g.value) == 1) and entry.weight.shape[0] == units

    walked = walk_back(exit_node.inputs[0], is_entry, _CHANNEL_OPS)
    if isinstance(walked, MatchFailure):
        return MatchFailure(walked.code, walked.message, walked.node or exit_node)
    nodes, stops, consts = walked
    if len(stops) != 1:
        return MatchFailure(Code.NOT_A_REGION, "no single Conv producing the channels", exit_node)
    entry = match_linear_weight(stops[0].producer(), decode=False)
    inside = set(nodes) | {exit_node}
    for v in [*(o for n in nodes for o in n.outputs), *stops]:
        if not _uses_inside(v, inside):
            return MatchFailure(Code.ESCAPES, f"'{v.name}' is also read outside the channel chain", exit_node)
    slices = [Slice(entry.weight, 0)]
    if len(entry.node.inputs) > 2 and entry.node.inputs[2] is not None:
        slices.append(Slice(constant_ref(entry.node.inputs[2]), 0))
    others, attr_fixes = [], []
    for node, i in consts:
        ref = constant_ref(node.inputs[i])
        if node.op_type == "BatchNormalization" or (node.op_type == "Conv" and i == 2):
            others.append(Slice(ref, 0))
            continue
        if node.op_type == "Conv":  # a depthwise Conv: one filter per channel
            g = node.attributes.get("group")
            if g is None or int(g.value) != units or ref.shape[0] != units or ref.shape[1] != 1:
                return MatchFailure(Code.UNKNOWN_LAYOUT, f"Conv '{node.name}' between the convolutions is not depthwise", exit_node)
            others.append(Slice(ref, 0))
            attr_fixes.append(AttrFix(node, "group", 1))
            continue
        per = _per_unit_const(ref, units, 1 if len(ref.shape) == 4 else -1, node)
        if isinstance(per, MatchFailure):
            return per
        if per is not None:
            others.append(per)
    for s in slices + others:
        if len(s.ref.users) != 1:
            return MatchFailure(Code.ESCAPES, f"'{s.ref.name}' is shared with other nodes", exit_node)
    internal = [o for n in nodes for o in n.outputs] + stops
    return Region("channels", node_label(exit_node), units, exit_node, Slice(site.weight, 1), slices, others,
                  attr_fixes=attr_fixes, internal=internal)
