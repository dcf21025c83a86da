"""Small helpers over the onnx_ir graph shared by analysis, passes and verification."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

# The node metadata keys through which sparsec records provenance.
PROVENANCE_PASS = "sparsec.pass"
PROVENANCE_REASON = "sparsec.reason"
# Packed constants: a weight a pass stores in another form (compressed storage) is rebuilt by a
# subgraph of constants. Its last node carries PACKED_KEY = "<codec>:<codec data>"; every node
# of the subgraph carries PACKED_PART. Only the codec (registered by the pass that packs) knows
# the format; everything else sees a read-only constant.
PACKED_KEY = "sparsec.packed"
PACKED_PART = "sparsec.packed_part"


# Rewritten weights at least this large go to the spill file while a spill is active.
SPILL_MIN_BYTES = 1 << 20


class Spill:
    """Keeps rewritten weights on disk, memory-mapped, instead of in memory (large models)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.name = "spill.data"
        self._file = open(self.directory / self.name, "wb")  # noqa: SIM115 (closed by close())
        self.offset = 0

    def store(self, array: np.ndarray, name: str) -> ir.ExternalTensor:
        data = np.asarray(array, order="C")  # keeps 0-d arrays 0-d (ascontiguousarray does not)
        dtype = ir.DataType.from_numpy(data.dtype)
        # 4-bit codes are one per byte in numpy and two per byte on disk.
        raw = ir.Tensor(data).tobytes() if dtype.bitwidth < 8 else memoryview(data.reshape(-1).view(np.uint8))
        self._file.write(raw)
        self._file.flush()
        tensor = ir.ExternalTensor(self.name, self.offset, len(raw), dtype, shape=ir.Shape(data.shape),
                                   name=name, base_dir=str(self.directory))
        self.offset += len(raw)
        return tensor

    def close(self) -> None:
        self._file.close()


_SPILL: contextvars.ContextVar[Spill | None] = contextvars.ContextVar("sparsec_spill", default=None)


@contextlib.contextmanager
def spilling(directory: Path) -> Iterator[Spill]:
    """While active, ``ConstantRef.replace`` writes large new weights to ``directory``."""
    spill = Spill(directory)
    token = _SPILL.set(spill)
    try:
        yield spill
    finally:
        spill.close()
        _SPILL.reset(token)


def return_free_memory() -> None:
    """Give the C heap's free pages back to the OS, where the C library allows it (glibc).

    glibc keeps blocks freed by worker threads in their arenas: a streamed SparseGPT compile,
    whose solves run in threads, held ~250 MiB more after each layer until this ran between
    layers (benchmarks/results/large_model_sparsegpt.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None


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


def fresh_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base.1``, ``base.2``, ... : a name no initializer or value of ``graph`` has."""
    taken = set(graph.initializers) | {v.name for v in graph.inputs} | {
        o.name for n in graph for o in n.outputs}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}.{i}"
    return name


def add_constant(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer named after ``base``; return its value."""
    name = fresh_name(graph, base)
    spill = _SPILL.get()
    if spill is not None and array.nbytes >= SPILL_MIN_BYTES:
        tensor = spill.store(array, name)
    else:
        tensor = ir.Tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), const_value=tensor)
    graph.register_initializer(value)
    return value


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
    packed: ir.Node | None = None  # the last node of the subgraph rebuilding a packed weight

    @property
    def name(self) -> str:
        return self.value.name or ""

    @property
    def tensor(self) -> ir.TensorProtocol:
        if self.packed is not None:
            return unpack_constant(self.packed)
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

    def replace(self, array: np.ndarray, *, resize: bool = False, **metadata: str) -> None:
        """Give the constant new contents of the same dtype (and shape, unless ``resize``)."""
        if self.packed is not None:
            raise ValueError(f"{self.name}: a packed (compressed) weight is read-only")
        old = self.tensor
        if tuple(array.shape) != self.shape and not resize:
            raise ValueError(f"{self.name}: shape {array.shape} != {self.shape}")
        if resize:
            self.value.shape = ir.Shape(array.shape)
        spill = _SPILL.get()
        if spill is not None and self.constant_node is None and array.nbytes >= SPILL_MIN_BYTES:
            new = spill.store(array.astype(old.dtype.numpy(), copy=False), old.name)
        else:
            new = ir.Tensor(np.asarray(array, order="C"), dtype=old.dtype, name=old.name,
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

    @property
    def readers(self) -> list[ir.Node]:
        """The nodes that read the weight (for a weight read through a decoding step, see
        :class:`sparsec.passes.quantized.EncodedWeight`, the nodes behind it)."""
        return [node for node, _ in self.users]


def constant_ref(value: ir.Value | None) -> ConstantRef | None:
    """The constant behind ``value``, or None when it is computed or overridable at run time."""
    if value is None or value.is_graph_input():
        return None
    if value.is_initializer() and value.const_value is not None:
        return ConstantRef(value)
    producer = value.producer()
    if producer is not None and PACKED_KEY in producer.metadata_props:
        return ConstantRef(value, packed=producer)
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


Codec = Callable[[ir.Node, str], ir.Tensor]
_CODECS: dict[str, Codec] = {}


def register_codec(name: str, decode: Codec) -> None:
    """Let ``decode(last_node, data)`` rebuild constants packed under codec ``name``."""
    _CODECS[name] = decode


def mark_packed(nodes: list[ir.Node], codec: str, data: str) -> None:
    """Tag the subgraph ``nodes`` (rebuilding one constant, last node last) as packed."""
    for node in nodes:
        node.metadata_props[PACKED_PART] = codec
    nodes[-1].metadata_props[PACKED_KEY] = f"{codec}:{data}"


def is_packed_part(node: ir.Node) -> bool:
    return PACKED_PART in node.metadata_props


def unpack_constant(node: ir.Node) -> ir.Tensor:
    """The dense tensor a packed subgraph ending in ``node`` rebuilds."""
    codec, _, data = node.metadata_props[PACKED_KEY].partition(":")
    if codec not in _CODECS:
        import sparsec.passes  # noqa: F401  (the passes register their codecs)
    if codec not in _CODECS:
        raise ValueError(f"node '{node.name}': unknown packed-constant codec '{codec}'")
    return _CODECS[codec](node, data)


def remove_dead(graph: ir.Graph, candidates: list[ir.Node]) -> None:
    """Remove the nodes no one reads any more (and what only they read), then their weights."""
    pending = list(candidates)
    weights = set()
    while pending:
        node = pending.pop()
        if node.graph is not graph or any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        for value in inputs:
            if value.is_initializer():
                weights.add(value)
            elif value.producer() is not None and not value.uses():
                pending.append(value.producer())
    for value in sorted(weights, key=lambda v: v.name or ""):
        if not value.uses() and not value.is_graph_input() and graph.initializers.get(value.name) is value:
            graph.initializers.pop(value.name)
