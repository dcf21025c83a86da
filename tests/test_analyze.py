"""Analysis: op counts, parameters, per-weight zeros and N:M compliance along the reduction axis."""

import numpy as np
import onnx_ir as ir
from onnx import helper

from sparsec.analyze import analyze, summarize_sparsity
from sparsec.sparsity import NMLayout
from tests.helpers import FLOAT, make_model, weights


def test_analysis_of_a_small_model():
    w = weights(64, 32)
    w24 = np.where(NMLayout(2, 4).mask(np.abs(w.T)).T, w, 0).astype(np.float32)  # 2:4 along K (axis 0)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["H"], name="a"), helper.make_node("Relu", ["H"], ["R"]),
             helper.make_node("MatMul", ["R", "V"], ["Y"], name="b"), helper.make_node("Add", ["Y", "b0"], ["Z"])]
    proto = make_model(nodes, [("X", FLOAT, ["B", 64])], [("Z", FLOAT, ["B", 16])],
                       {"W": w24, "V": weights(32, 16), "b0": np.zeros(16, np.float32)})
    analysis = analyze(ir.serde.deserialize_model(proto), "fp")
    assert analysis.op_counts == {"MatMul": 2, "Relu": 1, "Add": 1}
    assert analysis.params == 64 * 32 + 32 * 16 + 16 and analysis.weight_bytes == 4 * analysis.params
    by_name = {w.name: w for w in analysis.weights}
    assert by_name["W"].nm == ["2:4", "4:8", "8:16"] and by_name["W"].zeros == 0.5 and by_name["W"].reduce_axis == 0
    assert by_name["V"].nm == [] and by_name["V"].op == "MatMul" and by_name["b0"].op == ""
    assert [w.name for w in analysis.linear_weights] == ["V", "W"]
    assert analysis.inputs == [{"name": "X", "dtype": "FLOAT", "shape": ["B", 64]}]
    summary = summarize_sparsity(analysis.weights)
    assert summary["linear_weights"] == 2 and summary["nm_compliant"] == {"2:4": 1, "4:8": 1, "8:16": 1}
    assert summary["linear_zero_fraction"] == 1024 / (2048 + 512)


def test_shared_weights_count_once_with_their_readers():
    nodes = [helper.make_node("MatMul", ["X", "W"], ["A"], name="l1"),
             helper.make_node("MatMul", ["A", "W"], ["Y"], name="l2")]
    proto = make_model(nodes, [("X", FLOAT, [4, 8])], [("Y", FLOAT, [4, 8])], {"W": weights(8, 8)})
    (info,) = analyze(ir.serde.deserialize_model(proto)).weights
    assert info.readers == 2 and info.node == "l1" and info.params == 64


def test_analysis_of_an_export_is_json_ready(zoo_path):
    from sparsec.model_io import load_model

    analysis = analyze(load_model(zoo_path("tiny-llama")).model, "x")
    data = analysis.to_dict()
    assert data["op_counts"]["MatMul"] == 19 and len([w for w in data["weights"] if w["op"]]) == 14  # + 4 in attention
    assert all(w["label"].startswith("m.model.layers.") for w in data["weights"] if w["op"])
