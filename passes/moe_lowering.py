"""The three lowerings of a MoE site (see :mod:`.moe`): gather, contrib and masked.

All three route in the graph: router logits -> ``TopK`` -> the k chosen experts per token, so no
kernel ever breaks a tie. Shared neurons stay in the original FFN subgraph, sliced to them
(:func:`~.structured_prune.keep_units`); the routed experts' sum is added to its output.

* :func:`lower_gather` -- standard ops, and only the chosen experts are computed: the (token,
  slot) pairs are sorted by expert, the tokens gathered and split per expert, each expert's FFN
  runs on its own tokens (the activation emitted exactly as the model computes it), and the
  results go back to (token, slot) order through the inverse permutation and are summed over
  the k slots. (Not a ScatterND with reduction: ORT's CPU kernel races on repeated indices.)
* :func:`lower_contrib` -- ``com.microsoft.MoE``: router_probs 0 for the chosen experts and
  -1e4 for the others, ``normalize_routing_weights=1`` (each chosen expert weighs 1/k) and fc2
  scaled by k; fc1 (E, I_e, H), or (E, 2 I_e, H) with gate and up rows interleaved for SwiGLU.
  Experts of unequal size are padded with zero neurons (they contribute exactly 0).
* :func:`lower_masked` -- the FFN as it was, its hidden units multiplied by the routed mask:
  any activation, any runtime, no speed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from sparsec.graph import add_constant, fresh_name, mark_changed

from .blocks import GELU, GELU_TANH, QUICK_GELU, RELU, SILU, FfnBlock
from .rewrite import Builder, redirect
from .structured_prune import keep_units

if TYPE_CHECKING:
    from .moe import ExpertPlan, MoEOptions, MoeSite

MS = "com.microsoft"
# Activations com.microsoft.MoE computes, and its names for them (its gelu is the tanh form).
KERNEL_ACTIVATIONS = {RELU: "relu", GELU_TANH: "gelu", GELU: "gelu", SILU: "silu"}
# Activations the gather lowering emits in standard ops, exactly.
EMITTED_ACTIVATIONS = (RELU, GELU, GELU_TANH, SILU, QUICK_GELU)


def _router(b: Builder, x: ir.Value, plan: ExpertPlan, opts: MoEOptions, dtype) -> tuple[ir.Value, ir.Value]:
    """Router logits of ``x`` (..., E) and TopK's chosen expert indices (..., k)."""
    logits = b.one("MatMul", [x, b.const("router", plan.router_weight.astype(dtype))])
    if plan.router_bias is not None:
        logits = b.one("Add", [logits, b.const("router_bias", plan.router_bias.astype(dtype))])
    _, chosen = b.op("TopK", [logits, b.const("k", np.array([opts.k], np.int64))], outputs=2, axis=-1)
    return logits, chosen


def _flatten(b: Builder, block: FfnBlock) -> ir.Value:
    return b.one("Reshape", [block.input, b.const("flat", np.array([-1, block.input_size], np.int64))])


def _unflatten(b: Builder, block: FfnBlock, y2d: ir.Value, out_size: int) -> ir.Value:
    """(tokens, out) back to the input's leading axes."""
    lead = b.one("Slice", [b.one("Shape", [block.input]), b.const("zero", np.array([0], np.int64)),
                           b.const("last", np.array([-1], np.int64))])
    shape = b.one("Concat", [lead, b.const("out", np.array([out_size], np.int64))], axis=0)
    return b.one("Reshape", [y2d, shape])


