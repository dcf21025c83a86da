"""Graph helpers: constants behind values, fresh names, packed constants, labels, spilling."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from sparsec.graph import (
    PACKED_KEY, add_constant, constant_ref, fresh_name, mark_packed, node_label, register_codec, spilling,
    unpack_constant,
)
from tests.helpers import FLOAT, linear, make_model, weights


def _model(proto):
    return ir.serde.deserialize_model(proto)


def test_constant_refs_initializer_constant_node_and_graph_input():
    model = _model(linear())
    w = model.graph.initializers["W"]
    ref = constant_ref(w)
    assert ref is not None and ref.shape == (64, 32) and ref.constant_node is None
    assert constant_ref(model.graph.inputs[0]) is None  # X is computed at run time
    proto = linear()
    proto.graph.input.append(helper.make_tensor_value_info("W", FLOAT, [64, 32]))
    assert constant_ref(_model(proto).graph.initializers["W"]) is None  # overridable
    nodes = [helper.make_node("Constant", [], ["C"], value=helper.make_tensor("C", TensorProto.FLOAT, [2], [1, 2])),
             helper.make_node("Add", ["X", "C"], ["Y"])]
    const = _model(make_model(nodes, [("X", FLOAT, [2])], [("Y", FLOAT, [2])]))
    ref = constant_ref(next(n for n in const.graph if n.op_type == "Constant").outputs[0])
    assert ref.constant_node is not None and ref.numpy().tolist() == [1, 2]


def test_replace_keeps_dtype_and_refuses_a_new_shape_unless_asked():
    model = _model(linear())
    ref = constant_ref(model.graph.initializers["W"])
    ref.replace(np.zeros((64, 32), np.float32), **{"sparsec.layout": "2:4"})
    assert not ref.numpy().any() and ref.tensor.metadata_props["sparsec.layout"] == "2:4"
    with pytest.raises(ValueError, match="shape"):
        ref.replace(np.zeros((8, 8), np.float32))
    ref.replace(np.ones((8, 8), np.float32), resize=True)
    assert ref.shape == (8, 8) and model.graph.initializers["W"].shape == ir.Shape((8, 8))


def test_fresh_names_and_new_constants_do_not_collide():
    model = _model(linear())
    assert fresh_name(model.graph, "W") == "W.1" and fresh_name(model.graph, "Z") == "Z"
    v = add_constant(model.graph, "W", np.arange(3, dtype=np.int64))
    assert v.name == "W.1" and constant_ref(v).numpy().tolist() == [0, 1, 2]


def test_packed_constants_are_read_through_their_codec_and_are_read_only():
    model = _model(make_model([helper.make_node("Identity", ["S"], ["W"], name="rebuild"),
                               helper.make_node("MatMul", ["X", "W"], ["Y"], name="lin")],
                              [("X", FLOAT, [2, 4])], [("Y", FLOAT, [2, 4])], {"S": weights(4, 4)}))
    rebuild = next(n for n in model.graph if n.name == "rebuild")
    register_codec("test-identity", lambda node, data: ir.Tensor(
        node.graph.initializers[data].const_value.numpy() * 2, name="W"))
    mark_packed([rebuild], "test-identity", "S")
    ref = constant_ref(rebuild.outputs[0])
    assert ref.packed is rebuild
    np.testing.assert_array_equal(ref.numpy(), weights(4, 4) * 2)
    with pytest.raises(ValueError, match="read-only"):
        ref.replace(np.zeros((4, 4), np.float32))
    rebuild.metadata_props[PACKED_KEY] = "no-such-codec:S"
    with pytest.raises(ValueError, match="unknown packed-constant codec 'no-such-codec'"):
        unpack_constant(rebuild)


def test_node_label_prefers_the_torch_module_path():
    model = _model(linear())
    node = next(iter(model.graph))
    assert node_label(node) == "lin"
    node.metadata_props["pkg.torch.onnx.name_scopes"] = "['', 'm', 'm.layers.0.mlp', 'linear_4']"
    assert node_label(node) == "m.layers.0.mlp"


def test_spilling_writes_large_new_constants_to_disk(tmp_path, monkeypatch):
    monkeypatch.setattr("sparsec.graph.SPILL_MIN_BYTES", 16)
    model = _model(linear())
    with spilling(tmp_path) as spill:
        big = add_constant(model.graph, "big", np.arange(64, dtype=np.float32))
        small = add_constant(model.graph, "small", np.arange(2, dtype=np.float32))
        assert isinstance(big.const_value, ir.ExternalTensor) and not isinstance(small.const_value, ir.ExternalTensor)
        assert spill.offset == 64 * 4
        np.testing.assert_array_equal(big.const_value.numpy(), np.arange(64, dtype=np.float32))
