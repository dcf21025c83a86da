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

Failures use the shared :class:`~sparsec.passes.patterns.MatchFailure` with stable codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from sparsec.graph import ConstantRef, constant_ref, node_label

from .patterns import MatchFailure, match_linear_weight

NOT_A_REGION = "NOT_A_REGION"  # the exit's input is not produced by a prunable region
ESCAPES = "ESCAPES"  # a value inside the region is also read outside it
UNKNOWN_LAYOUT = "UNKNOWN_LAYOUT"  # a constant or reshape whose per-unit layout is not understood

ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Relu", "Gelu", "Sigmoid", "Tanh", "Erf", "Neg", "Exp", "Softplus",
    "Identity", "Pow", "Sqrt", "Abs", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Mish", "Elu",
    "Selu", "Celu", "Softsign", "Cast", "PRelu",
})
# Element-wise contrib ops ONNX Runtime's optimizer fuses into graphs (bias inputs are per unit).
MS_ELEMENTWISE = frozenset({"BiasGelu", "FastGelu", "Gelu", "QuickGelu", "BiasAdd"})
MS_DOMAIN = "com.microsoft"


def _allowed(node: ir.Node, ops: frozenset[str], ms_ops: frozenset[str] = MS_ELEMENTWISE) -> bool:
    if node.domain in ("", "ai.onnx"):
        return node.op_type in ops
    return node.domain == MS_DOMAIN and node.op_type in ms_ops


@dataclass
class Slice:
    """A constant holding ``unit`` consecutive entries per unit along ``axis``."""

    ref: ConstantRef
    axis: int
    unit: int = 1


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

    def tensors(self) -> list[Slice]:
        return [self.exit, *self.entries, *self.others]


def _uses_inside(value: ir.Value, inside: set[ir.Node]) -> bool:
    return all(use.node in inside for use in value.uses()) and not value.is_graph_output()


def _walk_back(start: ir.Value, stop, allowed: frozenset[str]):
    """Nodes between ``start`` and the values ``stop(value)`` accepts, through ``allowed`` ops.

    Returns (region nodes, stop values, side constants as (node, input index)) or a failure
    reason string.
    """
    nodes: list[ir.Node] = []
    stops: list[ir.Value] = []
    consts: list[tuple[ir.Node, int]] = []
    stack, seen = [start], set()
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        if stop(value):
            stops.append(value)
            continue
        producer = value.producer()
        if producer is None:
            return f"'{value.name}' is a graph input"
        if not _allowed(producer, allowed):
            domain = "" if producer.domain in ("", "ai.onnx") else f"{producer.domain}::"
            return f"'{domain}{producer.op_type}' node '{producer.name}' between the units and their consumer"
        nodes.append(producer)
        for i, inp in enumerate(producer.inputs):
            if inp is None:
                continue
            if constant_ref(inp) is not None:
                consts.append((producer, i))
            else:
                stack.append(inp)
    return nodes, stops, consts


def _per_unit_const(ref: ConstantRef, units: int, axis: int) -> Slice | str | None:
    """None for a scalar-like constant; a Slice for a (..., units) vector along ``axis``."""
    shape = ref.shape
    if int(np.prod(shape, dtype=np.int64)) == 1:
        return None
    rank = len(shape)
    ax = axis % rank if rank else 0
    if rank and shape[ax] == units and all(d == 1 for i, d in enumerate(shape) if i != ax):
        return Slice(ref, ax)
    return f"constant '{ref.name}' of shape {list(shape)} does not broadcast per unit"


