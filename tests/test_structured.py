"""Structured pruning: physically removing units equals zeroing their exit weights (exact),
on real exports (MiniLM MHA, LLaMA GQA, a CNN) and hand-built graphs; skip codes."""

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from sparsec.model_io import load_model, save_model
from sparsec.passes import structured_patterns as sp
from sparsec.passes.patterns import Code
from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
from sparsec.feeds import input_specs, random_feeds
from sparsec.verify import verify_models
from tests.helpers import FLOAT, make_model, save, weights


def masked_reference(path, record, match, tmp_path):
    """The original model with the removed units' exit weights zeroed."""
    model = load_model(path).model
    exits = {n.name: n for n in model.graph}
    for site in record.changed:
        region = match(exits[site.node])
        assert region, region
        w = region.exit.ref.numpy().copy()
        rows = np.concatenate([np.arange(u * region.exit_unit, (u + 1) * region.exit_unit)
                               for u in site.details["removed_units"]])
        np.moveaxis(w, region.exit.axis, 0)[rows] = 0
        region.exit.ref.replace(w)
    return save_model(model, tmp_path / "masked.onnx", external_data=True)


def prune_and_compare(path, spec, match, tmp_path, dims=None, atol=None, rtol=None):
    """Pruned against masked, at the default fp32 tolerances (1e-5 / 1e-4) unless a test says why not."""
    model = load_model(path).model
    (record,) = run_passes(model, parse_pass_specs(spec), PassContext())
    assert record.changed, record.sites
    pruned = save_model(model, tmp_path / "pruned.onnx", external_data=True)
    onnx.checker.check_model(str(pruned), full_check=True)
    reference = masked_reference(path, record, match, tmp_path)
    feeds = random_feeds(input_specs(model), samples=2, dims=dims or {})
    verdict = verify_models(reference, pruned, feeds, atol=atol, rtol=rtol)
    assert verdict.passed, verdict.lines()
    return record


def test_minilm_ffn_neurons(zoo_path, tmp_path):
    record = prune_and_compare(zoo_path("minilm"), "ffn-neurons:ratio=0.25", sp.match_ffn, tmp_path)
    assert [s.details["units_after"] for s in record.changed] == [1152] * 6


def test_minilm_heads(zoo_path, tmp_path):
    record = prune_and_compare(zoo_path("minilm"), "attention-heads:ratio=0.34", sp.match_attention, tmp_path)
    assert [s.details["units_after"] for s in record.changed] == [8] * 6


def test_llama_swiglu_and_grouped_heads(zoo_path, tmp_path):
    record = prune_and_compare(zoo_path("tiny-llama"), "ffn-neurons:ratio=0.5,multiple=1",
                               sp.match_ffn, tmp_path, {"sequence": 8})
    assert record.changed[0].details["units_after"] == 96
    record = prune_and_compare(zoo_path("tiny-llama"), "attention-heads:ratio=0.5", sp.match_attention,
                               tmp_path, {"sequence": 8})
    assert [(s.details["units_before"], s.details["units_after"]) for s in record.changed] == [(2, 1)] * 2


def test_cnn_channels_through_depthwise(zoo_path, tmp_path):
    record = prune_and_compare(zoo_path("cnn"), "conv-channels:ratio=0.5,multiple=1", sp.match_conv_channels,
                               tmp_path)
    assert sorted(s.details["units_after"] for s in record.changed) == [8, 16]


def _mha(tmp_path, heads=4, d=8, constant_shapes=True, per_head_bias=False):
    """A legacy-exporter style attention block: constant reshape targets, biases."""
    hidden = heads * d
    shape_in = np.array([0, 0, heads, d], np.int64) if constant_shapes else np.array([0, 0, -1, d], np.int64)
    nodes = []
    inits = {"shape_in": shape_in, "shape_out": np.array([0, 0, hidden], np.int64), "scale": np.float32(d ** -0.5),
             "Wo": weights(hidden, hidden, seed=9)}
    for i, name in enumerate("qkv"):
        inits[f"W{name}"] = weights(hidden, hidden, seed=i)
        inits[f"b{name}"] = weights(hidden, seed=10 + i)
        nodes += [helper.make_node("MatMul", ["X", f"W{name}"], [f"{name}0"]),
                  helper.make_node("Add", [f"{name}0", f"b{name}"], [f"{name}1"]),
                  helper.make_node("Reshape", [f"{name}1", "shape_in"], [f"{name}2"]),
                  helper.make_node("Transpose", [f"{name}2"], [name], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["s0"]),
              helper.make_node("Mul", ["s0", "scale"], ["s1"])]
    if per_head_bias:
        inits["head_bias"] = weights(1, heads, 1, 1, seed=20)
        nodes.append(helper.make_node("Add", ["s1", "head_bias"], ["s2"]))
    else:
        nodes.append(helper.make_node("Identity", ["s1"], ["s2"]))
    nodes += [helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["o0"]),
              helper.make_node("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["o1", "shape_out"], ["o2"]),
              helper.make_node("MatMul", ["o2", "Wo"], ["Y"], name="out_proj")]
    proto = make_model(nodes, [("X", FLOAT, [2, 5, hidden])], [("Y", FLOAT, [2, 5, hidden])], inits, opset=13)
    return save(proto, tmp_path / "mha.onnx")


