"""FFN -> MoE: every lowering exact with every expert active, the lowerings equal to each other
with k < E, skip codes, options, records, idempotence; on real exports."""


import re

import numpy as np
import pytest
from onnx import helper

from sparsec.data import Calibration
from sparsec.errors import OptionError
from sparsec.model_io import load_model, save_model
from sparsec.passes import moe_experts as mx
from sparsec.passes.patterns import Code
from sparsec.pipeline import Kind, PassContext, parse_pass_specs, run_passes
from sparsec.verify import verify_models
from tests.helpers import FLOAT, make_model, run_ort, save, weights
from tests.test_blocks import activation_nodes

H, I = 16, 48


def ffn(kind, *, gated=False, bias=True, hidden=I, opset=20):
    """X (B, S, H) -> FFN (optionally gated) -> + residual -> Y."""
    nodes = [helper.make_node("MatMul", ["X", "Wg" if gated else "Wu"], ["g0"], name="first")]
    inits = {("Wg" if gated else "Wu"): weights(H, hidden, seed=1) * 0.5, "Wd": weights(hidden, H, seed=3) * 0.3}
    act_in = "g0"
    if bias:
        nodes.append(helper.make_node("Add", ["g0", "bg"], ["g1"]))
        inits["bg"] = weights(hidden, seed=4) * 0.1
        act_in = "g1"
    act, consts = activation_nodes(kind, act_in, "a")
    nodes += act
    inits.update(consts)
    h = "a"
    if gated:
        nodes += [helper.make_node("MatMul", ["X", "Wu"], ["u"], name="up"), helper.make_node("Mul", ["a", "u"], ["m"])]
        inits["Wu"] = weights(H, hidden, seed=2) * 0.5
        h = "m"
    nodes += [helper.make_node("MatMul", [h, "Wd"], ["d"], name="down"), helper.make_node("Add", ["d", "X"], ["Y"])]
    return make_model(nodes, [("X", FLOAT, ["B", "S", H])], [("Y", FLOAT, ["B", "S", H])], inits, opset=opset)


def calibration(sets=4, tokens=64, seed=7):
    rng = np.random.default_rng(seed)
    return Calibration([{"X": rng.standard_normal((1, tokens, H)).astype(np.float32)} for _ in range(sets)], "random")


def compile_moe(proto, spec, tmp_path, name="moe.onnx", calib=None):
    src = save(proto, tmp_path / f"src-{name}")
    model = load_model(src).model
    (record,) = run_passes(model, parse_pass_specs(spec), PassContext(calibration=calib or calibration()))
    return src, save_model(model, tmp_path / name), record


def feeds(count=2, tokens=24, seed=11):
    rng = np.random.default_rng(seed)
    return [{"X": rng.standard_normal((2, tokens, H)).astype(np.float32)} for _ in range(count)]


CASES = [("relu", False), ("gelu-erf", False), ("gelu-tanh", False), ("silu", False), ("quick_gelu", False),
         ("silu", True), ("gelu-erf", True)]
KERNEL = {("relu", False), ("gelu-tanh", False), ("silu", False), ("silu", True)}  # activations the kernel has


@pytest.mark.parametrize("kind,gated", CASES)
@pytest.mark.parametrize("lowering", ["gather", "contrib", "masked"])
def test_every_expert_active_is_exact(tmp_path, kind, gated, lowering):
    spec = f"moe:experts=4,k=4,lowering={lowering},shared=0.25"
    if lowering == "contrib" and (kind, gated) not in KERNEL:
        src = save(ffn(kind, gated=gated), tmp_path / "src.onnx")
        (record,) = run_passes(load_model(src).model, parse_pass_specs(spec), PassContext(calibration=calibration()))
        assert record.skip_counts() == {Code.ACTIVATION_UNSUPPORTED: 1, Code.NOT_A_REGION: 1 + gated}
        return
    src, out, record = compile_moe(ffn(kind, gated=gated), spec, tmp_path)
    assert len(record.changed) == 1 and record.changed[0].details["lowering"] == lowering
    verdict = verify_models(src, out, feeds())  # default fp32 tolerances
    assert verdict.passed, verdict.lines()


