"""compress: values + bit mask, rebuilt bit-exactly by a subgraph ORT constant-folds."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from sparsec.model_io import load_model, save_model
from sparsec.passes import patterns
from sparsec.passes.compress import pack, unpack
from sparsec.passes.patterns import Code
from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
from sparsec.sparsity import is_nm
from tests.helpers import linear, run_ort, weights


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("zeros", [0.0, 0.5, 0.9, 1.0])
def test_pack_unpack_roundtrip(dtype, zeros):
    w = weights(13, 7, dtype=dtype)
    w[np.random.default_rng(1).random(w.shape) < zeros] = 0
    values, mask = pack(w)
    padded = np.concatenate([np.zeros(1, dtype), values])
    out = unpack(padded, mask, w.shape)
    assert out.dtype == dtype and out.tobytes() == w.tobytes()


def compressed(tmp_path, proto, spec="nm:min_params=0;compress"):
    pruned = ir.serde.deserialize_model(proto)
    run_passes(pruned, parse_pass_specs(spec.split(";")[0]), PassContext())
    dense_path = save_model(pruned, tmp_path / "pruned.onnx", external_data=True)
    model = load_model(dense_path).model
    records = run_passes(model, parse_pass_specs("compress"), PassContext())
    out = save_model(model, tmp_path / "packed.onnx", external_data=True)
    onnx.checker.check_model(str(out), full_check=True)
    return dense_path, out, records[0]


def test_2_4_fp32_file_shrinks_and_outputs_are_bit_identical(tmp_path):
    dense, packed, record = compressed(tmp_path, linear(k=512, n=256))
    assert len(record.changed) == 1
    ratio = (tmp_path / "packed.onnx.data").stat().st_size / (tmp_path / "pruned.onnx.data").stat().st_size
    assert ratio <= 0.62 and ratio == pytest.approx(0.53125, abs=0.001)
    x = weights(4, 512)
    assert run_ort(packed, {"X": x})[0].tobytes() == run_ort(dense, {"X": x})[0].tobytes()
    # inspect still reads the weight through the rebuild subgraph
    w = load_model(packed).model
    site = patterns.match_linear_weight(next(n for n in w.graph if n.op_type == "MatMul"))
    assert site.weight.packed is not None and is_nm(site.weight.numpy(), 2, 4, 0)


def test_90_percent_unstructured_is_under_20_percent(tmp_path):
    _, packed, record = compressed(tmp_path, linear(k=512, n=256), "unstructured:sparsity=0.9,min_params=0")
    ratio = record.changed[0].details["bytes_after"] / record.changed[0].details["bytes_before"]
    assert ratio <= 0.20


def test_ort_folds_the_rebuild_subgraph(tmp_path):
    import onnxruntime as ort

    _, packed, _ = compressed(tmp_path, linear(k=128, n=64))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(packed), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert not ops & {"CumSum", "Gather", "BitShift", "Mod"}


def test_pruning_a_compressed_weight_is_refused_and_compress_is_idempotent(tmp_path):
    _, packed, _ = compressed(tmp_path, linear(k=128, n=64))
    model = load_model(packed).model
    (record,) = run_passes(model, parse_pass_specs("nm:min_params=0"), PassContext())
    assert record.skip_counts() == {Code.COMPRESSED: 1}
    (record,) = run_passes(model, parse_pass_specs("compress"), PassContext())
    assert not record.changed


def test_skips(tmp_path):
    proto = linear(k=128, n=64)
    w = onnx.numpy_helper.to_array(proto.graph.initializer[0]).copy()
    w[:4] = 0  # 3% zeros
    proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "W"))
    (record,) = run_passes(ir.serde.deserialize_model(proto), parse_pass_specs("compress"), PassContext())
    assert record.skip_counts() == {Code.TOO_DENSE: 1}
    old = linear(k=128, n=64)
    old.opset_import[0].version = 10
    model = ir.serde.deserialize_model(old)
    run_passes(model, parse_pass_specs("nm:min_params=0"), PassContext())
    (record,) = run_passes(model, parse_pass_specs("compress"), PassContext())
    assert record.skip_counts() == {Code.OPSET_TOO_OLD: 1}


def test_compile_minilm_compressed_is_exact_against_pruned(zoo_path, tmp_path):
    from sparsec.compiler import compile

    pruned = compile(zoo_path("minilm"), passes="nm", output=tmp_path / "p.onnx", best_effort=True).output
    packed = compile(pruned, passes="compress", output=tmp_path / "c.onnx")
    assert packed.plan.exact and packed.verdicts["random"].passed
    assert all(o.max_abs == 0 for o in packed.verdicts["real"].outputs)
    assert packed.sizes["output_bytes"] < 0.8 * packed.sizes["input_bytes"]


# --- quantized codes: the fill is the zero point -------------------------------------------------

def _qdq_pruned(tmp_path, code, mode, spec="nm:min_params=0"):
    from tests.test_quantized import qdq_model

    proto, (q, scale, zp, attrs) = qdq_model(code, mode, k=128, n=64)
    model = ir.serde.deserialize_model(proto)
    run_passes(model, parse_pass_specs(spec), PassContext())
    return save_model(model, tmp_path / "pruned.onnx", external_data=True), zp


@pytest.mark.parametrize("code,mode", [("uint8", "tensor"), ("int8", "tensor"), ("int8", "axis-symmetric")])
def test_quantized_codes_pack_around_their_zero_point(tmp_path, code, mode):
    from tests.test_quantized import qdq_model

    if mode == "axis-symmetric":  # ORT's default for weights: int8 per channel, every zero point 0
        proto, _ = qdq_model(code, "axis", k=128, n=64, zero_point=False)
        model = ir.serde.deserialize_model(proto)
        run_passes(model, parse_pass_specs("nm:min_params=0"), PassContext())
        pruned, zp = save_model(model, tmp_path / "pruned.onnx", external_data=True), 0
    else:
        pruned, zp = _qdq_pruned(tmp_path, code, mode)
    model = load_model(pruned).model
    codes = model.graph.initializers["q"].const_value.numpy()
    assert int(zp) != 0 or mode != "tensor" or code == "int8"
    (record,) = run_passes(model, parse_pass_specs("compress"), PassContext())
    (site,) = record.changed
    assert site.details["bytes_after"] == (codes != zp).sum() + codes.size // 8  # the fill is not stored
    assert site.sparsity_before == pytest.approx(0.5)
    packed = save_model(model, tmp_path / "packed.onnx", external_data=True)
    onnx.checker.check_model(str(packed), full_check=True)
    x = weights(4, 128)
    assert run_ort(packed, {"X": x})[0].tobytes() == run_ort(pruned, {"X": x})[0].tobytes()
    # the codes behind the rebuild are the pruned ones, bit for bit (inspect / analyze read them)
    site = patterns.match_linear_weight(next(n for n in load_model(packed).model.graph if n.op_type == "MatMul"))
    assert site.weight.packed is not None and is_nm(site.weight.numpy(), 2, 4, 0)


def test_codes_with_zero_points_that_vary_per_channel_are_left(tmp_path):
    pruned, zp = _qdq_pruned(tmp_path, "uint8", "axis")
    assert len(np.unique(zp)) > 1
    (record,) = run_passes(load_model(pruned).model, parse_pass_specs("compress"), PassContext())
    assert record.skip_counts() == {Code.ZERO_POINTS_VARY: 1} and not record.changed


def test_ort_int8_dynamic_weights_are_packed_and_folded(tmp_path):
    """quantize_dynamic's MatMulInteger weights: packed, rebuilt by constant folding, bit-exact."""
    import onnxruntime as ort

    proto = linear(k=256, n=128)
    model = ir.serde.deserialize_model(proto)
    run_passes(model, parse_pass_specs("nm:min_params=0;quantize:mode=dynamic"), PassContext())
    quantized = save_model(model, tmp_path / "q.onnx", external_data=True)
    model = load_model(quantized).model
    (record,) = run_passes(model, parse_pass_specs("compress"), PassContext())
    assert len(record.changed) == 1 and record.changed[0].sparsity_before >= 0.5
    packed = save_model(model, tmp_path / "packed.onnx", external_data=True)
    x = weights(8, 256)
    assert run_ort(packed, {"X": x})[0].tobytes() == run_ort(quantized, {"X": x})[0].tobytes()
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(packed), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"} and not ops & {"CumSum", "Gather", "BitShift", "Mod"}
