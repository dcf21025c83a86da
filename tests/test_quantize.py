"""The quantize pass: ONNX Runtime's quantizers after the sparsity passes, zeros kept exact.

Every check of the stored weights here decodes the saved ONNX file in numpy from the operator
definitions (MatMulInteger, DequantizeLinear, MatMulNBits), independently of the pass's own
decoding.
"""

import json
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from sparsec.data import Calibration
from sparsec.errors import OptionError, PassError
from sparsec.model_io import fingerprint, load_model, save_model
from sparsec.passes import quantize as quantize_module
from sparsec.passes.patterns import Code
from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
from sparsec.plan import make_plan
from sparsec.runtime.session import create_session, run
from sparsec.sparsity import is_nm
from sparsec.targets import get_target
from tests.test_quantized import nbits_codes, nbits_weight, tensor

FLOAT = TensorProto.FLOAT
K, H, N = 64, 48, 32


def two_four(w, rng):
    """``w`` with the 2 smallest of every 4 consecutive entries along K (axis 0) set to 0."""
    groups = w.reshape(w.shape[0] // 4, 4, -1)
    order = np.argsort(np.abs(groups), axis=1)
    np.put_along_axis(groups, order[:, :2], 0.0, axis=1)
    return groups.reshape(w.shape)


def micro(*, seed=0, extra_nodes=(), extra_inits=()):
    """X (B, K) -> MatMul W1 (2:4 along K, one column all zero) -> Relu -> MatMul W2 (2:4) -> Y."""
    rng = np.random.default_rng(seed)
    w1 = two_four(rng.standard_normal((K, H)).astype(np.float32), rng)
    w1[:, 3] = 0.0
    w2 = two_four(rng.standard_normal((H, N)).astype(np.float32), rng)
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["Y"], name="mm2"), *extra_nodes]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", FLOAT, ["B", K])],
                              [helper.make_tensor_value_info("Y", FLOAT, ["B", N])],
                              [tensor(w1, "W1"), tensor(w2, "W2"), *extra_inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, {"W1": w1, "W2": w2}


def calibration(seed=1):
    x = np.random.default_rng(seed).standard_normal((16, K)).astype(np.float32)
    return Calibration([{"X": x[:8]}, {"X": x[8:]}], "test sets")


def quantize(proto, spec, calib=None):
    model = ir.serde.deserialize_model(proto) if isinstance(proto, onnx.ModelProto) else proto
    records = run_passes(model, parse_pass_specs(spec), PassContext(calibration=calib))
    return model, records[-1]


def decoded(path):
    """{float weight name: decoded weight} from the saved file, per the operator definitions:
    MatMulInteger: code - zero point (per tensor or per column); DequantizeLinear: (q - zp) *
    scale; MatMulNBits: unpacked codes per block along K."""
    model = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulInteger" and node.input[1] in inits:
            q = inits[node.input[1]].astype(np.int64)
            zp = inits[node.input[3]].astype(np.int64) if len(node.input) > 3 else 0
            out[node.input[1].removesuffix("_quantized")] = q - zp  # zp per tensor or (N,): broadcasts on columns
        elif node.op_type == "MatMul" and node.input[1] in producers:
            dq = producers[node.input[1]]
            if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            q, scale, zp = (inits[name].astype(np.float64) for name in dq.input)
            if scale.ndim == 1:  # per axis 1 (columns)
                scale, zp = scale[None, :], zp[None, :]
            out[dq.input[0].removesuffix("_quantized")] = (q - zp) * scale
        elif node.op_type == "MatMulNBits":
            k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
            blocks = -(-k // block)
            codes = nbits_codes(inits[node.input[1]].reshape(n, -1), bits, n).astype(np.int64)
            scales = inits[node.input[2]].reshape(n, blocks)
            if len(node.input) > 3 and node.input[3]:
                zp = nbits_codes(inits[node.input[3]].reshape(n, -1), bits, n)[:, :blocks].astype(np.int64)
            else:
                zp = np.full((n, blocks), 2 ** (bits - 1))
            out[node.input[1].removesuffix(f"_Q{bits}")] = nbits_weight(codes, scales, zp, k, block)
    return out


def ort_y(path, x):
    return run(create_session(path), {"X": x})["Y"]


def cosine(a, b):
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


MODES = {  # spec, ops the output must hold (at least), stored form, max relative L2 error of Y against float
    "dynamic": ("quantize", {"MatMulInteger": 2, "DynamicQuantizeLinear": 2}, "int8", 0.05),
    "dynamic-uint8-per-channel": ("quantize:weight_type=uint8,per_channel=true", {"MatMulInteger": 2}, "int8", 0.05),
    "static": ("quantize:mode=static", {"DequantizeLinear": 4, "QuantizeLinear": 2}, "qdq", 0.05),
    "int4": ("quantize:mode=int4,block_size=32", {"MatMulNBits": 2}, "nbits", 0.2),
    "int4-symmetric": ("quantize:mode=int4,block_size=16,symmetric=true", {"MatMulNBits": 2}, "nbits", 0.2),
}


@pytest.mark.parametrize("case", list(MODES))
def test_each_mode_keeps_zeros_exact_and_2_4_and_runs_close_to_float(tmp_path, case):
    spec, ops, form, max_rel = MODES[case]
    proto, weights = micro()
    model, record = quantize(proto, spec, calibration())
    assert [s.weight for s in record.changed] == ["W1", "W2"] and not record.skipped
    assert {s.details["stored"] for s in record.changed} == {form}
    info = record.extra["quantization"]
    assert info["tool"].startswith("onnxruntime ")
    assert info["ops"].get("MatMul") == (None if form == "qdq" else {"before": 2, "after": 0})  # QDQ keeps its MatMuls
    assert info["weight_bytes_before"] == (K * H + H * N) * 4 > info["weight_bytes_after"] > 0
    path = save_model(model, tmp_path / "q.onnx")
    counts = {op: sum(n.op_type == op for n in onnx.load(str(path)).graph.node) for op in ops}
    assert all(counts[op] >= least for op, least in ops.items()), counts
    stored = decoded(path)
    assert stored.keys() == weights.keys()
    for name, w in weights.items():
        assert np.all(stored[name][w == 0] == 0), name  # every pruned zero dequantizes to exactly 0
        assert is_nm(w, 2, 4, axis=0) and is_nm(stored[name], 2, 4, axis=0), name
    x = np.random.default_rng(5).standard_normal((32, K)).astype(np.float32)
    save_model(ir.serde.deserialize_model(proto), tmp_path / "float.onnx")
    ref, got = ort_y(tmp_path / "float.onnx", x), ort_y(path, x)
    assert cosine(ref, got) > 0.98
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < max_rel


def test_plan_runs_quantize_last_and_needs_calibration_only_when_static():
    plan = make_plan(get_target("cpu"), "quantize:mode=static;nm:method=magnitude")
    assert [p.id for p in plan.passes] == ["nm", "quantize"]
    assert any("quantize reordered" in n for n in plan.notes)
    assert plan.needs_calibration and plan.budget is not None  # lossy: judged against a budget
    assert not make_plan(get_target("cpu"), "nm:method=magnitude;quantize").needs_calibration
    assert not any("reordered" in n for n in make_plan(get_target("cpu"), "nm;quantize;compress").notes)
    plan = make_plan(get_target("cpu"), "compress;quantize;nm:method=magnitude")
    assert [p.id for p in plan.passes] == ["nm", "quantize", "compress"]
    assert make_plan(get_target("cpu"), "quantize").steps[0].form == "int8-dynamic"
    assert get_target("cpu").gain("int8-dynamic").speedup


def test_static_without_calibration_is_an_option_error():
    proto, _ = micro()
    with pytest.raises(OptionError, match="mode=static calibrates activation ranges; give --calib"):
        quantize(proto, "quantize:mode=static")


@pytest.mark.parametrize("spec,message", [
    ("quantize:mode=fp8", "option 'mode' must be one of dynamic, static, int4; got 'fp8'"),
    ("quantize:mode=int4,block_size=48", "option 'block_size' must be a power of two; got 48"),
    ("quantize:mode=int4,block_size=8", "option 'block_size' must be >= 16; got 8"),
    ("quantize:block_size=64", "option 'block_size' applies to mode=int4 only; got mode=dynamic"),
    ("quantize:mode=int4,per_channel=false", "option 'per_channel' applies to mode=dynamic|static only"),
    ("quantize:activation_type=int8", "option 'activation_type' applies to mode=static only"),
    ("quantize:accuracy_level=5", "option 'accuracy_level' must be <= 4; got 5"),
    ("quantize:op_types=Gather", "option 'op_types' must be one of MatMul, Gemm, Conv; got 'Gather'"),
])
def test_bad_options_are_one_line_errors(spec, message):
    with pytest.raises(OptionError, match="^quantize: " + re.escape(message)) as info:
        parse_pass_specs(spec)
    assert "\n" not in str(info.value)


def skip_codes(record):
    return {s.node or s.site: s.code for s in record.skipped}


def test_skips_each_with_its_code():
    rng = np.random.default_rng(2)
    w16 = rng.standard_normal((N, 8)).astype(np.float16)
    const = helper.make_tensor("Wc", FLOAT, [N, 8], rng.standard_normal((N, 8)).astype(np.float32).ravel())
    q = rng.integers(-100, 100, (N, 8)).astype(np.int8)
    extra = [
        helper.make_node("Gemm", ["Y", "Wg"], ["g"], name="gemm"),  # dynamic has no Gemm form
        helper.make_node("Transpose", ["Y"], ["Y_t"], name="t"),
        helper.make_node("MatMul", ["Y", "Y_t"], ["act"], name="act_mm"),  # two activations
        helper.make_node("MatMul", ["Y", "W16c"], ["h16"], name="fp16_mm"),
        helper.make_node("Cast", ["W16"], ["W16c"], name="cast16", to=FLOAT),  # read through Cast: QUANTIZED
        helper.make_node("Constant", [], ["Wc_out"], name="wc", value=const),
        helper.make_node("MatMul", ["Y", "Wc_out"], ["c"], name="const_mm"),  # a Constant node: LEFT_FLOAT
        helper.make_node("DequantizeLinear", ["Wq", "sq"], ["Wdq"], name="dq"),
        helper.make_node("MatMul", ["Y", "Wdq"], ["d"], name="dq_mm"),  # already quantized
        helper.make_node("MatMul", ["Wf", "Y_t"], ["f"], name="first_mm"),  # weight is the first operand
    ]
    inits = [tensor(rng.standard_normal((N, 8)).astype(np.float32), "Wg"), tensor(w16, "W16"), tensor(q, "Wq"),
             tensor(np.float32(0.01), "sq"), tensor(rng.standard_normal((8, N)).astype(np.float32), "Wf")]
    proto, _ = micro(extra_nodes=extra, extra_inits=inits)
    model = ir.serde.deserialize_model(proto)
    (record,) = run_passes(model, parse_pass_specs("quantize:exclude=mm2"), PassContext())
    assert [s.node for s in record.changed] == ["mm1_quant"]
    assert skip_codes(record) == {
        "mm2": Code.EXCLUDED, "gemm": Code.MODE_UNSUPPORTED, "act_mm": Code.NOT_CONSTANT,
        "fp16_mm": Code.QUANTIZED, "const_mm": Code.LEFT_FLOAT, "dq_mm": Code.QUANTIZED,
        "first_mm": Code.MODE_UNSUPPORTED}
    gemm_static = run_passes(ir.serde.deserialize_model(proto), parse_pass_specs("quantize:mode=static,op_types=Gemm"),
                             PassContext(calibration=calibration()))[0]
    assert [s.node for s in gemm_static.changed] == ["gemm"]


def test_weights_not_float32_and_conv_in_int4_are_skipped():
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "Wconv"], ["c"], name="conv"),
         helper.make_node("Flatten", ["c"], ["flat"], name="flat"),
         helper.make_node("MatMul", ["flat", "W16"], ["Y"], name="mm16")], "g",
        [helper.make_tensor_value_info("X", FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [1, 4])],
        [tensor(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "Wconv"),
         tensor(rng.standard_normal((288, 4)).astype(np.float16), "W16")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    (record,) = run_passes(ir.serde.deserialize_model(proto), parse_pass_specs("quantize:mode=int4"), PassContext())
    assert skip_codes(record) == {"conv": Code.MODE_UNSUPPORTED, "mm16": Code.DTYPE_UNSUPPORTED}
    assert not record.changed and record.notes == ["no weight to quantize"]


def test_conv_dynamic_keeps_zeros_per_output_channel(tmp_path):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0
    graph = helper.make_graph([helper.make_node("Conv", ["X", "W"], ["Y"], name="conv")], "g",
                              [helper.make_tensor_value_info("X", FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("Y", FLOAT, [1, 8, 6, 6])], [tensor(w, "W")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model, record = quantize(proto, "quantize:per_channel=true")
    assert [s.details["stored"] for s in record.changed] == ["int8"]
    path = save_model(model, tmp_path / "conv.onnx")
    saved = onnx.load(str(path))
    (conv,) = [n for n in saved.graph.node if n.op_type == "ConvInteger"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in saved.graph.initializer}
    codes = inits[conv.input[1]].astype(np.int64) - inits[conv.input[3]].astype(np.int64).reshape(-1, 1, 1, 1)
    assert np.all(codes[w == 0] == 0)


@pytest.mark.parametrize("spec,skips", [("quantize", {}), ("quantize:mode=static", {"QUANTIZED": 2}),
                                         ("quantize:mode=int4,block_size=32", {})])
def test_second_run_changes_nothing(spec, skips):
    proto, _ = micro()
    model, _ = quantize(proto, spec, calibration())
    before = fingerprint(model)
    _, record = quantize(model, spec, calibration())
    assert not record.changed and fingerprint(model) == before
    assert record.skip_counts() == skips  # MatMulInteger and MatMulNBits are not candidates; QDQ weights are QUANTIZED


def break_a_zero(monkeypatch):
    """ORT's call, then one pruned entry of W1 given a code other than its zero point: what a
    quantizer that did not keep zeros exact would write."""
    call = quantize_module._call_ort

    def broken(src, out, *args, **kwargs):
        tool = call(src, out, *args, **kwargs)
        model = onnx.load(str(out))
        inits = {t.name: t for t in model.graph.initializer}
        codes = onnx.numpy_helper.to_array(inits["W1_quantized"]).copy()
        zp = onnx.numpy_helper.to_array(inits["W1_zero_point"])
        codes[0, 3] = zp.reshape(-1)[3 % zp.size] + 1  # column 3 of W1 is all zero (zero point per column)
        inits["W1_quantized"].CopyFrom(onnx.numpy_helper.from_array(codes, "W1_quantized"))
        onnx.save(model, str(out), save_as_external_data=True, location="quantized.onnx.data")
        return tool

    monkeypatch.setattr(quantize_module, "_call_ort", broken)


def test_a_quantizer_that_breaks_zeros_is_a_pass_error_and_changes_nothing(monkeypatch):
    break_a_zero(monkeypatch)
    proto, _ = micro()
    model = ir.serde.deserialize_model(proto)
    before = fingerprint(model)
    with pytest.raises(PassError, match="1 entries of 'W1' that were 0 do not dequantize to 0 after dynamic"):
        run_passes(model, parse_pass_specs("quantize"), PassContext())
    assert fingerprint(model) == before


# --- real models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_2_4(zoo_path, tmp_path_factory):
    """all-MiniLM-L6-v2 with every projection 2:4 (magnitude: seconds, not SparseGPT's minutes)."""
    loaded = load_model(zoo_path("minilm"))
    run_passes(loaded.model, parse_pass_specs("nm:method=magnitude"), PassContext())
    path = tmp_path_factory.mktemp("minilm") / "nm.onnx"
    return save_model(loaded.model, path, external_data=True)


@pytest.mark.parametrize("spec", ["quantize:mode=dynamic", "quantize:mode=int4"])
def test_minilm_2_4_stays_2_4_after_quantization_and_answers_like_float(minilm_2_4, tmp_path, spec):
    from sparsec.models import get

    loaded = load_model(minilm_2_4)
    pruned = {s.weight.name: s.weight.numpy() for s in _linear_sites(loaded.model)}
    (record,) = run_passes(loaded.model, parse_pass_specs(spec), PassContext())
    assert len(record.changed) == 36 and record.skip_counts() == {"NOT_CONSTANT": 12}
    path = save_model(loaded.model, tmp_path / "q.onnx", external_data=True)
    stored = decoded(path)
    assert stored.keys() == pruned.keys()
    for name, w in pruned.items():
        assert is_nm(w, 2, 4, axis=0) and is_nm(stored[name], 2, 4, axis=0), name
        assert np.all(stored[name][w == 0] == 0), name
    feed = get("minilm").real_inputs(1)[0]
    ref = run(create_session(minilm_2_4), feed)["last_hidden_state"]
    got = run(create_session(path), feed)["last_hidden_state"]
    mask = feed["attention_mask"].astype(bool)
    rows = [cosine(a, b) for a, b in zip(ref[mask], got[mask])]
    assert np.mean(rows) > 0.97  # against the float 2:4 model; int4 rounds more than int8


def _linear_sites(model):
    from sparsec.passes.patterns import match_linear_weight

    return [s for s in (match_linear_weight(n) for n in model.graph if n.op_type == "MatMul") if s]


def test_cli_compile_structured_then_int8_writes_model_and_fidelity_report(zoo_path, tmp_path, capsys):
    from sparsec.cli import main

    out = tmp_path / "tiny.q.onnx"
    code = main(["compile", str(zoo_path("tiny-bert")), "--passes", "ffn-neurons:ratio=0.25;quantize:mode=dynamic",
                 "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert out.exists() and "quantize [lossy]" in printed
    report = json.loads(out.with_name("tiny.q.report.json").read_text())
    assert [r["pass"] for r in report["records"]] == ["ffn-neurons", "quantize"]
    q = report["records"][1]
    assert q["changed"] == 12 and q["quantization"]["ops"]["MatMulInteger"] == {"before": 0, "after": 12}
    assert q["quantization"]["weight_bytes_after"] < q["quantization"]["weight_bytes_before"] / 3
    assert report["judgement"]["status"] == "WITHIN BUDGET" and report["plan"]["budget"]["origin"] == "default"
    metrics = report["verification"]["real"]["metrics"]
    assert 0.95 <= metrics["embedding_cosine_mean"] < 1.0
    assert report["sizes"]["output_bytes"] < report["sizes"]["input_bytes"]


def test_cli_bad_quantize_option_is_one_line_exit_2(zoo_path, tmp_path, capsys):
    from sparsec.cli import main

    code = main(["compile", str(zoo_path("tiny-bert")), "--passes", "quantize:mode=int4,block_size=100",
                 "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "block_size' must be a power of two; got 100" in err
    assert not (tmp_path / "x.onnx").exists()


def test_same_input_same_output():
    proto, _ = micro()
    first, _ = quantize(proto, "quantize:mode=static", calibration())
    second, _ = quantize(proto, "quantize:mode=static", calibration())
    assert fingerprint(first) == fingerprint(second)


@pytest.mark.parametrize("spec", ["quantize:mode=static", "quantize:mode=int4"])
def test_compile_judges_each_mode_against_the_default_budget(zoo_path, tmp_path, spec):
    import sparsec

    result = sparsec.compile(zoo_path("tiny-bert"), passes=spec, output=tmp_path / "q.onnx")
    assert result.plan.budget.origin == "default" and result.plan.budget.min_embedding_cosine == 0.95
    if spec.endswith("static"):  # calibrated on the example model's built-in text, as the plan says
        assert result.plan.calibration == "builtin" and "built-in calibration text" in result.calibration["source"]
    assert result.judgement.status == "WITHIN BUDGET" and result.output.exists()
    assert 0.95 <= result.verdicts["real"].metrics["embedding_cosine_mean"] < 1.0


def test_passes_command_lists_quantize(capsys):
    from sparsec.cli import main

    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "quantize [lossy]: ONNX Runtime quantization" in out and "  mode=dynamic" in out
