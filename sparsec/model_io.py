"""Load and save ONNX models safely: lazy external data, hostile-input checks, atomic writes.

Loading goes through onnx_ir, which memory-maps external data, so a 3 GB model costs little
memory until a pass touches a weight. Before the IR sees anything, the raw protobuf is checked:
it must parse and look like a model, its opsets must be ones this ONNX build knows, and every
external-data reference must stay inside the model's directory (no absolute paths, no ``..``,
no symbolic or hard links) and fit inside its file. The input file is only ever read.

Saving writes into a temporary directory beside the destination and renames the files into
place (external data first, the model last), so a crash or a kill never leaves a half-written
model at the destination. The output is deterministic: same model, same bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from sparsec.errors import InputError, OutputError
from sparsec.graph import all_graphs

# Lowest default-domain opset we accept: ONNX Runtime has kernels from opset 7 on.
MIN_OPSET = 7
# Models whose weights exceed this are always saved with external data (protobuf's 2 GB limit).
INLINE_LIMIT_BYTES = 1536 * 1024 * 1024
# Tensors smaller than this stay inside the model file when external data is written.
EXTERNAL_THRESHOLD_BYTES = 1024


@dataclass
class LoadedModel:
    """A model read from disk, with what loading found out about it."""

    path: Path
    model: ir.Model
    external_files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    file_bytes: int = 0
    # A file ONNX Runtime can run as the original: ``path`` itself, or the upgraded model when
    # the input's opset was older than ORT runs (kept in ``_scratch`` until the object goes).
    runnable: Path | None = None
    _scratch: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.runnable is None:
            self.runnable = self.path

    @property
    def total_bytes(self) -> int:
        """Size on disk of the model file and all its external data files."""
        return self.file_bytes + sum(p.stat().st_size for p in self.external_files)


def load_model(path: str | os.PathLike, *, constant_initializers: bool = False) -> LoadedModel:
    """Read an ONNX model from ``path`` without modifying it.

    A default-domain opset older than ONNX Runtime runs (< 7) is upgraded with onnx's version
    converter (the notes say so). With ``constant_initializers``, initializers that are also
    listed as graph inputs (old exporters list every weight so) are treated as constants.

    Raises:
        InputError: the file is missing, not ONNX, truncated, uses an opset this onnx cannot
            handle, or references external data that is missing, truncated or outside its
            directory.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: not readable")
    proto = _parse_model_proto(path)
    notes: list[str] = []
    external = _check_external_data(path, proto)
    proto, upgraded = _check_opsets(path, proto, notes)
    _densify_sparse_initializers(path, proto, notes)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises several types on malformed graphs
        raise InputError(f"{path}: malformed ONNX graph ({_first_line(exc)})") from None
    ir.external_data.set_base_dir(model.graph, str(path.parent.resolve()))
    _drop_duplicate_tensor_metadata(model)
    _check_graph_closed(path, model)
    if _sort_if_needed(model):
        notes.append("graph was not topologically sorted; nodes were reordered (stable sort)")
    renamed = _name_nodes(model)
    if renamed:
        notes.append(f"{renamed} node(s) had no name or a duplicate name and were given unique ones")
    if constant_initializers:
        overridable = [v for v in model.graph.inputs if v.is_initializer()]
        for value in overridable:
            model.graph.inputs.remove(value)
        if overridable and model.ir_version < 4:
            model.ir_version = 4  # IR 3 required every initializer to be a graph input too
        if overridable:
            notes.append(f"{len(overridable)} initializer(s) listed as graph inputs are treated as constants"
                         " (--constant-initializers)")
    folded = _fold_constant_transposes(model)
    if folded:
        notes.append(f"{folded} Transpose(s) of constant weights were folded into the weights (as ONNX Runtime"
                     " does at session start), so passes can rewrite them")
    loaded = LoadedModel(path=path, model=model, external_files=external, notes=notes,
                         file_bytes=path.stat().st_size)
    if upgraded:
        scratch = tempfile.TemporaryDirectory(prefix="sparsec-upgraded-")
        loaded.runnable = Path(scratch.name) / "original-upgraded.onnx"
        onnx.save(proto, loaded.runnable)
        loaded._scratch = scratch
    return loaded


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _parse_model_proto(path: Path) -> onnx.ModelProto:
    data = path.read_bytes()
    if not data:
        raise InputError(f"{path}: empty file, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InputError(
            f"{path}: not an ONNX model or truncated (protobuf parse failed: {_first_line(exc)})"
        ) from None
    # Arbitrary bytes sometimes parse as a protobuf message; a model has these fields.
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise InputError(
            f"{path}: not an ONNX model (no ir_version, graph or opset_import in the protobuf)"
        )
    if not proto.graph.output:
        raise InputError(f"{path}: not an ONNX model or truncated (the graph has no outputs)")
    return proto


