"""Building rewrites: new nodes with deterministic names and provenance, and rewiring.

* :class:`Builder` -- nodes named ``<prefix>.<op>.<n>``, collected in order and tagged with the
  pass that made them; constants, fills and activations emitted in standard ops.
* :func:`redirect` -- move every reader of a value (and a graph output's name) to another.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sparsec.graph import add_constant, fresh_name, mark_changed

from .blocks import GELU, GELU_TANH, QUICK_GELU, RELU, SILU


class Builder:
    """New nodes with deterministic names ``<prefix>.<op>.<n>``, collected in order, tagged."""

    def __init__(self, graph: ir.Graph, prefix: str, pass_id: str, reason: str, opset: int) -> None:
        self.graph, self.prefix, self.pass_id, self.reason, self.opset = graph, prefix, pass_id, reason, opset
        self.nodes: list[ir.Node] = []

    def const(self, name: str, array) -> ir.Value:
        return add_constant(self.graph, f"{self.prefix}.{name}", np.asarray(array))

    def op(self, op_type: str, inputs, *, outputs: int = 1, domain: str = "", **attributes) -> list[ir.Value]:
        node = ir.node(op_type, inputs, attributes=attributes, domain=domain, num_outputs=outputs,
                       name=fresh_name(self.graph, f"{self.prefix}.{op_type}.{len(self.nodes)}"))
        for i, out in enumerate(node.outputs):
            out.name = fresh_name(self.graph, f"{node.name}.out{i}")
        mark_changed(node, self.pass_id, self.reason)
        self.nodes.append(node)
        return list(node.outputs)

    def one(self, op_type: str, inputs, **attributes) -> ir.Value:
        return self.op(op_type, inputs, **attributes)[0]

    def fill(self, like: ir.Value, value: float, dtype) -> ir.Value:
        """A tensor of ``like``'s shape filled with ``value``."""
        return self.one("ConstantOfShape", [self.one("Shape", [like])],
                        value=ir.tensor(np.array([value], dtype=dtype)))

    def activation(self, kind: str, x: ir.Value, dtype) -> ir.Value:
        """``kind`` applied to ``x`` with standard ops, as exactly as the model computes it."""
        if kind == RELU:
            return self.one("Relu", [x])
        if kind in (GELU, GELU_TANH):
            if self.opset >= 20:
                return self.one("Gelu", [x], approximate="tanh" if kind == GELU_TANH else "none")
            half = self.const("half", np.array(0.5, dtype))
            one = self.const("one", np.array(1.0, dtype))
            if kind == GELU:
                inner = self.one("Erf", [self.one("Mul", [x, self.const("rsqrt2", np.array(2 ** -0.5, dtype))])])
            else:
                cube = self.one("Mul", [self.one("Mul", [x, x]), x])
                poly = self.one("Add", [x, self.one("Mul", [cube, self.const("c", np.array(0.044715, dtype))])])
                inner = self.one("Tanh", [self.one("Mul", [poly, self.const("k", np.array((2 / np.pi) ** 0.5, dtype))])])
            return self.one("Mul", [self.one("Mul", [x, half]), self.one("Add", [inner, one])])
        if kind == SILU:
            return self.one("Mul", [x, self.one("Sigmoid", [x])])
        if kind == QUICK_GELU:
            return self.one("Mul", [x, self.one("Sigmoid", [self.one("Mul", [x, self.const("alpha", np.array(1.702, dtype))])])])
        raise ValueError(f"no standard-op form of activation '{kind}'")


def redirect(graph: ir.Graph, old: ir.Value, new: ir.Value, keep: ir.Node | None = None) -> None:
    """Every reader of ``old`` (but ``keep``) and the graph outputs read ``new`` instead; a graph
    output keeps its name, type and shape (``new`` takes them; ``old`` gets a fresh name)."""
    for use in list(old.uses()):
        if use.node is not keep:
            use.node.replace_input_with(use.idx, new)
    if old in graph.outputs:
        name = old.name
        old.name = fresh_name(graph, f"{name}.replaced")
        graph.outputs[graph.outputs.index(old)] = new
        new.name = name
        if new.type is None:
            new.type = old.type
        if new.shape is None:
            new.shape = old.shape
