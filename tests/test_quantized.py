"""Pruning through quantization: QDQ, MatMulNBits and Cast weights, zeros exact after decoding.

Every reference here is computed in numpy from the ONNX / contrib-op definitions, independently
of sparsec.passes.quantized: dequantization, MatMulNBits unpacking and N:M masks.
"""

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from sparsec.data import Calibration
from sparsec.model_io import load_model, save_model
from sparsec.passes import quantized
from sparsec.passes.patterns import Code
from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
from sparsec.runtime.session import create_session, run
from sparsec.sparsity import BlockLayout, NMLayout, UnstructuredLayout, is_nm, nm_mask
from tests.test_prune_methods import correlated_inputs

FLOAT = TensorProto.FLOAT
CODES = {  # code type: (numpy dtype, low, high)
    "int8": (np.int8, -128, 127), "uint8": (np.uint8, 0, 255), "int4": (ml_dtypes.int4, -8, 7),
    "uint4": (ml_dtypes.uint4, 0, 15), "int16": (np.int16, -32768, 32767), "uint16": (np.uint16, 0, 65535),
}
BLOCK = 16


def tensor(array, name):
    return ir.serde.serialize_tensor(ir.Tensor(np.asarray(array), name=name))


def graph_model(nodes, k, n, inits, *, opset=21, ms=False, x_type=FLOAT):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", x_type, ["B", k])],
                              [helper.make_tensor_value_info("Y", x_type, ["B", n])], inits)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def qdq_params(code, mode, shape, *, zero_point=True, seed=0):
    """Random codes (none equal to their zero point: no weight starts at zero), scale and zero
    point for a per-tensor, per-axis (axis 1) or blocked (axis 0, BLOCK rows) quantization."""
    dtype, low, high = CODES[code]
    rng = np.random.default_rng(seed)
    k, n = shape
    param_shape, attrs = {"tensor": ((), {}), "axis": ((n,), {"axis": 1}),
                          "blocked": ((k // BLOCK, n), {"axis": 0, "block_size": BLOCK})}[mode]
    span = high - low
    zp = rng.integers(low + span // 4, high - span // 4, param_shape) if zero_point else np.zeros(param_shape, int)
    scale = (rng.random(param_shape) * 0.05 + 0.01).astype(np.float32)
    q = rng.integers(low, high + 1, shape)
    full_zp = expand(zp, shape, attrs)
    q = np.where(q == full_zp, np.where(q < high, q + 1, q - 1), q)
    return q, scale, zp, attrs


def expand(param, shape, attrs):
    """A scale or zero point broadcast to the codes (the DequantizeLinear definition)."""
    param = np.asarray(param)
    if param.ndim == 0:
        return np.broadcast_to(param, shape)
    if "block_size" in attrs:
        return np.repeat(param, attrs["block_size"], axis=attrs["axis"])
    view = [1] * len(shape)
    view[attrs["axis"]] = -1
    return np.broadcast_to(param.reshape(view), shape)


def dequantize(q, scale, zp, attrs):
    return ((q.astype(np.int64) - expand(zp, q.shape, attrs)).astype(np.float32)
            * expand(scale, q.shape, attrs).astype(np.float32))


def qdq_model(code, mode, *, k=64, n=32, zero_point=True, seed=0):
    """X (B, K) -> MatMul(X, DequantizeLinear(q, scale[, zp])) -> Relu -> Y."""
    dtype = CODES[code][0]
    q, scale, zp, attrs = qdq_params(code, mode, (k, n), zero_point=zero_point, seed=seed)
    inputs = ["q", "s", "z"] if zero_point else ["q", "s"]
    nodes = [helper.make_node("DequantizeLinear", inputs, ["W"], name="dq", **attrs),
             helper.make_node("MatMul", ["X", "W"], ["H"], name="lin"), helper.make_node("Relu", ["H"], ["Y"], name="act")]
    inits = [tensor(q.astype(dtype), "q"), tensor(scale, "s")] + ([tensor(zp.astype(dtype), "z")] if zero_point else [])
    return graph_model(nodes, k, n, inits), (q, scale, zp, attrs)


def prune(proto, spec, calibration=None):
    model = ir.serde.deserialize_model(proto)
    (record,) = run_passes(model, parse_pass_specs(spec), PassContext(calibration=calibration))
    return model, record


def stored(model, name):
    return model.graph.initializers[name].const_value.numpy()


def ort_outputs(model, path, x):
    save_model(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    # No graph optimizations: at ORT_ENABLE_ALL ORT fuses DequantizeLinear -> MatMul into
    # MatMulNBits, which quantizes X to int8 (0.5% off here); the reference is the plain graph.
    return run(create_session(path, optimize=False), {"X": x})["Y"]


# --- QDQ ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["tensor", "axis", "blocked"])
@pytest.mark.parametrize("code", list(CODES))
def test_qdq_2_4_exact_zeros_and_kept_codes_bit_identical(tmp_path, code, mode):
    proto, (q, scale, zp, attrs) = qdq_model(code, mode)
    model, record = prune(proto, "nm:min_params=0")
    assert [s.action for s in record.sites] == ["changed"] and record.changed[0].details["stored"] == "qdq"
    new_q = stored(model, "q").astype(np.int64)
    assert stored(model, "q").dtype == CODES[code][0]
    w, new_w = dequantize(q, scale, zp, attrs), dequantize(new_q, scale, zp, attrs)
    # The mask is magnitude 2:4 of the dequantized weight along K (axis 0), not of the codes.
    keep = nm_mask(np.abs(w), 2, 4, axis=0)
    np.testing.assert_array_equal(new_q[~keep], expand(zp, q.shape, attrs)[~keep])  # pruned: the zero point
    np.testing.assert_array_equal(new_q[keep], q[keep])  # kept: the same codes
    assert is_nm(new_w, 2, 4, axis=0) and np.count_nonzero(new_w) == w.size // 2
    assert np.all(new_w[~keep] == 0)
    np.testing.assert_array_equal(stored(model, "s"), scale)  # scale and zero point untouched
    if "z" in model.graph.initializers:
        np.testing.assert_array_equal(stored(model, "z").astype(np.int64), zp)
    x = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    y = ort_outputs(model, tmp_path / "out.onnx", x)
    np.testing.assert_allclose(y, np.maximum(x @ new_w, 0), rtol=1e-5, atol=1e-5)


def test_asymmetric_uint8_pruned_codes_are_the_zero_point_not_zero(tmp_path):
    """uint8 with zero point 131: a pruned weight is code 131 (decodes to 0.0); code 0 would
    decode to -131 * scale."""
    k, n = 64, 32
    q = np.random.default_rng(3).integers(0, 256, (k, n))
    q[q == 131] = 130
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["W"], name="dq"),
             helper.make_node("MatMul", ["X", "W"], ["H"], name="lin"), helper.make_node("Relu", ["H"], ["Y"], name="act")]
    proto = graph_model(nodes, k, n, [tensor(q.astype(np.uint8), "q"), tensor(np.float32(0.02), "s"),
                                      tensor(np.uint8(131), "z")], opset=13)
    model, _ = prune(proto, "nm:min_params=0")
    new_q = stored(model, "q")
    pruned = new_q != q
    assert pruned.sum() == q.size // 2 and np.all(new_q[pruned] == 131)
    w = (new_q.astype(np.float32) - 131) * np.float32(0.02)
    assert is_nm(w, 2, 4, axis=0)
    x = np.random.default_rng(8).standard_normal((2, k)).astype(np.float32)
    np.testing.assert_allclose(ort_outputs(model, tmp_path / "o.onnx", x), np.maximum(x @ w, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,layout", [
    ("nm:min_params=0", NMLayout(2, 4)),
    ("unstructured:sparsity=0.6,min_params=0", UnstructuredLayout(0.6)),
    ("block:rows=4,cols=4,sparsity=0.5,min_params=0", BlockLayout(4, 4, 0.5)),
])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_pass_and_method_on_a_qdq_weight(tmp_path, spec, layout, method):
    proto, (q, scale, zp, attrs) = qdq_model("int8", "axis", k=64, n=32)
    x = correlated_inputs(tokens=256, k=64)
    calib = Calibration([{"X": x[:128]}, {"X": x[128:]}], "test") if method != "magnitude" else None
    model, record = prune(proto, f"{spec},method={method}", calib)
    assert len(record.changed) == 1
    new_q = stored(model, "q").astype(np.int64)
    full_zp = expand(zp, q.shape, attrs)
    w, new_w = dequantize(q, scale, zp, attrs), dequantize(new_q, scale, zp, attrs)
    assert layout.complies(new_w.T)  # canonical (N, K), after dequantization
    pruned = new_w == 0
    np.testing.assert_array_equal(new_q[pruned], full_zp[pruned])
    assert record.changed[0].sparsity_after == pytest.approx(pruned.mean())
    if method == "sparsegpt":  # kept values reconstructed, then quantized with the same scale
        assert np.any(new_q[~pruned] != q[~pruned]) and new_q.min() >= -128 and new_q.max() <= 127
        err = {name: np.linalg.norm(x @ w - x @ cand) for name, cand in
               (("sparsegpt", new_w), ("magnitude", np.where(nm_or_mask(layout, w), w, 0)))}
        assert err["sparsegpt"] < err["magnitude"]
    else:
        np.testing.assert_array_equal(new_q[~pruned], q[~pruned])
    run(create_session(save_model(model, tmp_path / "o.onnx"), optimize=False), {"X": x[:2]})


def nm_or_mask(layout, w):
    """The magnitude keep-mask of ``layout`` for a (K, N) weight."""
    return layout.mask(np.abs(w.T), per_row=False).T


def test_qdq_idempotent_and_already_sparse_is_bit_identical(tmp_path):
    proto, _ = qdq_model("uint8", "axis")
    model, _ = prune(proto, "nm:min_params=0")
    first = save_model(model, tmp_path / "first.onnx")
    again = load_model(first).model
    (record,) = run_passes(again, parse_pass_specs("nm:min_params=0"), PassContext())
    assert record.skip_counts() == {Code.ALREADY_SPARSE: 1}
    assert save_model(again, tmp_path / "second.onnx").read_bytes() == first.read_bytes()


def test_conv_and_gemm_behind_dequantize_linear(tmp_path):
    """Conv weights are quantized per output channel (axis 0); 2:4 runs along input channels."""
    q = np.random.default_rng(5).integers(-127, 128, (8, 16, 3, 3))
    q[q == 0] = 1
    scale = np.linspace(0.01, 0.05, 8).astype(np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["W"], axis=0, name="dq"),
             helper.make_node("Conv", ["X", "W"], ["Y"], pads=[1, 1, 1, 1], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", FLOAT, [1, 16, 6, 6])],
                              [helper.make_tensor_value_info("Y", FLOAT, [1, 8, 6, 6])],
                              [tensor(q.astype(np.int8), "q"), tensor(scale, "s")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 10
    model, record = prune(proto, "nm:min_params=0,keep_output_layers=false")
    assert record.changed[0].details["reduce_axis"] == 1
    new_q = stored(model, "q")
    assert is_nm(new_q.astype(np.float32) * scale[:, None, None, None], 2, 4, axis=1)
    assert np.count_nonzero(new_q) == q.size // 2


# --- shared codes ------------------------------------------------------------------------------

def shared_qdq(second_scale="s"):
    q, scale, _, _ = qdq_params("int8", "tensor", (64, 64), zero_point=False)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["W1"], name="dq1"),
             helper.make_node("DequantizeLinear", ["q", second_scale], ["W2"], name="dq2"),
             helper.make_node("MatMul", ["X", "W1"], ["A"], name="lin1"),
             helper.make_node("MatMul", ["A", "W2"], ["H"], name="lin2"), helper.make_node("Relu", ["H"], ["Y"], name="act")]
    inits = [tensor(q.astype(np.int8), "q"), tensor(scale, "s"), tensor(np.float32(0.5), "s2")]
    return graph_model(nodes, 64, 64, inits)


def test_codes_shared_by_two_dequantize_nodes():
    model, record = prune(shared_qdq(), "nm:min_params=0")
    assert len(record.changed) == 1 and record.changed[0].details["readers"] == ["lin1", "lin2"]
    assert is_nm(stored(model, "q"), 2, 4, axis=0)
    _, record = prune(shared_qdq("s2"), "nm:min_params=0")  # another scale: another weight
    assert record.skip_counts() == {Code.SHARED_WEIGHT: 2}
    x = np.ones((4, 64), np.float32)
    calib = Calibration([{"X": x}], "test")
    _, record = prune(shared_qdq(), "nm:min_params=0,method=wanda", calib)
    assert record.skip_counts() == {Code.SHARED_WEIGHT: 2}


# --- MatMulNBits -------------------------------------------------------------------------------

def nbits_model(k, n, *, bits=4, block=16, zero_points="packed", seed=0, g_idx=False):
    """X (B, K) -> MatMulNBits -> Relu; returns the model and the (N, k_blocks * block) codes,
    (N, k_blocks) scales and zero points, packed as the com.microsoft schema says."""
    rng = np.random.default_rng(seed)
    blocks, per = -(-k // block), 8 // bits
    codes = rng.integers(0, 2 ** bits, (n, blocks * block))
    zp = rng.integers(2, 2 ** bits - 2, (n, blocks)) if zero_points else np.full((n, blocks), 2 ** (bits - 1))
    full_zp = np.repeat(zp, block, axis=1)
    codes = np.where(codes == full_zp, codes + 1, codes)
    scales = (rng.random((n, blocks)) * 0.05 + 0.01).astype(np.float32)
    packed = sum((codes.reshape(n, blocks, -1, per)[..., j] << (bits * j)) for j in range(per)).astype(np.uint8)
    inits = [tensor(packed, "B"), tensor(scales, "S")]
    inputs = ["X", "B", "S"]
    if zero_points == "packed":
        width = -(-blocks * bits // 8)
        padded = np.zeros((n, width * per), np.int64)
        padded[:, :blocks] = zp
        zbytes = sum((padded.reshape(n, width, per)[..., j] << (bits * j)) for j in range(per)).astype(np.uint8)
        inits.append(tensor(zbytes, "Z"))
        inputs.append("Z")
    elif zero_points == "float":
        inits.append(tensor(zp.astype(np.float32), "Z"))
        inputs.append("Z")
    if g_idx:
        inits.append(tensor((np.arange(k) // block).astype(np.int32), "G"))
        inputs += ["", "G"] if zero_points is None else ["G"]
    node = helper.make_node("MatMulNBits", inputs, ["H"], domain="com.microsoft", name="lin",
                            K=k, N=n, bits=bits, block_size=block)
    model = graph_model([node, helper.make_node("Relu", ["H"], ["Y"], name="act")], k, n, inits, ms=True)
    return model, codes, scales, zp


def nbits_codes(packed, bits, n):
    per = 8 // bits
    return np.stack([(packed >> (bits * j)) & (2 ** bits - 1) for j in range(per)], axis=-1).reshape(n, -1)


def nbits_weight(codes, scales, zp, k, block):
    """The (K, N) float weight: (code - zero point) * scale per block along K."""
    w = (codes - np.repeat(zp, block, axis=1)).astype(np.float32) * np.repeat(scales, block, axis=1)
    return w[:, :k].T


@pytest.mark.parametrize("k,bits,block,zero_points", [
    (64, 4, 16, "packed"), (64, 4, 16, None), (80, 4, 32, "packed"), (72, 4, 16, "float"),
    (64, 8, 16, "packed"), (64, 2, 16, None),
])
def test_matmulnbits_2_4_zeros_are_block_zero_points(tmp_path, k, bits, block, zero_points):
    n = 24
    proto, codes, scales, zp = nbits_model(k, n, bits=bits, block=block, zero_points=zero_points)
    model, record = prune(proto, "nm:min_params=0")
    assert [s.action for s in record.sites] == ["changed"] and record.changed[0].shape == (k, n)
    new_codes = nbits_codes(stored(model, "B"), bits, n).astype(np.int64)
    w, new_w = nbits_weight(codes, scales, zp, k, block), nbits_weight(new_codes, scales, zp, k, block)
    keep = nm_mask(np.abs(w), 2, 4, axis=0).T  # (N, K), as the codes
    full_zp = np.repeat(zp, block, axis=1)[:, :k]
    np.testing.assert_array_equal(new_codes[:, :k][~keep], full_zp[~keep])
    np.testing.assert_array_equal(new_codes[:, :k][keep], codes[:, :k][keep])
    np.testing.assert_array_equal(new_codes[:, k:], codes[:, k:])  # the last block's padding
    assert is_nm(new_w, 2, 4, axis=0) and np.count_nonzero(new_w) == w.size // 2
    np.testing.assert_array_equal(stored(model, "S"), scales)
    x = np.random.default_rng(9).standard_normal((3, k)).astype(np.float32)
    y = ort_outputs(model, tmp_path / "o.onnx", x)
    ref = np.maximum(x @ new_w, 0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_matmulnbits_wanda_through_the_staged_runner():
    proto, codes, scales, zp = nbits_model(64, 32)
    x = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    model, record = prune(proto, "nm:min_params=0,method=wanda", Calibration([{"X": x}], "test"))
    new_w = nbits_weight(nbits_codes(stored(model, "B"), 4, 32).astype(np.int64), scales, zp, 64, 16)
    w = nbits_weight(codes, scales, zp, 64, 16)
    keep = nm_mask(np.abs(w) * np.linalg.norm(x, axis=0)[:, None], 2, 4, axis=0)
    np.testing.assert_array_equal(new_w != 0, keep)


def test_matmulnbits_skips():
    proto, *_ = nbits_model(64, 32, zero_points="float")
    z = next(i for i in proto.graph.initializer if i.name == "Z")
    z.CopyFrom(tensor(onnx.numpy_helper.to_array(z) + np.float32(0.5), "Z"))  # no code decodes to 0
    _, record = prune(proto, "nm:min_params=0")
    assert record.skip_counts() == {Code.QUANTIZED: 1} and "not integers" in record.sites[0].message
    proto, *_ = nbits_model(64, 32, g_idx=True)
    _, record = prune(proto, "nm:min_params=0")
    assert record.skip_counts() == {Code.QUANTIZED: 1} and "g_idx" in record.sites[0].message
    proto, *_ = nbits_model(64, 32)
    helper_attr = helper.make_attribute("weight_prepacked", 1)
    proto.graph.node[0].attribute.append(helper_attr)
    _, record = prune(proto, "nm:min_params=0")
    assert record.skip_counts() == {Code.QUANTIZED: 1} and "prepacked" in record.sites[0].message


# --- Cast --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_weight_cast_to_float_is_pruned_in_its_stored_dtype(tmp_path, dtype):
    w = np.random.default_rng(6).standard_normal((64, 32)).astype(dtype)
    nodes = [helper.make_node("Cast", ["W16"], ["W"], to=FLOAT, name="cast"),
             helper.make_node("MatMul", ["X", "W"], ["H"], name="lin"), helper.make_node("Relu", ["H"], ["Y"], name="act")]
    model, record = prune(graph_model(nodes, 64, 32, [tensor(w, "W16")]), "nm:min_params=0")
    assert record.changed[0].details["stored"] == "cast"
    new = stored(model, "W16")
    assert new.dtype == dtype
    keep = nm_mask(np.abs(w.astype(np.float32)), 2, 4, axis=0)
    bits = np.uint16
    np.testing.assert_array_equal(new.view(bits)[keep], w.view(bits)[keep])  # kept: bit-identical
    assert np.all(new[~keep].astype(np.float32) == 0) and is_nm(new.astype(np.float32), 2, 4, axis=0)
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(ort_outputs(model, tmp_path / "o.onnx", x),
                               np.maximum(x @ new.astype(np.float32), 0), rtol=1e-5, atol=1e-5)


def test_integer_weight_cast_to_float_is_not_pruned():
    nodes = [helper.make_node("Cast", ["Wi"], ["W"], to=FLOAT, name="cast"),
             helper.make_node("MatMul", ["X", "W"], ["H"], name="lin"), helper.make_node("Relu", ["H"], ["Y"], name="act")]
    proto = graph_model(nodes, 64, 32, [tensor(np.ones((64, 32), np.int32), "Wi")])
    _, record = prune(proto, "nm:min_params=0")
    assert record.skip_counts() == {Code.DTYPE_UNSUPPORTED: 1}


# --- the postcondition and analysis ------------------------------------------------------------

def test_a_re_encoding_that_breaks_the_layout_is_a_pass_error(monkeypatch):
    from sparsec.errors import PassError

    proto, _ = qdq_model("int8", "tensor")
    monkeypatch.setattr(quantized.QDQCodec, "encode", lambda self, weight, stored: stored)
    with pytest.raises(PassError, match="'q' \\(qdq\\) is not 2:4 after re-encoding"):
        prune(proto, "nm:min_params=0")


def test_analysis_measures_quantized_weights_after_dequantization():
    from sparsec.analyze import analyze, summarize_sparsity

    proto, _ = qdq_model("uint8", "blocked")
    model, _ = prune(proto, "nm:min_params=0")
    (info,) = [w for w in analyze(model).weights if w.op]
    assert info.name == "q" and info.dtype == "UINT8" and info.nm == ["2:4", "4:8", "8:16"]
    assert info.zeros == 0.5 and np.mean(stored(model, "q") == 0) < 0.01  # zero codes are not zeros
    assert summarize_sparsity(analyze(model).weights)["linear_zero_fraction"] == 0.5


def test_int4_codes_spilled_to_disk_are_packed_two_per_byte(tmp_path, monkeypatch):
    """The streamed compile path writes rewritten weights to a spill file: int4 codes must be
    packed there as in the in-memory path (numpy holds them one per byte)."""
    from sparsec import compiler
    from tests.helpers import save

    proto, (q, scale, zp, attrs) = qdq_model("int4", "blocked", k=128, n=64)
    src = save(proto, tmp_path / "src.onnx", external=True)
    results = {}
    for mode in ("memory", "streamed"):
        if mode == "streamed":
            monkeypatch.setattr(compiler, "STREAM_BYTES", 0)
            monkeypatch.setattr("sparsec.graph.SPILL_MIN_BYTES", 1)
        (tmp_path / mode).mkdir()
        results[mode] = compiler.compile(src, passes="nm:min_params=0", output=tmp_path / mode / "m.onnx",
                                         best_effort=True)
    assert any("compiled streamed" in n for n in results["streamed"].notes)
    for name in ("m.onnx", "m.onnx.data"):
        assert (tmp_path / "memory" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes()
    new_q = load_model(tmp_path / "streamed" / "m.onnx").model.graph.initializers["q"].const_value.numpy()
    assert new_q.dtype == ml_dtypes.int4 and is_nm(dequantize(new_q, scale, zp, attrs), 2, 4, axis=0)


# --- a real model, quantized by ONNX Runtime's own tooling -------------------------------------

@pytest.fixture(scope="module")
def qdq_minilm(zoo_path, tmp_path_factory):
    """MiniLM through onnxruntime.quantization.quantize_static: QDQ, int8 weights per output
    channel (axis 1), uint8 activations calibrated on 16 sentences of the calibration half."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from sparsec.models.bert import calibration_inputs

    feeds, _ = calibration_inputs(16, 64)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.sets = iter(feeds)

        def get_next(self):
            return next(self.sets, None)

    path = tmp_path_factory.mktemp("qdq-minilm") / "model.onnx"
    quantize_static(str(zoo_path("minilm")), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, op_types_to_quantize=["MatMul"],
                    use_external_data_format=True)
    return path


def dequantized_weights(path):
    """{MatMul name: (dequantized weight, scale, zero point)} for every MatMul reading a constant
    through DequantizeLinear, from the ONNX file (numpy, the DequantizeLinear definition)."""
    model = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        dq = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        q, scale, zp = (inits[name] for name in dq.input)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        assert q.ndim == 2 and axis == 1 and scale.shape == (q.shape[1],)
        out[node.name] = ((q.astype(np.int64) - zp).astype(np.float32) * scale, scale, zp)
    return out


def test_qdq_minilm_pruned_to_exact_2_4_through_the_cli(qdq_minilm, tmp_path, capsys):
    import json

    from sparsec.cli import main

    out = tmp_path / "minilm.qdq.2_4.onnx"
    code = main(["compile", str(qdq_minilm), "--passes", "nm", "--best-effort", "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.with_name("minilm.qdq.2_4.report.json").read_text())
    (record,) = report["records"]
    assert record["changed"] == 36 and record["skipped"] == {"NOT_CONSTANT": 12}  # Q.K^T and P.V read activations
    assert report["sparsity_after"]["nm_compliant"]["2:4"] == 36  # analysed after dequantization
    before, after = dequantized_weights(qdq_minilm), dequantized_weights(out)
    assert len(after) == 36 and after.keys() == before.keys()
    for name, (w, scale, zp) in after.items():
        assert is_nm(w, 2, 4, axis=0), name  # K is axis 0 of a MatMul's right operand
        assert np.count_nonzero(w) <= w.size // 2
        np.testing.assert_array_equal(scale, before[name][1])
        np.testing.assert_array_equal(zp, before[name][2])
    cosine = report["verification"]["real"]["metrics"]["embedding_cosine_mean"]
    assert 0.5 < cosine < 1 and f"embedding_cosine_mean | {cosine:.6f}" in printed
