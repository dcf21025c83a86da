"""Model inputs: what each graph input takes, and seeded valid input sets for it.

Verification, calibration, benchmarks and the testing helpers all build their inputs here:

* :func:`input_specs` reads the graph inputs and says how to fill each with *valid* data:
  token ids stay inside the embedding table they index, ``*mask*`` inputs are ones, position
  ids count up, KV-cache inputs (``past_key_values.*``, ``past_key``/``past_value``, ``*cache*``)
  are normal floats whose past length, together with the new tokens, fills the attention mask;
* :func:`random_feeds` makes seeded input sets (the same seed gives the same arrays);
* :func:`load_feeds` reads a ``.npz`` of input sets and checks it against the specs;
* :func:`make_feeds` is the one entry point: a ``.npz`` when given, else seeded random sets,
  with a note that says which.

Symbolic dimensions default to 1 when their name says batch and to :data:`DEFAULT_DIM`
otherwise; ``--dim NAME=N`` overrides them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sparsec.errors import InputError
from sparsec.graph import constant_ref

# Symbolic dimensions default to 1 when their name says batch, else to this.
DEFAULT_DIM = 16

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """A graph input and how to fill it with valid random data.

    ``fill`` is one of normal, randint (in [low, high)), uniform (in [low, high)), ones, zeros,
    arange, minus_one (-1 then ones: a Reshape target that fits any size), big, bool, string.
    ``container`` is tensor, sequence (a list of two tensors) or optional.
    """

    name: str
    dtype: str  # numpy dtype name (the element type for sequences)
    shape: tuple[int | str | None, ...]
    fill: str
    high: float = 2  # exclusive upper bound for randint / uniform
    role: str = ""  # ids | mask | position | token_type | past | "" (anything else)
    low: float = 0
    container: str = "tensor"


@dataclass
class Feeds:
    """Input sets and where they came from (the note goes into every verdict)."""

    sets: list[Feed]
    note: str
    outputs: list[Feed] | None = None  # the original's outputs on the sets, when the check computed them


def _np_dtype(dtype: ir.DataType) -> np.dtype:
    return np.dtype(dtype.numpy())


def _index_range(value: ir.Value, depth: int = 3) -> int | None:
    """Rows of the table an integer input indexes (Gather indices), following cheap ops."""
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for use in v.uses():
                node = use.node
                if node.op_type == "Gather" and use.idx == 1:
                    table = constant_ref(node.inputs[0])
                    if table is not None:
                        axis_attr = node.attributes.get("axis")
                        axis = int(axis_attr.value) if axis_attr is not None else 0
                        return table.shape[axis]
                if node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"):
                    nxt.extend(node.outputs)
        frontier = nxt
    return None


_PAST = re.compile(r"(^|[._/])(past|cache)|kv_cache|key_cache|value_cache", re.IGNORECASE)

# How an input is used decides which values are valid: (op, input index) -> (fill, low, high).
# Shapes and repeats of ones fit any data; axes count up from 0; divisors are never 0;
# thresholds and ratios stay in their ranges.
_USES: dict[tuple[str, int], tuple[str, float, float]] = {
    **{(op, 1): ("arange", 0, 0) for op in ("Unsqueeze", "Squeeze", "ReduceSum", "ReduceMean", "ReduceMax",
                                            "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                                            "ReduceLogSumExp", "ReduceSumSquare", "CumSum", "CumProd")},
    ("Slice", 1): ("zeros", 0, 0), ("Slice", 2): ("big", 0, 0), ("Slice", 3): ("arange", 0, 0),
    ("Slice", 4): ("ones", 0, 0),
    ("Div", 1): ("randint", 1, 8), ("Mod", 1): ("randint", 1, 8),
    ("TopK", 1): ("ones", 0, 0), ("OneHot", 1): ("randint", 2, 9),
    ("Expand", 1): ("ones", 0, 0), ("Tile", 1): ("ones", 0, 0), ("ConstantOfShape", 0): ("ones", 0, 0),
    ("Reshape", 1): ("minus_one", 0, 0),
    ("Range", 0): ("zeros", 0, 0), ("Range", 1): ("randint", 4, 17), ("Range", 2): ("ones", 0, 0),
    ("Resize", 2): ("ones", 0, 0), ("Resize", 3): ("randint", 1, 9), ("Upsample", 1): ("ones", 0, 0),
    ("NonMaxSuppression", 2): ("randint", 1, 4), ("NonMaxSuppression", 3): ("uniform", 0, 1),
    ("NonMaxSuppression", 4): ("uniform", 0, 1),
    ("Dropout", 1): ("uniform", 0, 0.5),
}
_FLOAT_FILLS = {"uniform", "ones", "zeros", "randint"}  # randint: whole numbers (OneHot depth)


def _usage(value: ir.Value, floating: bool) -> tuple[str, float, float] | None:
    """The fill the first informative consumer of ``value`` asks for (through Cast/Identity)."""
    frontier = [value]
    for _ in range(3):
        nxt = []
        for v in frontier:
            for use in v.uses():
                node = use.node
                if node.op_type in ("Cast", "Identity"):
                    nxt.extend(node.outputs)
                    continue
                rule = _USES.get((node.op_type, use.idx))
                if rule is not None and (not floating or rule[0] in _FLOAT_FILLS):
                    return rule
        frontier = nxt
    return None


def is_kv_cache_name(name: str) -> bool:
    """``past_key_values.0.key``, ``past_key``, ``past.3.value``, ``cache_k`` ... (not masks)."""
    return bool(_PAST.search(name)) and "mask" not in name.lower() and "position" not in name.lower()


def _container(value: ir.Value) -> tuple[str, ir.TypeProtocol | None]:
    """(tensor | sequence | optional, the tensor type inside)."""
    tp = value.type
    kind = "tensor"
    if isinstance(tp, ir.OptionalType):
        kind, tp = "optional", tp.elem_type
    if isinstance(tp, ir.SequenceType):
        kind, tp = ("sequence" if kind == "tensor" else "optional_sequence"), tp.elem_type
    return kind, tp


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller must feed (initializer-backed inputs have defaults and are left out)."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        container, _ = _container(value)
        if value.dtype is None or value.shape is None:
            raise InputError(f"graph input '{value.name}' has no type or shape; cannot make inputs for it"
                             " (give --inputs)")
        dims = tuple(d if isinstance(d, int) else (d.value if d.value is not None else None)
                     for d in value.shape)
        name = value.name or ""
        lname = name.lower()
        if value.dtype == ir.DataType.STRING:
            specs.append(InputSpec(name, "object", dims, "string", container=container))
            continue
        dtype = _np_dtype(value.dtype)
        high, low, role = 2.0, 0.0, ""
        if dtype == np.bool_:
            fill = "bool"
        elif np.issubdtype(dtype, np.integer):
            if "mask" in lname:
                fill, role = "ones", "mask"
            elif "position" in lname:
                fill, role = "arange", "position"
            elif "token_type" in lname or "segment" in lname:
                fill, role = "zeros", "token_type"
            else:
                fill = "randint"
                rows = _index_range(value)
                used = _usage(value, floating=False) if rows is None else None
                if used is not None:
                    fill, low, high = used
                else:
                    high = rows or 2
                role = "ids" if (rows or 0) > 2 or "ids" in lname else ""
        else:
            fill = "normal"
            role = "past" if is_kv_cache_name(name) else ""
            used = _usage(value, floating=True)
            if used is not None:
                fill, low, high = used
        specs.append(InputSpec(name, dtype.name, dims, fill, high, role, low, container))
    return specs


def parse_dims(items: Iterable[str]) -> dict[str, int]:
    """``["seq=128", "batch=2"]`` -> ``{"seq": 128, "batch": 2}``."""
    dims = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name or not re.fullmatch(r"\d+", raw.strip()) or int(raw) <= 0:
            raise InputError(f"--dim expects NAME=POSITIVE_INT, got '{item}'")
        dims[name.strip()] = int(raw)
    return dims


def symbolic_dims(specs: Sequence[InputSpec]) -> list[str]:
    """The names of the symbolic dimensions of the inputs, in order of appearance."""
    return list(dict.fromkeys(d for s in specs for d in s.shape if isinstance(d, str)))


def check_dims(dims: Mapping[str, int], specs: Sequence[InputSpec]) -> None:
    """Refuse a ``--dim`` name no input has (a typo would otherwise be silently ignored)."""
    known = symbolic_dims(specs)
    for name in dims:
        base, _, index = name.rpartition(".")
        positional = base and index.isdigit() and any(s.name == base for s in specs)
        if name not in known and not positional:
            listing = ", ".join(known) if known else "none: every input dimension is fixed"
            raise InputError(f"--dim {name}: the model has no symbolic dimension '{name}'"
                             f" (its symbolic dimensions: {listing})")


def _default_dim(name: str | None, default: int = DEFAULT_DIM) -> int:
    return 1 if name is not None and "batch" in name.lower() else default


def resolve_shape(spec: InputSpec, dims: Mapping[str, int], default: int = DEFAULT_DIM) -> tuple[int, ...]:
    shape = []
    for i, d in enumerate(spec.shape):
        if isinstance(d, int):
            shape.append(d)
        elif d is not None and d in dims:
            shape.append(dims[d])
        elif f"{spec.name}.{i}" in dims:
            shape.append(dims[f"{spec.name}.{i}"])
        else:
            shape.append(_default_dim(d, default))
    return tuple(shape)


def resolve_all(specs: Sequence[InputSpec], dims: Mapping[str, int] | None = None,
                default: int = DEFAULT_DIM) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every input, keeping related dimensions consistent.

    With a KV cache, an attention mask covers the past and the new tokens: its length is the
    past length plus the sequence length unless ``dims`` sets it.
    """
    dims = dict(dims or {})
    shapes = {s.name: resolve_shape(s, dims, default) for s in specs}
    past = [s for s in specs if s.role == "past" and len(s.shape) >= 3]
    ids = next((s for s in specs if s.role == "ids" and len(s.shape) == 2), None)
    if past and ids is not None:
        past_len = shapes[past[0].name][-2]
        seq_len = shapes[ids.name][1]
        for s in specs:
            if s.role == "mask" and len(s.shape) == 2 and isinstance(s.shape[1], str) \
                    and s.shape[1] != ids.shape[1] and s.shape[1] not in dims:
                shapes[s.name] = (shapes[s.name][0], past_len + seq_len)
            if s.role == "position" and len(s.shape) == 2 and isinstance(s.shape[1], str) \
                    and s.shape[1] == ids.shape[1]:
                shapes[s.name] = (shapes[s.name][0], seq_len)
    return shapes


