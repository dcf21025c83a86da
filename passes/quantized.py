"""Weights a linear op reads through a decoding step: the QDQ, MatMulNBits and Cast codecs.

A pruning pass works on the float matrix a linear op multiplies by. When that matrix is stored
in another form, a codec turns the stored tensor into it (``decode``) and back (``encode``):

* ``DequantizeLinear(q, scale, zero_point)``: q a constant of int4, uint4, int8, uint8, int16
  or uint16 codes; per-tensor, per-axis (``axis``) or blocked (``block_size``, opset 21)
  scales; the zero point optional (0). w = (q - zero_point) * scale.
* ``com.microsoft.MatMulNBits``: B packed uint8 (N, k_blocks, blob_size), 2-, 4- or 8-bit codes
  low bits first along K; scales (N, k_blocks); zero points packed like B (N, ceil(k_blocks *
  bits / 8)), unpacked floats (N, k_blocks), or absent (2^(bits-1)). The float matrix is
  (K, N), summed over K, like a MatMul's right operand.
* ``Cast`` of a float constant of another precision (bf16, fp16): pruned in its own dtype,
  where zeros are exact; the codec is the identity.

Encoding keeps zeros exact: an entry set to 0.0 gets its zero point as code, so it decodes to
exactly 0.0 whatever its scale; an entry equal to what its code decodes to keeps its code bit
for bit (magnitude and Wanda only zero entries); any other value (SparseGPT's reconstruction)
is quantized with the same scale and zero point: rounded half to even and clamped to the code
range. Scales and zero points are never changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx_ir as ir

from sparsec.graph import ConstantRef

# Integer codes DequantizeLinear reads that sparsec re-encodes, with their ranges.
CODE_RANGES: dict[ir.DataType, tuple[int, int]] = {
    ir.DataType.INT4: (-8, 7), ir.DataType.UINT4: (0, 15),
    ir.DataType.INT8: (-128, 127), ir.DataType.UINT8: (0, 255),
    ir.DataType.INT16: (-32768, 32767), ir.DataType.UINT16: (0, 65535),
}
NBITS = (2, 4, 8)  # MatMulNBits code widths


class Codec(Protocol):
    """Between a stored tensor and the float weight its readers see."""

    dtype: ir.DataType  # of the decoded weight

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]: ...

    def decode(self, stored: np.ndarray) -> np.ndarray: ...

    def encode(self, weight: np.ndarray, stored: np.ndarray) -> np.ndarray: ...


def requantize(weight: np.ndarray, decoded: np.ndarray, codes: np.ndarray, scale: np.ndarray,
               zero_point: np.ndarray, low: int, high: int) -> np.ndarray:
    """New integer codes for ``weight`` (all arguments broadcast to one shape, int64 result).

    0.0 -> the zero point; a value equal to its decoded value -> its old code; anything else
    -> round(weight / scale) + zero_point, clamped to [low, high] (a zero scale -> the zero point).
    """
    scale = np.asarray(scale, dtype=np.float32)
    zero_point = np.asarray(zero_point, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = np.rint(weight.astype(np.float32) / scale)
    fresh = np.where(scale == 0, 0, fresh)
    fresh = np.clip(fresh + zero_point, low, high).astype(np.int64)
    out = np.where(weight == decoded, codes.astype(np.int64), fresh)
    return np.where(weight == 0, zero_point, out)


def _dequantize(codes: np.ndarray, zero_point: np.ndarray, scale: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    diff = codes.astype(np.int32) - np.asarray(zero_point).astype(np.int32)
    return (diff.astype(np.float32) * np.asarray(scale, dtype=np.float32)).astype(dtype.numpy())


# --- DequantizeLinear -------------------------------------------------------------------------

@dataclass(frozen=True)
class QDQCodec:
    """``DequantizeLinear``: scale and zero point broadcast to the codes' full shape."""

    scale: np.ndarray  # float32, the shape of the codes (or broadcastable: per-tensor)
    zero_point: np.ndarray  # int64, as scale
    low: int
    high: int
    dtype: ir.DataType

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        return stored

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return _dequantize(stored, self.zero_point, self.scale, self.dtype)

    def encode(self, weight: np.ndarray, stored: np.ndarray) -> np.ndarray:
        codes = requantize(weight, self.decode(stored), stored, self.scale, self.zero_point, self.low, self.high)
        return codes.astype(stored.dtype)


