"""The hazard suite: graphs sparsec did not make, through every pass that applies.

Each hazard model goes through each pass spec; the result must be a valid model (onnx.checker
with full_check) that ONNX Runtime runs, every site either changed or skipped with a recorded
code, and exact passes must leave the outputs equal.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from sparsec.errors import InputError, RuntimeFailure
from sparsec.model_io import load_model, save_model
from sparsec.runtime.session import create_session, run
from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
from sparsec.feeds import input_specs, random_feeds
from sparsec.verify import verify_models
from tests.helpers import FLOAT, make_model, save, weights

F16 = TensorProto.FLOAT16


def ffn(prefix: str, x: str, out: str, k: int = 64, hidden: int = 128, dtype=np.float32):
    """x -> MatMul -> Add bias -> Relu -> MatMul -> out; returns (nodes, initializers)."""
    nodes = [helper.make_node("MatMul", [x, f"{prefix}W1"], [f"{prefix}h"], name=f"{prefix}up"),
             helper.make_node("Add", [f"{prefix}h", f"{prefix}b1"], [f"{prefix}hb"], name=f"{prefix}bias"),
             helper.make_node("Relu", [f"{prefix}hb"], [f"{prefix}a"], name=f"{prefix}act"),
             helper.make_node("MatMul", [f"{prefix}a", f"{prefix}W2"], [out], name=f"{prefix}down")]
    inits = {f"{prefix}W1": weights(k, hidden, seed=1, dtype=dtype), f"{prefix}b1": weights(hidden, seed=2, dtype=dtype),
             f"{prefix}W2": weights(hidden, k, seed=3, dtype=dtype)}
    return nodes, inits


def _residual(nodes, inits, x="X", y="Y", tp=FLOAT, shape=("B", 64), opset=17):
    nodes = nodes + [helper.make_node("Add", ["f", x], [y], name="residual")]
    return make_model(nodes, [(x, tp, list(shape))], [(y, tp, list(shape))], inits, opset=opset)


def plain():
    n, i = ffn("", "X", "f")
    return _residual(n, i)


def hazard_if():
    then_nodes, inits = ffn("t_", "X", "ft")
    else_nodes, else_inits = ffn("e_", "X", "fe")
    inits.update(else_inits)
    branch = lambda nodes, out: helper.make_graph(nodes, out, [], [helper.make_tensor_value_info(out, FLOAT, ["B", 64])])  # noqa: E731
    nodes = [helper.make_node("If", ["C"], ["f"], name="if", then_branch=branch(then_nodes, "ft"),
                              else_branch=branch(else_nodes, "fe")),
             helper.make_node("Add", ["f", "X"], ["Y"], name="residual")]
    return make_model(nodes, [("X", FLOAT, ["B", 64]), ("C", TensorProto.BOOL, [])], [("Y", FLOAT, ["B", 64])], inits)


def hazard_loop():
    body_nodes, inits = ffn("l_", "x_in", "f")
    body_nodes.append(helper.make_node("Add", ["f", "x_in"], ["x_out"], name="l_res"))
    body_nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name="l_cond"))
    body = helper.make_graph(body_nodes, "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("x_in", FLOAT, ["B", 64])],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("x_out", FLOAT, ["B", 64])])
    nodes = [helper.make_node("Loop", ["N", "", "X"], ["Y"], name="loop", body=body)]
    inits["N"] = np.array(2, np.int64)
    return make_model(nodes, [("X", FLOAT, ["B", 64])], [("Y", FLOAT, ["B", 64])], inits)


def hazard_scan():
    body_nodes, inits = ffn("s_", "x_t", "y_t")
    body_nodes.append(helper.make_node("Identity", ["st_in"], ["st_out"], name="s_state"))
    body = helper.make_graph(body_nodes, "body",
                             [helper.make_tensor_value_info("st_in", FLOAT, [1]),
                              helper.make_tensor_value_info("x_t", FLOAT, ["B", 64])],
                             [helper.make_tensor_value_info("st_out", FLOAT, [1]),
                              helper.make_tensor_value_info("y_t", FLOAT, ["B", 64])])
    nodes = [helper.make_node("Scan", ["S0", "X"], ["SN", "Y"], name="scan", body=body, num_scan_inputs=1)]
    inits["S0"] = np.zeros(1, np.float32)
    return make_model(nodes, [("X", FLOAT, [3, "B", 64])], [("SN", FLOAT, [1]), ("Y", FLOAT, [3, "B", 64])], inits)


def hazard_shared():
    n1, inits = ffn("", "X", "f1")
    # W1 and W2 are each read by two MatMuls summing over the same axis: pruned once.
    n2 = [helper.make_node("MatMul", ["f1", "W1"], ["g"], name="reuse"),
          helper.make_node("MatMul", ["g", "W2"], ["f"], name="reuse2")]
    return _residual(n1 + n2, inits)


def hazard_graph_input():
    m = plain()
    m.graph.input.append(helper.make_tensor_value_info("W1", FLOAT, [64, 128]))
    return m


def hazard_unknown_dims():
    n, i = ffn("", "X", "f")
    nodes = n + [helper.make_node("Add", ["f", "X"], ["Y"], name="residual")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", FLOAT, None)],
                              [helper.make_tensor_value_info("Y", FLOAT, None)],
                              [onnx.numpy_helper.from_array(v, k) for k, v in i.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m


def hazard_fp16():
    n, i = ffn("", "X", "f", dtype=np.float16)
    return _residual(n, i, tp=F16)


def hazard_bf16():
    """bf16 weights cast to float before use (how mixed-precision exports store them)."""
    n, i = ffn("", "Xc", "f")
    casts = []
    for name in ("W1", "b1", "W2"):
        i[name + "_bf16"] = onnx.numpy_helper.from_array(i.pop(name).astype(np.float32), name + "_bf16")
        casts.append(helper.make_node("Cast", [name + "_bf16"], [name], to=TensorProto.FLOAT, name="cast_" + name))
    m = _residual([helper.make_node("Identity", ["X"], ["Xc"], name="id")] + casts + n, {})
    for name in ("W1", "b1", "W2"):
        t = i[name + "_bf16"]
        arr = onnx.numpy_helper.to_array(t)
        bf = helper.make_tensor(t.name, TensorProto.BFLOAT16, arr.shape,
                                (arr.view(np.uint32) >> 16).astype(np.uint16).tobytes(), raw=True)
        m.graph.initializer.append(bf)
    return m


def hazard_qdq():
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W1"], name="dq"),
             helper.make_node("MatMul", ["X", "W1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["f"], name="down")]
    inits = {"Wq": np.random.default_rng(0).integers(-127, 127, (64, 128)).astype(np.int8), "s": np.float32(0.01),
             "z": np.int8(0), "W2": weights(128, 64)}
    return _residual(nodes, inits)


def hazard_custom_domain():
    n, i = ffn("", "X", "f")
    n[2] = helper.make_node("Relu", ["hb"], ["a"], name="act")
    m = _residual(n, i, opset=17)
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    m.graph.node.append(helper.make_node("Identity", ["Y"], ["Z"], name="custom", domain=""))
    m.graph.output.append(helper.make_tensor_value_info("Z", FLOAT, ["B", 64]))
    return m


def hazard_unsorted():
    m = plain()
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))
    return m


def hazard_names():
    m = plain()
    for node in m.graph.node:
        node.name = "same" if node.op_type == "MatMul" else ""
    return m


def hazard_constant_node():
    n, i = ffn("", "X", "f")
    w = i.pop("W1")
    n.insert(0, helper.make_node("Constant", [], ["W1"], value=onnx.numpy_helper.from_array(w, "W1"), name="const"))
    return _residual(n, i)


def hazard_attention():
    from tests.test_structured import _mha  # noqa: PLC0415 (a hand-built attention block)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return onnx.load(str(_mha(Path(tmp), heads=4, d=16)))


def hazard_conv():
    nodes = [helper.make_node("Conv", ["X", "C1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "C2"], ["Y"], pads=[1, 1, 1, 1], name="conv2")]
    inits = {"C1": weights(32, 16, 3, 3), "C2": weights(16, 32, 3, 3), "g": np.ones(32, np.float32),
             "b": weights(32, seed=4), "m": weights(32, seed=5), "v": np.ones(32, np.float32)}
    return make_model(nodes, [("X", FLOAT, [1, 16, 8, 8])], [("Y", FLOAT, [1, 16, 8, 8])], inits, opset=15)


HAZARDS = {
    "if": hazard_if, "loop": hazard_loop, "scan": hazard_scan, "shared": hazard_shared,
    "graph-input": hazard_graph_input, "unknown-dims": hazard_unknown_dims, "fp16": hazard_fp16,
    "bf16-cast": hazard_bf16, "qdq": hazard_qdq, "custom-domain-opset": hazard_custom_domain,
    "unsorted": hazard_unsorted, "names": hazard_names, "constant-node": hazard_constant_node,
    "attention": hazard_attention, "conv-bn": hazard_conv,
}
SPECS = ["nm:min_params=0", "unstructured:sparsity=0.5,min_params=0", "block:min_params=0",
         "nm:min_params=0;compress", "ffn-neurons:ratio=0.5,multiple=1", "attention-heads:ratio=0.5",
         "conv-channels:ratio=0.5,multiple=1"]


def _feeds(model, dims):
    try:
        feeds = random_feeds(input_specs(model), samples=1, dims=dims)
    except InputError:  # an input of unknown rank: sparsec asks for explicit inputs
        return [{"X": weights(2, 64)}]
    for feed in feeds:
        if "C" in feed:  # the If condition
            feed["C"] = np.array(True)
    return feeds


def checker_passes_like_input(src, out):
    """onnx.checker (full) accepts the output, or rejects the input for the same reason."""
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except onnx.checker.ValidationError as exc:
        with pytest.raises(onnx.checker.ValidationError) as original:
            onnx.checker.check_model(str(src), full_check=True)
        assert str(original.value).splitlines()[0] == str(exc).splitlines()[0]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("hazard", sorted(HAZARDS))
def test_hazard(tmp_path, hazard, spec):
    src = save(HAZARDS[hazard](), tmp_path / "in.onnx")
    loaded = load_model(src)
    records = run_passes(loaded.model, parse_pass_specs(spec), PassContext())
    for record in records:
        for site in record.sites:
            assert site.action == "changed" or site.code, site
    out = save_model(loaded.model, tmp_path / "out.onnx", external_data=True)
    checker_passes_like_input(src, out)
    feeds = _feeds(load_model(src).model, {"B": 2})
    try:
        create_session(src)
    except RuntimeFailure:  # e.g. duplicate node names: ORT refuses the input, sparsec fixes it
        for feed in feeds:
            run(create_session(out), feed)
        return
    exact = all(r.kind == "exact" for r in records) or not any(r.changed for r in records)
    verdict = verify_models(src, out, feeds, exact=True)
    if exact:
        assert verdict.passed, verdict.lines()
    else:
        assert verdict.outputs and all(np.isfinite(o.cosine) and not o.error for o in verdict.outputs)
    if spec.endswith("compress") and any(r.changed for r in records[:1]):
        pruned = tmp_path / "pruned_only.onnx"
        model = load_model(src).model
        run_passes(model, parse_pass_specs(spec.split(";")[0]), PassContext())
        save_model(model, pruned, external_data=True)
        assert verify_models(pruned, out, feeds, atol=0, rtol=0).passed  # compress is bit-exact


def test_expected_skips():
    """What each hazard leaves alone, by code."""
    def codes(hazard, spec="nm:min_params=0"):
        model = ir.serde.deserialize_model(HAZARDS[hazard]())
        (record,) = run_passes(model, parse_pass_specs(spec), PassContext())
        return record.skip_counts(), len(record.changed)

    assert codes("graph-input") == ({"GRAPH_INPUT": 1}, 1)
    assert codes("qdq") == ({}, 2)  # the int8 weight behind DequantizeLinear is pruned too
    assert codes("bf16-cast") == ({}, 2)  # bf16 weights behind Cast: pruned in bf16
    for hazard, stored in (("qdq", "stored quantized"), ("bf16-cast", "stored as BFLOAT16")):
        model = ir.serde.deserialize_model(HAZARDS[hazard]())  # structured passes do not resize them
        (record,) = run_passes(model, parse_pass_specs("ffn-neurons:ratio=0.5,multiple=1"), PassContext())
        assert not record.changed and stored in record.sites[0].message
    assert codes("if") == ({}, 4) and codes("loop") == ({}, 2) and codes("scan") == ({}, 2)
    assert codes("shared")[1] == 2


def test_opsets_13_to_23(tmp_path):
    for opset in range(13, 24):
        n, i = ffn("", "X", "f")
        src = save(_residual(n, i, opset=opset), tmp_path / f"o{opset}.onnx")
        model = load_model(src).model
        run_passes(model, parse_pass_specs("nm:min_params=0;compress;ffn-neurons:ratio=0.5,multiple=1"), PassContext())
        out = save_model(model, tmp_path / f"out{opset}.onnx")
        onnx.checker.check_model(str(out), full_check=True)
        assert verify_models(src, out, _feeds(load_model(src).model, {"B": 2}), exact=False).outputs


def test_external_data_in_a_subdirectory(tmp_path):
    proto = plain()
    onnx.external_data_helper.convert_model_to_external_data(proto, location="weights/w.bin", size_threshold=0)
    (tmp_path / "weights").mkdir()
    onnx.save(proto, str(tmp_path / "m.onnx"))
    loaded = load_model(tmp_path / "m.onnx")
    assert loaded.external_files == [tmp_path / "weights" / "w.bin"]
    run_passes(loaded.model, parse_pass_specs("nm:min_params=0"), PassContext())
    out = save_model(loaded.model, tmp_path / "out.onnx")
    assert verify_models(tmp_path / "m.onnx", out, _feeds(loaded.model, {"B": 2}), exact=False).outputs