def _array(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator, past_len: int) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    fill = spec.fill
    if fill == "normal":
        return rng.standard_normal(shape).astype(dtype)
    if fill == "randint":
        return rng.integers(int(spec.low), max(int(spec.high), int(spec.low) + 1), size=shape).astype(dtype)
    if fill == "uniform":
        return rng.uniform(spec.low, spec.high, size=shape).astype(dtype)
    if fill == "ones":
        return np.ones(shape, dtype=dtype)
    if fill == "zeros":
        return np.zeros(shape, dtype=dtype)
    if fill == "big":
        return np.full(shape, np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1e9, dtype=dtype)
    if fill == "minus_one":
        arr = np.ones(shape, dtype=dtype)
        arr.reshape(-1)[:1] = -1
        return arr
    if fill == "arange":
        start = past_len if spec.role == "position" else 0
        if not shape:  # a scalar axis or position
            return np.asarray(start, dtype=dtype)
        return np.broadcast_to(np.arange(start, start + shape[-1], dtype=dtype), shape).copy()
    if fill == "string":
        return np.array([f"s{v}" for v in rng.integers(0, 100, size=int(np.prod(shape)))], dtype=object).reshape(shape)
    return rng.integers(0, 2, size=shape).astype(bool)


def random_feeds(specs: Sequence[InputSpec], *, seed: int = 0, dims: Mapping[str, int] | None = None,
                 samples: int = 1, default: int = DEFAULT_DIM) -> list[Feed]:
    """Seeded, valid random inputs: the same seed gives the same arrays. Symbolic dimensions
    that ``dims`` does not set take ``default`` (batch-like names: 1)."""
    rng = np.random.default_rng(seed)
    shapes = resolve_all(specs, dims, default)
    past_len = next((shapes[s.name][-2] for s in specs if s.role == "past" and len(s.shape) >= 3), 0)
    feeds = []
    for _ in range(samples):
        feed = {}
        for spec in specs:
            arr = _array(spec, shapes[spec.name], rng, past_len)
            feed[spec.name] = [arr, _array(spec, shapes[spec.name], rng, past_len)] \
                if spec.container in ("sequence", "optional_sequence") else arr
        feeds.append(feed)
    return feeds