def match_ffn(exit_node: ir.Node) -> Region | MatchFailure:
    """An FFN ending in ``exit_node`` (MatMul with a constant (I, H) weight)."""
    site = match_linear_weight(exit_node)
    if not site or site.op != "MatMul" or site.input_index != 1 or len(site.weight.shape) != 2:
        return MatchFailure(NOT_A_REGION, "not a MatMul with a constant 2-D weight on the right", exit_node)
    units = site.weight.shape[0]

    def is_entry(value: ir.Value) -> bool:
        producer = value.producer()
        if producer is None or producer.op_type not in ("MatMul", "Gemm"):
            return False
        entry = match_linear_weight(producer)
        return bool(entry) and entry.input_index == 1 and len(entry.weight.shape) == 2 and \
            entry.weight.shape[entry.out_axis] == units

    walked = _walk_back(exit_node.inputs[0], is_entry, ELEMENTWISE)
    if isinstance(walked, str):
        return MatchFailure(NOT_A_REGION, walked, exit_node)
    nodes, stops, consts = walked
    if not stops:
        return MatchFailure(NOT_A_REGION, "no MatMul producing the hidden units", exit_node)
    entries = [match_linear_weight(v.producer()) for v in stops]
    sources = {e.node.inputs[0] for e in entries}
    if len(sources) != 1:
        return MatchFailure(NOT_A_REGION, "the hidden units come from MatMuls of different inputs", exit_node)
    inside = set(nodes) | {exit_node}
    for v in [*(o for n in nodes for o in n.outputs), *stops]:
        if not _uses_inside(v, inside):
            return MatchFailure(ESCAPES, f"'{v.name}' is also read outside the FFN", exit_node)
    slices = [Slice(e.weight, e.out_axis) for e in entries]
    for e in entries:
        if e.op == "Gemm" and len(e.node.inputs) > 2 and e.node.inputs[2] is not None:
            bias = constant_ref(e.node.inputs[2])
            per = _per_unit_const(bias, units, -1) if bias is not None else "Gemm bias is not constant"
            if isinstance(per, str):
                return MatchFailure(UNKNOWN_LAYOUT, per, exit_node)
            if per is not None:
                slices.append(per)
    others = []
    for node, i in consts:
        per = _per_unit_const(constant_ref(node.inputs[i]), units, -1)
        if isinstance(per, str):
            return MatchFailure(UNKNOWN_LAYOUT, per, exit_node)
        if per is not None and len(per.ref.users) != 1:
            return MatchFailure(ESCAPES, f"constant '{per.ref.name}' is shared with other nodes", exit_node)
        if per is not None:
            others.append(per)
    for s in slices:
        if len(s.ref.users) != 1:
            return MatchFailure(ESCAPES, f"weight '{s.ref.name}' is shared with other nodes", exit_node)
    internal = [o for n in nodes for o in n.outputs] + stops
    return Region("ffn", node_label(exit_node), units, exit_node, Slice(site.weight, 0), slices, others,
                  internal=internal)


# --- attention heads -------------------------------------------------------------------------

_MS_CORE_OPS = frozenset({"FusedMatMul"})  # batched over heads, like MatMul
_CORE_OPS = frozenset({"Mul", "Add", "Sub", "Div", "Neg", "Softmax", "MatMul", "Transpose", "Slice",
                       "Concat", "Where", "IsNaN", "Cast", "Reshape", "Expand", "Unsqueeze", "Sqrt",
                       "Shape", "Identity", "Squeeze"})


def _shape_pieces(value: ir.Value) -> list[tuple[ConstantRef | None, int | None]] | None:
    """The entries of a shape operand: (constant, value) per position, (None, None) when
    computed at run time. None when the operand is neither a constant nor a Concat."""
    ref = constant_ref(value)
    if ref is not None:
        return [(ref, int(v)) for v in ref.numpy().reshape(-1)]
    producer = value.producer()
    if producer is None or producer.op_type != "Concat":
        return None
    pieces = []
    for inp in producer.inputs:
        ref = constant_ref(inp)
        if ref is not None:
            pieces.extend((ref, int(v)) for v in ref.numpy().reshape(-1))
        else:
            pieces.append((None, None))
    return pieces


