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


def test_quantized_weight():
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"]),
             helper.make_node("MatMul", ["X", "W"], ["Y"], name="lin")]
    m = make_model(nodes, [("X", FLOAT, [4, 8])], [("Y", FLOAT, [4, 4])],
                   {"Wq": np.ones((8, 4), np.int8), "s": np.float32(0.1), "z": np.int8(0)})
    assert patterns.match_linear_weight(_node(m)).code == Code.QUANTIZED


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