def test_attention_with_constant_shapes(tmp_path):
    path = _mha(tmp_path)
    record = prune_and_compare(path, "attention-heads:ratio=0.5", sp.match_attention, tmp_path)
    assert record.changed[0].details["units_after"] == 2
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    shapes = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in pruned.graph.initializer if "shape" in i.name}
    assert [0, 0, 2, 8] in shapes.values() and [0, 0, 16] in shapes.values()


def test_per_head_constant_is_not_understood(tmp_path):
    model = load_model(_mha(tmp_path, per_head_bias=True)).model
    out_proj = next(n for n in model.graph if n.name == "out_proj")
    failure = sp.match_attention(out_proj)
    assert not failure and failure.code in (Code.UNKNOWN_LAYOUT, Code.NOT_A_REGION)


def test_ffn_hidden_value_read_elsewhere_escapes(tmp_path):
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="down"),
             helper.make_node("ReduceSum", ["a"], ["side"], keepdims=0)]
    proto = make_model(nodes, [("X", FLOAT, [4, 16])], [("y", FLOAT, [4, 16]), ("side", FLOAT, [])],
                       {"W1": weights(16, 64), "W2": weights(64, 16)})
    model = ir.serde.deserialize_model(proto)
    (record,) = run_passes(model, parse_pass_specs("ffn-neurons"), PassContext())
    assert record.skip_counts() == {Code.ESCAPES: 1, Code.NOT_A_REGION: 1} and not record.changed


def test_gelu_with_per_neuron_constant_is_sliced(tmp_path):
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"]), helper.make_node("Mul", ["h", "gain"], ["g"]),
             helper.make_node("Tanh", ["g"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="down")]
    proto = make_model(nodes, [("X", FLOAT, [4, 16])], [("y", FLOAT, [4, 16])],
                       {"W1": weights(16, 64), "W2": weights(64, 16), "gain": weights(64, seed=3)})
    path = save(proto, tmp_path / "f.onnx")
    record = prune_and_compare(path, "ffn-neurons:ratio=0.5", sp.match_ffn, tmp_path)
    assert record.changed[0].details["units_after"] == 32


def test_activation_scores_and_reconstruction(zoo_path, tmp_path):
    from sparsec.compiler import compile

    src = zoo_path("minilm")  # real weights: random-init FFNs barely move a BERT's output
    plain = compile(src, passes="ffn-neurons:ratio=0.5,method=activation,reconstruct=false",
                    output=tmp_path / "a.onnx", calib_samples=64, best_effort=True)
    refit = compile(src, passes="ffn-neurons:ratio=0.5,method=activation", output=tmp_path / "b.onnx",
                    calib_samples=64, best_effort=True)
    mag = compile(src, passes="ffn-neurons:ratio=0.5,method=magnitude", output=tmp_path / "c.onnx", best_effort=True)
    cos = {name: r.verdicts["real"].metrics["embedding_cosine_mean"]
           for name, r in (("plain", plain), ("refit", refit), ("magnitude", mag))}
    assert cos["refit"] > cos["plain"] and cos["refit"] > cos["magnitude"]
    assert all(s.details["reconstructed"] for s in refit.records[0].changed)


def test_constants_an_exporter_merged_are_cloned_per_region(zoo_path, tmp_path):
    """A Hugging Face export merged identical zero biases into one shared constant; every region
    still prunes (each gets its own copy), exactly as masking does."""
    from onnx_ir.passes.common import DeduplicateInitializersPass

    model = load_model(zoo_path("tiny-bert")).model
    for name, value in model.graph.initializers.items():
        if name.endswith(".bias") and ("intermediate" in name or "attention.self" in name):
            value.const_value = ir.Tensor(np.zeros(value.const_value.shape.numpy(), np.float32), name=name)
    DeduplicateInitializersPass()(model)
    shared = [v for v in model.graph.initializers.values() if len(v.uses()) > 1]
    assert shared, "the dedup pass merged nothing"
    path = save_model(model, tmp_path / "merged.onnx", external_data=True)
    record = prune_and_compare(path, "ffn-neurons:ratio=0.5", sp.match_ffn, tmp_path)
    assert len(record.changed) == 2 and not record.skip_counts().get(Code.ESCAPES)
    record = prune_and_compare(path, "attention-heads:ratio=0.5", sp.match_attention, tmp_path)
    assert len(record.changed) == 2 and not record.skip_counts().get(Code.ESCAPES)


def test_include_and_exclude_choose_the_regions(zoo_path):
    """One FFN by its module path; the others skipped NOT_SELECTED; an excluded one EXCLUDED."""
    model = load_model(zoo_path("minilm")).model
    (record,) = run_passes(model, parse_pass_specs("ffn-neurons:ratio=0.5,include=*layer.2.output.dense"),
                           PassContext())
    assert [s.site for s in record.changed] == ["m.encoder.layer.2.output.dense"]
    assert sum(s.code == Code.NOT_SELECTED.value for s in record.skipped) == 5
    model = load_model(zoo_path("minilm")).model
    (record,) = run_passes(model, parse_pass_specs("attention-heads:ratio=0.5,exclude=*layer.0*"), PassContext())
    assert len(record.changed) == 5 and sum(s.code == Code.EXCLUDED.value for s in record.skipped) == 1
