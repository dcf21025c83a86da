"""Subgraph matchers shared by every pass: one way to match, one way to say why not.

A matcher returns either a match object (truthy) or a :class:`MatchFailure` (falsy) carrying a
stable ``code``, a message with the actual and expected values, and the node it looked at.
Passes turn failures into skipped sites in their record, grouped by code; tests assert codes.

Matchers here:

* :func:`match_linear_weight` -- a MatMul, Gemm or Conv whose weight operand is a constant
  (initializer or Constant node), with the axis its products are summed over.
* :func:`check_shared_weight` -- a weight read by several nodes is only safe to rewrite when
  every reader is a linear site summing over the same axis.
* :func:`select` -- include / exclude glob patterns over a site's label, node and weight names.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sparsec.graph import ConstantRef, constant_ref, node_label

# Stable skip codes. Tests and reports rely on these names.
NOT_CONSTANT = "NOT_CONSTANT"  # the operand is computed at run time
GRAPH_INPUT = "GRAPH_INPUT"  # an initializer that is also a graph input (overridable)
QUANTIZED = "QUANTIZED"  # the weight comes out of DequantizeLinear
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
COMPRESSED = "COMPRESSED"  # stored by the compress pass: prune before compressing
IN_SUBGRAPH = "IN_SUBGRAPH"  # calibration cannot capture values inside If/Loop/Scan bodies

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16,
                         ir.DataType.DOUBLE})
LINEAR_OPS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class MatchFailure:
    """Why a matcher did not match. Always falsy."""

    code: str
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
    """

    node: ir.Node
    input_index: int
    weight: ConstantRef
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

    def __bool__(self) -> bool:
        return True


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None or attr.is_ref() else int(attr.value)


def _operand(node: ir.Node, index: int) -> tuple[ConstantRef | None, MatchFailure | None]:
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        return None, MatchFailure(NOT_CONSTANT, f"input {index} is missing", node)
    if value.is_graph_input() and value.is_initializer():
        return None, MatchFailure(
            GRAPH_INPUT,
            f"'{value.name}' is an initializer that is also a graph input: callers may"
            " override it at run time, so it is not pruned",
            node,
        )
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        return None, MatchFailure(
            QUANTIZED, f"'{value.name}' comes out of DequantizeLinear (quantized weight)", node
        )
    ref = constant_ref(value)
    if ref is None:
        return None, MatchFailure(NOT_CONSTANT, f"'{value.name}' is computed at run time", node)
    return ref, None


def match_linear_weight(node: ir.Node) -> LinearWeight | MatchFailure:
    """Match a MatMul / Gemm / Conv with a constant floating-point weight."""
    if node.domain not in ("", "ai.onnx"):
        return MatchFailure(CUSTOM_DOMAIN, f"op {node.domain}::{node.op_type} is not a standard op", node)
    op = node.op_type
    if op == "MatMul":
        ref, fail_b = _operand(node, 1)
        index = 1
        if ref is None:
            ref, fail_a = _operand(node, 0)
            index = 0
            if ref is None:
                # Report the reason for the usual weight position.
                assert fail_b is not None
                return fail_b if fail_b.code != NOT_CONSTANT else (fail_a or fail_b)
        rank = len(ref.shape)
        if rank < 2:
            return MatchFailure(RANK_UNSUPPORTED, f"weight '{ref.name}' has rank {rank}, expected >= 2", node)
        # MatMul(X, W): W is (..., K, N); MatMul(W, X): W is (..., N, K).
        reduce_axis, out_axis = (rank - 2, rank - 1) if index == 1 else (rank - 1, rank - 2)
    elif op == "Gemm":
        ref, fail = _operand(node, 1)
        index = 1
        if ref is None:
            ref_a, _ = _operand(node, 0)
            if ref_a is None:
                assert fail is not None
                return fail
            ref, index = ref_a, 0
        if len(ref.shape) != 2:
            return MatchFailure(RANK_UNSUPPORTED, f"Gemm weight '{ref.name}' has rank {len(ref.shape)}", node)
        if index == 1:  # B is (K, N), or (N, K) when transB
            reduce_axis = 1 if _int_attr(node, "transB", 0) else 0
        else:  # A is (M, K), or (K, M) when transA
            reduce_axis = 0 if _int_attr(node, "transA", 0) else 1
        out_axis = 1 - reduce_axis
    elif op == "Conv":
        ref, fail = _operand(node, 1)
        index = 1
        if ref is None:
            assert fail is not None
            return fail
        if len(ref.shape) < 3:
            return MatchFailure(RANK_UNSUPPORTED, f"Conv weight '{ref.name}' has rank {len(ref.shape)}", node)
        # W is (C_out, C_in / groups, k...): products are summed over the input channels of
        # each group (and the kernel window); N:M groups run along the input channels.
        reduce_axis, out_axis = 1, 0
    else:
        return MatchFailure(NOT_CONSTANT, f"op {op} is not a linear op ({', '.join(LINEAR_OPS)})", node)
    if ref.dtype not in FLOAT_TYPES:
        return MatchFailure(DTYPE_UNSUPPORTED, f"weight '{ref.name}' is {ref.dtype}, not floating point", node)
    return LinearWeight(node, index, ref, reduce_axis, out_axis)


def check_shared_weight(site: LinearWeight) -> MatchFailure | None:
    """None when every reader of the weight is a linear site summing over the same axis."""
    users = site.weight.users
    if len(users) <= 1:
        return None
    for user, _ in users:
        other = match_linear_weight(user)
        if not other or other.weight.value is not site.weight.value or other.reduce_axis != site.reduce_axis:
            return MatchFailure(
                SHARED_WEIGHT,
                f"weight '{site.weight.name}' is also read by {user.op_type} '{user.name}',"
                " which does not accept the same layout",
                site.node,
            )
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


def select(site: LinearWeight, include: tuple[str, ...], exclude: tuple[str, ...]) -> MatchFailure | None:
    """Apply include / exclude glob patterns to a site's label, node name, weight name, op type
    and weight shape (written ``384x1536``)."""
    names = (site.label, site.node.name or "", site.weight.name, site.op, "x".join(map(str, site.weight.shape)))
    if include and not any(fnmatch.fnmatchcase(n, p) for p in include for n in names):
        return MatchFailure(NOT_SELECTED, f"matches no include pattern ({'|'.join(include)})", site.node)
    hit = next((p for p in exclude for n in names if fnmatch.fnmatchcase(n, p)), None)
    if hit is not None:
        return MatchFailure(EXCLUDED, f"excluded by pattern '{hit}'", site.node)
    return None
