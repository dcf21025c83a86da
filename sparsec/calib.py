"""Calibration: sample inputs, and capturing the inputs of chosen nodes stage by stage.

Calibration data comes from a .npz of input sets, from a text file tokenized with a tokenizer
the user names, or, for the example models, from the calibration half of the built-in text
(never the half fidelity is measured on).

:class:`StagedRunner` runs the model in ONNX Runtime one stage at a time: each stage computes
exactly what is needed to produce the next captured value from what earlier stages produced,
and only the values later stages still read (the frontier) are kept between stages. So a pass
can capture the input of one layer, prune that layer, and have every later stage see the
pruned weights (sequential pruning, as SparseGPT does), while memory holds one frontier and one
captured activation, never all activations of all layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from sparsec.errors import InputError
from sparsec.graph import constant_ref, infer_missing_types
from sparsec.progress import Progress, silent
from sparsec.verify import InputSpec, input_specs, load_feeds

# Defaults for text calibration: 32 windows of 512 tokens (the SparseGPT/Wanda papers use 128).
DEFAULT_SAMPLES = 32
DEFAULT_SEQLEN = 512
BATCH_ROWS = 8  # windows stacked into one input set


@dataclass
class Calibration:
    """Input sets a calibration-aware pass runs the model on."""

    feeds: list[dict[str, np.ndarray]]
    source: str
    tokens: int = 0

    def to_dict(self) -> dict:
        return {"source": self.source, "input_sets": len(self.feeds), "tokens": self.tokens}


def _text_feeds(ids: Sequence[int], specs: Sequence[InputSpec], samples: int, seqlen: int,
                source: str) -> Calibration:
    """Cut a token stream into ``samples`` windows and fill every model input for them."""
    need = samples * seqlen
    if len(ids) < need:
        raise InputError(f"{source}: {len(ids)} tokens, {samples} x {seqlen} = {need} needed;"
                         " use fewer --calib-samples or a shorter --calib-seqlen")
    id_inputs = [s for s in specs if "input_ids" in s.name] or [s for s in specs if s.fill == "randint"]
    if len(id_inputs) != 1:
        raise InputError(f"{source}: cannot tell which model input takes token ids"
                         f" (inputs: {', '.join(s.name for s in specs)}); give a .npz instead")
    windows = np.asarray(ids[:need], dtype=np.int64).reshape(samples, seqlen)
    feeds = []
    for start in range(0, samples, BATCH_ROWS):
        rows = windows[start:start + BATCH_ROWS]
        feed = {}
        for spec in specs:
            shape = rows.shape
            dtype = np.dtype(spec.dtype)
            if spec is id_inputs[0]:
                feed[spec.name] = rows.astype(dtype)
            elif spec.fill == "ones":
                feed[spec.name] = np.ones(shape, dtype)
            elif spec.fill == "zeros":
                feed[spec.name] = np.zeros(shape, dtype)
            elif spec.fill == "arange":
                feed[spec.name] = np.broadcast_to(np.arange(seqlen, dtype=dtype), shape).copy()
            else:
                raise InputError(f"{source}: no rule to fill model input '{spec.name}' from text;"
                                 " give a .npz instead")
        feeds.append(feed)
    return Calibration(feeds, source, need)


def load_calibration(spec: str, model: ir.Model, *, samples: int = DEFAULT_SAMPLES,
                     seqlen: int = DEFAULT_SEQLEN, tokenizer: str | None = None) -> Calibration:
    """Calibration data from ``spec``: ``builtin``, a ``.npz`` of input sets, or a text file.

    Raises:
        InputError: the source is missing or does not fit the model's inputs (the message names
            the input and the shape it expects).
    """
    specs = input_specs(model)
    if spec == "builtin":
        from sparsec.models import entry_for

        entry = entry_for(model.metadata_props)
        if entry is None or entry.calib_inputs is None:
            raise InputError("--calib builtin works for the example models only; give a .npz of"
                             " input sets or a text file with --tokenizer")
        feeds, tokens = entry.calib_inputs(samples, seqlen)
        return Calibration(feeds, f"built-in calibration text of '{entry.name}' ({entry.calib_note})", tokens)
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--calib {spec}: no such file (give a .npz, a text file or 'builtin')")
    if path.suffix == ".npz":
        feeds = load_feeds(path, specs)
        return Calibration(feeds, f"input sets from {path}", 0)
    if tokenizer is None:
        raise InputError(f"--calib {spec}: a text file needs --tokenizer (a tokenizer folder or tokenizer.json)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--calib {spec}: not UTF-8 text") from None
    ids = load_tokenizer(tokenizer)(text)
    return _text_feeds(ids, specs, samples, seqlen, f"{path} tokenized with {tokenizer}")


def load_tokenizer(name: str):
    """A callable text -> token ids, from a tokenizer folder or a tokenizer.json file (offline)."""
    path = Path(name)
    try:
        if path.is_file() and path.suffix == ".json":
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
            tok.no_truncation()  # calibration text is cut into windows here, not by the tokenizer
            tok.no_padding()
            return lambda text: tok.encode(text, add_special_tokens=False).ids
        if path.is_dir():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            return lambda text: tok(text, add_special_tokens=False)["input_ids"]
    except ImportError as exc:
        raise InputError(f"--tokenizer {name}: needs the 'models' extra ({exc})") from None
    except Exception as exc:
        raise InputError(f"--tokenizer {name}: cannot load it ({str(exc).splitlines()[0][:200]})") from None
    raise InputError(f"--tokenizer {name}: not a tokenizer folder or tokenizer.json file")


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


def _dependencies(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None] + _subgraph_captures(node)


class StagedRunner:
    """Runs a model stage by stage up to chosen values, keeping only the frontier in memory."""

    def __init__(self, model: ir.Model, feeds: Sequence[dict[str, np.ndarray]], *,
                 threads: int | None = None, progress: Progress | None = None,
                 overrides: dict[ir.Value, ir.TensorProtocol] | None = None) -> None:
        """``overrides`` replaces the contents of some constants (initializers or Constant-node
        outputs) when stages are built: with the original weights it runs the dense model."""
        self.model = model
        self.overrides = overrides or {}
        infer_missing_types(model)
        self.threads = threads
        self.progress = progress or silent()
        self.order = {node: i for i, node in enumerate(model.graph)}
        graph_inputs = [v for v in model.graph.inputs if not v.is_initializer()]
        self.computed: set[ir.Value] = set(graph_inputs)
        self.store: list[dict[ir.Value, np.ndarray]] = [
            {v: feed[v.name] for v in graph_inputs} for feed in feeds
        ]

    @staticmethod
    def _is_packed_weight(value: ir.Value) -> bool:
        """A weight the compress pass stored packed: fed to stages as a plain constant."""
        ref = constant_ref(value)
        return ref is not None and ref.compressed is not None

    def _is_available(self, value: ir.Value) -> bool:
        return value in self.computed or value.is_initializer() or self._is_packed_weight(value) or (
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
            stack.extend(_dependencies(producer))
        return sorted(needed, key=self.order.__getitem__)

    def _stage_model(self, nodes: list[ir.Node], outputs: list[ir.Value]) -> bytes:
        """A standalone model of ``nodes``: frontier values in, ``outputs`` out, weights inline."""
        produced = {o for n in nodes for o in n.outputs}
        inputs: list[ir.Value] = []
        initializers: dict[str, ir.Value] = {}
        for node in nodes:
            for v in _dependencies(node):
                if v in produced:
                    continue
                if (v.is_initializer() and v.const_value is not None) or self._is_packed_weight(v):
                    initializers[v.name] = v
                elif v in self.computed and v not in inputs:
                    inputs.append(v)
        for v in inputs + outputs:
            if v.dtype is None:
                raise InputError(f"value '{v.name}' has no known type; cannot run the model in stages")
        graph = onnx.helper.make_graph(
            [self._serialize_node(n) for n in nodes], "stage",
            [ir.serde.serialize_value(v) for v in inputs],
            [ir.serde.serialize_value(v) for v in outputs],
            [onnx.numpy_helper.from_array(np.asarray(self._constant(v).numpy()), v.name)
             for v in initializers.values()],
        )
        proto = onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid(d, ver) for d, ver in self.model.opset_imports.items()])
        proto.ir_version = self.model.ir_version
        proto.functions.extend(ir.serde.serialize_function(f) for f in self.model.functions.values())
        self._inputs = inputs
        return proto.SerializeToString()

    def _constant(self, value: ir.Value) -> ir.TensorProtocol:
        if value in self.overrides:
            return self.overrides[value]
        return value.const_value if value.const_value is not None else constant_ref(value).tensor

    def _serialize_node(self, node: ir.Node) -> onnx.NodeProto:
        proto = ir.serde.serialize_node(node)
        if node.op_type == "Constant" and node.outputs[0] in self.overrides:
            tensor = self.overrides[node.outputs[0]]
            del proto.attribute[:]
            proto.attribute.append(onnx.helper.make_attribute(
                "value", onnx.numpy_helper.from_array(np.asarray(tensor.numpy()), tensor.name or "")))
        return proto

    def capture(self, target: ir.Value) -> Iterator[np.ndarray]:
        """Compute ``target`` for every input set (one array per set), advancing the frontier.

        Weights are read when the stage is built, so weights changed by earlier captures are
        what the stage computes with.
        """
        from sparsec.runtime.session import create_session, run

        if target in self.computed:
            for values in self.store:
                yield values[target]
            return
        nodes = self._stage_nodes(target)
        produced = [o for n in nodes for o in n.outputs]
        self.computed.update(produced)
        pending = [n for n in self.model.graph if not all(o in self.computed for o in n.outputs)]
        still_needed = {v for n in pending for v in _dependencies(n)}
        outputs = [target] + [o for o in produced if o in still_needed and o is not target]
        session = create_session(self._stage_model(nodes, outputs), threads=self.threads)
        names = [v.name for v in outputs]
        stage_inputs = list(self._inputs)
        for values in self.store:
            result = run(session, {v.name: values[v] for v in stage_inputs}, names)
            for v in outputs:
                values[v] = result[v.name]
            # Keep only the frontier: what later stages still read (and the captured value).
            for v in [v for v in values if v not in still_needed and v is not target]:
                del values[v]
            yield values[target]

    def transform(self, value: ir.Value, fn) -> None:
        """Replace the stored arrays of ``value`` by ``fn(array)`` (after a pass changed what
        its producers compute, e.g. removed units)."""
        for values in self.store:
            if value in values:
                values[value] = fn(values[value])

