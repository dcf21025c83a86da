"""``moe-fuse``: Mixture-of-Experts blocks a model already has -> one ``com.microsoft.MoE`` op.

Matches what torch.onnx dynamo writes for transformers' Mixtral-, Qwen2-MoE-, Qwen3-MoE- and
OLMoE-style blocks (the ``batched_mm`` experts; see :mod:`sparsec.models.moe`)::

    logits = router(x2d)                       Gemm / MatMul, (tokens, E)
    vals, idx = TopK(Softmax(logits), k)       [weights = vals / ReduceSum(vals)]  (renormalized)
    W1 = GatherND(gate_up (E, 2I, H), idx)     every (token, slot) pair: its expert's weights
    g, u = Split(Squeeze(MatMul(W1, x)))       x: x2d repeated k times
    h = g * Sigmoid(g) * u                     SwiGLU
    y = Squeeze(MatMul(GatherND(down (E, H, I), idx), h)) * weights
    out = ReduceSum(Reshape(y, (tokens, k, H)), axis 1)

and replaces it by ``MoE(x2d, probs, fc1, -, fc2)`` with the gate and up rows interleaved
(``swiglu_fusion=1``, the one SwiGLU layout ONNX Runtime's CPU kernel runs). The routing stays
the model's own: its TopK picks the experts, and ``probs`` is ``log(vals)`` at the chosen
experts and -1e4 elsewhere, so the kernel's softmax over them gives ``vals / sum(vals)`` and its
own top-k can only pick the same experts (no tie is left to the kernel, which breaks ties
differently on CPU and CUDA). ``normalize_routing_weights=1``; blocks that do not renormalize
(OLMoE, Qwen2-MoE) multiply the kernel's output by ``sum(vals)``. Exact to fp tolerance. A
Qwen2-MoE shared expert stays as it is, beside the kernel.

Skipped with a code: routing (Softmax -> TopK) whose experts are in another form
(``EXPERTS_UNMATCHED``, with the step that failed), experts whose activation is not SwiGLU
(``ACTIVATION_UNSUPPORTED``), non-float weights (``DTYPE_UNSUPPORTED``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sparsec.graph import constant_ref, node_label, remove_dead
from sparsec.pipeline import REORDER_TOLERANCE, Kind, Pass, PassContext, PassOptions, PassRecord, SiteRecord, option, register
from sparsec.targets import MOE

from .moe_lowering import MS
from .patterns import Code, MatchFailure, select
from .rewrite import Builder, redirect

SHAPE_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity"})
KERNEL_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


@dataclass(frozen=True)
class MoeFuseOptions(PassOptions):
    include: tuple[str, ...] = option((), "glob patterns over the block's module path or router TopK name")
    exclude: tuple[str, ...] = option((), "glob patterns of MoE blocks left as they are")


@dataclass
class MoeBlock:
    """One matched Mixture-of-Experts block."""

    topk: ir.Node
    x: ir.Value  # (tokens, H), what the router and the experts read
    logits: ir.Value  # (tokens, E)
    values: ir.Value  # TopK's values: the softmax probabilities of the chosen experts
    chosen: ir.Value  # TopK's indices (tokens, k)
    k: int
    renormalized: bool
    gate_up: np.ndarray  # (E, 2I, H): gate rows first, then up rows
    down: np.ndarray  # (E, H, I)
    output: ir.Value  # the ReduceSum over the k slots, (tokens, H)
    nodes: list[ir.Node]  # the block's expert nodes, removed once the kernel replaces them

    @property
    def node(self) -> ir.Node:
        return self.topk

    @property
    def label(self) -> str:
        return node_label(self.topk)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.label, self.topk.name or "")


def _producer(value: ir.Value | None, skip: frozenset[str] = frozenset({"Cast", "Identity"})) -> ir.Node | None:
    node = value.producer() if value is not None else None
    while node is not None and node.op_type in skip and node.inputs and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    return node


def _through_shapes(value: ir.Value) -> ir.Value:
    """``value`` traced back through Reshape / Unsqueeze / Squeeze / Cast to where it was made."""
    node = value.producer()
    while node is not None and node.op_type in SHAPE_OPS:
        value = node.inputs[0]
        node = value.producer()
    return value


def _readers(value: ir.Value, op: str) -> list[ir.Node]:
    return [use.node for use in value.uses() if use.node.op_type == op]


def _reachable(value: ir.Value, op: str) -> list[ir.Node]:
    """``op`` nodes reading ``value`` directly or through shape ops."""
    found, frontier = [], [value]
    while frontier:
        v = frontier.pop()
        for use in v.uses():
            if use.node.op_type == op:
                found.append(use.node)
            elif use.node.op_type in SHAPE_OPS and use.idx == 0:
                frontier.extend(use.node.outputs)
    return found


def _one(nodes: list[ir.Node], what: str, at: ir.Node) -> ir.Node | MatchFailure:
    if len(nodes) != 1:
        return MatchFailure(Code.EXPERTS_UNMATCHED, f"expected one {what}, found {len(nodes)}", at)
    return nodes[0]


def _batched_matvec(gather: ir.Node) -> tuple[ir.Node, ir.Value, ir.Value] | MatchFailure:
    """GatherND(W, idx) -> MatMul(., Unsqueeze(v)) -> Squeeze: (MatMul, v, the squeezed output)."""
    matmul = _one([n for n in _readers(gather.outputs[0], "MatMul") if n.inputs[0] is gather.outputs[0]],
                  "MatMul of the gathered expert weights", gather)
    if not matmul:
        return matmul
    operand = matmul.inputs[1].producer()
    if operand is None or operand.op_type != "Unsqueeze":
        return MatchFailure(Code.EXPERTS_UNMATCHED, "the gathered weights multiply something other than an"
                            " unsqueezed vector", matmul)
    squeeze = _one(_readers(matmul.outputs[0], "Squeeze"), "Squeeze after the batched MatMul", matmul)
    if not squeeze:
        return squeeze
    return matmul, operand.inputs[0], squeeze.outputs[0]


def _repeated(value: ir.Value) -> ir.Value:
    """What ``value`` repeats: x2d for ``Reshape(Expand(Unsqueeze(x2d)))`` (each token k times)."""
    value = _through_shapes(value)
    node = value.producer()
    return _through_shapes(node.inputs[0]) if node is not None and node.op_type == "Expand" else value


def match_moe_block(topk: ir.Node) -> MoeBlock | MatchFailure:
    """The MoE block routed by ``topk`` (see the module docstring), or why not."""
    softmax = _producer(topk.inputs[0])
    if softmax is None or softmax.op_type != "Softmax":
        return MatchFailure(Code.NOT_A_REGION, "TopK does not read a Softmax (not a MoE router)", topk)
    router = _producer(softmax.inputs[0])
    if router is None or router.op_type not in ("Gemm", "MatMul") or constant_ref(router.inputs[1]) is None:
        return MatchFailure(Code.NOT_A_REGION, "the Softmax does not read a linear router", topk)
    k_ref = constant_ref(topk.inputs[1])
    if k_ref is None:
        return MatchFailure(Code.EXPERTS_UNMATCHED, "TopK's k is computed at run time", topk)
    k = int(np.asarray(k_ref.numpy()).reshape(-1)[0])
    largest = topk.attributes.get("largest")
    if largest is not None and int(largest.value) != 1:
        return MatchFailure(Code.EXPERTS_UNMATCHED, "TopK picks the smallest values", topk)
    values, chosen = topk.outputs
    renorm = [n for n in _readers(values, "Div") if n.inputs[0] is values and (p := _producer(n.inputs[1]))
              is not None and p.op_type == "ReduceSum" and p.inputs[0] is values]
    weights = renorm[0].outputs[0] if renorm else values
    gathers = [n for n in _reachable(chosen, "GatherND") if constant_ref(n.inputs[0]) is not None
               and len(constant_ref(n.inputs[0]).shape) == 3]
    if len(gathers) != 2:
        return MatchFailure(Code.EXPERTS_UNMATCHED, f"expected the two stacked expert weights gathered by the"
                            f" chosen indices (GatherND), found {len(gathers)}", topk)
    first, second = (_batched_matvec(g) for g in gathers)
    for found in (first, second):
        if not found:
            return found
    # The first projection's output is split into gate and up; swap if the other one is.
    if not _readers(first[2], "Split"):
        gathers.reverse()
        first, second = second, first
    split = _one(_readers(first[2], "Split"), "Split of the first projection into gate and up", first[0])
    if not split:
        return split
    if len(split.outputs) != 2:
        return MatchFailure(Code.EXPERTS_UNMATCHED, f"the first projection splits into {len(split.outputs)}", split)
    gate, up = split.outputs
    sigmoid = _readers(gate, "Sigmoid")
    silu = [n for n in _readers(gate, "Mul") if sigmoid and sigmoid[0].outputs[0] in n.inputs]
    glu = [n for n in (_readers(silu[0].outputs[0], "Mul") if silu else []) if up in n.inputs]
    if not glu:
        return MatchFailure(Code.ACTIVATION_UNSUPPORTED, "the experts' activation is not SwiGLU"
                            " (gate * Sigmoid(gate) * up), the one the MoE kernel fuses", split)
    if second[1] is not glu[0].outputs[0]:
        return MatchFailure(Code.EXPERTS_UNMATCHED, "the second projection does not read the SwiGLU", second[0])
    x = router.inputs[0]  # (tokens, H): a Gemm's input is 2-D
    if _repeated(first[1]) is not _through_shapes(x):
        return MatchFailure(Code.EXPERTS_UNMATCHED, "the experts do not read the router's input", first[0])
    scale = _one([n for n in _readers(second[2], "Mul")], "Mul by the routing weights", second[0])
    if not scale:
        return scale
    other = scale.inputs[1] if scale.inputs[0] is second[2] else scale.inputs[0]
    if _through_shapes(other) is not weights:
        return MatchFailure(Code.EXPERTS_UNMATCHED, "the experts' outputs are not scaled by the routing weights",
                            scale)
    reshape = _one(_readers(scale.outputs[0], "Reshape"), "Reshape to (tokens, k, H)", scale)
    if not reshape:
        return reshape
    total = _one(_readers(reshape.outputs[0], "ReduceSum"), "ReduceSum over the k slots", reshape)
    if not total:
        return total
    gate_up, down = (constant_ref(g.inputs[0]) for g in gathers)
    if gate_up.dtype not in KERNEL_DTYPES or down.dtype != gate_up.dtype:
        return MatchFailure(Code.DTYPE_UNSUPPORTED, f"expert weights are {gate_up.dtype}; the kernel takes"
                            " float32 and float16", topk)
    e, two_i, hidden = gate_up.shape
    if down.shape != (e, hidden, two_i // 2) or two_i % 2:
        return MatchFailure(Code.UNKNOWN_LAYOUT, f"expert weights {gate_up.shape} and {down.shape} are not"
                            " (E, 2I, H) and (E, H, I)", topk)
    nodes = [*gathers, first[0], second[0], split, sigmoid[0], silu[0], glu[0], scale, reshape, total]
    return MoeBlock(topk, x, router.outputs[0], values, chosen, k, bool(renorm), gate_up.numpy(),
                    down.numpy(), total.outputs[0], nodes)


@register
class MoeFusePass(Pass):
    """Lower a model's own MoE blocks to one com.microsoft.MoE op each (exact)."""

    id = "moe-fuse"
    summary = "a model's own Mixture-of-Experts blocks (gathered experts) -> com.microsoft.MoE"
    kinds = (Kind.EXACT,)
    matches = "Softmax -> TopK routing whose chosen indices gather stacked SwiGLU expert weights (Mixtral, Qwen-MoE, OLMoE)"
    Options = MoeFuseOptions
    # com.microsoft.MoE sums the experts' outputs in its own order.
    reorder_tolerance = REORDER_TOLERANCE

    def sparse_form(self) -> str:
        return MOE

    def match(self, model: ir.Model, ctx: PassContext, record: PassRecord) -> list[MoeBlock]:
        opts: MoeFuseOptions = self.options  # type: ignore[assignment]
        blocks = []
        for node in list(model.graph):
            if node.op_type != "TopK" or node.domain not in ("", "ai.onnx"):
                continue
            found = match_moe_block(node)
            if found and (failure := select(found, opts.include, opts.exclude)) is not None:
                found = failure
            if not found:
                if found.code is not Code.NOT_A_REGION:
                    record.skip(found, node=node)
            else:
                blocks.append(found)
        return blocks

    def run(self, model: ir.Model, ctx: PassContext) -> PassRecord:
        record = self.new_record()
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        for block in self.match(model, ctx, record):
            anchor = _lower(model, block, self.id, opset)
            e, two_i, hidden = block.gate_up.shape
            record.sites.append(SiteRecord(
                site=block.label, node=anchor.name or "", action="changed",
                message=f"{self.id}: {e} experts of {two_i // 2}, top-{block.k}"
                f" ({'renormalized' if block.renormalized else 'softmax'} weights) -> com.microsoft.MoE",
                weight="", params=int(block.gate_up.size + block.down.size), sparsity_before=0.0,
                sparsity_after=0.0, details={"experts": e, "k": block.k, "expert_size": two_i // 2, "hidden": hidden,
                                             "renormalized": block.renormalized}))
        return record


