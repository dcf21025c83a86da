"""``com.microsoft.MoE`` -> ``com.microsoft.QMoE``: the experts' weights quantized, for ``quantize``.

ONNX Runtime's quantizers leave MoE nodes alone, so the ``quantize`` pass rewrites them here:
each MoE node (made by ``moe:...,lowering=contrib`` or ``moe-fuse``, or already in the model)
becomes one QMoE node with the same inputs, routing and attributes, its fc1 / fc2 expert weights
stored as uint8 codes with scales (and zero points when asymmetric):

* ``mode=dynamic`` -- 8-bit codes, one scale per output row (QMoE without ``block_size``), each
  row quantized by ``onnxruntime.quantization.quant_utils.quantize_data``, the function
  ``quantize_dynamic`` quantizes per-channel weights with: ``weight_type=int8`` symmetric (codes
  stored + 128, the kernel's default zero point), ``uint8`` asymmetric (a zero point per row).
  The kernel computes in float: equal to ``MoE`` with the dequantized weights to fp tolerance.
* ``mode=int4`` -- 4-bit codes in blocks of ``block`` along K, quantized by ORT's
  ``quantize_matmul_4bits`` (what ``MatMulNBitsQuantizer`` uses, so the codes are those
  ``MatMulNBits`` would get), symmetric or with zero points. The kernel wants H and the expert
  width divisible by the block: an expert width that is not a multiple of 16 is padded with zero
  neurons (they contribute exactly 0), and the block is the largest power of two from 16 to
  ``block_size`` dividing both. ``accuracy_level`` as for MatMulNBits: 4 quantizes the activations to
  int8 inside the kernel (faster, about 5e-3 relative from the dequantized MoE), 0 keeps float.

Layout (measured on ORT 1.32's CPU kernel, docs/passes/moe.md): weights (E, N, K * bits / 8),
one row per output feature, K packed low nibble first; ``weights_prepacked=0`` (raw layout:
the CUDA kernel's default expects CUTLASS-prepacked weights). Every code is decoded again and
checked before anything changes: a weight entry that was 0 must dequantize to exactly 0 (a
zero point is the code of 0; a block or row of zeros gets scale 1 or 0) and N:M layouts along K
must hold; otherwise a PassError.

Skipped: a target whose provider has no fp32 QMoE kernel (``NO_KERNEL``: the CUDA kernel is
fp16/bf16 only, so the node would fall back to the CPU), ``mode=static`` (``MODE_UNSUPPORTED``:
QMoE has no calibrated activation form), activations QMoE lacks (``ACTIVATION_UNSUPPORTED``),
separate fc3 weights or a SwiGLU layout other than interleaved (``UNKNOWN_LAYOUT``), MoE nodes
with ``normalize_routing_weights=0`` (``ROUTING_UNSUPPORTED``: the CPU QMoE kernel renormalizes
the chosen experts' weights whatever the attribute says; sparsec's lowerings write 1), non-float32
nodes (``DTYPE_UNSUPPORTED``), computed weights (``NOT_CONSTANT``), H not divisible by 16 for
int4 (``NOT_DIVISIBLE``), nodes inside subgraphs (``IN_SUBGRAPH``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sparsec.errors import PassError
from sparsec.graph import ConstantRef, add_constant, constant_ref, fresh_name, mark_changed, node_label
from sparsec.sparsity import nm_layouts, zero_fraction
from sparsec.targets import QMOE

from .patterns import MS_DOMAIN, Code, MatchFailure
from .rewrite import redirect

# Activations the QMoE kernel computes (the same names and forms as MoE's).
ACTIVATIONS = ("relu", "gelu", "silu", "swiglu", "identity")
MIN_BLOCK = 16
# MoE attributes that carry over to QMoE unchanged.
KEPT_ATTRIBUTES = ("k", "activation_type", "normalize_routing_weights", "swiglu_fusion", "activation_alpha",
                   "activation_beta", "swiglu_limit", "use_sparse_mixer")


@dataclass
class MoeSite:
    """A com.microsoft.MoE node whose experts the quantize pass will store quantized."""

    node: ir.Node
    fc1: ConstantRef  # (E, N1, H): N1 = I, or 2 I with SwiGLU's gate and up rows interleaved
    fc2: ConstantRef  # (E, H_out, I)
    fc1_bias: ir.Value | None
    fc2_bias: ir.Value | None

    @property
    def label(self) -> str:
        return node_label(self.node)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.label, self.node.name or "", self.fc1.name, self.fc2.name, "MoE")

    @property
    def glu(self) -> bool:
        return _attribute(self.node, "activation_type", "relu") == "swiglu"


def _attribute(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return attr.value if attr is not None else default


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def match_moe(node: ir.Node, model: ir.Model, mode: str, target) -> MoeSite | MatchFailure:
    """The MoE node as a site, or why it stays float."""
    failure = kernel_failure(target, node)
    if failure is not None:
        return failure
    if mode == "static":
        return MatchFailure(Code.MODE_UNSUPPORTED, "mode=static calibrates int8 activations; QMoE takes float"
                            " activations (use mode=dynamic or int4 for the experts)", node)
    activation = _attribute(node, "activation_type", "relu")
    if activation not in ACTIVATIONS:
        return MatchFailure(Code.ACTIVATION_UNSUPPORTED, f"QMoE has no '{activation}' activation"
                            f" (it has {', '.join(ACTIVATIONS)})", node)
    if _attribute(node, "normalize_routing_weights", 0) != 1:
        return MatchFailure(Code.ROUTING_UNSUPPORTED, "normalize_routing_weights=0: ONNX Runtime 1.32's CPU QMoE"
                            " renormalizes the chosen experts' weights regardless (measured: 0.43 max difference)",
                            node)
    if _input(node, 6) is not None:
        return MatchFailure(Code.UNKNOWN_LAYOUT, "separate fc3 weights: ONNX Runtime's CPU kernels run SwiGLU only"
                            " with gate and up interleaved in fc1 (swiglu_fusion=1)", node)
    if activation == "swiglu" and _attribute(node, "swiglu_fusion", 0) != 1:
        return MatchFailure(Code.UNKNOWN_LAYOUT, f"swiglu_fusion={_attribute(node, 'swiglu_fusion', 0)}; the CPU"
                            " kernel runs the interleaved layout (swiglu_fusion=1) only", node)
    if node.graph is not model.graph:
        return MatchFailure(Code.IN_SUBGRAPH, "inside an If/Loop/Scan body", node)
    fc1, fc2 = constant_ref(_input(node, 2)), constant_ref(_input(node, 4))
    if fc1 is None or fc2 is None:
        return MatchFailure(Code.NOT_CONSTANT, "the expert weights are computed at run time", node)
    biases = [_input(node, i) for i in (3, 5)]
    if any(b is not None and constant_ref(b) is None for b in biases):
        return MatchFailure(Code.NOT_CONSTANT, "an expert bias is computed at run time", node)
    x = _input(node, 0)
    dtypes = {fc1.dtype, fc2.dtype, x.dtype if x is not None and x.dtype is not None else ir.DataType.FLOAT}
    if dtypes != {ir.DataType.FLOAT}:
        return MatchFailure(Code.DTYPE_UNSUPPORTED, f"{'/'.join(sorted(str(d) for d in dtypes))} experts; the"
                            " pass writes float32 QMoE nodes", node)
    if len(fc1.shape) != 3 or len(fc2.shape) != 3:
        return MatchFailure(Code.RANK_UNSUPPORTED, f"expert weights of shapes {fc1.shape}, {fc2.shape}; expected"
                            " (E, N, K)", node)
    if mode == "int4" and fc1.shape[2] % MIN_BLOCK:
        return MatchFailure(Code.NOT_DIVISIBLE, f"hidden size {fc1.shape[2]} is not a multiple of {MIN_BLOCK}:"
                            " QMoE's 4-bit blocks must divide it", node)
    return MoeSite(node, fc1, fc2, *biases)


# Ops between a router's MatMul / Gemm and the TopK that reads its logits.
ROUTER_PATH = frozenset({"Add", "Softmax", "Sigmoid", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze",
                         "Flatten"})


def router_failure(node: ir.Node, depth: int = 4) -> MatchFailure | None:
    """ROUTER when ``node``'s output reaches a TopK (or an MoE node's router input) through
    element-wise and shape ops only: its logits choose the experts."""
    frontier, seen = [node], set()
    for _ in range(depth):
        following = []
        for current in frontier:
            for out in current.outputs:
                for use in out.uses():
                    reader = use.node
                    if reader.op_type == "TopK" or (reader.op_type in ("MoE", "QMoE") and use.idx == 1):
                        return MatchFailure(Code.ROUTER, f"a Mixture-of-Experts router (its logits reach"
                                            f" {reader.op_type} '{reader.name}'); routers=true quantizes it", node)
                    if reader.op_type in ROUTER_PATH and id(reader) not in seen:
                        seen.add(id(reader))
                        following.append(reader)
        frontier = following
    return None


def kernel_failure(target, node: ir.Node) -> MatchFailure | None:
    """NO_KERNEL when the provider that would run a QMoE node on ``target`` has no kernel for it
    (the target's facts for the form ``qmoe``; no target: nothing to check)."""
    if target is None:
        return None
    gain = target.gain(QMOE)
    if gain.speedup:
        return None
    return MatchFailure(Code.NO_KERNEL, f"target '{target.name}': {gain.how}", node)


# --- encoding ----------------------------------------------------------------------------------

@dataclass
class Encoded:
    """One projection's QMoE inputs: codes (E, N, K * bits / 8), scales (E, N) per row or
    (E, N, K / block), zero points (None: the kernel's default 2^(bits - 1))."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block: int  # 0: one scale per row

    def decode(self) -> np.ndarray:
        """The dequantized weights (E, N, K), as the kernel computes them."""
        e, n = self.codes.shape[:2]
        if self.bits == 8:
            q = self.codes.astype(np.float32)
        else:
            q = np.stack([self.codes & 15, self.codes >> 4], -1).reshape(e, n, -1).astype(np.float32)
        k = q.shape[2]
        blocks = 1 if self.block == 0 else k // self.block
        if self.zero_points is None:
            zp = np.full((e, n, blocks), 2.0 ** (self.bits - 1), np.float32)
        elif self.bits == 8:
            zp = self.zero_points.reshape(e, n, blocks).astype(np.float32)
        else:  # blocked 4-bit: (E, N, ceil(blocks / 2)), block b in nibble b % 2
            zp = np.stack([self.zero_points & 15, self.zero_points >> 4], -1).reshape(e, n, -1)[..., :blocks]
            zp = zp.astype(np.float32)
        scales = self.scales.reshape(e, n, blocks)
        width = k // blocks
        return ((q - np.repeat(zp, width, axis=2)) * np.repeat(scales, width, axis=2)).astype(np.float32)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes))


def encode_rows_8bit(w: np.ndarray, symmetric: bool) -> Encoded:
    """8-bit codes, one scale (and zero point) per output row, by ORT's per-channel quantizer."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    e, n, k = w.shape
    rows = w.reshape(e * n, k)
    codes = np.empty((e * n, k), np.uint8)
    scales = np.empty(e * n, np.float32)
    zps = np.empty(e * n, np.uint8)
    qtype = TensorProto.INT8 if symmetric else TensorProto.UINT8
    for r, row in enumerate(rows):
        zp, scale, q = quantize_data(row, qtype, symmetric)
        # int8 codes stored + 128: the kernel's default zero point is 128, so no zero-point input.
        codes[r] = (q.astype(np.int16) + 128).astype(np.uint8) if symmetric else q
        scales[r], zps[r] = scale, zp if not symmetric else 0
    return Encoded(codes.reshape(e, n, k), scales.reshape(e, n), None if symmetric else zps.reshape(e, n), 8, 0)


def encode_blocks_4bit(w: np.ndarray, block: int, symmetric: bool) -> Encoded:
    """4-bit codes in blocks along K, by ORT's MatMulNBits quantizer kernel, per expert."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    e, n, k = w.shape
    blocks = k // block
    codes = np.zeros((e, n, blocks, block // 2), np.uint8)
    scales = np.zeros((e, n, blocks), np.float32)
    zps = np.zeros((e, n, (blocks + 1) // 2), np.uint8)
    for i in range(e):
        # The quantizer takes the MatMul weight (K, N) and writes (N, blocks, block / 2).
        quantize_matmul_4bits(codes[i], np.ascontiguousarray(w[i].T), scales[i], zps[i], block, n, k, symmetric)
    return Encoded(codes.reshape(e, n, k // 2), scales, None if symmetric else zps, 4, block)


def int4_block(hidden: int, width: int, block_size: int) -> int:
    """The largest power of two from 16 to ``block_size`` dividing ``hidden`` and ``width``."""
    block = block_size
    while block > MIN_BLOCK and (hidden % block or width % block):
        block //= 2
    return block


@dataclass
class QmoePlan:
    """Everything the rewrite of one site writes, computed and checked before anything changes."""

    site: MoeSite
    fc1: Encoded
    fc2: Encoded
    fc1_bias: np.ndarray | None
    attributes: dict
    padding: int  # zero neurons added per expert
    checks: list[dict]  # per weight: name, shape, bytes, zeros, N:M layouts


def plan_site(site: MoeSite, mode: str, *, weight_type: str, block_size: int, symmetric: bool,
              accuracy_level: int) -> QmoePlan:
    """Quantize one MoE node's experts and check the codes (PassError if a zero is lost)."""
    w1, w2 = site.fc1.tensor.numpy().astype(np.float32), site.fc2.tensor.numpy().astype(np.float32)
    b1 = constant_ref(site.fc1_bias).tensor.numpy().astype(np.float32) if site.fc1_bias is not None else None
    width = w2.shape[2]
    attributes = {name: site.node.attributes[name].value for name in KEPT_ATTRIBUTES if name in site.node.attributes}
    attributes["weights_prepacked"] = 0
    padding = 0
    if mode == "int4":
        padding = -width % MIN_BLOCK
        block = int4_block(w1.shape[2], width + padding, block_size)
        if padding:  # zero neurons: fc1 rows (gate and up pairs for SwiGLU), fc2 columns
            rows = (2 if site.glu else 1) * padding
            w1 = np.concatenate([w1, np.zeros((w1.shape[0], rows, w1.shape[2]), np.float32)], axis=1)
            w2 = np.concatenate([w2, np.zeros((*w2.shape[:2], padding), np.float32)], axis=2)
            if b1 is not None:
                b1 = np.concatenate([b1, np.zeros((b1.shape[0], rows), np.float32)], axis=1)
        fc1, fc2 = encode_blocks_4bit(w1, block, symmetric), encode_blocks_4bit(w2, block, symmetric)
        attributes.update(expert_weight_bits=4, block_size=block, accuracy_level=accuracy_level)
    else:
        fc1, fc2 = encode_rows_8bit(w1, weight_type == "int8"), encode_rows_8bit(w2, weight_type == "int8")
        attributes["expert_weight_bits"] = 8
    checks = [_check(site.fc1, w1, fc1, mode), _check(site.fc2, w2, fc2, mode)]
    return QmoePlan(site, fc1, fc2, b1 if padding else None, attributes, padding, checks)


def _check(ref: ConstantRef, padded: np.ndarray, encoded: Encoded, mode: str) -> dict:
    original = ref.tensor.numpy().astype(np.float32)
    decoded = encoded.decode()
    if decoded.shape != padded.shape:
        raise PassError(f"quantize: QMoE codes of '{ref.name}' decode to {decoded.shape}, not {padded.shape}")
    decoded = decoded[:, :original.shape[1], :original.shape[2]]
    lost = int(np.count_nonzero((original == 0) & (decoded != 0)))
    if lost:
        raise PassError(f"quantize: {lost} entries of '{ref.name}' that were 0 do not dequantize to 0 in QMoE"
                        f" ({encoded.bits}-bit codes); nothing was changed")
    layouts = nm_layouts(original, 2)
    broken = [layout for layout in layouts if layout not in nm_layouts(decoded, 2)]
    if broken:
        raise PassError(f"quantize: '{ref.name}' was {broken[0]} along K and is not after {mode} quantization"
                        " into QMoE; nothing was changed")
    return {"name": ref.name, "shape": tuple(original.shape), "params": int(original.size),
            "bytes_before": int(original.nbytes), "bytes_after": encoded.nbytes,
            "sparsity_before": zero_fraction(original), "sparsity_after": zero_fraction(decoded), "nm": layouts}


def apply_plan(graph: ir.Graph, plan: QmoePlan, node: ir.Node, pass_id: str) -> ir.Node:
    """Replace ``node`` (the plan's MoE node, in ``graph``) by the QMoE node."""
    prefix = f"{node.name}.qmoe"

    def const(name, array):
        return add_constant(graph, f"{prefix}.{name}", array) if array is not None else None

    fc1_bias = const("fc1_bias", plan.fc1_bias) if plan.fc1_bias is not None else _input(node, 3)
    inputs = [node.inputs[0], node.inputs[1], const("fc1", plan.fc1.codes), const("fc1_scales", plan.fc1.scales),
              fc1_bias, const("fc2", plan.fc2.codes), const("fc2_scales", plan.fc2.scales), _input(node, 5),
              None, None, None, const("fc1_zero_points", plan.fc1.zero_points),
              const("fc2_zero_points", plan.fc2.zero_points)]
    while inputs[-1] is None:
        inputs.pop()
    qmoe = ir.node("QMoE", inputs, attributes=plan.attributes, domain=MS_DOMAIN, name=node.name,
                   num_outputs=1, metadata_props=dict(node.metadata_props))
    bits, block = plan.attributes["expert_weight_bits"], plan.attributes.get("block_size", 0)
    mark_changed(qmoe, pass_id, f"quantize: experts as {bits}-bit codes"
                 f" ({f'blocks of {block}' if block else 'one scale per row'}) in com.microsoft.QMoE")
    old = node.outputs[0]
    graph.insert_after(node, [qmoe])
    qmoe.outputs[0].name = fresh_name(graph, f"{prefix}.out")
    qmoe.outputs[0].shape, qmoe.outputs[0].type = old.shape, old.type
    redirect(graph, old, qmoe.outputs[0])
    weights = [v for v in node.inputs if v is not None and v.is_initializer()]
    graph.remove(node, safe=True)
    for value in weights:
        if not list(value.uses()) and not value.is_graph_input() and value.name in graph.initializers:
            graph.initializers.pop(value.name)
    return qmoe
