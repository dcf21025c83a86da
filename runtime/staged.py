"""Running a model stage by stage, keeping only the frontier in memory.

A :class:`StagedRunner` computes a chosen value for every input set by running, in ONNX
Runtime, exactly the nodes needed to produce it from what earlier stages produced. Between
stages it keeps only the values later nodes still read (the frontier). So a pass can capture
the input of one layer, prune that layer, and have every later stage see the pruned weights
(sequential pruning, as SparseGPT does), while memory holds one frontier and one captured
activation, never all activations of all layers. Weights are read when a stage is built.

:func:`staged_outputs` runs a whole model this way with a bounded amount of weights per stage
(verification of models too large to hold twice in memory).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from sparsec.errors import InputError
from sparsec.graph import constant_ref, is_packed_part
from sparsec.progress import Progress, silent

if TYPE_CHECKING:
    from .session import Runner

# Weights per stage when a whole model runs in stages (verification of a streamed compile).
STAGE_BYTES = 256 << 20


def _subgraph_captures(node: ir.Node) -> list[ir.Value]:
    """Outer-scope values a node's subgraphs (If/Loop/Scan bodies) read."""
    captured: list[ir.Value] = []
    for attr in node.attributes.values():
        if attr.is_ref() or attr.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            continue
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else list(attr.value)
        for graph in graphs:
            inner_nodes = list(ir.traversal.RecursiveGraphIterator(graph))
            produced = {o for n in inner_nodes for o in n.outputs}
            local = set(graph.inputs) | set(graph.initializers.values())
            for n in inner_nodes:
                for v in n.inputs:
                    if v is not None and v not in produced and v not in local:
                        captured.append(v)
    return captured


def dependencies(node: ir.Node) -> list[ir.Value]:
    """Every value ``node`` reads, its subgraphs' outer-scope reads included."""
    return [v for v in node.inputs if v is not None] + _subgraph_captures(node)


def _is_packed(value: ir.Value) -> bool:
    ref = constant_ref(value)
    return ref is not None and ref.packed is not None


def _inline(tensor: ir.TensorProtocol, name: str) -> onnx.TensorProto:
    """A tensor with its data inside the proto (stages are sent to ORT as bytes, so external data
    would be looked up in the working directory)."""
    return ir.serde.serialize_tensor(ir.Tensor(np.asarray(tensor.numpy()), name=name))


def _input_info(value: ir.Value, array: np.ndarray) -> onnx.ValueInfoProto:
    """A stage input typed from the array it will be fed (no shape: stages are any size)."""
    info = onnx.ValueInfoProto(name=value.name)
    info.type.tensor_type.elem_type = ir.DataType.from_numpy(array.dtype).value
    return info