def load_feeds(path: str | os.PathLike, specs: Sequence[InputSpec]) -> list[Feed]:
    """Input sets from a .npz: keys are input names (one set) or ``K/name`` (set K).

    Raises:
        InputError: unreadable file, unknown or missing inputs, wrong dtype or rank.
    """
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
        arrays = {k: archive[k] for k in archive.files}
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0][:200]})") from None
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        set_name, _, name = key.rpartition("/")
        groups.setdefault(set_name, {})[name] = arr
    by_name = {s.name: s for s in specs}
    feeds = []
    for set_name in sorted(groups, key=lambda k: (len(k), k)):
        feed = groups[set_name]
        for name, arr in feed.items():
            if name not in by_name:
                raise InputError(f"{path}: '{name}' is not an input of the model (inputs: {', '.join(by_name)})")
            spec = by_name[name]
            expected = tuple(d if isinstance(d, int) else (d or "?") for d in spec.shape)
            if arr.dtype != np.dtype(spec.dtype):
                raise InputError(f"{path}: input '{name}' is {arr.dtype}, the model expects {spec.dtype} {list(expected)}")
            if arr.ndim != len(spec.shape) or any(isinstance(d, int) and d != a for d, a in zip(spec.shape, arr.shape)):
                raise InputError(f"{path}: input '{name}' has shape {list(arr.shape)}, the model expects {list(expected)}")
        missing = [n for n in by_name if n not in feed]
        if missing:
            raise InputError(f"{path}: no array for input '{missing[0]}'")
        feeds.append(feed)
    if not feeds:
        raise InputError(f"{path}: contains no arrays")
    return feeds


