"""Typed blocks: the transformer sites phase-2 rewrites work on, matched from any export.

* :func:`match_ffn_block` -- an FFN ending in a MatMul with a constant (I, H) weight: one entry
  projection (GELU, ReLU, SiLU, QuickGELU... FFNs) or two reading the same input (GLU: SwiGLU,
  GeGLU, ReGLU), element-wise ops between them and the exit. The :class:`FfnBlock` knows the
  roles (gate, up, down), the biases and the activation, whichever way the exporter wrote it
  (a Gelu op, the erf or tanh decompositions, Sigmoid * x, ORT's fused BiasGelu / FastGelu /
  QuickGelu).
* :func:`match_attention_block` -- multi-head or grouped-query attention whose output
  projection is a MatMul with a constant weight: Q/K/V projections -> reshape to heads ->
  [rotary embedding] -> [KV cache concat] -> scores -> [mask] -> Softmax -> context. The
  :class:`AttentionBlock` knows the projections, head and KV-group counts, the mask operand,
  the rotary tables and the KV-cache inputs and outputs.

Blocks describe what the model computes; whether a pass may rewrite them (values escaping the
block, layouts of constants) is the pass's own check (:mod:`.structured_patterns`). Every
matcher returns a block or a :class:`~.patterns.MatchFailure` with a code and the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from sparsec.graph import ConstantRef, constant_ref, node_label

from .patterns import Code, LinearWeight, MatchFailure, match_linear_weight

MS_DOMAIN = "com.microsoft"

ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Relu", "Gelu", "Sigmoid", "Tanh", "Erf", "Neg", "Exp", "Softplus",
    "Identity", "Pow", "Sqrt", "Abs", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Mish", "Elu",
    "Selu", "Celu", "Softsign", "Cast", "PRelu",
})
# Element-wise contrib ops ONNX Runtime's optimizer fuses into graphs (bias inputs are per unit).
MS_ELEMENTWISE = frozenset({"BiasGelu", "FastGelu", "Gelu", "QuickGelu", "BiasAdd"})

# Activation kinds an FfnBlock reports.
RELU, GELU, GELU_TANH, SILU, QUICK_GELU, IDENTITY, OTHER = (
    "relu", "gelu", "gelu_tanh", "silu", "quick_gelu", "identity", "other")


def allowed(node: ir.Node, ops: frozenset[str], ms_ops: frozenset[str] = MS_ELEMENTWISE) -> bool:
    if node.domain in ("", "ai.onnx"):
        return node.op_type in ops
    return node.domain == MS_DOMAIN and node.op_type in ms_ops


def _op(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def walk_back(start: ir.Value, stop, ops: frozenset[str]
              ) -> tuple[list[ir.Node], list[ir.Value], list[tuple[ir.Node, int]]] | MatchFailure:
    """Nodes between ``start`` and the values ``stop(value)`` accepts, through ``ops``.

    Returns (nodes, stop values, side constants as (node, input index)), or why not.
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
            return MatchFailure(Code.NOT_A_REGION, f"'{value.name}' is a graph input, not a projection")
        if not allowed(producer, ops):
            return MatchFailure(Code.NOT_A_REGION, f"'{_op(producer)}' node '{producer.name}' between the"
                                " units and their consumer", producer)
        nodes.append(producer)
        for i, inp in enumerate(producer.inputs):
            if inp is None:
                continue
            if constant_ref(inp) is not None:
                consts.append((producer, i))
            else:
                stack.append(inp)
    return nodes, stops, consts


# --- FFN -------------------------------------------------------------------------------------