@pytest.mark.parametrize("kind,gated", [("relu", False), ("silu", True), ("gelu-tanh", False)])
def test_lowerings_agree_with_k_below_e(tmp_path, kind, gated):
    """Same routing, same experts: gather, contrib and masked compute the same sum."""
    outs = {}
    for lowering in ("gather", "contrib", "masked"):
        _, out, record = compile_moe(ffn(kind, gated=gated), f"moe:experts=8,k=2,lowering={lowering},shared=0.125",
                                     tmp_path, f"{lowering}.onnx")
        assert record.changed[0].details["k"] == 2 and record.changed[0].details["shared"] == 6
        outs[lowering] = [run_ort(out, f)[0] for f in feeds()]
    for lowering in ("contrib", "masked"):
        for a, b in zip(outs["gather"], outs[lowering]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def test_k_below_e_moves_the_output_and_records_the_router(tmp_path):
    src, out, record = compile_moe(ffn("relu"), "moe:experts=8,k=2,shared=0", tmp_path)
    site = record.changed[0]
    assert site.details["lowering"] == "gather" and site.details["expert_size"] == 6
    assert 0 < site.details["router_recall"] <= 1 and sum(site.details["expert_load"]) == pytest.approx(1.0)
    assert site.details["output_error"] < site.details["output_error_before_refit"]  # the refit helped
    verdict = verify_models(src, out, feeds(), exact=False)
    assert not verdict.passed and verdict.outputs[0].cosine > 0.5
    assert site.sparsity_after == pytest.approx(0.75)  # 2 of 8 experts active, nothing shared


@pytest.mark.parametrize("lowering", ["gather", "contrib", "masked"])
def test_an_ffn_output_that_is_a_graph_output_keeps_its_name(tmp_path, lowering):
    proto = ffn("relu")
    proto.graph.node.pop()  # no residual: the FFN's output is the graph output
    proto.graph.node[-1].output[0] = "Y"
    for shared in ("0", "0.25"):
        src, out, record = compile_moe(proto, f"moe:experts=4,k=4,shared={shared},lowering={lowering}", tmp_path,
                                       f"{lowering}{shared}.onnx")
        verdict = verify_models(src, out, feeds())
        assert verdict.passed and [o.name for o in verdict.outputs] == ["Y"], verdict.lines()


def test_uneven_split_pads_with_zero_neurons(tmp_path):
    src, out, record = compile_moe(ffn("silu", gated=True, hidden=50), "moe:experts=4,k=4,lowering=contrib,shared=0",
                                   tmp_path)
    assert record.changed[0].details["padding"] == 2 and record.changed[0].details["expert_size"] == 13
    assert verify_models(src, out, feeds()).passed


def test_kind_follows_k_and_options_are_checked():
    (p,) = parse_pass_specs("moe:experts=8,k=8")
    assert p.kind is Kind.EXACT and parse_pass_specs("moe")[0].kind is Kind.LOSSY
    for spec, message in (("moe:k=9", "k must be at most experts"), ("moe:experts=1", ">= 2"),
                          ("moe:k=0", ">= 1"), ("moe:shared=1.5", "<= 0.9"), ("moe:lowering=cuda", "one of")):
        with pytest.raises(OptionError, match=message):
            parse_pass_specs(spec)


def test_calibration_is_needed_unless_the_data_free_choices_are_made(tmp_path):
    src = save(ffn("relu"), tmp_path / "m.onnx")
    model = load_model(src).model
    with pytest.raises(OptionError, match="need calibration data"):
        run_passes(model, parse_pass_specs("moe"), PassContext())
    (record,) = run_passes(model, parse_pass_specs("moe:router=centroid,split=weights,shared=0.25,refit=false"),
                           PassContext())
    assert len(record.changed) == 1 and "router_recall" not in record.changed[0].details


def test_second_run_changes_nothing(tmp_path):
    _, out, _ = compile_moe(ffn("relu"), "moe:experts=4,k=2,shared=0.25", tmp_path)
    (again,) = run_passes(load_model(out).model, parse_pass_specs("moe:experts=4,k=2,shared=0.25"),
                          PassContext(calibration=calibration()))
    assert not again.changed and set(again.skip_counts()) == {Code.ALREADY_SPARSE}  # every MatMul is moe's now


def test_an_ffn_that_cannot_be_routed_is_skipped_with_its_code(tmp_path):
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"], name="first"), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="down"),
             helper.make_node("ReduceSum", ["a"], ["side"], keepdims=0)]
    proto = make_model(nodes, [("X", FLOAT, [4, H])], [("y", FLOAT, [4, H]), ("side", FLOAT, [])],
                       {"W1": weights(H, I), "W2": weights(I, H)}, opset=17)
    src = save(proto, tmp_path / "m.onnx")
    (record,) = run_passes(load_model(src).model, parse_pass_specs("moe"), PassContext(calibration=calibration()))
    assert record.skip_counts() == {Code.ESCAPES: 1, Code.NOT_A_REGION: 1}
    small = save(ffn("relu", hidden=4), tmp_path / "small.onnx")
    (record,) = run_passes(load_model(small).model, parse_pass_specs("moe:experts=8"),
                           PassContext(calibration=calibration()))
    assert record.skip_counts()[Code.TOO_SMALL] == 1