def _expand(param: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray | str:
    """A scale or zero point broadcast to the codes' shape, or why its shape does not fit."""
    if param.size == 1:  # per-tensor (ORT also reads a one-element vector so)
        return param.reshape(())
    rank = len(shape)
    if not -rank <= axis < rank:
        return f"axis {axis} is out of range for codes of rank {rank}"
    axis %= rank
    if block_size <= 0:
        if param.ndim != 1 or param.shape[0] != shape[axis]:
            return f"per-axis parameter of shape {param.shape} does not fit codes {shape} on axis {axis}"
        view = [1] * rank
        view[axis] = shape[axis]
        return param.reshape(view)
    blocks = -(-shape[axis] // block_size)
    expected = tuple(blocks if a == axis else d for a, d in enumerate(shape))
    if param.shape != expected:
        return f"blocked parameter of shape {param.shape} does not fit codes {shape} (expected {expected})"
    return np.take(np.repeat(param, block_size, axis=axis), np.arange(shape[axis]), axis=axis)


def qdq_codec(shape: tuple[int, ...], code_type: ir.DataType, scale: np.ndarray, zero_point: np.ndarray | None,
              axis: int, block_size: int, dtype: ir.DataType) -> QDQCodec | str:
    """The codec of a ``DequantizeLinear`` node, or why sparsec cannot re-encode it."""
    if code_type not in CODE_RANGES:
        kinds = ", ".join(t.name.lower() for t in CODE_RANGES)
        return f"codes are {code_type.name.lower()}; sparsec re-encodes {kinds} only"
    if zero_point is not None and zero_point.shape != scale.shape:
        return f"zero point shape {zero_point.shape} differs from scale shape {scale.shape}"
    full_scale = _expand(scale.astype(np.float32), shape, axis, block_size)
    if isinstance(full_scale, str):
        return full_scale
    if zero_point is None:
        full_zero = np.zeros((), dtype=np.int64)
    else:
        full_zero = _expand(zero_point.astype(np.int64), shape, axis, block_size)
        assert not isinstance(full_zero, str)  # same shape as the scale, which fitted
    low, high = CODE_RANGES[code_type]
    return QDQCodec(full_scale, full_zero, low, high, dtype)


# --- MatMulNBits -----------------------------------------------------------------------------

def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes (..., B) -> codes (..., B * 8 / bits), low bits first."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`unpack_codes` (the last axis a multiple of 8 / bits)."""
    per = 8 // bits
    grouped = codes.astype(np.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    packed = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for j in range(per):
        packed |= (grouped[..., j] << np.uint8(bits * j)).astype(np.uint8)
    return packed


@dataclass(frozen=True)
class NBitsCodec:
    """``MatMulNBits``: B (N, k_blocks, blob_size) <-> the float (K, N) weight."""

    k: int
    n: int
    bits: int
    block_size: int
    scales: np.ndarray  # (N, k_blocks) float32
    zero_points: np.ndarray  # (N, k_blocks) int64
    dtype: ir.DataType
    _full: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        scale = np.repeat(self.scales, self.block_size, axis=1)
        zero = np.repeat(self.zero_points, self.block_size, axis=1)
        object.__setattr__(self, "_full", (scale, zero))

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        return (self.k, self.n)

    def _decode_codes(self, codes: np.ndarray) -> np.ndarray:
        scale, zero = self._full
        return _dequantize(codes, zero, scale, self.dtype)  # (N, k_blocks * block_size)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        codes = unpack_codes(stored, self.bits).reshape(self.n, -1)
        return np.ascontiguousarray(self._decode_codes(codes)[:, :self.k].T)

    def encode(self, weight: np.ndarray, stored: np.ndarray) -> np.ndarray:
        codes = unpack_codes(stored, self.bits).reshape(self.n, -1)
        scale, zero = self._full
        k = self.k  # the padding of the last block keeps its codes
        new = codes.astype(np.int64)
        new[:, :k] = requantize(weight.T, self._decode_codes(codes)[:, :k], codes[:, :k], scale[:, :k],
                                zero[:, :k], 0, (1 << self.bits) - 1)
        return pack_codes(new, self.bits).reshape(stored.shape)


def nbits_codec(k: int, n: int, bits: int, block_size: int, stored_shape: tuple[int, ...], scales: np.ndarray,
                zero_points: np.ndarray | None, dtype: ir.DataType) -> NBitsCodec | str:
    """The codec of a ``MatMulNBits`` node, or why sparsec cannot re-encode it."""
    if bits not in NBITS:
        return f"bits={bits}; MatMulNBits codes of {', '.join(map(str, NBITS))} bits are re-encoded"
    if block_size < 16 or block_size & (block_size - 1):
        return f"block_size={block_size} is not a power of two >= 16"
    blocks = -(-k // block_size)
    expected = (n, blocks, block_size * bits // 8)
    if tuple(stored_shape) != expected:
        return f"B has shape {tuple(stored_shape)}, expected {expected} (an omitted or prepacked projection)"
    if scales.size != n * blocks:
        return f"{scales.size} scales for {n} x {blocks} blocks"
    top = (1 << bits) - 1
    if zero_points is None:
        zeros = np.full((n, blocks), 1 << (bits - 1), dtype=np.int64)
    elif zero_points.dtype == np.uint8:
        width = -(-blocks * bits // 8)
        if zero_points.size != n * width:
            return f"{zero_points.size} packed zero-point bytes, expected {n} x {width}"
        zeros = unpack_codes(zero_points.reshape(n, width), bits)[:, :blocks].astype(np.int64)
    else:
        values = zero_points.astype(np.float64).reshape(-1)
        if values.size != n * blocks:
            return f"{values.size} zero points for {n} x {blocks} blocks"
        if not np.all((values == np.rint(values)) & (values >= 0) & (values <= top)):
            return f"float zero points that are not integers in [0, {top}]: no code decodes to exactly 0"
        zeros = values.astype(np.int64).reshape(n, blocks)
    return NBitsCodec(k, n, bits, block_size, scales.astype(np.float32).reshape(n, blocks), zeros, dtype)


# --- Cast ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CastCodec:
    """A float constant read through ``Cast``: pruned in its stored dtype (zeros are exact)."""

    dtype: ir.DataType

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        return stored

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return stored

    def encode(self, weight: np.ndarray, stored: np.ndarray) -> np.ndarray:
        return weight.astype(stored.dtype)


# --- the weight a linear site sees -----------------------------------------------------------

def decoding_key(node: ir.Node, skip: tuple[int, ...] = (0,)) -> tuple:
    """What two nodes decoding one stored tensor must share to see the same weight: op, the
    other inputs (scales, zero points: the same values) and the attributes."""
    inputs = tuple(v for i, v in enumerate(node.inputs) if i not in skip)
    attrs = tuple(sorted((name, repr(attr.value)) for name, attr in node.attributes.items()))
    return node.domain, node.op_type, inputs, attrs


class EncodedWeight:
    """A constant stored in another form than the float weight its readers multiply by.

    Same interface as :class:`~sparsec.graph.ConstantRef`: ``value``, ``name``, ``tensor`` and
    ``users`` are those of the stored constant; ``shape``, ``dtype`` and :meth:`numpy` are the
    decoded weight's; :meth:`replace` takes a decoded weight and stores its encoding.
    ``decoder`` is the node between the stored constant and the readers (DequantizeLinear,
    Cast), or None where the reader decodes it (MatMulNBits); ``key`` says which decoding
    (:func:`decoding_key`).
    """

    def __init__(self, stored: ConstantRef, codec: Codec, decoder: ir.Node | None, key: tuple, form: str) -> None:
        self.stored = stored
        self.codec = codec
        self.decoder = decoder
        self.key = key
        self.form = form  # "qdq", "nbits", "cast": for records and messages

    @property
    def value(self) -> ir.Value:
        return self.stored.value

    @property
    def name(self) -> str:
        return self.stored.name

    @property
    def constant_node(self) -> ir.Node | None:
        return self.stored.constant_node

    @property
    def packed(self) -> ir.Node | None:
        return self.stored.packed

    @property
    def tensor(self) -> ir.TensorProtocol:
        return self.stored.tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codec.shape(self.stored.shape))

    @property
    def dtype(self) -> ir.DataType:
        return self.codec.dtype

    def numpy(self) -> np.ndarray:
        return self.codec.decode(self.stored.numpy())

    def encode(self, array: np.ndarray) -> np.ndarray:
        """The stored form of a decoded weight ``array`` (keeping zeros exact, see module doc)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"{self.name}: shape {array.shape} != {self.shape}")
        return self.codec.encode(array, self.stored.numpy())

    def replace(self, array: np.ndarray, **metadata: str) -> None:
        self.stored.replace(self.encode(array), **metadata)

    @property
    def users(self) -> list[tuple[ir.Node, int]]:
        return self.stored.users

    @property
    def readers(self) -> list[ir.Node]:
        """The nodes that read the decoded weight: behind every decoder of the same decoding, and
        every other reader of the stored constant as it is."""
        if self.decoder is None:
            return [node for node, _ in self.stored.users]
        out: list[ir.Node] = []
        for node, index in self.stored.users:
            if index == 0 and decoding_key(node) == self.key:
                out.extend(use.node for use in node.outputs[0].uses())
            else:
                out.append(node)
        return out
