"""Small helpers over the onnx_ir graph shared by analysis, passes and verification."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

# The node metadata keys through which sparsec records provenance.
PROVENANCE_PASS = "sparsec.pass"
PROVENANCE_REASON = "sparsec.reason"


def all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph and every subgraph (If/Loop/Scan bodies), outermost first."""
    yield model.graph
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.is_ref():
                continue
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.value
            elif attr.type == ir.AttributeType.GRAPHS:
                yield from attr.value


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node of the main graph and its subgraphs, in graph order."""
    yield from ir.traversal.RecursiveGraphIterator(model.graph)


def node_label(node: ir.Node) -> str:
    """A readable name for a node: the torch module it came from when the exporter said so."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        # "['', 'm', 'm.encoder', ..., 'm.encoder.layer.0.intermediate.dense', 'linear_4']"
        parts = [p.strip(" '\"") for p in scopes.strip("[]").split(",")]
        parts = [p for p in parts if p]
        if len(parts) >= 2:
            return parts[-2]
    return node.name or f"<{node.op_type}>"


def mark_changed(node: ir.Node, pass_id: str, reason: str) -> None:
    """Record on ``node`` which pass changed it and why (kept in the saved model)."""
    node.metadata_props[PROVENANCE_PASS] = pass_id
    node.metadata_props[PROVENANCE_REASON] = reason


@dataclass
class ConstantRef:
    """A constant tensor feeding a node: an initializer or the output of a Constant node.

    Initializers that are also graph inputs are not constants (the caller may override them
    at run time) and never become a ``ConstantRef``.
    """

    value: ir.Value
    constant_node: ir.Node | None = None

    @property
    def name(self) -> str:
        return self.value.name or ""

    @property
    def tensor(self) -> ir.TensorProtocol:
        if self.constant_node is not None:
            return self.constant_node.attributes["value"].value
        assert self.value.const_value is not None
        return self.value.const_value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.shape)

    @property
    def dtype(self) -> ir.DataType:
        return self.tensor.dtype

    def numpy(self) -> np.ndarray:
        return self.tensor.numpy()

    def replace(self, array: np.ndarray, **metadata: str) -> None:
        """Give the constant new contents of the same shape and dtype."""
        old = self.tensor
        if tuple(array.shape) != self.shape:
            raise ValueError(f"{self.name}: shape {array.shape} != {self.shape}")
        new = ir.Tensor(np.ascontiguousarray(array), dtype=old.dtype, name=old.name,
                        doc_string=old.doc_string)
        new.metadata_props.update(old.metadata_props)
        new.metadata_props.update(metadata)
        if self.constant_node is not None:
            self.constant_node.attributes["value"] = ir.AttrTensor("value", new)
        else:
            self.value.const_value = new

    @property
    def users(self) -> list[tuple[ir.Node, int]]:
        return [(use.node, use.idx) for use in self.value.uses()]


def constant_ref(value: ir.Value | None) -> ConstantRef | None:
    """The constant behind ``value``, or None when it is computed or overridable at run time."""
    if value is None or value.is_graph_input():
        return None
    if value.is_initializer() and value.const_value is not None:
        return ConstantRef(value)
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None and not attr.is_ref() and attr.type == ir.AttributeType.TENSOR:
            return ConstantRef(value, constant_node=producer)
    return None


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The fully known shape of ``value`` or None."""
    if value is None or value.shape is None:
        return None
    dims = []
    for dim in value.shape:
        if not isinstance(dim, int):
            return None
        dims.append(dim)
    return tuple(dims)
