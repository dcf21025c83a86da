"""MoE nodes -> com.microsoft.QMoE in the quantize pass (passes/qmoe.py).

The reference for every numeric check is ONNX Runtime itself: the QMoE node the pass writes
against a com.microsoft.MoE node holding the weights decoded here, in numpy, from the QMoE
operator definition (codes (E, N, K * bits / 8) low nibble first, (q - zero point) * scale,
zero point 2^(bits - 1) when absent), independently of the pass's own decoding.
"""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsec.errors import PassError
from sparsec.passes import qmoe as qmoe_module
from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
from sparsec.sparsity import is_nm
from sparsec.targets import get_target

FLOAT = TensorProto.FLOAT
E, H, I, T = 4, 64, 32, 9


def moe_model(activation="relu", *, k=2, bias=True, hidden=H, inter=I, dtype=np.float32, extra=None, seed=0):
    """X (T, H), router logits P (T, E) -> MoE -> Y, with pruned weights: whole neurons, a 2:4
    layout along K in fc1 and scattered zeros in fc2."""
    rng = np.random.default_rng(seed)
    rows = 2 * inter if activation == "swiglu" else inter
    w1 = rng.standard_normal((E, rows, hidden)).astype(np.float32) * 0.2
    groups = w1.reshape(E, rows, hidden // 4, 4)
    np.put_along_axis(groups, np.argsort(np.abs(groups), axis=-1)[..., :2], 0.0, axis=-1)  # 2:4 along K
    w1[:, :2] = 0.0  # pruned neurons
    w2 = rng.standard_normal((E, hidden, inter)).astype(np.float32) * 0.2
    w2[rng.random(w2.shape) < 0.3] = 0.0
    w2[:, :, -1] = 0.0
    inits = {"fc1": w1.astype(dtype), "fc2": w2.astype(dtype)}
    if bias:
        inits["fc1_bias"] = (rng.standard_normal((E, rows)) * 0.1).astype(dtype)
        inits["fc2_bias"] = (rng.standard_normal((E, hidden)) * 0.1).astype(dtype)
    names = ["X", "P", "fc1", "fc1_bias" if bias else "", "fc2", "fc2_bias" if bias else ""]
    attrs = {"k": k, "activation_type": activation, "normalize_routing_weights": 1, **(extra or {})}
    if activation == "swiglu":
        attrs.setdefault("swiglu_fusion", 1)
    node = helper.make_node("MoE", names, ["Y"], name="moe", domain="com.microsoft", **attrs)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", elem, ["T", hidden]),
                                            helper.make_tensor_value_info("P", elem, ["T", E])],
                              [helper.make_tensor_value_info("Y", elem, ["T", hidden])],
                              [numpy_helper.from_array(v, n) for n, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model, inits


def feeds(seed=1, hidden=H):
    rng = np.random.default_rng(seed)
    return {"X": rng.standard_normal((T, hidden)).astype(np.float32),
            "P": rng.standard_normal((T, E)).astype(np.float32)}


def quantize(proto, spec, target=None):
    model = ir.serde.deserialize_model(proto)
    (record,) = run_passes(model, parse_pass_specs(spec), PassContext(target=target))
    return ir.serde.serialize_model(model), record


def ort(proto, feed):
    import onnxruntime

    return onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def dequantized(proto):
    """The QMoE node's fc1 / fc2 decoded from the operator definition: {"fc1": (E, N, K), ...}."""
    (node,) = [n for n in proto.graph.node if n.op_type == "QMoE"]
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs = {n: v.decode() if isinstance(v, bytes) else v for n, v in attrs.items()}
    bits, block = attrs["expert_weight_bits"], attrs.get("block_size", 0)
    inputs = list(node.input) + [""] * (14 - len(node.input))
    out = {}
    for name, (w, s, zp) in {"fc1": (2, 3, 11), "fc2": (5, 6, 12)}.items():
        codes = inits[inputs[w]]
        if bits == 4:  # element 2j in the low nibble of byte j
            q = np.empty(codes.shape[:2] + (codes.shape[2] * 2,), np.float64)
            q[..., 0::2], q[..., 1::2] = codes & 0x0F, codes >> 4
        else:
            q = codes.astype(np.float64)
        scales = inits[inputs[s]].astype(np.float64)
        scales = scales[..., None] if scales.ndim == 2 else scales
        per = q.shape[2] // scales.shape[2]
        assert per == (block or q.shape[2])  # the scales' blocks are the attribute's
        if inputs[zp]:
            z = inits[inputs[zp]]
            if bits == 4:  # blocked: (E, N, ceil(blocks / 2)), block b in nibble b % 2
                z = np.stack([z & 0x0F, z >> 4], -1).reshape(z.shape[0], z.shape[1], -1)[..., :scales.shape[2]]
            z = z.reshape(scales.shape).astype(np.float64)
        else:
            z = np.full(scales.shape, 2.0 ** (bits - 1))
        out[name] = ((q - np.repeat(z, per, 2)) * np.repeat(scales, per, 2)).astype(np.float32)
        out[name + "_bias"] = inits[inputs[w + 2]] if inputs[w + 2] in inits else None
    return out, attrs


def with_weights(proto, weights, inter):
    """The MoE model with its fc1 / fc2 (and fc1 bias) replaced by ``weights`` (padded neurons
    cut off again: they are zero)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    glu = any(a.name == "activation_type" and a.s == b"swiglu" for a in proto.graph.node[0].attribute)
    for t in out.graph.initializer:
        if t.name == "fc1":
            t.CopyFrom(numpy_helper.from_array(weights["fc1"][:, :(2 if glu else 1) * inter], "fc1"))
        elif t.name == "fc2":
            t.CopyFrom(numpy_helper.from_array(weights["fc2"][:, :, :inter], "fc2"))
    return out


CASES = [(act, k, bias) for act in ("relu", "gelu", "silu", "swiglu") for k, bias in ((1, True), (2, False))]
MODES = {"int8": "quantize:mode=dynamic", "uint8": "quantize:mode=dynamic,weight_type=uint8",
         "int4": "quantize:mode=int4,accuracy_level=0,symmetric=true",
         "int4-zero-points": "quantize:mode=int4,accuracy_level=0,block_size=32"}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("activation,k,bias", CASES)
def test_qmoe_equals_moe_with_the_dequantized_experts(mode, activation, k, bias):
    proto, original = moe_model(activation, k=k, bias=bias)
    out, record = quantize(proto, MODES[mode])
    assert [n.op_type for n in out.graph.node] == ["QMoE"]
    weights, attrs = dequantized(out)
    assert attrs["expert_weight_bits"] == (4 if mode.startswith("int4") else 8)
    assert attrs["weights_prepacked"] == 0 and attrs["k"] == k and attrs["activation_type"] == activation
    assert attrs.get("block_size", 0) == {"int4": 32, "int4-zero-points": 32}.get(mode, 0)
    for name in ("fc1", "fc2"):  # pruned zeros dequantize to exactly 0; fc1's 2:4 holds
        assert np.all(weights[name][original[name] == 0] == 0), name
        assert 0 < np.abs(weights[name] - original[name]).max() < (0.1 if mode.startswith("int4") else 0.01)
    assert is_nm(weights["fc1"], 2, 4, axis=2)
    feed = feeds()
    got, want = ort(out, feed), ort(with_weights(proto, weights, I), feed)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    float_out = ort(proto, feed)
    assert np.abs(got - float_out).max() > 1e-4  # it did quantize: the float model answers otherwise
    assert {s.details["stored"] for s in record.changed} == {"qmoe-int4" if mode.startswith("int4") else "qmoe-int8"}
    assert len(record.changed) == 2 and sum(s.details["bytes_after"] for s in record.changed) < \
        sum(s.details["bytes_before"] for s in record.changed) / (6 if mode.startswith("int4") else 3)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_int4_pads_experts_to_whole_blocks_with_zero_neurons(activation):
    proto, original = moe_model(activation, inter=24)  # 24 neurons: 8 zero ones make blocks of 32
    out, record = quantize(proto, "quantize:mode=int4,accuracy_level=0")
    weights, attrs = dequantized(out)
    assert attrs["block_size"] == 32 and weights["fc2"].shape == (E, H, 32)
    assert record.changed[0].details["padding_neurons"] == 8
    assert np.all(weights["fc2"][:, :, 24:] == 0) and np.all(weights["fc1"][:, original["fc1"].shape[1]:] == 0)
    feed = feeds()
    np.testing.assert_allclose(ort(out, feed), ort(with_weights(proto, weights, 24), feed), atol=1e-5, rtol=1e-4)


def test_int4_default_accuracy_level_quantizes_activations_inside_the_kernel():
    """accuracy_level=4 (the int4 default, as for MatMulNBits): int8 activations in the kernel,
    close to the dequantized MoE but not equal to it."""
    proto, _ = moe_model("silu")
    out, _ = quantize(proto, "quantize:mode=int4")
    weights, attrs = dequantized(out)
    assert attrs["accuracy_level"] == 4
    feed = feeds()
    got, want = ort(out, feed), ort(with_weights(proto, weights, I), feed)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert 1e-6 < rel < 3e-2


def skips(record):
    return {s.code for s in record.skipped}


@pytest.mark.parametrize("build,spec,code", [
    (lambda: moe_model(), "quantize:mode=static", "MODE_UNSUPPORTED"),
    (lambda: moe_model(extra={"activation_type": "geglu"}), "quantize", "ACTIVATION_UNSUPPORTED"),
    (lambda: moe_model("swiglu", extra={"swiglu_fusion": 2}), "quantize", "UNKNOWN_LAYOUT"),
    (lambda: moe_model(extra={"normalize_routing_weights": 0}), "quantize", "ROUTING_UNSUPPORTED"),
    (lambda: moe_model(dtype=np.float16), "quantize", "DTYPE_UNSUPPORTED"),
    (lambda: moe_model(hidden=40), "quantize:mode=int4", "NOT_DIVISIBLE"),
    (lambda: moe_model(), "quantize:exclude=MoE", "EXCLUDED"),
    (lambda: moe_model(), "quantize:include=nothing*", "NOT_SELECTED"),
])
def test_skips_each_with_its_code(build, spec, code):
    proto, _ = build()
    out, record = quantize(proto, spec)
    assert skips(record) == {code} and not record.changed
    assert [n.op_type for n in out.graph.node] == ["MoE"]


def test_computed_weights_and_fc3_are_skipped():
    proto, _ = moe_model()
    node = proto.graph.node[0]
    node.input.extend(["fc3"])  # a separate fc3 (up projection)
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros((E, I, H), np.float32), "fc3"))
    assert skips(quantize(proto, "quantize")[1]) == {"UNKNOWN_LAYOUT"}
    proto, _ = moe_model()
    fc2 = [t for t in proto.graph.initializer if t.name == "fc2"][0]
    proto.graph.initializer.remove(fc2)
    proto.graph.input.append(helper.make_tensor_value_info("fc2", FLOAT, [E, H, I]))  # computed: an input
    assert skips(quantize(proto, "quantize")[1]) == {"NOT_CONSTANT"}


def test_a_target_without_an_fp32_kernel_keeps_the_moe_node():
    """On the GPU targets the CUDA provider would run the node, and its QMoE is fp16/bf16 only."""
    proto, _ = moe_model()
    out, record = quantize(proto, "quantize", get_target("hopper"))
    assert skips(record) == {"NO_KERNEL"} and "fp16 and bf16 only" in record.skipped[0].message
    assert [n.op_type for n in out.graph.node] == ["MoE"]
    _, on_cpu = quantize(proto, "quantize", get_target("cpu"))
    assert len(on_cpu.changed) == 2


def test_second_run_changes_nothing():
    proto, _ = moe_model("swiglu")
    once, _ = quantize(proto, "quantize:mode=int4")
    twice, record = quantize(once, "quantize:mode=int4")
    assert not record.changed and not record.skipped
    assert twice.SerializeToString() == once.SerializeToString()


def test_a_lost_zero_is_a_pass_error_and_changes_nothing(monkeypatch):
    real = qmoe_module.encode_rows_8bit

    def broken(w, symmetric):
        encoded = real(w, symmetric)
        encoded.codes[0, 0, 0] += 1  # fc1[0, 0, 0] is a pruned zero: now it dequantizes to one step
        return encoded

    monkeypatch.setattr(qmoe_module, "encode_rows_8bit", broken)
    proto, _ = moe_model()
    model = ir.serde.deserialize_model(proto)
    with pytest.raises(PassError, match="that were 0 do not dequantize to 0 in QMoE"):
        run_passes(model, parse_pass_specs("quantize"), PassContext())
    assert [n.op_type for n in model.graph] == ["MoE"]


@pytest.mark.parametrize("spec", ["quantize:mode=dynamic", "quantize:mode=int4"])
def test_moe_contrib_then_quantize_keeps_the_router_float_unless_asked(tmp_path, spec):
    from sparsec.model_io import save_model
    from tests.test_moe import calibration, ffn
    from tests.test_moe import feeds as ffn_feeds

    proto = ffn("silu", gated=True)  # SwiGLU, 48 neurons: 4 experts of 12 (int4: padded to 16)
    model = ir.serde.deserialize_model(proto)
    moe, quant = run_passes(model, parse_pass_specs(f"moe:experts=4,k=2,lowering=contrib,shared=0;{spec}"),
                            PassContext(calibration=calibration()))
    ops = [n.op_type for n in model.graph]
    assert "QMoE" in ops and "MoE" not in ops and ops.count("MatMul") == 1  # the router, float
    assert skips(quant) == {"ROUTER"} and len(quant.changed) == 2
    path = save_model(model, tmp_path / "q.onnx")
    (moe_only,) = run_passes(routed := ir.serde.deserialize_model(proto),
                             parse_pass_specs("moe:experts=4,k=2,lowering=contrib,shared=0"),
                             PassContext(calibration=calibration()))
    reference = save_model(routed, tmp_path / "moe.onnx")
    feed = ffn_feeds()[0]
    got, want = (ort(onnx.load(str(p)), feed) for p in (path, reference))
    # 4-bit codes are 7% off the weights here (blocks of 16), 8-bit 0.5%: the outputs follow
    assert 0 < np.linalg.norm(got - want) / np.linalg.norm(want) < (0.2 if "int4" in spec else 0.02)
    everything = ir.serde.deserialize_model(proto)
    _, quant = run_passes(everything, parse_pass_specs(f"moe:experts=4,k=2,lowering=contrib,shared=0;{spec},"
                                                       "routers=true"), PassContext(calibration=calibration()))
    assert not quant.skipped and len(quant.changed) == 3
    assert "MatMul" not in [n.op_type for n in everything.graph]


@pytest.mark.parametrize("model,passes,stored", [
    ("tiny-llama", "moe:experts=4,k=4,lowering=contrib;quantize:mode=int4", "qmoe-int4"),
    ("tiny-mixtral", "moe-fuse;quantize:mode=dynamic", "qmoe-int8"),
])
def test_moe_then_quantize_compiles_and_verifies_on_real_exports(zoo_path, tmp_path, model, passes, stored):
    """tiny-llama (SwiGLU, exported with torch dynamo): every expert active (the MoE rewrite is
    exact), then int4; tiny-mixtral: its own experts fused into MoE, then int8. Each MoE node is
    a QMoE node, the routers float, and the compile's verification on held-out text judges it
    against the default perplexity budget."""
    import sparsec

    result = sparsec.compile(zoo_path(model), passes=passes, output=tmp_path / "q.onnx")
    moe, quant = result.records
    assert len(moe.changed) == 2 and quant.skip_counts() == {"NOT_CONSTANT": 5, "ROUTER": 2}
    ops = quant.extra["quantization"]["ops"]
    assert ops["QMoE"] == {"before": 0, "after": 2} and ops["MoE"] == {"before": 2, "after": 0}
    experts = [s for s in quant.changed if s.details["stored"] == stored]
    assert len(experts) == 4
    assert result.judgement.status == "WITHIN BUDGET" and result.output.exists()
    ratio = result.verdicts["real"].metrics["perplexity_ratio"]
    assert ratio != 1.0 and 0.8 < ratio < 1.2  # moved by the quantization, within the default budget
    saved = onnx.load(str(result.output))
    assert sum(n.op_type == "QMoE" for n in saved.graph.node) == 2