@dataclass
class FfnBlock:
    """A feed-forward block: ``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))``.

    ``projections`` are the entry MatMuls (one, or two for a gated FFN). ``up`` is the one whose
    output is multiplied (GLU) or activated (plain FFN); ``gate`` the GLU branch the activation
    applies to. When the element-wise ops do not say which is which, both are None and
    ``activation`` is ``other``. Biases are the constants added right after a projection (or a
    Gemm's C input, or the bias of ORT's BiasGelu). ``nodes`` are the element-wise nodes
    between the projections and ``down``; ``consts`` the constants they read.
    """

    label: str
    input: ir.Value
    projections: list[LinearWeight]
    down: LinearWeight
    activation: str
    hidden: int  # intermediate neurons
    up: LinearWeight | None = None
    gate: LinearWeight | None = None
    nodes: list[ir.Node] = field(default_factory=list)
    consts: list[tuple[ir.Node, int]] = field(default_factory=list)
    up_bias: ConstantRef | None = None
    gate_bias: ConstantRef | None = None
    down_bias: ConstantRef | None = None  # an Add right after ``down`` (outside ``nodes``)

    def __bool__(self) -> bool:
        return True

    @property
    def glu(self) -> bool:
        return len(self.projections) == 2

    @property
    def kind(self) -> str:
        """``swiglu``, ``geglu``, ``reglu`` for gated FFNs, else the activation."""
        if not self.glu:
            return self.activation
        return {SILU: "swiglu", GELU: "geglu", GELU_TANH: "geglu_tanh", RELU: "reglu"}.get(self.activation, "glu")

    @property
    def node(self) -> ir.Node:
        return self.down.node

    @property
    def output(self) -> ir.Value:
        return self.down.node.outputs[0]

    @property
    def entries(self) -> list[LinearWeight]:
        return list(self.projections)

    @property
    def input_size(self) -> int:
        """H: the features of the FFN's input (the projections' reduction size)."""
        return self.projections[0].matrix_shape[1]

    @property
    def names(self) -> tuple[str, ...]:
        return (self.label, self.node.name or "")


def _scalar(ref: ConstantRef | None) -> float | None:
    if ref is None or int(np.prod(ref.shape, dtype=np.int64)) != 1:
        return None
    return float(np.asarray(ref.numpy()).reshape(-1)[0])


def _const_input(node: ir.Node) -> tuple[int, ConstantRef] | None:
    for i, v in enumerate(node.inputs):
        ref = constant_ref(v) if v is not None else None
        if ref is not None:
            return i, ref
    return None