def test_balanced_kmeans_and_router_math():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 8)) * 5
    points = np.concatenate([c + rng.standard_normal((6, 8)) * 0.1 for c in centers])
    labels = mx.balanced_kmeans(points, 4)
    assert sorted(np.bincount(labels).tolist()) == [6, 6, 6, 6]
    assert all(len(set(labels[i * 6:(i + 1) * 6])) == 1 for i in range(4))  # the true clusters
    assert np.array_equal(labels, mx.balanced_kmeans(points, 4))  # deterministic
    with pytest.raises(ValueError, match="do not divide"):
        mx.balanced_kmeans(points[:23], 4)
    hidden = np.abs(rng.standard_normal((100, 10)))
    hidden[:, 3] += 10  # always among the largest
    assert mx.activation_rates(hidden, 0.1)[3] == 1.0
    mass = rng.random((50, 4))
    assert mx.router_quality(mass, mass, 2).recall == 1.0 and mx.router_quality(-mass, mass, 2).recall == 0.0


def test_moe_on_real_exports(zoo_path, tmp_path):
    from sparsec.compiler import compile

    result = compile(zoo_path("tiny-llama"), passes="moe:experts=8,k=8", output=tmp_path / "a.onnx")
    assert result.judgement.status == "EXACT" and len(result.records[0].changed) == 2
    assert {s.details["lowering"] for s in result.records[0].changed} == {"gather"}
    kv = compile(zoo_path("tiny-llama-kv"), passes="moe:experts=8,k=8", output=tmp_path / "b.onnx")
    assert kv.judgement.status == "EXACT"
    assert {s.details["lowering"] for s in kv.records[0].changed} == {"contrib"}  # a decoder: the kernel
    minilm = compile(zoo_path("minilm"), passes="moe:experts=8,k=8", output=tmp_path / "c.onnx")
    assert minilm.judgement.status == "EXACT" and len(minilm.records[0].changed) == 6  # erf GELU, gathered
    ort_opt = compile(zoo_path("minilm-ort"), passes="moe:experts=8,k=8", output=tmp_path / "d.onnx")
    assert ort_opt.judgement.status == "EXACT" and len(ort_opt.records[0].changed) == 6  # BiasGelu


def test_the_html_report_plots_router_recall_and_expert_load(zoo_path, tmp_path):
    from sparsec.cli import main
    from tests.test_report import parse

    report = tmp_path / "r.html"
    assert main(["compile", str(zoo_path("tiny-llama")), "--passes", "moe:experts=4,k=2", "--best-effort",
                 "-o", str(tmp_path / "m.onnx"), "--report", str(report)]) == 0
    page = parse(report)
    assert "routers" in page.ids
    text = report.read_text()
    assert "router top-k recall against the oracle" in text and "expert load (fraction of token-slots; 0.250" in text
    loads = [float(v) for v in re.findall(r"expert \d: ([0-9.]+)</title>", text)]
    assert len(loads) == 8 and abs(sum(loads) - 2.0) < 0.01  # 2 layers x 4 experts, each layer's loads sum to 1
