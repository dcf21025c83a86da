"""The cost model: work and bytes per node from observed shapes, the roofline with a profile,
the CPU provider's attention facts, and predictions that move the right way."""

import dataclasses
import json

import numpy as np
import onnx_ir as ir
import pytest

from sparsec.cost import CPU, NodeCost, Profile, graph_costs, observed_shapes, predict
from tests.helpers import linear, save

PROFILE = Profile("test", [(1e6, 1e10), (1e9, 1e11)], 1e10, 1e-6, "test")


def test_a_product_costs_2mkn_flops_and_its_bytes(tmp_path):
    from sparsec.model_io import load_model

    path = save(linear(k=128, n=64), tmp_path / "m.onnx")
    feed = {"X": np.ones((32, 128), np.float32)}
    shapes, sizes = observed_shapes(path, feed)
    (cost,) = [c for c in graph_costs(load_model(path).model, shapes, sizes) if c.op == "MatMul"]
    assert cost.flops == 2 * 32 * 128 * 64
    assert cost.bytes == 4 * (32 * 128 + 128 * 64 + 32 * 64)
    assert cost.kind == "gemm"


def test_profile_rates_interpolate_and_times_follow_the_roofline():
    assert PROFILE.gemm_rate(1e6) == pytest.approx(1e10) and PROFILE.gemm_rate(1e9) == pytest.approx(1e11)
    assert 1e10 < PROFILE.gemm_rate(3e7) < 1e11 and PROFILE.gemm_rate(1e12) == pytest.approx(1e11)
    assert PROFILE.gemm_rate(1e4) < 1e10  # smaller than measured: less efficient, not more
    compute = NodeCost("a", "MatMul", 1e9, 1e3, "gemm")
    memory = NodeCost("b", "Add", 0, 1e9, "memory")
    assert compute.seconds(PROFILE) == pytest.approx(1e-6 + 1e-2)
    assert memory.seconds(PROFILE) == pytest.approx(1e-6 + 1e-1)
    # an operator with a rate of its own (a profile from `sparsec calibrate`) moves its bytes at it
    # an operator with rates of its own (a profile from `sparsec calibrate`) moves its bytes at
    # them: at its measured sizes, log-linear between them, the nearest one outside them
    slow = dataclasses.replace(PROFILE, op_bandwidth={"LayerNormalization": [(1e6, 4e9), (1e8, 1e9)]})
    norm = NodeCost("c", "LayerNormalization", 0, 1e9, "memory")
    assert norm.seconds(slow) == pytest.approx(1e-6 + 1.0) and memory.seconds(slow) == memory.seconds(PROFILE)
    assert slow.memory_rate("LayerNormalization", 1e6) == 4e9 and slow.memory_rate("LayerNormalization", 1e3) == 4e9
    assert slow.memory_rate("LayerNormalization", 1e7) == pytest.approx(2e9)
    assert slow.memory_rate("Add", 1e7) == PROFILE.bandwidth
    assert Profile.from_dict(slow.to_dict()) == slow
    old = {k: v for k, v in PROFILE.to_dict().items() if k != "op_bandwidth"}
    assert Profile.from_dict(old).op_bandwidth == {}  # measured before operators had rates
    assert Profile.from_dict({**old, "op_bandwidth": {"Gelu": 5e9}}).memory_rate("Gelu", 1e9) == 5e9  # one each


def test_quantized_products_run_at_their_forms_measured_rate(tmp_path):
    """The quantize pass's products are costed at the profile's quantized rates, the nodes around
    them as usual; a profile without quantized rates costs them as float products."""
    from sparsec.model_io import load_model, save_model
    from sparsec.pipeline import PassContext, parse_pass_specs, run_passes

    feed = {"X": np.ones((64, 256), np.float32)}
    fast = Profile("q", PROFILE.gemm, 1e10, 1e-6, "q", quantized={"int8-dynamic": [(1e6, 4e10), (1e9, 4e11)],
                                                                  "int4": [(1e6, 2e10), (1e9, 2e11)]})
    for spec, op, form in (("quantize:mode=dynamic", "MatMulInteger", "int8-dynamic"),
                           ("quantize:mode=int4", "MatMulNBits", "int4")):
        model = load_model(save(linear(k=256, n=128), tmp_path / "m.onnx")).model
        run_passes(model, parse_pass_specs(spec), PassContext())
        path = save_model(model, tmp_path / f"{form}.onnx")
        shapes, sizes = observed_shapes(path, feed)
        (cost,) = [c for c in graph_costs(load_model(path).model, shapes, sizes) if c.kind == "gemm"]
        assert cost.op == op and cost.form == form and cost.flops == 2 * 64 * 256 * 128
        assert fast.gemm_rate(cost.flops, cost.form) == pytest.approx(fast.quantized[form][0][1] * (
            PROFILE.gemm_rate(cost.flops) / PROFILE.gemm[0][1]), rel=1e-6)
        assert PROFILE.gemm_rate(cost.flops, cost.form) == PROFILE.gemm_rate(cost.flops)  # none measured
        assert predict(path, feed, fast).seconds < predict(path, feed, PROFILE).seconds
    assert Profile.from_dict(fast.to_dict()) == fast  # a saved profile keeps its quantized rates