def _attach(model: ir.Model, site: MoeSite, plan: ExpertPlan, b: Builder, routed: ir.Value, pass_id: str) -> None:
    """Insert ``b``'s nodes; the shared neurons stay in the original FFN (sliced) and the
    routed sum is added to it; without shared neurons the original FFN goes."""
    block, graph = site.block, model.graph
    if plan.down_bias is not None:  # the refit's bias: what the dropped experts gave on average
        routed = b.one("Add", [routed, b.const("refit_bias", plan.down_bias)])
    graph.insert_before(block.down.node, b.nodes)
    output = block.output
    if len(plan.shared):
        down = plan.down_weight(block)
        keep_units(site.region, plan.shared, np.ascontiguousarray(down[plan.shared]), pass_id,
                   f"moe: the FFN keeps its {len(plan.shared)} shared neurons")
        total = ir.node("Add", [output, routed], name=fresh_name(graph, f"{block.node.name}.moe.sum"))
        total.outputs[0].name = fresh_name(graph, f"{block.node.name}.moe.sum.out")
        mark_changed(total, pass_id, b.reason)
        graph.insert_after(block.down.node, [total])
        redirect(graph, output, total.outputs[0], keep=total)
        return
    redirect(graph, output, routed)
    dead = [*(e.node for e in block.entries), *block.nodes, block.down.node]
    weights = {v for n in dead for v in n.inputs if v is not None and v.is_initializer()}
    graph.remove(dead, safe=True)
    for value in sorted(weights, key=lambda v: v.name or ""):
        if not list(value.uses()) and not value.is_graph_input() and value.name in graph.initializers:
            graph.initializers.pop(value.name)


def _rows(block: FfnBlock, which) -> np.ndarray:
    """A projection's weight as (neurons, H)."""
    return which.to_matrix(which.weight.numpy())


def lower_gather(model: ir.Model, site: MoeSite, plan: ExpertPlan, opts: MoEOptions, pass_id: str,
                 opset: int) -> ir.Node:
    """Only the chosen experts computed, in standard ops (see the module docstring)."""
    block = site.block
    dtype = block.down.weight.dtype.numpy()
    b = Builder(model.graph, f"{block.node.name}.moe", pass_id,
                f"moe: {opts.k} of {opts.experts} experts per token, gathered (standard ops)", opset)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    x2d = _flatten(b, block)
    _, chosen = _router(b, x2d, plan, opts, dtype)  # (tokens, k)
    expert_of_slot = b.one("Reshape", [chosen, b.const("flat1", i64(-1))])  # (tokens * k,)
    slots = b.one("Shape", [expert_of_slot])
    tokens = b.one("Shape", [x2d], start=0, end=1)
    token_ids = b.one("Range", [b.const("zero", np.array(0, np.int64)), b.one("Squeeze", [tokens]),
                                b.const("one", np.array(1, np.int64))])
    token_of_slot = b.one("Reshape", [b.one("Expand", [b.one("Unsqueeze", [token_ids, b.const("axis1", i64(1))]),
                                                      b.one("Concat", [tokens, b.const("kk", i64(opts.k))], axis=0)]),
                                     b.const("flat2", i64(-1))])
    # Slots sorted by expert (a full TopK is a sort), then each expert's tokens in one block.
    _, order = b.op("TopK", [b.one("Cast", [expert_of_slot], to=ir.DataType.FLOAT), slots], outputs=2, axis=0,
                    largest=0, sorted=1)
    gathered = b.one("Gather", [x2d, b.one("Gather", [token_of_slot, order])], axis=0)
    onehot = b.one("OneHot", [expert_of_slot, b.const("depth", np.array(opts.experts, np.int64)),
                              b.const("onoff", np.array([0, 1], np.float32))])
    counts = b.one("Cast", [b.one("ReduceSum", [onehot, b.const("axis0", i64(0))], keepdims=0)], to=ir.DataType.INT64)
    per_expert = b.op("Split", [gathered, counts], outputs=opts.experts, axis=0)
    outs = []
    for e, (x_e, idx) in enumerate(zip(per_expert, plan.experts)):
        idx = idx[idx >= 0]
        # A gated FFN's gate and up columns side by side: one GEMM twice as wide, then split.
        projections = [p for p in (block.gate, block.up) if p is not None]
        biases = [bias for p, bias in ((block.gate, block.gate_bias), (block.up, block.up_bias)) if p is not None]
        first = b.one("MatMul", [x_e, b.const(f"e{e}.first", np.ascontiguousarray(
            np.concatenate([_rows(block, p)[idx] for p in projections]).T))])
        if any(bias is not None for bias in biases):
            first = b.one("Add", [first, b.const(f"e{e}.first_bias", np.concatenate([
                (bias.numpy().reshape(-1) if bias is not None else np.zeros(block.hidden, dtype))[idx]
                for bias in biases]).astype(dtype))])
        if block.gate is not None:
            gate, up = b.op("Split", [first, b.const(f"e{e}.halves", np.array([len(idx), len(idx)], np.int64))],
                            outputs=2, axis=-1)
            hidden = b.one("Mul", [b.activation(block.activation, gate, dtype), up])
        else:
            hidden = b.activation(block.activation, first, dtype)
        outs.append(b.one("MatMul", [hidden, b.const(f"e{e}.down", np.ascontiguousarray(plan.down_weight(block)[idx]))]))
    by_expert = b.one("Concat", outs, axis=0)  # (tokens * k, out) in sorted order
    inverse = b.one("ScatterElements", [b.fill(order, 0, np.int64), order,
                                        b.one("Range", [b.const("zero2", np.array(0, np.int64)), b.one("Squeeze", [slots]),
                                                        b.const("one2", np.array(1, np.int64))])], axis=0)
    out_size = block.down.weight.shape[1]
    per_slot = b.one("Reshape", [b.one("Gather", [by_expert, inverse], axis=0),
                                 b.one("Concat", [tokens, b.const("k3", i64(opts.k, -1))], axis=0)])
    routed = _unflatten(b, block, b.one("ReduceSum", [per_slot, b.const("axis1b", i64(1))], keepdims=0), out_size)
    anchor = routed.producer()
    _attach(model, site, plan, b, routed, pass_id)
    return anchor