def _lower(model: ir.Model, block: MoeBlock, pass_id: str, opset: int) -> ir.Node:
    graph = model.graph
    dtype = block.gate_up.dtype
    b = Builder(graph, f"{block.topk.name}.moe", pass_id, "moe-fuse: the block's experts in com.microsoft.MoE", opset)
    half = block.gate_up.shape[1] // 2
    fc1 = np.empty_like(block.gate_up)
    fc1[:, 0::2], fc1[:, 1::2] = block.gate_up[:, :half], block.gate_up[:, half:]
    values = block.values if block.values.dtype == ir.DataType.from_numpy(dtype) else \
        b.one("Cast", [block.values], to=ir.DataType.from_numpy(dtype))
    probs = b.one("ScatterElements", [b.fill(block.logits, -1e4, dtype), block.chosen, b.one("Log", [values])],
                  axis=-1)
    moe = b.one("MoE", [block.x, probs, b.const("fc1", np.ascontiguousarray(fc1)), None,
                        b.const("fc2", np.ascontiguousarray(block.down))], domain=MS, k=block.k,
                activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                activation_alpha=1.0, activation_beta=0.0)
    anchor = moe.producer()
    if not block.renormalized:  # the kernel's weights are vals / sum(vals); the block's are vals
        moe = b.one("Mul", [moe, b.one("ReduceSum", [values, b.const("last", np.array([-1], np.int64))], keepdims=1)])
    graph.insert_before(block.output.producer(), b.nodes)
    redirect(graph, block.output, moe)
    model.opset_imports.setdefault(MS, 1)
    remove_dead(graph, block.nodes)
    return anchor
