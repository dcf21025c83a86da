"""nm: N:M pruning. Positive case per op layout, a negative case per skip code, idempotence,
config errors, and exactness on an already-2:4 model."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from sparsec.errors import OptionError
from sparsec.graph import PROVENANCE_PASS
from sparsec.model_io import load_model, save_model
from sparsec.passes.patterns import Code
from sparsec.passes.nm_prune import NMPrunePass
from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
from sparsec.sparsity import is_nm
from sparsec.feeds import input_specs, random_feeds
from sparsec.verify import verify_models
from tests.helpers import FLOAT, linear, make_model, run_ort, weights


def prune(proto, spec="nm", tmp_path=None):
    model = ir.serde.deserialize_model(proto)
    (record,) = run_passes(model, parse_pass_specs(spec), PassContext())
    if tmp_path is not None:
        out = save_model(model, tmp_path / "out.onnx")
        onnx.checker.check_model(str(out), full_check=True)
    return model, record


def weight(model, name="W"):
    for node in model.graph:
        for v in node.inputs:
            if v is not None and v.name == name:
                if v.const_value is not None:
                    return v.const_value.numpy()
                return v.producer().attributes["value"].value.numpy()
    raise KeyError(name)


@pytest.mark.parametrize("op,attrs,axis", [("MatMul", {}, 0), ("Gemm", {}, 0), ("Gemm", {"transB": 1}, 1)])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (8, 16)])
def test_linear_ops_pruned_along_reduction(tmp_path, op, attrs, axis, n, m):
    proto = linear(op, 64, 32, **attrs)
    original = weight(ir.serde.deserialize_model(proto))
    model, record = prune(proto, f"nm:n={n},m={m},min_params=0", tmp_path)
    w = weight(model)
    assert is_nm(w, n, m, axis)
    assert not is_nm(w, n, m, 1 - axis)  # along the reduction axis, not the output axis
    assert np.count_nonzero(w) == w.size * n // m
    kept = w != 0
    np.testing.assert_array_equal(w[kept], original[kept])  # survivors are untouched
    assert [s.action for s in record.sites] == ["changed"]
    assert record.sparsity() == pytest.approx(1 - n / m)
    node = next(nd for nd in model.graph if nd.name == "lin")
    assert node.metadata_props[PROVENANCE_PASS] == "nm"
    x = weights(3, 64, seed=5)
    (y,) = run_ort(tmp_path / "out.onnx", {"X": x})
    wk = w.T if (op == "Gemm" and attrs.get("transB")) else w
    np.testing.assert_allclose(y, np.maximum(x @ wk, 0), rtol=1e-5, atol=1e-5)


def test_conv_groups_along_input_channels(tmp_path):
    nodes = [helper.make_node("Conv", ["X", "W"], ["H"], name="lin", group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["H"], ["Y"])]
    proto = make_model(nodes, [("X", FLOAT, [1, 16, 8, 8])], [("Y", FLOAT, [1, 8, 8, 8])],
                       {"W": weights(8, 8, 3, 3)})
    model, record = prune(proto, "nm:min_params=0", tmp_path)
    w = weight(model)
    assert is_nm(w, 2, 4, axis=1)  # groups of 4 input channels at each (out, kh, kw)
    assert record.changed[0].details["reduce_axis"] == 1
    run_ort(tmp_path / "out.onnx", {"X": weights(1, 16, 8, 8)})


def test_constant_node_weight_is_pruned(tmp_path):
    nodes = [helper.make_node("Constant", [], ["W"], value=onnx.numpy_helper.from_array(weights(64, 32), "W")),
             helper.make_node("MatMul", ["X", "W"], ["H"], name="lin"),
             helper.make_node("Relu", ["H"], ["Y"])]
    proto = make_model(nodes, [("X", FLOAT, ["B", 64])], [("Y", FLOAT, ["B", 32])])
    model, record = prune(proto, "nm:min_params=0", tmp_path)
    assert is_nm(weight(model), 2, 4, 0) and len(record.changed) == 1


def test_weight_in_an_if_branch(tmp_path):
    w = weights(64, 32)
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("MatMul", ["X", "W"], ["Z" + name], name="lin_" + name)],
        name, [], [helper.make_tensor_value_info("Z" + name, FLOAT, ["B", 32])])
    nodes = [helper.make_node("If", ["C"], ["H"], then_branch=branch("t"), else_branch=branch("e")),
             helper.make_node("Relu", ["H"], ["Y"])]
    proto = make_model(nodes, [("X", FLOAT, ["B", 64]), ("C", onnx.TensorProto.BOOL, [])],
                       [("Y", FLOAT, ["B", 32])], {"W": w})
    model, record = prune(proto, "nm:min_params=0", tmp_path)
    assert len(record.changed) == 1 and len(record.changed[0].details["readers"]) == 2
    assert is_nm(model.graph.initializers["W"].const_value.numpy(), 2, 4, 0)
    run_ort(tmp_path / "out.onnx", {"X": weights(2, 64), "C": np.array(True)})


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float16_and_double_weights(tmp_path, dtype):
    tp = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("MatMul", ["X", "W"], ["H"], name="lin"), helper.make_node("Relu", ["H"], ["Y"])]
    proto = make_model(nodes, [("X", tp, ["B", 64])], [("Y", tp, ["B", 32])], {"W": weights(64, 32, dtype=dtype)})
    model, _ = prune(proto, "nm:min_params=0", tmp_path)
    w = weight(model)
    assert w.dtype == dtype and is_nm(w, 2, 4, 0)


def test_skip_codes(tmp_path):
    proto = linear("MatMul", 6, 32)  # K=6 not divisible by 4
    _, record = prune(proto, "nm:min_params=0")
    assert record.skip_counts() == {Code.NOT_DIVISIBLE: 1}
    _, record = prune(linear(), "nm")  # 64x32 = 2048 < default min_params
    assert record.skip_counts() == {Code.TOO_SMALL: 1}
    _, record = prune(linear(), "nm:min_params=0,exclude=lin")
    assert record.skip_counts() == {Code.EXCLUDED: 1}
    _, record = prune(linear(), "nm:min_params=0,include=attn*")
    assert record.skip_counts() == {Code.NOT_SELECTED: 1}
    _, record = prune(linear(), "nm:min_params=0,op_types=Gemm")
    assert record.sites == []


def test_output_layer_kept_unless_asked():
    head = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="lin")],
                      [("X", FLOAT, ["B", 64])], [("Y", FLOAT, ["B", 32])], {"W": weights(64, 32)})
    _, record = prune(head, "nm:min_params=0")
    assert record.skip_counts() == {Code.OUTPUT_LAYER: 1}
    model, record = prune(head, "nm:min_params=0,keep_output_layers=false")
    assert len(record.changed) == 1


def test_shared_weight_with_incompatible_reader_is_skipped():
    nodes = [helper.make_node("MatMul", ["X", "W"], ["A"], name="lin"),
             helper.make_node("Add", ["A", "W"], ["H"]), helper.make_node("Relu", ["H"], ["Y"])]
    proto = make_model(nodes, [("X", FLOAT, [64, 64])], [("Y", FLOAT, [64, 64])], {"W": weights(64, 64)})
    _, record = prune(proto, "nm:min_params=0")
    assert record.skip_counts() == {Code.SHARED_WEIGHT: 1}


def test_idempotent_and_already_nm_is_exact(tmp_path):
    first = tmp_path / "first.onnx"
    model, _ = prune(linear("MatMul", 64, 32), "nm:min_params=0")
    save_model(model, first)
    again = load_model(first)
    (record,) = run_passes(again.model, parse_pass_specs("nm:min_params=0"), PassContext())
    assert record.skip_counts() == {Code.ALREADY_SPARSE: 1} and not record.changed
    second = save_model(again.model, tmp_path / "second.onnx")
    assert second.read_bytes() == first.read_bytes()  # a second run changes nothing
    feeds = random_feeds(input_specs(again.model), samples=2)
    assert verify_models(first, second, feeds).passed


def test_deterministic(tmp_path):
    outs = []
    for i in range(2):
        model, _ = prune(linear("MatMul", 64, 64), "nm:min_params=0")
        outs.append(save_model(model, tmp_path / f"o{i}.onnx").read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("spec,message", [
    ("nm:n=4,m=4", "n must be smaller than m"),
    ("nm:n=0", "must be >= 1"),
    ("nm:n=two", "expects int"),
    ("nm:q=1", "unknown option 'q'"),
    ("nm:method=random", "must be one of"),
    ("nm:op_types=Add", "must be one of"),
    ("nm:n", "malformed option"),
    ("nm:n=1,n=2", "given twice"),
    ("nmx", "unknown pass 'nmx'"),
    ("nm:keep_output_layers=maybe", "true or false"),
])
def test_config_errors(spec, message):
    with pytest.raises(OptionError, match=message):
        parse_pass_specs(spec)


def test_options_object_and_spec_roundtrip():
    p = NMPrunePass(n=1, m=4, include=("a*", "b*"))
    assert p.spec() == "nm:include=a*|b*,n=1"  # defaults are left out
    assert parse_pass_specs(p.spec())[0].options == p.options