def _check_opsets(path: Path, proto: onnx.ModelProto, notes: list[str]) -> tuple[onnx.ModelProto, bool]:
    """The model, upgraded to opset MIN_OPSET when it is older (True when it was)."""
    import onnx.external_data_helper
    import onnx.version_converter

    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain not in ("", "ai.onnx"):
            continue
        if opset.version > newest:
            raise InputError(
                f"{path}: opset {opset.version} is newer than this ONNX build supports"
                f" ({newest}); upgrade the onnx package"
            )
        if opset.version < MIN_OPSET:
            old = opset.version
            try:
                if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _iter_tensor_protos(proto.graph)):
                    onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
                upgraded = onnx.version_converter.convert_version(proto, MIN_OPSET)
            except Exception as exc:  # the converter raises several types
                raise InputError(f"{path}: opset {old} is older than ONNX Runtime runs ({MIN_OPSET}) and"
                                 f" onnx.version_converter cannot upgrade it ({_first_line(exc)})") from None
            notes.append(f"opset {old} upgraded to opset {MIN_OPSET} with onnx.version_converter (ONNX Runtime"
                         f" runs opset {MIN_OPSET} and later); the upgraded model is the reference")
            return upgraded, True
    return proto, False


def _iter_tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph and its subgraphs: initializers and attribute tensors."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_tensor_protos(attr.g)
            for sub in attr.graphs:
                yield from _iter_tensor_protos(sub)


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError:
        return None
    if dtype == ir.DataType.STRING:
        return None
    numel = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    return (numel * dtype.bitwidth + 7) // 8


