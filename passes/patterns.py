"""Subgraph matchers shared by every pass: one way to match, one way to say why not.

A matcher returns either a match object (truthy) or a :class:`MatchFailure` (falsy) carrying a
stable ``code``, a message with the actual and expected values, and the node it looked at.
Passes turn failures into skipped sites in their record, grouped by code; tests assert codes.

Matchers here:

* :func:`match_linear_weight` -- a MatMul, Gemm or Conv whose weight operand is a constant
  (initializer or Constant node), with the axis its products are summed over; the constant
  may be read through DequantizeLinear or Cast, and a com.microsoft MatMulNBits is a MatMul
  with a packed 2/4/8-bit weight (see :mod:`sparsec.passes.quantized` for the codecs).
* :func:`check_shared_weight` -- a weight read by several nodes is only safe to rewrite when
  every reader is a linear site summing over the same axis (and decoding it the same way).
* :func:`select` -- include / exclude glob patterns over a site's label, node and weight names.
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx_ir as ir

from sparsec.graph import ConstantRef, constant_ref, node_label

from . import quantized
from .quantized import EncodedWeight


class Code(str, enum.Enum):
    """Why a site was skipped: one enumeration for every matcher and pass.

    The names are stable (tests, reports and users' scripts rely on them); :attr:`meaning` is
    the one-line explanation shown beside each code in summaries and reports.
    """

    NOT_LINEAR = "NOT_LINEAR"
    NOT_CONSTANT = "NOT_CONSTANT"
    GRAPH_INPUT = "GRAPH_INPUT"
    QUANTIZED = "QUANTIZED"
    DTYPE_UNSUPPORTED = "DTYPE_UNSUPPORTED"
    RANK_UNSUPPORTED = "RANK_UNSUPPORTED"
    NOT_DIVISIBLE = "NOT_DIVISIBLE"
    TOO_SMALL = "TOO_SMALL"
    SHARED_WEIGHT = "SHARED_WEIGHT"
    OUTPUT_LAYER = "OUTPUT_LAYER"
    NOT_SELECTED = "NOT_SELECTED"
    EXCLUDED = "EXCLUDED"
    ALREADY_SPARSE = "ALREADY_SPARSE"
    CUSTOM_DOMAIN = "CUSTOM_DOMAIN"
    COMPRESSED = "COMPRESSED"
    IN_SUBGRAPH = "IN_SUBGRAPH"
    METHOD_UNSUPPORTED = "METHOD_UNSUPPORTED"
    NOT_A_REGION = "NOT_A_REGION"
    ESCAPES = "ESCAPES"
    UNKNOWN_LAYOUT = "UNKNOWN_LAYOUT"
    NOTHING_TO_REMOVE = "NOTHING_TO_REMOVE"
    TOO_DENSE = "TOO_DENSE"
    OPSET_TOO_OLD = "OPSET_TOO_OLD"
    ACTIVATION_UNSUPPORTED = "ACTIVATION_UNSUPPORTED"
    EXPERTS_UNMATCHED = "EXPERTS_UNMATCHED"
    MODE_UNSUPPORTED = "MODE_UNSUPPORTED"
    LEFT_FLOAT = "LEFT_FLOAT"
    ZERO_POINTS_VARY = "ZERO_POINTS_VARY"
    NO_KERNEL = "NO_KERNEL"
    ROUTER = "ROUTER"
    ROUTING_UNSUPPORTED = "ROUTING_UNSUPPORTED"
    PERMUTATION_UNABSORBED = "PERMUTATION_UNABSORBED"
    LOWRANK_FACTOR = "LOWRANK_FACTOR"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def meaning(self) -> str:
        return MEANINGS[self]


MEANINGS: dict[Code, str] = {
    Code.NOT_LINEAR: "the op is not a MatMul, Gemm, Conv or MatMulNBits",
    Code.NOT_CONSTANT: "the weight is computed at run time, so it cannot be rewritten ahead of time",
    Code.GRAPH_INPUT: "the weight is also a graph input: callers may override it (--constant-initializers)",
    Code.QUANTIZED: "stored quantized or cast in a form this pass cannot rewrite exactly (float8"
                    " codes, MatMulNBits g_idx or prepacked B, fractional zero points; any, for"
                    " passes that resize weights)",
    Code.DTYPE_UNSUPPORTED: "the weight is not floating point",
    Code.RANK_UNSUPPORTED: "the weight's rank does not fit the layout",
    Code.NOT_DIVISIBLE: "the weight's shape does not divide into the layout's groups or tiles",
    Code.TOO_SMALL: "fewer weights than min_params: pruning would not pay",
    Code.SHARED_WEIGHT: "the weight is read by another node that needs it unchanged",
    Code.OUTPUT_LAYER: "a head layer feeding a graph output (keep_output_layers=true keeps it dense)",
    Code.NOT_SELECTED: "matches no include pattern",
    Code.EXCLUDED: "matches an exclude pattern",
    Code.ALREADY_SPARSE: "already in the layout: left bit-identical",
    Code.CUSTOM_DOMAIN: "a custom-domain op sparsec does not know",
    Code.COMPRESSED: "the weight is stored compressed: run pruning passes before compress",
    Code.IN_SUBGRAPH: "inside an If/Loop/Scan body, where calibration cannot capture inputs",
    Code.METHOD_UNSUPPORTED: "the method cannot score this weight layout",
    Code.NOT_A_REGION: "not the exit of a region this pass rewrites (an FFN, attention block, conv chain)",
    Code.ESCAPES: "a value inside the region is also read outside it",
    Code.UNKNOWN_LAYOUT: "a constant or reshape inside the region has a layout sparsec does not understand",
    Code.NOTHING_TO_REMOVE: "the ratio and multiple keep every unit",
    Code.TOO_DENSE: "too few zeros for compression to pay",
    Code.OPSET_TOO_OLD: "the model's opset lacks the ops the rewrite needs",
    Code.ACTIVATION_UNSUPPORTED: "the kernel has no such activation (lowering=masked computes any)",
    Code.EXPERTS_UNMATCHED: "a router (Softmax -> TopK) whose experts are not in a form sparsec lowers",
    Code.MODE_UNSUPPORTED: "the quantization mode has no quantized form for this op or weight (dynamic: MatMul,"
                           " Conv; static: MatMul, Gemm, Conv; int4: MatMul with a 2-D weight)",
    Code.LEFT_FLOAT: "ONNX Runtime's quantizer left the weight in float (a Constant node, or a node it declined)",
    Code.ZERO_POINTS_VARY: "the quantized weight's zero points differ per channel or block; compressed storage"
                           " keeps one fill value",
    Code.NO_KERNEL: "the target's execution provider has no kernel for the rewritten op (it would run elsewhere)",
    Code.ROUTER: "a Mixture-of-Experts router: its logits choose the experts, and it is tiny; kept float",
    Code.ROUTING_UNSUPPORTED: "the kernel would weigh the experts differently from the node (QMoE on the CPU"
                              " always renormalizes the chosen experts' weights)",
    Code.PERMUTATION_UNABSORBED: "no producer can absorb a permutation of the input channels exactly (residual"
                                 " stream, shared or quantized producer, KV cache): pruned unpermuted",
    Code.LOWRANK_FACTOR: "a factor of a sparse + low-rank weight (pruning option rank / rank_ratio): left dense",
}


FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16,
                         ir.DataType.DOUBLE})
LINEAR_OPS = ("MatMul", "Gemm", "Conv", "MatMulNBits")
STANDARD_DOMAINS = ("", "ai.onnx")
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class MatchFailure:
    """Why a matcher did not match: a code, the actual against the expected, and the node on
    which the check failed. Always falsy, so ``if not match:`` reads naturally."""

    code: Code
    message: str
    node: ir.Node | None = None

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class LinearWeight:
    """A linear op with a constant weight.

    ``reduce_axis`` is the weight axis its products are summed over (the K of a GEMM, the
    input channels of a Conv); ``out_axis`` the axis of output features.

    :meth:`to_matrix` gives the weight in canonical form, (rows, K): one row per output feature
    (leading batch axes of a batched MatMul weight included), the columns ordered with the
    reduction axis innermost, so N:M groups run along consecutive input channels (for a Conv,
    at each kernel position: columns ordered (kh, kw, c_in)).

    ``weight.numpy()`` is the float weight the op multiplies by, decoded where it is stored
    quantized (:class:`~sparsec.passes.quantized.EncodedWeight`); ``weight.replace`` takes such
    a weight and stores it encoded, keeping zeros exact.
    """

    node: ir.Node
    input_index: int
    weight: ConstantRef | EncodedWeight
    reduce_axis: int
    out_axis: int

    def _axes(self) -> tuple[list[int], list[int]]:
        rank = len(self.weight.shape)
        if self.op == "Conv":
            return [self.out_axis], [*range(2, rank), self.reduce_axis]
        batch = [a for a in range(rank) if a not in (self.reduce_axis, self.out_axis)]
        return [*batch, self.out_axis], [self.reduce_axis]

    def to_matrix(self, array: np.ndarray) -> np.ndarray:
        rows, cols = self._axes()
        moved = np.transpose(array, rows + cols)
        return moved.reshape(int(np.prod([array.shape[a] for a in rows])), -1)

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        rows, cols = self._axes()
        perm = rows + cols
        moved = matrix.reshape([self.weight.shape[a] for a in perm])
        return np.transpose(moved, np.argsort(perm))

    @property
    def matrix_shape(self) -> tuple[int, int]:
        rows, cols = self._axes()
        shape = self.weight.shape
        return int(np.prod([shape[a] for a in rows])), int(np.prod([shape[a] for a in cols]))

    @property
    def label(self) -> str:
        return node_label(self.node)

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def names(self) -> tuple[str, ...]:
        return (self.label, self.node.name or "", self.weight.name, self.op, "x".join(map(str, self.weight.shape)))

    def __bool__(self) -> bool:
        return True


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None or attr.is_ref() else int(attr.value)


def _graph_input(value: ir.Value, node: ir.Node) -> MatchFailure | None:
    if value.is_graph_input() and value.is_initializer():
        return MatchFailure(Code.GRAPH_INPUT, f"'{value.name}' is an initializer that is also a graph input:"
                            " callers may override it at run time, so it is not rewritten"
                            " (--constant-initializers treats such initializers as constants)", node)
    return None


def _stored(value: ir.Value | None, node: ir.Node, what: str) -> ConstantRef | MatchFailure:
    """The constant behind ``value`` (``what`` names it in messages), or why it is not one."""
    if value is None:
        return MatchFailure(Code.NOT_CONSTANT, f"{what} is missing", node)
    failure = _graph_input(value, node)
    if failure is not None:
        return failure
    ref = constant_ref(value)
    if ref is None:
        return MatchFailure(Code.NOT_CONSTANT, f"{what} '{value.name}' is computed at run time", node)
    return ref


def _optional_array(node: ir.Node, index: int, reader: ir.Node, what: str) -> np.ndarray | None | MatchFailure:
    """The contents of optional constant input ``index`` of ``node`` (None when absent)."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        return None
    ref = _stored(value, reader, what)
    return ref if isinstance(ref, MatchFailure) else ref.numpy()


def _dequantized(dq: ir.Node, reader: ir.Node) -> EncodedWeight | MatchFailure:
    """The weight behind ``DequantizeLinear(q, scale, zero_point)``, q a constant."""
    q = _stored(dq.inputs[0], reader, "quantized weight")
    if isinstance(q, MatchFailure):
        return q
    scale = _stored(dq.inputs[1] if len(dq.inputs) > 1 else None, reader, f"scale of '{q.name}'")
    if isinstance(scale, MatchFailure):
        return scale
    zero_point = _optional_array(dq, 2, reader, f"zero point of '{q.name}'")
    if isinstance(zero_point, MatchFailure):
        return zero_point
    out_type = _int_attr(dq, "output_dtype", 0)
    dtype = ir.DataType(out_type) if out_type else scale.dtype
    codec = quantized.qdq_codec(q.shape, q.dtype, scale.numpy(), zero_point, _int_attr(dq, "axis", 1),
                                _int_attr(dq, "block_size", 0), dtype)
    if isinstance(codec, str):
        return MatchFailure(Code.QUANTIZED, f"'{q.name}' (DequantizeLinear '{dq.name}'): {codec}", reader)
    return EncodedWeight(q, codec, dq, quantized.decoding_key(dq), "qdq")


def _cast(cast: ir.Node, reader: ir.Node) -> EncodedWeight | MatchFailure | None:
    """A float constant read through ``Cast`` to another float type; None when the Cast's input
    is computed (the caller says so)."""
    source = cast.inputs[0]
    if source is None:
        return None
    ref = constant_ref(source)
    if ref is None:
        return _graph_input(source, reader)
    target = _int_attr(cast, "to", 0)
    if ref.dtype not in FLOAT_TYPES or ir.DataType(target) not in FLOAT_TYPES:
        return MatchFailure(Code.DTYPE_UNSUPPORTED, f"'{ref.name}' is {ref.dtype} cast to"
                            f" {ir.DataType(target)}: only float constants cast to float are pruned", reader)
    return EncodedWeight(ref, quantized.CastCodec(ref.dtype), cast, quantized.decoding_key(cast), "cast")


def constant_operand(node: ir.Node, index: int) -> ConstantRef | EncodedWeight | MatchFailure:
    """The constant that input ``index`` of ``node`` reads, or why it is not one.

    A constant read through DequantizeLinear or a float-to-float Cast is an
    :class:`~sparsec.passes.quantized.EncodedWeight`: the decoded weight, written back encoded.
    """
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        return MatchFailure(Code.NOT_CONSTANT, f"input {index} is missing", node)
    failure = _graph_input(value, node)
    if failure is not None:
        return failure
    producer = value.producer()
    if producer is not None and producer.domain in STANDARD_DOMAINS:
        if producer.op_type == "DequantizeLinear":
            return _dequantized(producer, node)
        if producer.op_type == "Cast" and (found := _cast(producer, node)) is not None:
            return found
    ref = constant_ref(value)
    if ref is None:
        return MatchFailure(Code.NOT_CONSTANT, f"'{value.name}' is computed at run time", node)
    return ref


def _nbits_weight(node: ir.Node) -> EncodedWeight | MatchFailure:
    """The packed weight B of a com.microsoft ``MatMulNBits``."""
    b = _stored(node.inputs[1] if len(node.inputs) > 1 else None, node, "packed weight B")
    if isinstance(b, MatchFailure):
        return b
    if _int_attr(node, "weight_prepacked", 0):
        return MatchFailure(Code.QUANTIZED, f"'{b.name}' is prepacked for an execution provider", node)
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        return MatchFailure(Code.QUANTIZED, f"'{b.name}' has a g_idx input (act-order groups, deprecated):"
                            " its blocks are not consecutive along K", node)
    scales = _stored(node.inputs[2] if len(node.inputs) > 2 else None, node, f"scales of '{b.name}'")
    if isinstance(scales, MatchFailure):
        return scales
    zero_points = _optional_array(node, 3, node, f"zero points of '{b.name}'")
    if isinstance(zero_points, MatchFailure):
        return zero_points
    codec = quantized.nbits_codec(_int_attr(node, "K", 0), _int_attr(node, "N", 0), _int_attr(node, "bits", 4),
                                  _int_attr(node, "block_size", 0), b.shape, scales.numpy(), zero_points, scales.dtype)
    if isinstance(codec, str):
        return MatchFailure(Code.QUANTIZED, f"'{b.name}' (MatMulNBits): {codec}", node)
    # Readers of B share it when they share scales, zero points and attributes (A and bias differ).
    return EncodedWeight(b, codec, None, quantized.decoding_key(node, skip=(0, 1, 5)), "nbits")


def _weight_operand(node: ir.Node, first: int, second: int) -> tuple[ConstantRef | EncodedWeight, int] | MatchFailure:
    """The constant among inputs ``first`` then ``second``; the failure of the usual position
    (``first``) unless only ``second``'s failure says more than "computed at run time"."""
    ref = constant_operand(node, first)
    if not isinstance(ref, MatchFailure):
        return ref, first
    other = constant_operand(node, second)
    if not isinstance(other, MatchFailure):
        return other, second
    return other if ref.code == Code.NOT_CONSTANT and other.code != Code.NOT_CONSTANT else ref


def match_linear_weight(node: ir.Node, *, decode: bool = True) -> LinearWeight | MatchFailure:
    """Match a MatMul / Gemm / Conv with a constant floating-point weight (stored as it is,
    quantized behind DequantizeLinear, or of another precision behind Cast), or a
    com.microsoft MatMulNBits: its packed B is a (K, N) weight summed over K.

    ``decode=False`` is for rewrites that change a weight's shape (structured pruning, MoE):
    they only take weights stored as they are; the others fail with QUANTIZED.
    """
    site = _match_linear_weight(node)
    if site and not decode and isinstance(site.weight, EncodedWeight):
        stored = {"qdq": "quantized (DequantizeLinear)", "nbits": "packed (MatMulNBits)",
                  "cast": f"as {site.weight.dtype} (read through Cast)"}[site.weight.form]
        return MatchFailure(Code.QUANTIZED, f"'{site.weight.name}' is stored {stored}: this rewrite"
                            " resizes only weights stored as the op reads them", node)
    return site


def _match_linear_weight(node: ir.Node) -> LinearWeight | MatchFailure:
    op = node.op_type
    if node.domain == MS_DOMAIN and op == "MatMulNBits":
        found = _nbits_weight(node)
        return found if isinstance(found, MatchFailure) else LinearWeight(node, 1, found, 0, 1)
    if node.domain not in STANDARD_DOMAINS:
        return MatchFailure(Code.CUSTOM_DOMAIN, f"op {node.domain}::{node.op_type} is not a standard op", node)
    if op not in LINEAR_OPS:
        return MatchFailure(Code.NOT_LINEAR, f"op {op} is not a linear op ({', '.join(LINEAR_OPS)})", node)
    if op == "MatMulNBits":
        return MatchFailure(Code.NOT_LINEAR, f"MatMulNBits is a {MS_DOMAIN} op, not one of domain"
                            f" '{node.domain}'", node)
    found = constant_operand(node, 1) if op == "Conv" else _weight_operand(node, 1, 0)
    if isinstance(found, MatchFailure):
        return found
    ref, index = (found, 1) if op == "Conv" else found
    rank = len(ref.shape)
    if op == "MatMul":
        if rank < 2:
            return MatchFailure(Code.RANK_UNSUPPORTED, f"weight '{ref.name}' has rank {rank}, expected >= 2", node)
        # MatMul(X, W): W is (..., K, N); MatMul(W, X): W is (..., N, K).
        reduce_axis, out_axis = (rank - 2, rank - 1) if index == 1 else (rank - 1, rank - 2)
    elif op == "Gemm":
        if rank != 2:
            return MatchFailure(Code.RANK_UNSUPPORTED, f"Gemm weight '{ref.name}' has rank {rank}, expected 2", node)
        if index == 1:  # B is (K, N), or (N, K) when transB
            reduce_axis = 1 if _int_attr(node, "transB", 0) else 0
        else:  # A is (M, K), or (K, M) when transA
            reduce_axis = 0 if _int_attr(node, "transA", 0) else 1
        out_axis = 1 - reduce_axis
    else:
        if rank < 3:
            return MatchFailure(Code.RANK_UNSUPPORTED, f"Conv weight '{ref.name}' has rank {rank}, expected >= 3", node)
        # W is (C_out, C_in / groups, k...): products are summed over the input channels of
        # each group (and the kernel window); N:M groups run along the input channels.
        reduce_axis, out_axis = 1, 0
    if ref.dtype not in FLOAT_TYPES:
        return MatchFailure(Code.DTYPE_UNSUPPORTED, f"weight '{ref.name}' is {ref.dtype}, not floating point", node)
    return LinearWeight(node, index, ref, reduce_axis, out_axis)


def _same_decoding(a: ConstantRef | EncodedWeight, b: ConstantRef | EncodedWeight) -> bool:
    if isinstance(a, EncodedWeight) and isinstance(b, EncodedWeight):
        return a.key == b.key
    return not isinstance(a, EncodedWeight) and not isinstance(b, EncodedWeight)


def check_shared_weight(site: LinearWeight) -> MatchFailure | None:
    """None when every reader of the weight is a linear site summing over the same axis and,
    for a weight read through a decoding step, decoding it the same way."""
    readers = site.weight.readers
    if len(readers) <= 1:
        return None
    for user in readers:
        other = match_linear_weight(user)
        if (not other or other.weight.value is not site.weight.value or other.reduce_axis != site.reduce_axis
                or not _same_decoding(other.weight, site.weight)):
            return MatchFailure(Code.SHARED_WEIGHT, f"weight '{site.weight.name}' is also read by"
                                f" {user.op_type} '{user.name}', which does not accept the same layout", site.node)
    return None


def feeds_graph_output(node: ir.Node, model: ir.Model) -> bool:
    """True when the node's output is a model output, directly or through a bias Add."""
    graph_outputs = set(model.graph.outputs)
    for out in node.outputs:
        if out in graph_outputs:
            return True
        uses = list(out.uses())
        if len(uses) != 1 or not any(o in graph_outputs for o in uses[0].node.outputs):
            continue
        follower = uses[0].node
        if follower.op_type in ("Cast", "Identity"):
            return True
        if follower.op_type == "Add" and constant_ref(follower.inputs[1 - uses[0].idx]) is not None:
            return True  # a bias, not a residual
    return False


class Selectable(Protocol):
    """A matched site or region: the node it hangs on and the names include/exclude match."""

    @property
    def node(self) -> ir.Node: ...

    @property
    def names(self) -> tuple[str, ...]: ...


def select(site: Selectable, include: tuple[str, ...], exclude: tuple[str, ...]) -> MatchFailure | None:
    """Apply include / exclude glob patterns to a site's names (for a weight: module path, node
    name, weight name, op type and weight shape written ``384x1536``)."""
    names = site.names
    if include and not any(fnmatch.fnmatchcase(n, p) for p in include for n in names):
        return MatchFailure(Code.NOT_SELECTED, f"matches no include pattern ({'|'.join(include)})", site.node)
    hit = next((p for p in exclude for n in names if fnmatch.fnmatchcase(n, p)), None)
    if hit is not None:
        return MatchFailure(Code.EXCLUDED, f"excluded by pattern '{hit}'", site.node)
    return None