def make_feeds(model: ir.Model, *, inputs: str | os.PathLike | Sequence[Mapping[str, np.ndarray]] | None = None,
               seed: int = 0, dims: Mapping[str, int] | None = None, samples: int = 1,
               check: Callable[[Sequence[Feed]], list[Feed]] | None = None, specs: list[InputSpec] | None = None) -> Feeds:
    """The input sets to run ``model`` on: from ``inputs`` (a .npz path or a list of dicts)
    when given, else ``samples`` seeded random sets (``specs``: the model's inputs as they were
    before a pass changed them).

    With ``check`` (a function that runs the original model on input sets, returns its outputs
    and raises RuntimeFailure when ONNX Runtime refuses one), generated inputs that the model cannot run
    are replaced: larger symbolic dimensions, then other seeds, before giving up with a
    message that says what was tried and how to give ``--dim`` or ``--inputs``.
    """
    from sparsec.errors import RuntimeFailure

    specs = specs if specs is not None else input_specs(model)
    if dims:
        check_dims(dims, specs)
    if inputs is not None:
        if isinstance(inputs, (str, os.PathLike)):
            return Feeds(load_feeds(inputs, specs), f"inputs from {inputs}")
        return Feeds([dict(f) for f in inputs], "given inputs")
    attempts = [(seed, DEFAULT_DIM)]
    if check is not None:
        attempts += [(seed, 64), (seed, 256), (seed + 1, DEFAULT_DIM), (seed + 2, 64)]
    error = ""
    for attempt_seed, default in attempts:
        sets = random_feeds(specs, seed=attempt_seed, dims=dims, samples=samples, default=default)
        try:
            outputs = check(sets) if check is not None else None
        except RuntimeFailure as exc:
            error = str(exc)
            continue
        note = f"random inputs (seed {attempt_seed})"
        if default != DEFAULT_DIM and symbolic_dims(specs):
            note += f", symbolic dimensions {default}"
        return Feeds(sets, note, outputs)
    known = symbolic_dims(specs)
    tried = f"symbolic dimensions {sorted({d for _, d in attempts})} and seeds {sorted({s for s, _ in attempts})}"
    raise InputError(f"the model does not run on generated inputs ({tried}; the last error: {error}); give real"
                     " inputs with --inputs FILE.npz" + (f" or sizes with --dim NAME=N (symbolic dimensions:"
                                                          f" {', '.join(known)})" if known else ""))