def lower_contrib(model: ir.Model, site: MoeSite, plan: ExpertPlan, opts: MoEOptions, pass_id: str,
                  opset: int) -> ir.Node:
    """Routed experts in com.microsoft.MoE (see the module docstring)."""
    block = site.block
    dtype = block.down.weight.dtype.numpy()
    b = Builder(model.graph, f"{block.node.name}.moe", pass_id,
                f"moe: {opts.k} of {opts.experts} experts per token in com.microsoft.MoE", opset)
    x2d = _flatten(b, block)
    logits, chosen = _router(b, x2d, plan, opts, dtype)
    probs = b.one("ScatterElements", [b.fill(logits, -1e4, dtype), chosen, b.fill(chosen, 0.0, dtype)], axis=-1)
    fc1, fc1_bias, fc2 = _kernel_weights(block, plan, opts, dtype)
    attrs = {"k": opts.k, "activation_type": "swiglu" if block.glu else KERNEL_ACTIVATIONS[block.activation],
             "normalize_routing_weights": 1}
    if block.glu:
        attrs["swiglu_fusion"] = 1
    moe = b.one("MoE", [x2d, probs, b.const("fc1", fc1), b.const("fc1_bias", fc1_bias), b.const("fc2", fc2)],
                domain=MS, **attrs)
    routed = _unflatten(b, block, moe, block.down.weight.shape[1])
    model.opset_imports.setdefault(MS, 1)
    _attach(model, site, plan, b, routed, pass_id)
    return moe.producer()