def _strip_bias(value: ir.Value, units: int) -> tuple[ir.Value, ConstantRef | None, ir.Node | None]:
    """Follow ``value`` through one Add of a per-unit constant (a bias); return the sum."""
    uses = list(value.uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add" or uses[0].node.domain not in ("", "ai.onnx"):
        return value, None, None
    add = uses[0].node
    ref = constant_ref(add.inputs[1 - uses[0].idx])
    if ref is None or ref.shape[-1:] != (units,) or int(np.prod(ref.shape)) != units:
        return value, None, None
    return add.outputs[0], ref, add


def classify_activation(entry_out: ir.Value, nodes: set[ir.Node]) -> str:
    """The activation the element-wise ``nodes`` apply to ``entry_out`` (a plain FFN's whole
    region, or a GLU's gate branch)."""
    ops = sorted(_op(n) for n in nodes)
    ms = {n.op_type for n in nodes if n.domain == MS_DOMAIN}
    plain = [n for n in nodes if n.domain in ("", "ai.onnx")]
    types = {n.op_type for n in plain}
    if ms:
        if ms <= {"BiasGelu", "Gelu"}:
            return GELU
        if ms == {"FastGelu"}:
            return GELU_TANH
        if ms == {"QuickGelu"}:
            node = next(n for n in nodes if n.op_type == "QuickGelu")
            alpha = node.attributes.get("alpha")
            return QUICK_GELU if alpha is None or abs(float(alpha.value) - 1.702) < 1e-3 else OTHER
        return OTHER
    if not ops:
        return IDENTITY
    if types == {"Relu"}:
        return RELU
    if types == {"Gelu"}:
        approx = next(n for n in plain).attributes.get("approximate")
        return GELU_TANH if approx is not None and approx.value == "tanh" else GELU
    if types <= {"Sigmoid", "Mul"} and len(types) == 2:
        sig = next(n for n in plain if n.op_type == "Sigmoid")
        source = sig.inputs[0]
        if source is entry_out:
            return SILU if len(plain) == 2 else OTHER
        scale = source.producer()
        if scale is not None and scale.op_type == "Mul" and entry_out in scale.inputs:
            found = _const_input(scale)
            beta = _scalar(found[1]) if found else None
            if beta is not None and abs(beta - 1.702) < 1e-3:
                return QUICK_GELU
        return OTHER
    if "Erf" in types and types <= {"Erf", "Div", "Mul", "Add"}:
        return GELU
    if "Tanh" in types and types <= {"Tanh", "Pow", "Mul", "Add"}:
        return GELU_TANH
    return OTHER


def _forward(start: ir.Value, nodes: set[ir.Node]) -> set[ir.Node]:
    """Nodes of ``nodes`` that read ``start`` directly or transitively."""
    reached, stack = set(), [start]
    while stack:
        value = stack.pop()
        for use in value.uses():
            if use.node in nodes and use.node not in reached:
                reached.add(use.node)
                stack.extend(use.node.outputs)
    return reached


def match_ffn_block(exit_node: ir.Node) -> FfnBlock | MatchFailure:
    """An FFN ending in ``exit_node`` (MatMul with a constant (I, H) weight on the right)."""
    down = match_linear_weight(exit_node, decode=False)
    if not down or down.op != "MatMul" or down.input_index != 1 or len(down.weight.shape) != 2:
        return MatchFailure(Code.NOT_A_REGION, "not a MatMul with a constant 2-D weight on the right"
                            + (f" ({down.message})" if not down else ""), exit_node)
    units = down.weight.shape[0]

    def is_entry(value: ir.Value) -> bool:
        producer = value.producer()
        if producer is None or producer.op_type not in ("MatMul", "Gemm") or producer.domain not in ("", "ai.onnx"):
            return False
        entry = match_linear_weight(producer, decode=False)
        return bool(entry) and entry.input_index == 1 and len(entry.weight.shape) == 2 and \
            entry.weight.shape[entry.out_axis] == units

    walked = walk_back(exit_node.inputs[0], is_entry, ELEMENTWISE)
    if isinstance(walked, MatchFailure):
        return MatchFailure(walked.code, walked.message, walked.node or exit_node)
    nodes, stops, consts = walked
    if not stops:
        return MatchFailure(Code.NOT_A_REGION, "no MatMul producing the hidden units", exit_node)
    entries = [match_linear_weight(v.producer(), decode=False) for v in stops]
    if len({e.node.inputs[0] for e in entries}) != 1:
        return MatchFailure(Code.NOT_A_REGION, "the hidden units come from MatMuls of different inputs", exit_node)
    region = set(nodes)
    entries.sort(key=lambda e: e.node.name or "")
    biases = [_entry_bias(e, units) for e in entries]
    block = FfnBlock(node_label(exit_node), entries[0].node.inputs[0], entries, down, OTHER, units,
                     nodes=nodes, consts=consts)
    if len(entries) == 1:
        block.up, block.up_bias = entries[0], biases[0]
        block.activation = _branch_activation(entries[0], region, units)
    elif len(entries) == 2:
        branches = [_forward(e.node.outputs[0], region) for e in entries]
        acts = [_branch_activation(e, b - branches[1 - i], units) for i, (e, b) in enumerate(zip(entries, branches))]
        if [a == IDENTITY for a in acts].count(True) == 1:  # one branch is linear: the up projection
            g = 0 if acts[1] == IDENTITY else 1
            block.gate, block.up = entries[g], entries[1 - g]
            block.gate_bias, block.up_bias = biases[g], biases[1 - g]
            block.activation = acts[g]
    _, block.down_bias, _ = _strip_bias(exit_node.outputs[0], down.weight.shape[1])
    return block


def _branch_activation(entry: LinearWeight, nodes: set[ir.Node], units: int) -> str:
    """The activation ``nodes`` apply to ``entry``'s output (after its bias, if any)."""
    start, _, bias_add = _strip_bias(entry.node.outputs[0], units)
    return classify_activation(start, nodes - {bias_add})


def _entry_bias(entry: LinearWeight, units: int) -> ConstantRef | None:
    """The bias added to an entry projection's output: a Gemm's C, an Add, or ORT's BiasGelu."""
    if entry.op == "Gemm" and len(entry.node.inputs) > 2 and entry.node.inputs[2] is not None:
        return constant_ref(entry.node.inputs[2])
    _, bias, _ = _strip_bias(entry.node.outputs[0], units)
    if bias is not None:
        return bias
    fused = [u.node for u in entry.node.outputs[0].uses() if u.node.domain == MS_DOMAIN
             and u.node.op_type in ("BiasGelu", "FastGelu") and len(u.node.inputs) > 1]
    return constant_ref(fused[0].inputs[1]) if fused and fused[0].inputs[1] is not None else None


# --- attention -------------------------------------------------------------------------------

_MS_CORE_OPS = frozenset({"FusedMatMul"})  # batched over heads, like MatMul
CORE_OPS = frozenset({"Mul", "Add", "Sub", "Div", "Neg", "Softmax", "MatMul", "Transpose", "Slice",
                      "Concat", "Where", "IsNaN", "Cast", "Reshape", "Expand", "Unsqueeze", "Sqrt",
                      "Shape", "Identity", "Squeeze"})


def shape_pieces(value: ir.Value) -> list[tuple[ConstantRef | None, int | None]] | None:
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


@dataclass
class Projection:
    """Transpose(0,2,1,3) <- Reshape(.., [.., heads, d]) <- [Add bias] <- MatMul(X, W)."""

    transpose: ir.Node
    reshape: ir.Node
    pieces: list[tuple[ConstantRef | None, int | None]]
    head_dim: int
    bias: ConstantRef | None
    site: LinearWeight

    @property
    def heads(self) -> int:
        return self.site.weight.shape[1] // self.head_dim

    @property
    def output(self) -> ir.Value:
        return self.transpose.outputs[0]

    @property
    def nodes(self) -> set[ir.Node]:
        found = {self.site.node, self.reshape, self.transpose}
        if self.bias is not None:
            found |= {u.node for u in self.site.node.outputs[0].uses()}
        return found


def _projection(value: ir.Value) -> Projection | None:
    t = value.producer()
    if t is None or t.op_type != "Transpose" or tuple(t.attributes["perm"].value) != (0, 2, 1, 3):
        return None
    r = t.inputs[0].producer()
    if r is None or r.op_type != "Reshape":
        return None
    pieces = shape_pieces(r.inputs[1])
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
    site = match_linear_weight(p, decode=False)
    if not site or site.input_index != 1 or len(site.weight.shape) != 2:
        return None
    return Projection(t, r, pieces, head_dim, bias, site)


def attention_core(out: ir.Value) -> tuple[list[Projection], set[ir.Node], set[ir.Node]]:
    """Projections feeding ``out``; the core (nodes between them and ``out``); and every node
    upstream of ``out`` that is not a projection (the core plus side inputs: masks, rotary)."""
    projections: dict[ir.Value, Projection] = {}
    upstream: set[ir.Node] = set()
    stack, seen = [out], set()
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
        if producer.op_type in ("Shape", "Size"):
            continue  # only the shape is read: no data flows from above (shared shape subgraphs)
        stack.extend(v for v in producer.inputs if v is not None and constant_ref(v) is None)
    core, frontier = set(), list(projections)
    while frontier:
        value = frontier.pop()
        for use in value.uses():
            if use.node in upstream and use.node not in core:
                core.add(use.node)
                frontier.extend(use.node.outputs)
    return list(projections.values()), core, upstream


@dataclass
class AttentionBlock:
    """Multi-head or grouped-query attention ending in the output projection ``o``.

    ``q``, ``k``, ``v`` are the projections (each with its reshape to heads); ``heads`` query
    heads share ``kv_heads`` KV heads (``group`` queries each). ``mask`` is the additive or
    boolean operand applied to the scores (None when there is none); ``rotary`` the (cos, sin)
    values the queries and keys are rotated with; ``past_key`` / ``past_value`` the graph
    inputs concatenated in front of the new keys and values, and ``present_key`` /
    ``present_value`` the concatenations (graph outputs of a KV-cache export).
    """

    label: str
    input: ir.Value
    q: Projection
    k: Projection
    v: Projection
    o: LinearWeight
    heads: int
    kv_heads: int
    head_dim: int
    core: set[ir.Node]
    reshape: ir.Node  # heads merged back before ``o``
    transpose: ir.Node
    scores: ir.Node | None = None  # MatMul(Q, K^T)
    softmax: ir.Node | None = None
    context: ir.Node | None = None  # MatMul(P, V)
    mask: ir.Value | None = None
    rotary: tuple[ir.Value, ir.Value] | None = None
    past_key: ir.Value | None = None
    past_value: ir.Value | None = None
    present_key: ir.Value | None = None
    present_value: ir.Value | None = None
    causal: bool | None = None  # None: could not tell

    def __bool__(self) -> bool:
        return True

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def node(self) -> ir.Node:
        return self.o.node

    @property
    def output(self) -> ir.Value:
        return self.o.node.outputs[0]

    @property
    def projections(self) -> list[Projection]:
        return [self.q, self.k, self.v]

    @property
    def names(self) -> tuple[str, ...]:
        return (self.label, self.node.name or "")


def _reaches(start: ir.Value, target: ir.Node, within: set[ir.Node]) -> bool:
    return target in _forward(start, within)


def _source_ops(value: ir.Value, depth: int = 12) -> set[str]:
    """Op types found walking up from ``value`` (a mask or rotary operand), bounded."""
    found, stack, seen = set(), [(value, 0)], set()
    while stack:
        v, d = stack.pop()
        p = v.producer() if v is not None else None
        if p is None or p in seen or d > depth:
            continue
        seen.add(p)
        found.add(p.op_type)
        stack.extend((i, d + 1) for i in p.inputs if i is not None)
    return found


def _graph_inputs_above(value: ir.Value, depth: int = 12) -> set[str]:
    names, stack, seen = set(), [(value, 0)], set()
    while stack:
        v, d = stack.pop()
        if v is None or v in seen or d > depth:
            continue
        seen.add(v)
        if v.is_graph_input():
            names.add(v.name or "")
            continue
        p = v.producer()
        if p is not None:
            stack.extend((i, d + 1) for i in p.inputs)
    return names


def _describe_core(block: AttentionBlock, upstream: set[ir.Node], graph_outputs: set[ir.Value]) -> None:
    """Fill in scores, softmax, context, mask, rotary and KV cache from the core's nodes."""
    core = block.core
    softmax = [n for n in core if n.op_type == "Softmax"]
    if len(softmax) == 1:
        block.softmax = softmax[0]
        after = _forward(block.softmax.outputs[0], core)
        block.context = next((n for n in after if n.op_type in ("MatMul", "FusedMatMul")), None)
        before = [n for n in core if n.op_type in ("MatMul", "FusedMatMul") and n is not block.context
                  and _reaches(n.outputs[0], block.softmax, core)]
        block.scores = before[0] if len(before) == 1 else None
    # The mask: an operand from outside the core added to (or selecting) the scores.
    if block.scores is not None and block.softmax is not None:
        between = _forward(block.scores.outputs[0], core) - _forward(block.softmax.outputs[0], core) - {block.softmax}
        for n in sorted(between, key=lambda n: n.name or ""):
            if n.op_type not in ("Add", "Where"):
                continue
            for v in n.inputs:
                if v is None or constant_ref(v) is not None:
                    continue
                producer = v.producer()
                if producer is None or producer not in core:
                    block.mask = v
                    break
    # Causal only where it is plain (a Trilu): masks built from index comparisons serve padding
    # too, and only running them tells (the attention pass does).
    if block.mask is not None:
        block.causal = True if "Trilu" in _source_ops(block.mask) else None
    else:
        block.causal = False if block.past_key is None else None
    # Rotary: Mul nodes on the Q and K paths whose other operand comes from Cos / Sin.
    tables = []
    for n in core:
        if n.op_type != "Mul":
            continue
        for v in n.inputs:
            if v is None or (v.producer() is not None and v.producer() in core):
                continue
            if v not in tables and _source_ops(v, 4) & {"Cos", "Sin"}:
                tables.append(v)
    if len(tables) == 2:
        cos = next((t for t in tables if "Cos" in _source_ops(t, 4)), tables[0])
        sin = next(t for t in tables if t is not cos)
        block.rotary = (cos, sin)
    # KV cache: a Concat in the core joining a graph input with the new keys (values).
    for n in core:
        if n.op_type != "Concat":
            continue
        past = [v for v in n.inputs if v is not None and v.is_graph_input()]
        if len(past) != 1:
            continue
        on_k = _reaches(n.outputs[0], block.scores, core) if block.scores is not None else False
        present = n.outputs[0] if n.outputs[0] in graph_outputs else None
        if on_k:
            block.past_key, block.present_key = past[0], present
        else:
            block.past_value, block.present_value = past[0], present


def match_attention_block(exit_node: ir.Node, model: ir.Model | None = None) -> AttentionBlock | MatchFailure:
    """Multi-head (or grouped-query) attention whose output projection is ``exit_node``."""
    site = match_linear_weight(exit_node, decode=False)
    if not site or site.op != "MatMul" or site.input_index != 1 or len(site.weight.shape) != 2:
        return MatchFailure(Code.NOT_A_REGION, "not a MatMul with a constant 2-D weight on the right", exit_node)
    reshape = exit_node.inputs[0].producer()
    transpose = reshape.inputs[0].producer() if reshape is not None and reshape.op_type == "Reshape" else None
    if transpose is None or transpose.op_type != "Transpose" or \
            tuple(transpose.attributes["perm"].value) != (0, 2, 1, 3):
        return MatchFailure(Code.NOT_A_REGION, "output projection input is not heads transposed back", exit_node)
    projections, core, upstream = attention_core(transpose.inputs[0])
    if len(projections) != 3:
        return MatchFailure(Code.NOT_A_REGION, f"found {len(projections)} projections, expected Q, K and V", exit_node)
    head_dim = projections[0].head_dim
    if any(p.head_dim != head_dim for p in projections):
        return MatchFailure(Code.UNKNOWN_LAYOUT, "Q, K and V have different head sizes", exit_node)
    if len({p.site.node.inputs[0] for p in projections}) != 1:
        return MatchFailure(Code.NOT_A_REGION, "Q, K and V read different inputs (cross-attention)", exit_node)
    heads = site.weight.shape[0] // head_dim
    qs = [p for p in projections if p.heads == heads]
    kvs = [p for p in projections if p.heads != heads]
    if len(qs) == 3:  # MHA: tell Q from K by the scores MatMul (K reaches it through a transpose)
        qs, kvs = qs[:1], qs[1:]
    if len(qs) != 1 or len(kvs) != 2 or kvs[0].heads != kvs[1].heads or heads % kvs[0].heads:
        return MatchFailure(Code.UNKNOWN_LAYOUT, "cannot tell Q from K and V by their head counts", exit_node)
    graph_outputs = set(model.graph.outputs) if model is not None else set()
    block = AttentionBlock(node_label(exit_node), projections[0].site.node.inputs[0], qs[0], kvs[0], kvs[1],
                           site, heads, kvs[0].heads, head_dim, core, reshape, transpose)
    _describe_core(block, upstream, graph_outputs)
    # Q, K and V by their role: the scores MatMul reads Q then K, the context MatMul reads V.
    if block.scores is not None and block.context is not None:
        roles = [_projection_above(block.scores.inputs[0], projections, core),
                 _projection_above(block.scores.inputs[1], projections, core),
                 _projection_above(block.context.inputs[1], projections, core)]
        if all(r is not None for r in roles) and len({id(r) for r in roles}) == 3 and roles[0].heads == heads:
            block.q, block.k, block.v = roles
            _describe_core(block, upstream, graph_outputs)
    return block


def _projection_above(value: ir.Value | None, projections: list[Projection], core: set[ir.Node]) -> Projection | None:
    """The one projection whose output ``value`` is computed from, walking up through the core."""
    outputs = {p.output: p for p in projections}
    found, stack, seen = set(), [value], set()
    while stack:
        v = stack.pop()
        if v is None or v in seen:
            continue
        seen.add(v)
        if v in outputs:
            found.add(id(outputs[v]))
            continue
        producer = v.producer()
        if producer is not None and producer in core:
            stack.extend(producer.inputs)
    if len(found) != 1:
        return None
    return next(p for p in projections if id(p) in found)
