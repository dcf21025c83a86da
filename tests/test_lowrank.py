"""Sparse + low-rank (OATS): the decomposition, its lowering beside MatMul / Gemm, skips, records."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from sparsec.analyze import analyze
from sparsec.data import Calibration
from sparsec.errors import OptionError
from sparsec.passes import lowrank, prune_methods
from sparsec.passes.patterns import Code
from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
from sparsec.sparsity import NMLayout, UnstructuredLayout, is_nm
from tests.helpers import FLOAT, linear, make_model, run_ort, save, weights
from tests.test_prune_methods import correlated_inputs


def planted(rows=48, k=64, rank=6, seed=0):
    """A weight with a strong low-rank part (as outlier directions make in real layers)."""
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, k)) * 0.6
    return (rng.standard_normal((rows, k)) + low).astype(np.float32)


@pytest.mark.parametrize("layout", [NMLayout(2, 4), UnstructuredLayout(0.5)], ids=lambda l: l.name)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_reconstruction_error_falls_as_the_rank_grows(layout, method):
    x = correlated_inputs(tokens=512, k=64, seed=1)
    w = planted()
    stat = None
    if method != "magnitude":
        stat = prune_methods.new_statistic(method, 64, "cpu")
        stat.add(x)
    errors = []
    for rank in (0, 2, 6, 12, 24):
        result = prune_methods.prune_matrix(method, w, layout, stat, rank=rank)
        s = result.values if result.values is not None else np.where(result.mask, w, 0)
        assert layout.complies(s)
        approx = s + (result.u @ result.v if rank else 0)
        if rank:
            assert result.u.shape == (48, rank) and result.v.shape == (rank, 64)
        errors.append(np.linalg.norm(x @ (w - approx).T) / np.linalg.norm(x @ w.T))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[2] < 0.7 * errors[0]  # the planted rank is found


def test_decomposition_is_deterministic_and_scaled_by_activation_norms():
    w = planted(seed=2)
    scale = np.exp(np.random.default_rng(3).standard_normal(64)).astype(np.float32)
    a = lowrank.decompose(w, NMLayout(2, 4), 4, scale)
    b = lowrank.decompose(w, NMLayout(2, 4), 4, scale)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    plain = lowrank.decompose(w, NMLayout(2, 4), 4, None)
    assert not np.allclose(a[0] @ a[1], plain[0] @ plain[1], atol=1e-3)


def test_layer_rank_under_a_parameter_budget():
    assert lowrank.layer_rank(576, 1536, 0, 0.1) == int(0.1 * 576 * 1536 / (576 + 1536))
    assert lowrank.layer_rank(576, 1536, 16, 0.0) == 16
    assert lowrank.layer_rank(8, 4, 100, 0.0) == 4
    assert lowrank.layer_rank(64, 64, 0, 0.0) == 0


def run(model, spec, calib=None):
    ctx = PassContext(calibration=calib) if calib is not None else PassContext()
    (record,) = run_passes(model, parse_pass_specs(spec), ctx)
    return record


def factors(model):
    """{pruned weight: V^T @ U^T} from the thin MatMuls tagged with the weight they stand beside."""
    found = {}
    for node in model.graph:
        of = node.metadata_props.get(lowrank.FACTOR_TAG)
        if of is not None:
            found.setdefault(of, []).append(node.inputs[1].const_value.numpy())
    return {of: vt @ ut for of, (vt, ut) in found.items()}


def dense_equivalent(model, weight="W"):
    """The weight of the only pruned site in its graph layout, S + (U V) laid out the same way."""
    found = factors(model)
    assert set(found) == {weight}
    return model.graph.initializers[weight].const_value.numpy(), found[weight]


@pytest.mark.parametrize("op,attrs", [("MatMul", {}), ("Gemm", {}), ("Gemm", {"transB": 1}),
                                      ("Gemm", {"transB": 1, "alpha": 0.5, "beta": 2.0})])
def test_lowered_graph_equals_s_plus_uv_applied_densely(tmp_path, op, attrs):
    k, n = 64, 32
    proto = linear(op, k=k, n=n, **attrs)
    if "beta" in attrs:  # with a bias
        proto.graph.node[0].input.append("C")
        proto.graph.initializer.append(numpy_helper.from_array(weights(n, seed=5), "C"))
    model = ir.serde.deserialize_model(proto)
    x = correlated_inputs(tokens=256, k=k, seed=4)
    calib = Calibration([{"X": x}], "test")
    record = run(model, "nm:method=wanda,rank=4,min_params=0", calib)
    (site,) = record.changed
    assert site.details["lowrank"] == {"rank": 4, "extra_params": 4 * (n + k),
                                       "extra_flops_per_token": 8 * (n + k), "dense_flops_per_token": 2 * n * k}
    s, uv = dense_equivalent(model)
    trans_b = attrs.get("transB", 0)
    assert is_nm(s, 2, 4, axis=1 if trans_b else 0)
    # The graph computes X @ S + (X @ V^T) @ U^T, alpha included: compare with S + UV dense.
    dense_w = s.T if trans_b else s
    dense_w = dense_w + uv / attrs.get("alpha", 1.0)
    out = save(ir.serde.serialize_model(model), tmp_path / "m.onnx")
    feed = {"X": weights(16, k, seed=9)}
    y = attrs.get("alpha", 1.0) * feed["X"] @ dense_w
    if "beta" in attrs:
        y = y + attrs["beta"] * weights(n, seed=5)
    np.testing.assert_allclose(run_ort(out, feed)[0], np.maximum(y, 0), rtol=1e-4, atol=1e-4)
    assert [node.op_type for node in model.graph].count("MatMul") == 2 + (op == "MatMul")
    assert "sparse + low-rank: 1 weights with rank 4" in " ".join(record.notes)
    # The factors are real parameters: the analysis counts them.
    assert analyze(model).params == k * n + 4 * (k + n) + (n if "beta" in attrs else 0)


@pytest.mark.parametrize("spec", ["nm:method=magnitude,rank=4", "unstructured:method=magnitude,rank=4",
                                  "block:method=magnitude,rank=4"])
def test_second_run_changes_nothing(tmp_path, spec):
    model = ir.serde.deserialize_model(linear(k=64, n=32))
    first = run(model, spec + ",min_params=0")
    assert len(first.changed) == 1 and first.changed[0].details["lowrank"]["rank"] == 4
    before = ir.serde.serialize_model(model).SerializeToString()
    again = run(model, spec + ",min_params=0")
    assert not again.changed
    assert again.skip_counts() == {Code.ALREADY_SPARSE: 1, Code.LOWRANK_FACTOR: 2}
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_graph_output_and_chained_layers(tmp_path):
    """The pruned MatMul's output is a graph output and feeds the next pruned layer: the
    graph output keeps its name, and the second layer is calibrated on the sum."""
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["H"], name="l1"),
             helper.make_node("MatMul", ["H", "W2"], ["Y"], name="l2")]
    proto = make_model(nodes, [("X", FLOAT, ["B", 64])], [("H", FLOAT, ["B", 64]), ("Y", FLOAT, ["B", 32])],
                       {"W1": weights(64, 64, seed=1), "W2": weights(64, 32, seed=2)})
    model = ir.serde.deserialize_model(proto)
    calib = Calibration([{"X": correlated_inputs(tokens=128, k=64)}], "test")
    record = run(model, "nm:method=wanda,rank=4,min_params=0,keep_output_layers=false", calib)
    assert len(record.changed) == 2
    assert [o.name for o in model.graph.outputs] == ["H", "Y"]
    out = save(ir.serde.serialize_model(model), tmp_path / "m.onnx")
    feed = {"X": weights(8, 64, seed=3)}
    s1 = model.graph.initializers["W1"].const_value.numpy()
    got = dict(zip(["H", "Y"], run_ort(out, feed)))
    uv1, uv2 = factors(model)["W1"], factors(model)["W2"]
    h = feed["X"] @ (s1 + uv1)
    np.testing.assert_allclose(got["H"], h, rtol=1e-4, atol=1e-4)
    s2 = model.graph.initializers["W2"].const_value.numpy()
    np.testing.assert_allclose(got["Y"], h @ (s2 + uv2), rtol=1e-4, atol=1e-3)


def test_unsupported_sites_are_skipped_with_a_code():
    nodes = [
        helper.make_node("MatMul", ["X", "Wb"], ["A"], name="batched"),  # (2, 64, 32): batched
        helper.make_node("MatMul", ["X2", "Ws"], ["B1"], name="shared1"),
        helper.make_node("MatMul", ["X2", "Ws"], ["B2"], name="shared2"),
        helper.make_node("Gemm", ["Wt", "X2"], ["G"], name="trans_a", transA=1),
        helper.make_node("Conv", ["I", "Wc"], ["C"], name="conv"),
    ]
    proto = make_model(nodes, [("X", FLOAT, [2, 8, 64]), ("X2", FLOAT, [8, 64]), ("I", FLOAT, [1, 16, 8, 8])],
                       [("A", FLOAT, None), ("B1", FLOAT, None), ("B2", FLOAT, None), ("G", FLOAT, None),
                        ("C", FLOAT, None)],
                       {"Wb": weights(2, 64, 32), "Ws": weights(64, 32, seed=1), "Wt": weights(8, 64, seed=2),
                        "Wc": weights(16, 16, 3, 3, seed=3)})
    model = ir.serde.deserialize_model(proto)
    record = run(model, "nm:method=magnitude,rank=4,min_params=0,keep_output_layers=false")
    codes = {s.node: s.code for s in record.skipped}
    assert codes == {"batched": Code.METHOD_UNSUPPORTED, "shared1": Code.SHARED_WEIGHT, "shared2": Code.SHARED_WEIGHT,
                     "trans_a": Code.METHOD_UNSUPPORTED, "conv": Code.METHOD_UNSUPPORTED}
    assert not record.changed


def test_option_errors():
    with pytest.raises(OptionError, match="not both"):
        parse_pass_specs("nm:rank=4,rank_ratio=0.1")
    with pytest.raises(OptionError, match="targets=dense"):
        parse_pass_specs("nm:method=sparsegpt,rank=4,targets=dense")
    with pytest.raises(OptionError):
        parse_pass_specs("nm:rank=-1")
    with pytest.raises(OptionError):
        parse_pass_specs("unstructured:rank_ratio=1.5")


def test_on_an_exported_decoder(zoo_path, tmp_path):
    """tiny-llama (dynamo export, 3-D activations): every linear gets its term, the model runs,
    and the layers' outputs on the calibration inputs move less than with S alone."""
    from sparsec.compiler import compile

    error = {}
    for name, extra in (("plain", ""), ("lowrank", ",rank_ratio=0.25,refine=dsnot")):
        result = compile(zoo_path("tiny-llama"), passes=f"nm:method=sparsegpt,min_params=0{extra}",
                         output=tmp_path / f"{name}.onnx", calib_samples=8, calib_seqlen=64, best_effort=True)
        record = result.records[0]
        assert len(record.changed) == 14
        assert np.isfinite(result.verdicts["real"].metrics["perplexity_candidate"])
        error[name] = np.mean([s.details["output_error"] for s in record.changed])
    info = record.extra["lowrank"]
    assert info["sites"] == 14 and info["extra_params"] > 0
    assert record.extra["refine"]["objective_after"] < record.extra["refine"]["objective_before"]
    assert error["lowrank"] < 0.8 * error["plain"]
    # Saved (external data) and loaded again: the factors are still known and left dense.
    from sparsec.model_io import load_model

    model = load_model(tmp_path / "lowrank.onnx").model
    assert len(factors(model)) == 14
    again = run(model, "nm:method=magnitude,min_params=0")
    counts = again.skip_counts()
    assert counts[Code.ALREADY_SPARSE] == 14 and counts[Code.LOWRANK_FACTOR] == 28 and not again.changed