def _kernel_weights(block: FfnBlock, plan: ExpertPlan, opts: MoEOptions, dtype) -> tuple:
    """fc1 (E, I_e, H) -- (E, 2 I_e, H) gate/up interleaved --, its bias, and fc2 (E, out, I_e)
    scaled by k (the kernel weighs each chosen expert by 1/k). Padding neurons are zero."""
    def rows(proj):  # (I + 1, H): a zero row last, for padding neurons (index -1)
        m = _rows(block, proj).astype(dtype)
        return np.concatenate([m, np.zeros((1, m.shape[1]), dtype)])

    def bias(ref):
        v = ref.numpy().astype(dtype).reshape(-1) if ref is not None else np.zeros(block.hidden, dtype)
        return np.concatenate([v, np.zeros(1, dtype)])

    width = max(len(idx) for idx in plan.experts)
    index = np.stack([np.concatenate([np.where(idx >= 0, idx, block.hidden), np.full(width - len(idx), block.hidden)])
                      for idx in plan.experts])  # (E, I_e)
    up, up_b = rows(block.up)[index], bias(block.up_bias)[index]
    if block.glu:
        gate, gate_b = rows(block.gate)[index], bias(block.gate_bias)[index]
        fc1 = np.empty((opts.experts, 2 * width, up.shape[2]), dtype)
        fc1[:, 0::2], fc1[:, 1::2] = gate, up
        fc1_bias = np.empty((opts.experts, 2 * width), dtype)
        fc1_bias[:, 0::2], fc1_bias[:, 1::2] = gate_b, up_b
    else:
        fc1, fc1_bias = up, up_b
    down = plan.down_weight(block).astype(dtype)  # (I, out)
    down = np.concatenate([down, np.zeros((1, down.shape[1]), dtype)])
    fc2 = down[index].transpose(0, 2, 1) * dtype.type(opts.k)  # (E, out, I_e)
    return np.ascontiguousarray(fc1), np.ascontiguousarray(fc1_bias), np.ascontiguousarray(fc2)


def lower_masked(model: ir.Model, site: MoeSite, plan: ExpertPlan, opts: MoEOptions, pass_id: str,
                 opset: int) -> ir.Node:
    """The FFN as it is, its hidden units multiplied by the routed mask (shared: always 1)."""
    block, graph = site.block, model.graph
    dtype = block.down.weight.dtype.numpy()
    b = Builder(graph, f"{block.node.name}.moe", pass_id, "moe: routed mask on the FFN's hidden units", opset)
    logits, chosen = _router(b, block.input, plan, opts, dtype)
    mask = b.one("ScatterElements", [b.fill(logits, 0.0, dtype), chosen, b.fill(chosen, 1.0, dtype)], axis=-1)
    hidden = block.down.node.inputs[0]
    rank = len(hidden.shape) if hidden.shape is not None else len(block.input.shape or (0, 0, 0))
    pads = np.zeros(2 * rank, np.int64)
    pads[-1] = 1  # one more column at the end of the last axis: the shared neurons' (always 1)
    always = b.one("Pad", [mask, b.const("pads", pads), b.const("one", np.array(1.0, dtype))], mode="constant")
    column = np.full(block.hidden, opts.experts, np.int64)
    for e, idx in enumerate(plan.experts):
        column[idx[idx >= 0]] = e
    masked = b.one("Mul", [hidden, b.one("Gather", [always, b.const("expert_of_neuron", column)], axis=-1)])
    graph.insert_before(block.down.node, b.nodes)
    block.down.node.replace_input_with(0, masked)
    mark_changed(block.down.node, pass_id, "moe: reads the routed hidden units")
    if plan.down is not None:
        block.down.weight.replace(np.ascontiguousarray(plan.down.astype(dtype)))
    if plan.down_bias is not None:
        output = block.output
        biased = ir.node("Add", [output, add_constant(graph, f"{block.node.name}.moe.refit_bias", plan.down_bias)],
                         name=fresh_name(graph, f"{block.node.name}.moe.bias"))
        biased.outputs[0].name = fresh_name(graph, f"{block.node.name}.moe.bias.out")
        mark_changed(biased, pass_id, b.reason)
        graph.insert_after(block.down.node, [biased])
        redirect(graph, output, biased.outputs[0], keep=biased)
    return block.down.node