def test_an_integer_products_quantization_nodes_run_inside_it(tmp_path):
    """ORT fuses DynamicQuantizeLinear, the scale product, the Cast and the scale Mul into its
    integer product: they take no time of their own, and the form's rate measured by calibrate
    is the whole probe's time (it does not move with the profile's bandwidth, as taking off a
    prediction for them did: 4-40x the float rate between calibrations)."""
    from sparsec.cost import GEMM_SIZES, _quantized_probes
    from sparsec.model_io import load_model, save_model
    from sparsec.pipeline import PassContext, parse_pass_specs, run_passes

    model = load_model(save(linear(k=256, n=128), tmp_path / "m.onnx")).model
    run_passes(model, parse_pass_specs("quantize:mode=dynamic"), PassContext())
    path = save_model(model, tmp_path / "q.onnx")
    feed = {"X": np.ones((64, 256), np.float32)}
    costs = graph_costs(load_model(path).model, *observed_shapes(path, feed))
    assert sorted(c.op for c in costs if c.kind == "fused") == ["Cast", "DynamicQuantizeLinear", "Mul", "Mul"]
    assert all(c.seconds(PROFILE) == 0 and c.form == "int8-dynamic" for c in costs if c.kind == "fused")
    assert [c.op for c in costs if c.kind != "fused"] == ["MatMulInteger", "Relu"]

    slow = dataclasses.replace(PROFILE, bandwidth=PROFILE.bandwidth / 100)
    for probe in _quantized_probes("quantize:mode=dynamic", np.random.default_rng(0), tmp_path, GEMM_SIZES[:3]):
        assert probe.target.op == "MatMulInteger"
        assert probe.share(1e-3, PROFILE) == probe.share(1e-3, slow) == pytest.approx(1e-3 - PROFILE.overhead)