def _projection(value: ir.Value):
    """Transpose(0,2,1,3) <- Reshape(.., [.., heads, d]) <- [Add bias] <- MatMul(X, W)."""
    t = value.producer()
    if t is None or t.op_type != "Transpose" or tuple(t.attributes["perm"].value) != (0, 2, 1, 3):
        return None
    r = t.inputs[0].producer()
    if r is None or r.op_type != "Reshape":
        return None
    pieces = _shape_pieces(r.inputs[1])
    if not pieces or len(pieces) != 4 or pieces[3][1] is None or pieces[3][1] <= 0:
        return None
    head_dim = pieces[3][1]
    x = r.inputs[0]
    bias = None
    p = x.producer()
    if p is not None and p.op_type == "Add":
        for i in (0, 1):
            ref = constant_ref(p.inputs[i])
            if ref is not None:
                bias, x, p = ref, p.inputs[1 - i], p.inputs[1 - i].producer()
                break
    if p is None or p.op_type != "MatMul":
        return None
    site = match_linear_weight(p)
    if not site or site.input_index != 1 or len(site.weight.shape) != 2:
        return None
    return {"transpose": t, "reshape": r, "pieces": pieces, "head_dim": head_dim, "bias": bias,
            "site": site, "heads": site.weight.shape[1] // head_dim}


def _attention_core(out: ir.Value):
    """Projections feeding ``out`` and the nodes between them and ``out`` (the core)."""
    projections, upstream, stack, seen = {}, set(), [out], set()
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        proj = _projection(value)
        if proj is not None:
            projections[value] = proj
            continue
        producer = value.producer()
        if producer is None or producer in upstream:
            continue
        upstream.add(producer)
        stack.extend(v for v in producer.inputs if v is not None and constant_ref(v) is None)
    # The core: upstream nodes that read (transitively) a projection; the rest computes side
    # inputs such as masks and rotary tables.
    core, frontier = set(), list(projections)
    while frontier:
        value = frontier.pop()
        for use in value.uses():
            if use.node in upstream and use.node not in core:
                core.add(use.node)
                frontier.extend(use.node.outputs)
    return list(projections.values()), core


def _per_head_operand(node: ir.Node, core: set[ir.Node], heads: int, kv_heads: int,
                      projected: set[ir.Value]) -> str | None:
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
            return f"'{v.name}' of shape {list(shape)} has a per-head axis"
    return None


def match_attention(exit_node: ir.Node) -> Region | MatchFailure:
    """Multi-head (or grouped-query) attention whose output projection is ``exit_node``."""
    site = match_linear_weight(exit_node)
    if not site or site.op != "MatMul" or site.input_index != 1 or len(site.weight.shape) != 2:
        return MatchFailure(NOT_A_REGION, "not a MatMul with a constant 2-D weight on the right", exit_node)
    reshape = exit_node.inputs[0].producer()
    transpose = reshape.inputs[0].producer() if reshape is not None and reshape.op_type == "Reshape" else None
    if transpose is None or transpose.op_type != "Transpose" or \
            tuple(transpose.attributes["perm"].value) != (0, 2, 1, 3):
        return MatchFailure(NOT_A_REGION, "output projection input is not heads transposed back", exit_node)
    projections, core = _attention_core(transpose.inputs[0])
    if len(projections) != 3:
        return MatchFailure(NOT_A_REGION, f"found {len(projections)} projections, expected Q, K and V", exit_node)
    head_dim = projections[0]["head_dim"]
    if any(p["head_dim"] != head_dim for p in projections):
        return MatchFailure(UNKNOWN_LAYOUT, "Q, K and V have different head sizes", exit_node)
    if len({p["site"].node.inputs[0] for p in projections}) != 1:
        return MatchFailure(NOT_A_REGION, "Q, K and V read different inputs (cross-attention)", exit_node)
    heads = site.weight.shape[0] // head_dim
    q = [p for p in projections if p["heads"] == heads]
    kv = [p for p in projections if p["heads"] != heads]
    if len(q) == 3:
        q, kv = q[:1], q[1:]  # MHA: all three are sliced alike; which one is Q does not matter
    if len(q) != 1 or len(kv) != 2 or kv[0]["heads"] != kv[1]["heads"] or heads % kv[0]["heads"]:
        return MatchFailure(UNKNOWN_LAYOUT, "cannot tell Q from K and V by their head counts", exit_node)
    kv_heads = kv[0]["heads"]
    group = heads // kv_heads  # query heads per KV head: a unit is one KV group
    fixes: list[ShapeFix] = []
    for node in core:
        if not _allowed(node, _CORE_OPS, _MS_CORE_OPS):
            return MatchFailure(NOT_A_REGION, f"'{node.op_type}' node '{node.name}' inside attention", exit_node)
        if node.op_type in ("Reshape", "Expand"):
            problem = _check_core_shape(node, head_dim, heads, kv_heads, group, fixes)
            if problem:
                return MatchFailure(UNKNOWN_LAYOUT, problem, exit_node)
        if node.op_type == "Transpose":
            perm = tuple(node.attributes["perm"].value)
            if len(perm) == 4 and perm[1] != 1:
                return MatchFailure(UNKNOWN_LAYOUT, f"Transpose {perm} moves the heads axis", exit_node)
        problem = _per_head_operand(node, core, heads, kv_heads, {p["transpose"].outputs[0] for p in projections})
        if problem:
            return MatchFailure(UNKNOWN_LAYOUT, problem, exit_node)
    projection_nodes = set()
    for p in projections:
        projection_nodes |= {p["site"].node, p["reshape"], p["transpose"]}
        projection_nodes |= {u.node for u in p["site"].node.outputs[0].uses()} if p["bias"] is not None else set()
    inside = core | projection_nodes | {reshape, transpose, exit_node}
    for node in core | projection_nodes:
        for v in node.outputs:
            if not _uses_inside(v, inside):
                return MatchFailure(ESCAPES, f"'{v.name}' is also read outside the attention", exit_node)
    for p in projections:
        per_unit = group if p in q else 1
        entry = p["pieces"][2]
        if entry[1] != -1:
            if entry[0] is None or entry[1] != p["heads"]:
                return MatchFailure(UNKNOWN_LAYOUT, "projection reshape has an unknown heads entry", exit_node)
            fixes.append(ShapeFix(p["reshape"], 2, per_unit))
    allowzero = reshape.attributes.get("allowzero")
    copies = (0,) if allowzero is None or int(allowzero.value) == 0 else ()  # 0 copies a dim
    for i, (ref, v) in enumerate(_shape_pieces(reshape.inputs[1]) or []):
        if v is not None and v == heads * head_dim:
            fixes.append(ShapeFix(reshape, i, group * head_dim))
        elif v is not None and v not in (-1, 1, *copies):
            return MatchFailure(UNKNOWN_LAYOUT, f"output reshape entry {v} is not understood", exit_node)
    entries, others = [], []
    for p in projections:
        unit = (group if p in q else 1) * head_dim
        entries.append(Slice(p["site"].weight, 1, unit))
        if p["bias"] is not None:
            others.append(Slice(p["bias"], len(p["bias"].shape) - 1, unit))
    for s in entries + others:
        if len(s.ref.users) != 1:
            return MatchFailure(ESCAPES, f"'{s.ref.name}' is shared with other nodes", exit_node)
    internal = [o for n in core | projection_nodes | {reshape, transpose} for o in n.outputs]
    return Region("heads", node_label(exit_node), kv_heads, exit_node, Slice(site.weight, 0, group * head_dim),
                  entries, others, shape_fixes=fixes, exit_unit=group * head_dim, internal=internal)


def _check_core_shape(node: ir.Node, head_dim: int, heads: int, kv_heads: int, group: int,
                      fixes: list[ShapeFix]) -> str | None:
    """A Reshape / Expand inside attention: dynamic, or GQA's repeat of KV heads."""
    pieces = _shape_pieces(node.inputs[1])
    if pieces is None:
        shape_src = node.inputs[1].producer()
        if shape_src is not None and shape_src.op_type in ("Shape", "Concat", "Slice"):
            return None
        return f"{node.op_type} '{node.name}' has a shape that is not understood"
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
    return f"{node.op_type} '{node.name}' has constant entries {[v for _, _, v in constants]}"


# --- conv channels ---------------------------------------------------------------------------

_CHANNEL_OPS = ELEMENTWISE | {"BatchNormalization", "Conv"}


def match_conv_channels(exit_node: ir.Node) -> Region | MatchFailure:
    """Conv -> [element-wise, BatchNormalization, depthwise Conv] -> ``exit_node`` (Conv, group 1)."""
    site = match_linear_weight(exit_node)
    group = exit_node.attributes.get("group")
    if not site or site.op != "Conv" or (group is not None and int(group.value) != 1):
        return MatchFailure(NOT_A_REGION, "not a Conv with group=1 and a constant weight", exit_node)
    units = site.weight.shape[1]

    def is_entry(value: ir.Value) -> bool:
        producer = value.producer()
        if producer is None or producer.op_type != "Conv":
            return False
        g = producer.attributes.get("group")
        entry = match_linear_weight(producer)
        return bool(entry) and (g is None or int(g.value) == 1) and entry.weight.shape[0] == units

    def allowed(value):  # depthwise convolutions are walked through, not stopped at
        return is_entry(value)

    walked = _walk_back(exit_node.inputs[0], allowed, _CHANNEL_OPS)
    if isinstance(walked, str):
        return MatchFailure(NOT_A_REGION, walked, exit_node)
    nodes, stops, consts = walked
    if len(stops) != 1:
        return MatchFailure(NOT_A_REGION, "no single Conv producing the channels", exit_node)
    entry = match_linear_weight(stops[0].producer())
    inside = set(nodes) | {exit_node}
    for v in [*(o for n in nodes for o in n.outputs), *stops]:
        if not _uses_inside(v, inside):
            return MatchFailure(ESCAPES, f"'{v.name}' is also read outside the channel chain", exit_node)
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
                return MatchFailure(UNKNOWN_LAYOUT, f"Conv '{node.name}' between the convolutions is not depthwise", exit_node)
            others.append(Slice(ref, 0))
            attr_fixes.append(AttrFix(node, "group", 1))
            continue
        per = _per_unit_const(ref, units, 1 if len(ref.shape) == 4 else -1)
        if isinstance(per, str):
            return MatchFailure(UNKNOWN_LAYOUT, per, exit_node)
        if per is not None:
            others.append(per)
    for s in slices + others:
        if len(s.ref.users) != 1:
            return MatchFailure(ESCAPES, f"'{s.ref.name}' is shared with other nodes", exit_node)
    internal = [o for n in nodes for o in n.outputs] + stops
    return Region("channels", node_label(exit_node), units, exit_node, Slice(site.weight, 1), slices, others,
                  attr_fixes=attr_fixes, internal=internal)