class StagedRunner:
    """Runs a model stage by stage up to chosen values, keeping only the frontier in memory."""

    def __init__(self, model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], *,
                 runner: Runner | None = None, progress: Progress | None = None,
                 overrides: Mapping[ir.Value, ir.TensorProtocol] | None = None) -> None:
        """``overrides`` replaces the contents of some constants (initializers or Constant-node
        outputs) when stages are built: with the original weights it runs the dense model."""
        from .session import cpu_runner

        self.model = model
        self.runner = runner or cpu_runner()
        self.overrides = dict(overrides or {})
        self.progress = progress or silent()
        graph_inputs = [v for v in model.graph.inputs if not v.is_initializer()]
        self.computed: set[ir.Value] = set(graph_inputs)
        self.pinned: set[ir.Value] = set()  # kept in the frontier although nothing pending reads them
        self.store: list[dict[ir.Value, np.ndarray]] = [
            {v: np.asarray(feed[v.name]) for v in graph_inputs} for feed in feeds
        ]

    def _is_available(self, value: ir.Value) -> bool:
        return value in self.computed or value.is_initializer() or _is_packed(value) or (
            value.producer() is None and not value.is_graph_input())

    def _stage_nodes(self, target: ir.Value) -> list[ir.Node]:
        needed: set[ir.Node] = set()
        stack = [target]
        while stack:
            value = stack.pop()
            if self._is_available(value):
                continue
            producer = value.producer()
            if producer is None or producer in needed:
                continue
            if producer.graph is not self.model.graph:
                raise InputError(f"cannot capture '{value.name}': it is computed inside a subgraph")
            needed.add(producer)
            stack.extend(dependencies(producer))
        # Graph order now: passes add nodes between captures (rewrites, shape fixes).
        order = {node: i for i, node in enumerate(self.model.graph)}
        return sorted(needed, key=order.__getitem__)

    def _constant(self, value: ir.Value) -> ir.TensorProtocol:
        if value in self.overrides:
            return self.overrides[value]
        return value.const_value if value.const_value is not None else constant_ref(value).tensor

    def _serialize_node(self, node: ir.Node) -> onnx.NodeProto:
        proto = ir.serde.serialize_node(node)
        if node.op_type == "Constant" and node.outputs[0] in self.overrides:
            del proto.attribute[:]
            attr = proto.attribute.add(name="value", type=onnx.AttributeProto.TENSOR)
            attr.t.CopyFrom(_inline(self.overrides[node.outputs[0]], node.outputs[0].name or ""))
        return proto

    def _stage_model(self, nodes: list[ir.Node], outputs: list[ir.Value]) -> tuple[bytes, list[ir.Value]]:
        """A standalone model of ``nodes`` (frontier values in, ``outputs`` out, weights inline)
        and the frontier values it reads."""
        produced = {o for n in nodes for o in n.outputs}
        inputs: list[ir.Value] = []
        constants: dict[str, ir.Value] = {}
        for node in nodes:
            for v in dependencies(node):
                if v in produced:
                    continue
                if (v.is_initializer() and v.const_value is not None) or _is_packed(v):
                    constants[v.name] = v
                elif v in self.computed and v not in inputs:
                    inputs.append(v)
        sample = self.store[0] if self.store else {}
        proto = onnx.ModelProto(ir_version=self.model.ir_version)
        graph = proto.graph
        graph.name = "stage"
        graph.node.extend(self._serialize_node(n) for n in nodes)
        graph.input.extend(_input_info(v, sample[v]) for v in inputs)
        graph.output.extend(onnx.ValueInfoProto(name=v.name) for v in outputs)
        graph.initializer.extend(_inline(self._constant(v), v.name) for v in constants.values())
        for domain, version in self.model.opset_imports.items():
            proto.opset_import.add(domain=domain, version=version)
        proto.functions.extend(ir.serde.serialize_function(f) for f in self.model.functions.values())
        return proto.SerializeToString(), inputs

    def capture(self, target: ir.Value) -> Iterator[np.ndarray]:
        """Compute ``target`` for every input set (one array per set), advancing the frontier.

        Weights are read when the stage is built, so weights changed by earlier captures are
        what the stage computes with.
        """
        if target in self.computed:
            for values in self.store:
                yield values[target]
            return
        nodes = self._stage_nodes(target)
        produced = [o for n in nodes for o in n.outputs]
        self.computed.update(produced)
        pending = [n for n in self.model.graph if not all(o in self.computed for o in n.outputs)]
        still_needed = {v for n in pending for v in dependencies(n)} | set(self.model.graph.outputs)
        outputs = [target] + [o for o in produced if o in still_needed and o is not target]
        stage, stage_inputs = self._stage_model(nodes, outputs)
        session = self.runner.session(stage)
        names = [v.name for v in outputs]
        for values in self.store:
            result = self.runner.run(session, {v.name: values[v] for v in stage_inputs}, names)
            for v in outputs:
                values[v] = result[v.name]
            # Keep only the frontier: what later stages still read (and the captured value).
            for v in [v for v in values if v not in still_needed and v is not target and v not in self.pinned]:
                del values[v]
            yield values[target]

    def fork(self, overrides: Mapping[ir.Value, ir.TensorProtocol], forget: set[ir.Value] = frozenset()) -> StagedRunner:
        """A runner that continues from this one's frontier with some constants replaced (e.g. a
        block's original weights), after forgetting the computed values in ``forget`` (those
        the replaced constants would change). Arrays are shared, not copied."""
        other = StagedRunner.__new__(StagedRunner)
        other.model, other.runner, other.progress = self.model, self.runner, self.progress
        other.overrides = {**self.overrides, **overrides}
        other.computed = self.computed - set(forget)
        other.pinned = set()
        other.store = [{v: a for v, a in values.items() if v not in forget} for values in self.store]
        return other

    def pin(self, value: ir.Value) -> None:
        """Keep ``value`` in the frontier: a pass is about to add nodes that read it."""
        self.pinned.add(value)

    def unpin(self, value: ir.Value) -> None:
        """Let ``value`` go once no pending node reads it (the next capture decides)."""
        self.pinned.discard(value)

    def transform(self, value: ir.Value, fn) -> None:
        """Replace the stored arrays of ``value`` by ``fn(array)`` (after a pass changed what
        its producers compute, e.g. removed units)."""
        for values in self.store:
            if value in values:
                values[value] = fn(values[value])


def _weight_bytes(value: ir.Value) -> int:
    """Bytes of a constant as a stage holds it (a packed weight counts unpacked)."""
    if value.shape is not None and value.dtype is not None and all(isinstance(d, int) for d in value.shape):
        return int(int(np.prod(list(value.shape), dtype=np.int64)) * value.dtype.itemsize)
    ref = constant_ref(value)
    return ref.tensor.nbytes if ref is not None else 0


def _cuts(model: ir.Model, budget_bytes: int) -> list[ir.Value]:
    """Values to stop at so that each stage reads at most about ``budget_bytes`` of weights."""
    counted: set[ir.Value] = set()
    cuts, acc = [], 0
    for node in model.graph:
        if is_packed_part(node):
            continue  # rebuilds of packed weights: stages take their weights unpacked
        for v in node.inputs:
            if v is not None and v not in counted and constant_ref(v) is not None:
                counted.add(v)
                acc += _weight_bytes(v)
        if acc >= budget_bytes and node.outputs:
            cuts.append(node.outputs[0])
            acc = 0
    return cuts


def staged_outputs(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], *, budget_bytes: int,
                   runner: Runner | None = None, progress: Progress | None = None) -> list[dict[str, np.ndarray]]:
    """The model's outputs for ``feeds``, computed stage by stage with bounded weights in memory."""
    staged = StagedRunner(model, feeds, runner=runner, progress=progress)
    cuts = _cuts(model, budget_bytes)
    for cut in (progress or silent()).track(cuts, "running in stages", total=len(cuts)):
        for _ in staged.capture(cut):
            pass
    outputs: list[dict[str, np.ndarray]] = [{} for _ in feeds]
    for value in model.graph.outputs:
        for i, array in enumerate(staged.capture(value)):
            outputs[i][value.name] = array
    return outputs