def _gqa(window: int) -> ir.Model:
    from onnx import TensorProto, helper

    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "sl", "tl"], ["o", "pk", "pv"],
                            domain="com.microsoft", num_heads=2, kv_num_heads=2, local_window_size=window)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 64, 32])
                                            for n in "qkv"], [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    return ir.serde.deserialize_model(helper.make_model(graph))


def test_cpu_attention_windows_cost_as_much_as_dense_elsewhere_less():
    shapes = {"q": (1, 64, 32), "k": (1, 64, 32), "v": (1, 64, 32), "o": (1, 64, 32)}
    sizes = dict.fromkeys(shapes, 4)
    dense = graph_costs(_gqa(-1), shapes, sizes, CPU)[0].flops
    assert dense == 4 * 1 * 2 * 64 * (65 / 2) * 16  # 4 B N S keys H, causal: (S + 1) / 2 keys on average
    assert graph_costs(_gqa(8), shapes, sizes, CPU)[0].flops == dense  # the CPU kernel masks, it does not skip
    assert graph_costs(_gqa(8), shapes, sizes, "CUDAExecutionProvider")[0].flops == 4 * 2 * 64 * 8 * 16


def test_softmax_probes_read_masked_scores_as_attention_does():
    """Masked scores make the CPU's Softmax 8x slower per byte (5.4 against 42 GB/s here): the
    probes mask a decoder's scores causally and an encoder's last quarter of keys (padding)."""
    from sparsec.cost import _operator_probe

    low = np.finfo(np.float32).min
    _, feed = _operator_probe("Softmax", {"x": [1, 2, 8, 8]}, {"axis": -1}, None, np.random.default_rng(0),
                              causal=True)
    above = np.triu(np.ones((8, 8), bool), 1)
    assert (feed["x"][..., above] == low).all() and (feed["x"][..., ~above] > low).all()
    _, feed = _operator_probe("Softmax", {"x": [2, 2, 8, 8]}, {"axis": -1}, None, np.random.default_rng(0))
    assert (feed["x"][..., 6:] == low).all() and (feed["x"][..., :6] > low).all()


def test_attention_guard_probes_read_the_shapes_exported_attention_has(zoo_path):
    """Exported attention adds its mask to the scores (broadcast over the heads) and guards the
    probabilities: ``Where(IsNaN(p), 0, p)``. The Add, IsNaN and Where probes read what MiniLM's
    graph gives those nodes (the Where probe once read a padding mask over the keys, and ran 1.8x
    faster per byte than SmolLM2's 30 Where nodes; IsNaN had no probe: 3.5x under)."""
    import onnx

    from sparsec.cost import OPERATOR_PROBES, _operator_probe
    from sparsec.runtime.session import cpu_runner

    from sparsec.model_io import load_model

    graph = load_model(zoo_path("minilm")).model.graph
    guard = next(n for n in graph if n.op_type == "Where" and n.inputs[0].producer() is not None
                 and n.inputs[0].producer().op_type == "IsNaN")
    mask_add = next(n for n in graph if n.op_type == "Add"
                    and any(u.node.op_type == "Softmax" for u in n.outputs[0].uses()))
    runner = cpu_runner(threads=1)
    for op, model_node in (("Where", guard), ("IsNaN", guard.inputs[0].producer()), ("Add", mask_add)):
        sizes, attrs, before = OPERATOR_PROBES[op]
        for i, inputs in enumerate(sizes):
            proto, feed = _operator_probe(op, inputs, attrs, before, np.random.default_rng(0), causal=i == 1)
            (node,) = ir.serde.deserialize_model(onnx.load_from_string(proto)).graph
            shapes = {v.name: np.shape(feed[v.name]) if v.name in feed else v.const_value.shape
                      for v in node.inputs}
            if op != "Add" or i == 1:  # the Add's encoder size is a residual's, not the mask's
                assert [len(shapes[v.name]) for v in node.inputs] == [len(v.shape) for v in model_node.inputs], op
            if op == "Where":  # a full condition, a scalar zero, the full probabilities
                c, zero, p = (shapes[v.name] for v in node.inputs)
                assert c == p and zero == () and feed["c"].dtype == bool and not feed["c"].any()
            out = runner.run(runner.session(proto), feed)["y"]
            assert out.dtype == (bool if op == "IsNaN" else np.float32)
        if op == "Add":  # the decoder's size: a mask over the keys, broadcast over the heads
            assert sizes[1]["r"][1] == 1 < sizes[1]["x"][1]


def test_fused_attention_runs_at_the_measured_attention_rate():
    """GroupQueryAttention on the CPU runs 5-6x below the product rate (SmolLM2's 30 nodes: 52 ms
    at the product rate, 277 ms measured): a profile from calibrate carries its own rate, which
    GroupQueryAttention and SparseAttention nodes take; other attention ops, and profiles without
    it, stay at the product rate."""
    measured = dataclasses.replace(PROFILE, attention=[(1e6, 2e9), (1e9, 2e10)])
    gqa = NodeCost("a", "GroupQueryAttention", 1e8, 1e3, "attention")
    assert measured.attention_rate(1e8, "GroupQueryAttention") == pytest.approx(2e9 * 10 ** (2 / 3))
    assert gqa.seconds(measured) == pytest.approx(1e-6 + 1e8 / (2e9 * 10 ** (2 / 3)))
    assert gqa.seconds(PROFILE) == pytest.approx(1e-6 + 1e8 / PROFILE.gemm_rate(1e8))
    assert measured.attention_rate(1e8, "SparseAttention") == measured.attention_rate(1e8, "GroupQueryAttention")
    assert measured.attention_rate(1e8, "MultiHeadAttention") == PROFILE.gemm_rate(1e8)
    assert Profile.from_dict(measured.to_dict()) == measured
    assert Profile.from_dict({k: v for k, v in PROFILE.to_dict().items() if k != "attention"}).attention == []


def test_structured_pruning_is_predicted_faster_and_in_proportion(zoo_path, tmp_path):
    from sparsec.models import bert
    from tests.test_attention import rewrite

    src = zoo_path("minilm")
    feed = bert.encode(["A sentence of a few words for the cost model."] * 4)
    profile = Profile("test", [(1e6, 2e10), (1e8, 6e10), (1e10, 8e10)], 2e10, 4e-6, "test")
    base = predict(src, feed, profile)
    _, half, _ = rewrite(src, "ffn-neurons:ratio=0.5", tmp_path / "half.onnx")
    _, most, _ = rewrite(src, "ffn-neurons:ratio=0.75", tmp_path / "most.onnx")
    t_half, t_most = predict(half, feed, profile).seconds, predict(most, feed, profile).seconds
    assert base.seconds > t_half > t_most
    ffn = sum(t for c, t in base.nodes if c.kind == "gemm") * 0.6  # FFNs: about 2/3 of MiniLM's products
    assert base.seconds - t_half < 0.5 * ffn + 1e-4  # at most half of the FFN time goes


@pytest.mark.integration
def test_calibrate_measures_this_machine(tmp_path, monkeypatch):
    from sparsec.cli import main
    from sparsec.cost import load_profile
    from sparsec.targets import get_target

    monkeypatch.setenv("SPARSEC_CACHE", str(tmp_path))
    assert "published" in load_profile(get_target("cpu")).source
    assert main(["calibrate", "--target", "cpu", "--threads", "1"]) == 0
    profile = load_profile(get_target("cpu"))
    assert "measured" in profile.source and profile.threads == 1
    assert all(rate > 1e8 for _, rate in profile.gemm) and profile.bandwidth > 1e8 and 0 < profile.overhead < 1e-3
    assert set(profile.quantized) == {"int8-dynamic", "int4"}  # ONNX Runtime's quantized products, measured
    assert all(len(points) == len(profile.gemm) and all(r > 1e8 for _, r in points)
               for points in profile.quantized.values())
    # operators measured on their own at two sizes: a layer norm (fused with the residual Add
    # before it) is far slower than the bandwidth of a large Add; every rate is a real bytes/s
    assert set(profile.op_bandwidth) == {"Add", "LayerNormalization", "Gelu", "Softmax", "Transpose", "IsNaN", "Where"}
    assert all(len(points) == 2 and all(1e8 < rate < 1e12 for _, rate in points)
               for points in profile.op_bandwidth.values())
    assert all(rate < profile.bandwidth / 2 for _, rate in profile.op_bandwidth["LayerNormalization"])
    # GroupQueryAttention on causal prompts of 128-1024 tokens: slower than a product of its size
    assert len(profile.attention) == 3 and all(r > 1e8 for _, r in profile.attention)
    assert all(rate < profile.gemm_rate(flops) for flops, rate in profile.attention)
    assert main(["calibrate", "--target", "ampere"]) == 2  # a GPU target is not measured on this machine
    assert "published" in load_profile(get_target("ampere")).source
    copied = tmp_path / "profiles" / "ampere.json"  # a profile measured on the GPU machine, copied here
    copied.write_text(json.dumps({**profile.to_dict(), "name": "ampere", "source": "measured on gpu-host"}))
    assert load_profile(get_target("ampere")).source == "measured on gpu-host"


def test_bench_command_times_plain_and_shared_cache_models_side_by_side(kv_paths, capsys):
    import json

    from sparsec.cli import main

    src, fused, sparse = kv_paths
    assert main(["bench", str(src), str(fused), str(sparse), "--mode", "decode", "--context", "40", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["ratios"]) == {"original", str(fused), str(sparse)} and data["mode"] == "decode"
    assert data["ratios"]["original"]["median"] == 1.0 and data["ratios"][str(sparse)]["median"] > 0
    assert main(["bench", str(src), str(fused), "--mode", "decode", "--context", "40"]) == 0
    assert "| original |" in capsys.readouterr().out
    assert main(["bench", str(fused), str(fused), "--mode", "decode", "--target", "nosuch"]) == 2
    junk = fused.parent / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert main(["bench", str(src), str(junk)]) == 2  # a bad file: one line, no traceback
    assert "not an ONNX model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def kv_paths(tmp_path_factory):
    from sparsec.models import build
    from tests.test_attention import rewrite

    src = build("tiny-llama-kv")
    root = tmp_path_factory.mktemp("bench")
    _, fused, _ = rewrite(src, "attention", root / "fused.onnx")
    _, sparse, _ = rewrite(src, "attention:block=16,local_blocks=2,lowering=sparse,max_positions=256",
                           root / "sparse.onnx")
    return src, fused, sparse