def _check_external_data(path: Path, proto: onnx.ModelProto) -> list[Path]:
    """Refuse unsafe or broken external-data references; return the files referenced."""
    base = path.parent.resolve()
    seen: dict[Path, int] = {}
    for tensor in _iter_tensor_protos(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        name = tensor.name or "<unnamed>"
        location = info.get("location", "")
        if not location:
            raise InputError(f"{path}: tensor '{name}' is external but names no location")
        parts = Path(location.replace("\\", "/")).parts
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ".." in parts or (
            len(location) > 1 and location[1] == ":"
        ):
            raise InputError(
                f"{path}: tensor '{name}' points outside the model directory"
                f" (external data location '{location}' is refused)"
            )
        data_path = base / location
        if data_path not in seen:
            try:
                st = os.lstat(data_path)
            except FileNotFoundError:
                raise InputError(
                    f"{path}: external data file '{location}' for tensor '{name}' is missing"
                    f" (expected at {data_path})"
                ) from None
            if stat.S_ISLNK(st.st_mode):
                raise InputError(f"{path}: external data file '{location}' is a symbolic link (refused)")
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{path}: external data '{location}' is not a regular file")
            if st.st_nlink > 1:
                raise InputError(f"{path}: external data file '{location}' has hard links (refused)")
            if base not in data_path.resolve().parents:
                raise InputError(f"{path}: external data '{location}' resolves outside the model directory")
            seen[data_path] = st.st_size
        size = seen[data_path]
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise InputError(f"{path}: tensor '{name}' has a non-numeric external offset/length") from None
        expected = _expected_nbytes(tensor)
        if length is None:
            length = expected if expected is not None else size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise InputError(
                f"{path}: external data file '{location}' is truncated or corrupt: tensor '{name}'"
                f" needs bytes {offset}..{offset + length} but the file has {size}"
            )
        if expected is not None and length != expected:
            raise InputError(
                f"{path}: tensor '{name}' declares {length} bytes of external data but its"
                f" shape and type need {expected}"
            )
    return sorted(seen)


def _sparse_to_dense(sparse: onnx.SparseTensorProto, base_dir: str) -> onnx.TensorProto:
    dims = list(sparse.dims)
    values = onnx.numpy_helper.to_array(sparse.values, base_dir)
    indices = onnx.numpy_helper.to_array(sparse.indices, base_dir).astype(np.int64)
    dense = np.zeros(int(np.prod(dims, dtype=np.int64)), dtype=values.dtype)
    if indices.ndim == 1:
        dense[indices] = values
    else:  # (nnz, rank) coordinates
        dense[np.ravel_multi_index(indices.T, dims)] = values
    return onnx.numpy_helper.from_array(dense.reshape(dims), name=sparse.values.name)


def _densify_sparse_initializers(path: Path, proto: onnx.ModelProto, notes: list[str]) -> None:
    # onnx_ir does not represent sparse_initializer; ORT densifies them at load anyway, so
    # turning them into dense initializers keeps the model's meaning exactly.
    graphs = [proto.graph]
    count = 0
    while graphs:
        graph = graphs.pop()
        if graph.sparse_initializer:
            for sparse in graph.sparse_initializer:
                try:
                    graph.initializer.append(_sparse_to_dense(sparse, str(path.parent)))
                except Exception as exc:
                    raise InputError(
                        f"{path}: sparse_initializer '{sparse.values.name}' is malformed"
                        f" ({_first_line(exc)})"
                    ) from None
                count += 1
            del graph.sparse_initializer[:]
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    if count:
        notes.append(f"{count} sparse_initializer(s) were converted to dense initializers")


def _drop_duplicate_tensor_metadata(model: ir.Model) -> None:
    # onnx_ir 1.1 serializes an inline tensor by copying its original TensorProto (metadata
    # included) and then appending tensor.metadata_props again, so every load/save round trip
    # would double a tensor's metadata. The IR keeps the metadata in tensor.metadata_props;
    # clearing it from the retained proto makes a round trip exact.
    for tensor in ir.external_data._all_tensors(model.graph, include_attributes=True):  # noqa: SLF001
        if isinstance(tensor, ir.serde.TensorProtoTensor) and tensor.raw.metadata_props:
            tensor.raw.ClearField("metadata_props")


def _check_graph_closed(path: Path, model: ir.Model) -> None:
    """Every node input must be produced somewhere: a truncated file fails here."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.inputs:
            if value is None:
                continue
            if value.producer() is None and not value.is_graph_input() and not value.is_initializer():
                # Values from an outer scope are legal inside subgraphs.
                if node.graph is model.graph:
                    raise InputError(
                        f"{path}: malformed or truncated graph: node '{node.name}' reads"
                        f" '{value.name}', which nothing produces"
                    )


def _name_nodes(model: ir.Model) -> int:
    """Give unnamed and duplicate-named nodes unique, deterministic names (records and
    provenance refer to nodes by name); return how many were renamed."""
    taken = {n.name for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.name}
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.op_type}_{index}"
        name, k = base, 0
        while name in taken or name in seen:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        seen.add(name)
        taken.add(name)
        renamed += 1
    return renamed


def _sort_if_needed(model: ir.Model) -> bool:
    for graph in all_graphs(model):
        defined = {v for v in graph.inputs} | set(graph.initializers.values())
        for node in graph:
            for value in node.inputs:
                if value is None or value in defined:
                    continue
                producer = value.producer()
                if producer is not None and producer.graph is graph:
                    model.graph.sort()
                    return True
            defined.update(node.outputs)
    return False


def _fold_constant_transposes(model: ir.Model) -> int:
    """Replace ``Transpose(initializer)`` by the transposed initializer (old exporters write
    Linear layers as MatMul(x, Transpose(W))); return how many were folded. Initializers that
    callers may override (graph inputs), initializers read elsewhere too (a tied embedding: folding
    would store it twice) and transposes feeding a graph output stay."""
    from sparsec.graph import add_constant

    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        source, out = node.inputs[0], node.outputs[0]
        if (source is None or not source.is_initializer() or source.is_graph_input() or source.const_value is None
                or out.is_graph_output() or len(source.uses()) != 1):
            continue
        perm = node.attributes.get("perm")
        array = source.const_value.numpy()
        array = np.ascontiguousarray(np.transpose(array, None if perm is None else list(perm.value)))
        replacement = add_constant(graph, out.name or f"{source.name}_transposed", array)
        ir.convenience.replace_all_uses_with(out, replacement)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
        folded += 1
    return folded


def _initializer_bytes(model: ir.Model) -> tuple[int, bool]:
    total = 0
    any_external = False
    for graph in all_graphs(model):
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            total += tensor.nbytes
            any_external |= isinstance(tensor, ir.ExternalTensor)
    return total, any_external


def external_data_name(path: str | os.PathLike) -> str:
    """The external data file written beside a model: ``model.onnx`` -> ``model.onnx.data``."""
    return Path(path).name + ".data"


def _referenced_files(model: ir.Model) -> set[Path]:
    files = set()
    for graph in all_graphs(model):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                files.add(Path(value.const_value.path).resolve())
    return files


@dataclass
class StagedModel:
    """A model written completely into a temporary directory beside its destination.

    ``path`` can be loaded (by ORT, for verification) before :meth:`commit` moves the files
    into place; :meth:`discard` removes them. Use it as a context manager to discard on error.
    """

    destination: Path
    directory: Path
    path: Path
    data_file: Path | None

    def commit(self) -> Path:
        parent = self.destination.parent
        try:
            # The data file lands first: a model file at the destination is always complete.
            if self.data_file is not None:
                os.replace(self.data_file, parent / self.data_file.name)
            os.replace(self.path, self.destination)
        except OSError as exc:
            raise OutputError(f"{self.destination}: cannot write ({exc.strerror or exc})") from None
        finally:
            self.discard()
        return self.destination

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.discard()


def check_output_path(path: str | os.PathLike, *, protect: tuple[str | os.PathLike, ...] = (),
                      model: ir.Model | None = None) -> Path:
    """Refuse an output path that cannot be written or would overwrite an input.

    Raises:
        OutputError: the destination is a directory, not writable, or would overwrite an
            input file or the external data the model is still reading from.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name for the output model")
    if not parent.is_dir():
        raise OutputError(f"{path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: directory {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{path}: exists and is not writable")
    dest = path.resolve()
    dest_data = (parent / external_data_name(path)).resolve()
    for protected in protect:
        if Path(protected).resolve() in (dest, dest_data):
            raise OutputError(f"{path}: the output would overwrite the input model {protected}")
    if model is not None:
        referenced = _referenced_files(model)
        if dest_data in referenced or dest in referenced:
            raise OutputError(
                f"{path}: the output would overwrite {dest_data.name}, which the model still reads"
                " its weights from; choose another output name"
            )
    return path


TMP_SUFFIX = ".sparsec-tmp"


def _remove_stale_temporaries(parent: Path, name: str) -> None:
    """Remove temporary directories a killed sparsec left for this output name."""
    for candidate in parent.glob(f".{name}.*{TMP_SUFFIX}"):
        parts = candidate.name[len(name) + 2:].split(".")
        try:
            pid = int(parts[0])
        except (ValueError, IndexError):
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(candidate, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue


def stage_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> StagedModel:
    """Write ``model`` completely next to ``path`` without touching ``path`` yet.

    Args:
        model: the model; it is not changed.
        path: destination ``.onnx`` file; external data goes beside it as ``<name>.data``.
        external_data: True writes weights to the data file, False inlines them, None decides:
            external when the model's weights came from external data or exceed 1.5 GiB.
        protect: files that must not be overwritten (the input model).
    """
    path = check_output_path(path, protect=protect, model=model)
    parent = path.parent if str(path.parent) else Path(".")
    data_name = external_data_name(path)
    total, any_external = _initializer_bytes(model)
    if external_data is None:
        external_data = any_external or total > INLINE_LIMIT_BYTES
    elif not external_data and total > INLINE_LIMIT_BYTES:
        raise OutputError(f"{path}: weights of {total / 2**30:.1f} GiB need external data")
    _remove_stale_temporaries(parent, path.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=parent))
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    staged = StagedModel(path, tmp, tmp / path.name, None)
    try:
        if external_data:
            ir.save(model, staged.path, external_data=data_name,
                    size_threshold_bytes=EXTERNAL_THRESHOLD_BYTES)
        else:
            _save_inline(model, staged.path)
        if (tmp / data_name).exists():
            staged.data_file = tmp / data_name
        for file in (staged.data_file, staged.path):
            if file is not None:
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())
    except OSError as exc:
        staged.discard()
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        staged.discard()
        raise
    return staged


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write ``model`` to ``path`` atomically (see :func:`stage_model`); return the path."""
    return stage_model(model, path, external_data=external_data, protect=protect).commit()


def _save_inline(model: ir.Model, path: Path) -> None:
    proto = ir.serde.serialize_model(model)
    for tensor in _iter_tensor_protos(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise OutputError(f"{path}: tensor '{tensor.name}' is external; save with external data")
    onnx.save(proto, path)


def fingerprint(model: ir.Model) -> str:
    """A content hash of the graph and its weights (names, ops, attributes, tensor bytes).

    Doc strings and metadata are left out, so provenance tags do not change the fingerprint
    of an otherwise identical model.
    """
    h = hashlib.sha256()
    h.update(repr(sorted(model.opset_imports.items())).encode())
    _hash_graph(h, model.graph)
    for key in sorted(model.functions):
        h.update(repr(key).encode())
        _hash_graph(h, model.functions[key])
    return h.hexdigest()[:16]


def tensor_digest(tensor: ir.TensorProtocol) -> str:
    h = hashlib.sha256()
    h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    array = tensor.numpy()
    h.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _value_sig(value: ir.Value | None) -> str:
    if value is None:
        return "-"
    return f"{value.name}:{value.dtype}:{value.shape}"


def _hash_graph(h: "hashlib._Hash", graph) -> None:
    h.update(repr([_value_sig(v) for v in graph.inputs]).encode())
    h.update(repr([_value_sig(v) for v in graph.outputs]).encode())
    initializers = getattr(graph, "initializers", {})
    for name in sorted(initializers):
        tensor = initializers[name].const_value
        h.update(f"init {name}:".encode())
        h.update((tensor_digest(tensor) if tensor is not None else "none").encode())
    for node in graph:
        h.update(f"node {node.domain}:{node.op_type}:{node.overload}".encode())
        h.update(repr([v.name if v is not None else "" for v in node.inputs]).encode())
        h.update(repr([v.name for v in node.outputs]).encode())
        for name in sorted(node.attributes):
            attr = node.attributes[name]
            h.update(f"@{name}:{attr.type}=".encode())
            if attr.is_ref():
                h.update(f"ref {attr.ref_attr_name}".encode())
            elif attr.type == ir.AttributeType.TENSOR:
                h.update(tensor_digest(attr.value).encode())
            elif attr.type == ir.AttributeType.TENSORS:
                h.update(repr([tensor_digest(t) for t in attr.value]).encode())
            elif attr.type == ir.AttributeType.GRAPH:
                _hash_graph(h, attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    _hash_graph(h, sub)
            else:
                h.update(repr(attr.value).encode())
