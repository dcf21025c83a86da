"""The shared matchers: one positive case per op layout, one negative case per failure code."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from sparsec.passes import patterns
from sparsec.passes.patterns import Code
from tests.helpers import FLOAT, linear, make_model, weights


def _node(model_proto, name="lin"):
    model = ir.serde.deserialize_model(model_proto)
    return next(n for n in model.graph if n.name == name)


def _feeds_output(model_proto):
    model = ir.serde.deserialize_model(model_proto)
    return patterns.feeds_graph_output(next(n for n in model.graph if n.name == "lin"), model)


@pytest.mark.parametrize("op,attrs,reduce_axis", [
    ("MatMul", {}, 0),
    ("Gemm", {}, 0),
    ("Gemm", {"transB": 1}, 1),
])
def test_linear_weight_axes(op, attrs, reduce_axis):
    site = patterns.match_linear_weight(_node(linear(op, 64, 32, **attrs)))
    assert site, site
    assert site.reduce_axis == reduce_axis
    assert site.out_axis == 1 - reduce_axis
    assert site.weight.name == "W"


def test_matmul_weight_on_the_left_reduces_over_its_last_axis():
    nodes = [helper.make_node("MatMul", ["W", "X"], ["Y"], name="lin")]
    m = make_model(nodes, [("X", FLOAT, [64, "B"])], [("Y", FLOAT, [32, "B"])], {"W": weights(32, 64)})
    site = patterns.match_linear_weight(_node(m))
    assert site and site.input_index == 0 and site.reduce_axis == 1


def test_gemm_weight_as_a():
    nodes = [helper.make_node("Gemm", ["W", "X"], ["Y"], name="lin", transA=1)]
    m = make_model(nodes, [("X", FLOAT, [64, 8])], [("Y", FLOAT, [32, 8])], {"W": weights(64, 32)})
    site = patterns.match_linear_weight(_node(m))
    assert site and site.input_index == 0 and site.reduce_axis == 0


def test_conv_reduces_over_input_channels():
    nodes = [helper.make_node("Conv", ["X", "W"], ["Y"], name="lin", group=2, pads=[1, 1, 1, 1])]
    m = make_model(nodes, [("X", FLOAT, [1, 16, 8, 8])], [("Y", FLOAT, [1, 8, 8, 8])],
                   {"W": weights(8, 8, 3, 3)})
    site = patterns.match_linear_weight(_node(m))
    assert site and site.reduce_axis == 1 and site.out_axis == 0


def test_weight_in_a_constant_node():
    nodes = [helper.make_node("Constant", [], ["W"], value=helper.make_tensor(
                 "W", TensorProto.FLOAT, [64, 32], weights(64, 32).ravel())),
             helper.make_node("MatMul", ["X", "W"], ["Y"], name="lin")]
    m = make_model(nodes, [("X", FLOAT, ["B", 64])], [("Y", FLOAT, ["B", 32])])
    site = patterns.match_linear_weight(_node(m))
    assert site and site.weight.constant_node is not None and site.weight.shape == (64, 32)


def test_not_constant():
    nodes = [helper.make_node("MatMul", ["X", "Z"], ["Y"], name="lin")]
    m = make_model(nodes, [("X", FLOAT, [4, 8]), ("Z", FLOAT, [8, 4])], [("Y", FLOAT, [4, 4])])
    fail = patterns.match_linear_weight(_node(m))
    assert not fail and fail.code == Code.NOT_CONSTANT and fail.node.name == "lin"


def test_initializer_that_is_a_graph_input():
    m = linear()
    m.graph.input.append(helper.make_tensor_value_info("W", FLOAT, [64, 32]))
    fail = patterns.match_linear_weight(_node(m))
    assert fail.code == Code.GRAPH_INPUT


def _dq_model(q, scale, zero_point=None, *, extra=(), **attrs):
    inputs = ["Wq", "s", "z"] if zero_point is not None else ["Wq", "s"]
    nodes = [helper.make_node("DequantizeLinear", inputs, ["W"], name="dq", **attrs),
             helper.make_node("MatMul", ["X", "W"], ["Y"], name="lin"), *extra]
    inits = {"Wq": q, "s": scale, **({"z": zero_point} if zero_point is not None else {})}
    return make_model(nodes, [("X", FLOAT, [4, 8])], [("Y", FLOAT, [4, 4])], inits, opset=21)


def test_quantized_weight_is_matched_decoded():
    q = np.arange(32, dtype=np.uint8).reshape(8, 4)
    site = patterns.match_linear_weight(_node(_dq_model(q, np.float32(0.5), np.uint8(3))))
    assert site and site.weight.name == "Wq" and site.weight.shape == (8, 4) and site.reduce_axis == 0
    assert site.weight.dtype == ir.DataType.FLOAT
    np.testing.assert_array_equal(site.weight.numpy(), (q.astype(np.float32) - 3) * 0.5)
    fail = patterns.match_linear_weight(_node(_dq_model(q, np.float32(0.5))), decode=False)
    assert fail.code == Code.QUANTIZED and "stored quantized" in fail.message  # for passes that resize


def test_quantized_weight_skips():
    q = np.ones((8, 4), np.int8)
    fp8 = helper.make_tensor("Wq", TensorProto.FLOAT8E4M3FN, [8, 4], [1.0] * 32)
    m = _dq_model(q, np.float32(0.1))
    m.graph.initializer[0].CopyFrom(fp8)
    fail = patterns.match_linear_weight(_node(m))
    assert fail.code == Code.QUANTIZED and "float8e4m3fn" in fail.message
    fail = patterns.match_linear_weight(_node(_dq_model(q, np.ones(3, np.float32), axis=1)))
    assert fail.code == Code.QUANTIZED and "per-axis" in fail.message  # 3 scales for 4 columns
    m = _dq_model(q, np.float32(0.1))
    m.graph.input.append(helper.make_tensor_value_info("Wq", TensorProto.INT8, [8, 4]))
    assert patterns.match_linear_weight(_node(m)).code == Code.GRAPH_INPUT
    # Quantized activations (DequantizeLinear of a computed tensor) are not weights.
    nodes = [helper.make_node("QuantizeLinear", ["Z", "s"], ["Zq"]),
             helper.make_node("DequantizeLinear", ["Zq", "s"], ["W"]),
             helper.make_node("MatMul", ["X", "W"], ["Y"], name="lin")]
    m = make_model(nodes, [("X", FLOAT, [4, 8]), ("Z", FLOAT, [8, 4])], [("Y", FLOAT, [4, 4])],
                   {"s": np.float32(0.1)})
    fail = patterns.match_linear_weight(_node(m))
    assert fail.code == Code.NOT_CONSTANT and "quantized weight 'Zq'" in fail.message


def test_matmulnbits_is_a_linear_site_and_other_ms_ops_are_not():
    b = np.zeros((4, 2, 8), np.uint8)  # N 4, K 32 in blocks of 16, 4-bit codes
    node = helper.make_node("MatMulNBits", ["X", "B", "S"], ["Y"], name="lin", domain="com.microsoft",
                            K=32, N=4, bits=4, block_size=16)
    m = make_model([node], [("X", FLOAT, [2, 32])], [("Y", FLOAT, [2, 4])],
                   {"B": b, "S": np.ones((4, 2), np.float32)}, extra_opsets=[("com.microsoft", 1)])
    site = patterns.match_linear_weight(_node(m))
    assert site and site.weight.shape == (32, 4) and site.reduce_axis == 0 and site.out_axis == 1
    np.testing.assert_array_equal(site.weight.numpy(), np.full((32, 4), -8.0, np.float32))  # zero point 8
    m.graph.node[0].op_type = "FusedMatMul"
    assert patterns.match_linear_weight(_node(m)).code == Code.CUSTOM_DOMAIN


def test_bf16_weight_through_cast():
    nodes = [helper.make_node("Cast", ["W16"], ["W"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("MatMul", ["X", "W"], ["Y"], name="lin")]
    w16 = helper.make_tensor("W16", TensorProto.BFLOAT16, [8, 4], np.full(32, 0x3F80, np.uint16).tobytes(), raw=True)
    m = make_model(nodes, [("X", FLOAT, [4, 8])], [("Y", FLOAT, [4, 4])])
    m.graph.initializer.append(w16)
    site = patterns.match_linear_weight(_node(m))
    assert site and site.weight.name == "W16" and site.weight.dtype == ir.DataType.BFLOAT16
    assert np.all(site.weight.numpy().astype(np.float32) == 1.0)


def test_integer_weight_and_rank():
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"], name="lin")]
    m = make_model(nodes, [("X", TensorProto.INT32, [4, 8])], [("Y", TensorProto.INT32, [4, 4])],
                   {"W": np.ones((8, 4), np.int32)})
    assert patterns.match_linear_weight(_node(m)).code == Code.DTYPE_UNSUPPORTED
    m = make_model(nodes, [("X", FLOAT, [4, 8])], [("Y", FLOAT, [4])], {"W": weights(8)})
    assert patterns.match_linear_weight(_node(m)).code == Code.RANK_UNSUPPORTED


def test_custom_domain():
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"], name="lin", domain="com.example")]
    m = make_model(nodes, [("X", FLOAT, [4, 8])], [("Y", FLOAT, [4, 4])], {"W": weights(8, 4)},
                   extra_opsets=[("com.example", 1)])
    assert patterns.match_linear_weight(_node(m)).code == Code.CUSTOM_DOMAIN


def test_shared_weight_same_layout_is_accepted_other_reader_is_not():
    w = weights(8, 8)
    same = [helper.make_node("MatMul", ["X", "W"], ["A"], name="lin"),
            helper.make_node("MatMul", ["A", "W"], ["Y"], name="lin2")]
    m = make_model(same, [("X", FLOAT, [4, 8])], [("Y", FLOAT, [4, 8])], {"W": w})
    assert patterns.check_shared_weight(patterns.match_linear_weight(_node(m))) is None
    other = [helper.make_node("MatMul", ["X", "W"], ["A"], name="lin"),
             helper.make_node("Add", ["A", "W"], ["Y"], name="add")]
    m = make_model(other, [("X", FLOAT, [8, 8])], [("Y", FLOAT, [8, 8])], {"W": w})
    fail = patterns.check_shared_weight(patterns.match_linear_weight(_node(m)))
    assert fail.code == Code.SHARED_WEIGHT and "add" in fail.message
    transposed = [helper.make_node("MatMul", ["X", "W"], ["A"], name="lin"),
                  helper.make_node("MatMul", ["W", "A"], ["Y"], name="lin2")]
    m = make_model(transposed, [("X", FLOAT, [8, 8])], [("Y", FLOAT, [8, 8])], {"W": w})
    assert patterns.check_shared_weight(patterns.match_linear_weight(_node(m))).code == Code.SHARED_WEIGHT
    # A quantized weight whose dequantized value is also read by an Add is shared too.
    add = [helper.make_node("Add", ["W", "W"], ["V"], name="add")]
    m = _dq_model(np.ones((8, 4), np.int8), np.float32(0.1), extra=add)
    m.graph.output.append(helper.make_tensor_value_info("V", FLOAT, [8, 4]))
    fail = patterns.check_shared_weight(patterns.match_linear_weight(_node(m)))
    assert fail.code == Code.SHARED_WEIGHT and "add" in fail.message


def test_select_and_output_layer():
    site = patterns.match_linear_weight(_node(linear()))
    assert patterns.select(site, (), ()) is None
    assert patterns.select(site, ("li*",), ()) is None
    assert patterns.select(site, ("attn*",), ()).code == Code.NOT_SELECTED
    assert patterns.select(site, (), ("W",)).code == Code.EXCLUDED
    assert patterns.select(site, ("64x32",), ()) is None  # by shape
    assert patterns.select(site, ("*x16",), ()).code == Code.NOT_SELECTED
    assert not _feeds_output(linear())
    head = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="lin")],
                      [("X", FLOAT, [4, 8])], [("Y", FLOAT, [4, 4])], {"W": weights(8, 4)})
    assert _feeds_output(head)
