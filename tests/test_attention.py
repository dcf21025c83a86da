"""attention: the pattern's bias against its numpy reference; decoder attention fused into
GroupQueryAttention exactly (prompt and decode); windows as GQA attributes equal to the same
window as a mask; the bounded cache decoding like the full one; encoder masks; fused ops taking
a pattern; option errors."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from sparsec.cli import main
from sparsec.model_io import load_model, save_model
from sparsec.passes.attention_patterns import Pattern, emit_bias
from sparsec.passes.rewrite import Builder
from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
from sparsec.runtime.decode import Decoder
from sparsec.verify import recorded_floor
from tests.helpers import make_model, run_ort, save

PATTERNS = [Pattern(window=3), Pattern(window=2, sinks=2), Pattern(stride=3), Pattern(window=2, stride=4),
            Pattern(block=16, local_blocks=1), Pattern(block=16, global_blocks=1, local_blocks=2),
            Pattern(block=16, random_blocks=1, seed=4), Pattern(block=16, layout=np.tril(np.ones((4, 4), np.int8)))]


def rewrite(path, spec, out):
    model = load_model(path).model
    (record,) = run_passes(model, parse_pass_specs(spec), PassContext())
    return record, save_model(model, out), model


def bias_model(pattern, causal):
    """S and T in, the pattern's bias out, built by emit_bias."""
    graph = ir.Graph([ir.Value(name="S", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([])),
                      ir.Value(name="T", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))], [], nodes=[],
                     opset_imports={"": 17})
    b = Builder(graph, "bias", "attention", "test", 17)
    bias = emit_bias(b, graph.inputs[0], graph.inputs[1], pattern, causal, np.float32)
    graph.extend(b.nodes)
    bias.name = "bias"
    graph.outputs.append(bias)
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
def test_in_graph_bias_is_the_reference_pattern(tmp_path, pattern, causal):
    path = save_model(bias_model(pattern, causal), tmp_path / "bias.onnx")
    for s, t in ((64, 64), (1, 50), (7, 70), (33, 33)):
        (bias,) = run_ort(path, {"S": np.array(s, np.int64), "T": np.array(t, np.int64)})
        want = pattern.allowed_at(np.arange(t - s, t)[:, None], np.arange(t)[None], causal)
        assert bias.shape == (s, t)
        np.testing.assert_array_equal(bias == 0, want)
        assert (bias[~want] == np.finfo(np.float32).min).all()
        if not want.all():  # the pattern restricts something on this grid
            assert 0 < want.mean() < 1


def test_reference_pattern_facts():
    causal = Pattern(window=3).allowed(6, 6, True)
    assert causal.sum(axis=1).tolist() == [1, 2, 3, 3, 3, 3]
    sinks = Pattern(window=2, sinks=1).allowed(1, 10, True)  # one decode query at position 9
    assert np.flatnonzero(sinks[0]).tolist() == [0, 8, 9]
    encoder = Pattern(window=2, sinks=1).allowed(5, 5, False)
    assert encoder[0].all() and encoder[:, 0].all() and not encoder[4, 2]
    assert Pattern().allowed(4, 4, True).sum() == 10 and Pattern().empty


def test_decoder_attention_fuses_into_gqa_exactly(zoo_path, tmp_path):
    src = zoo_path("tiny-llama")
    record, out, model = rewrite(src, "attention", tmp_path / "fused.onnx")
    assert len(record.changed) == 2 and {s.details["lowering"] for s in record.changed} == {"gqa"}
    ops = [n.op_type for n in model.graph]
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops
    for seq in (1, 9, 40):
        feed = {"input_ids": np.random.default_rng(seq).integers(0, 500, (2, seq), dtype=np.int64)}
        want, got = run_ort(src, feed)[0], run_ort(out, feed)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert np.abs(want).max() > 0.1
    assert main(["verify", str(src), str(out)]) == 0
    assert recorded_floor(model.metadata_props) == (5e-3, 1e-3)  # sparsec verify compares at least this loosely


def decode(path, ids, steps=16):
    decoder = Decoder(path)
    logits = [decoder.prompt(ids)[0, -1]]
    for _ in range(steps):
        logits.append(decoder.step(int(logits[-1].argmax()))[0, -1])
    return np.array(logits), decoder


@pytest.fixture(scope="module")
def kv_models(tmp_path_factory):
    from sparsec.models import build

    src = build("tiny-llama-kv")
    root = tmp_path_factory.mktemp("kv")
    specs = {"fused": "attention", "mask": "attention:window=6,lowering=mask", "gqa": "attention:window=6",
             "bounded": "attention:window=6,cache=window", "long": "attention:window=512"}
    out = {name: rewrite(src, spec, root / f"{name}.onnx") for name, spec in specs.items()}
    return src, out


def test_kv_cache_fusion_is_exact_for_prompt_and_decode(kv_models):
    src, models = kv_models
    ids = np.random.default_rng(0).integers(0, 500, 11)
    want, _ = decode(src, ids)
    got, decoder = decode(models["fused"][1], ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert decoder.capacity is None and decoder.length == 11 + 16
    for name in ("fused", "long"):  # a window longer than the sequence changes nothing
        np.testing.assert_allclose(decode(models[name][1], ids)[0], want, rtol=1e-4, atol=1e-5)
    assert main(["verify", str(src), str(models["fused"][1])]) == 0


def test_window_as_gqa_attribute_and_bounded_cache_equal_the_masked_window(kv_models):
    src, models = kv_models
    ids = np.random.default_rng(1).integers(0, 500, 9)
    masked, full = decode(models["mask"][1], ids)
    dense, _ = decode(src, ids)
    assert np.abs(masked - dense).max() > 1e-2  # the window (6 of up to 25 keys) does change the logits
    gqa, _ = decode(models["gqa"][1], ids)
    bounded, decoder = decode(models["bounded"][1], ids)
    np.testing.assert_allclose(gqa, masked, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bounded, masked, rtol=1e-4, atol=1e-5)
    assert decoder.capacity == 6 and decoder.cache_bytes * 25 == full.cache_bytes * 6  # 6 positions, not 25
    node = next(n for n in models["bounded"][2].graph if n.op_type == "GroupQueryAttention")
    assert node.attributes["local_window_size"].value == 6 and node.attributes["sliding_window_cache"].value == 1


def test_encoder_patterns_are_masks_and_a_long_window_is_exact(zoo_path, tmp_path):
    from sparsec.models import bert

    src = zoo_path("minilm")
    feed = bert.encode(["A short sentence.", "A longer sentence about windows in attention, padded less."])
    want = run_ort(src, feed)[0]
    record, out, model = rewrite(src, "attention:window=512", tmp_path / "long.onnx")
    assert len(record.changed) == 6 and {s.details["lowering"] for s in record.changed} == {"mask"}
    np.testing.assert_allclose(run_ort(out, feed)[0], want, rtol=1e-4, atol=1e-5)
    _, out, _ = rewrite(src, "attention:window=2", tmp_path / "short.onnx")
    assert np.abs(run_ort(out, feed)[0] - want).max() > 1e-2
    record, _, _ = rewrite(src, "attention", tmp_path / "none.onnx")  # encoders do not fuse: nothing to do
    assert not record.changed and {s.code for s in record.skipped} == {"NOTHING_TO_REMOVE"}


def mha_model(op):
    """One fused attention op over (B, S, N*D) inputs (4 heads of 8), no mask."""
    shape = ["B", "S", 32]
    if op == "MultiHeadAttention":
        node = helper.make_node(op, ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=4)
        extra = [("com.microsoft", 1)]
    elif op == "GroupQueryAttention":
        node = helper.make_node(op, ["q", "k", "v", "", "", "sl", "tot"], ["y", "pk", "pv"], domain="com.microsoft",
                                num_heads=4, kv_num_heads=4)
        extra = [("com.microsoft", 1)]
    else:
        node = helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=4, kv_num_heads=4)
        extra = []
    inputs = [(n, TensorProto.FLOAT, shape) for n in "qkv"]
    outputs = [("y", TensorProto.FLOAT, shape)]
    if op == "GroupQueryAttention":
        inputs += [("sl", TensorProto.INT32, ["B"]), ("tot", TensorProto.INT32, [])]
        outputs += [("pk", TensorProto.FLOAT, None), ("pv", TensorProto.FLOAT, None)]
    return make_model([node], inputs, outputs, opset=23 if op == "Attention" else 17, extra_opsets=extra)


def reference_attention(q, k, v, allowed):
    b, s, _ = q.shape
    split = lambda x: x.reshape(b, -1, 4, 8).transpose(0, 2, 1, 3)  # noqa: E731
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(8)
    scores = np.where(allowed, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return ((p / p.sum(-1, keepdims=True)) @ split(v)).transpose(0, 2, 1, 3).reshape(b, s, 32)


@pytest.mark.parametrize("op", ["MultiHeadAttention", "GroupQueryAttention", "Attention"])
def test_fused_attention_ops_take_the_pattern(tmp_path, op):
    src = save(mha_model(op), tmp_path / "fused.onnx")
    spec = "attention:window=3" if op == "GroupQueryAttention" else "attention:window=3,sinks=1"
    record, out, model = rewrite(src, spec, tmp_path / "sparse.onnx")
    assert len(record.changed) == 1
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 10, 32)).astype(np.float32) for _ in range(3))
    feed = {"q": q, "k": k, "v": v}
    if op == "GroupQueryAttention":
        feed |= {"sl": np.full(2, 9, np.int32), "tot": np.array(10, np.int32)}
        assert model.graph.node(0).attributes["local_window_size"].value == 3
    causal = op == "GroupQueryAttention"
    pattern = Pattern(window=3) if causal else Pattern(window=3, sinks=1)
    allowed = pattern.allowed(10, 10, causal)
    got = run_ort(out, feed)[0]
    np.testing.assert_allclose(got, reference_attention(q, k, v, allowed), rtol=1e-4, atol=1e-5)
    assert np.abs(got - reference_attention(q, k, v, np.tril(np.ones((10, 10), bool)) if causal
                                            else np.ones((10, 10), bool))).max() > 1e-2


@pytest.mark.parametrize("spec, words", [
    ("attention:window=0", "window must be at least 1"),
    ("attention:block=48,local_blocks=1", "block must be 16, 32, 64 or 128"),
    ("attention:local_blocks=2", "need block="),
    ("attention:window=8,sinks=2,cache=window", "cache=window keeps the last"),
    ("attention:block=16", "no blocks to keep"),
    ("attention:window=32,lowering=sparse", "lowering=sparse takes a block layout only"),
    ("attention:block=16,local_blocks=1,sinks=1,lowering=sparse", "lowering=sparse takes a block layout only"),
])
def test_bad_options_exit_2_with_one_line(zoo_path, tmp_path, capsys, spec, words):
    src = zoo_path("minilm" if spec.endswith("block=16") else "tiny-llama")
    assert main(["compile", str(src), "--passes", spec, "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_a_layout_that_leaves_a_query_block_empty_is_refused(zoo_path, tmp_path, capsys):
    layout = np.tril(np.ones((4, 4), np.int8))
    layout[2] = 0
    np.save(tmp_path / "layout.npy", layout)
    spec = f"attention:block=16,layout={tmp_path / 'layout.npy'}"
    assert main(["compile", str(zoo_path("tiny-llama")), "--passes", spec, "-o", str(tmp_path / "o.onnx")]) == 2
    assert "query block 2 with nothing to attend to" in capsys.readouterr().err
    layout[2, 0] = 1
    np.save(tmp_path / "layout.npy", layout)
    assert main(["compile", str(zoo_path("tiny-llama")), "--passes", spec, "-o", str(tmp_path / "o.onnx"),
                 "--best-effort"]) == 0


def test_a_static_sequence_shorter_than_a_block_is_refused(tmp_path, capsys):
    model = load_model(save(mha_model("MultiHeadAttention"), tmp_path / "mha.onnx")).model
    model.graph.inputs[0].shape = ir.Shape([1, 8, 32])
    src = save_model(model, tmp_path / "static.onnx")
    spec = "attention:block=16,local_blocks=1"
    assert main(["compile", str(src), "--passes", spec, "-o", str(tmp_path / "o.onnx")]) == 2
    assert "shorter than one block of 16" in capsys.readouterr().err


def test_verify_compares_a_bounded_cache_with_the_originals_last_positions(kv_models, tmp_path, capsys):
    """A window longer than the verify inputs (16 cached + 16 new) is exact; the bounded model's
    present (a 40-position buffer) is compared with the original's 32 positions, its past padded."""
    src, _ = kv_models
    out = tmp_path / "bounded.onnx"
    assert main(["compile", str(src), "--passes", "attention:window=40,cache=window", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["verify", str(src), str(out), "--dim", "past_sequence=16"]) == 0
    assert "present.0.key" in capsys.readouterr().out
    # past 48 > window 40: the buffer holds the last 40 of 64 positions; logits differ (lossy)
    assert main(["verify", str(src), str(out), "--dim", "past_sequence=48"]) == 1


def test_hf_eager_attention_export_fuses_exactly(tmp_path):
    """transformers' eager attention (softmax upcast, explicit causal mask) rather than SDPA."""
    from sparsec.models.llama import _tiny_llama_model, export_decoder_with_cache

    model = _tiny_llama_model()
    model.config._attn_implementation = "eager"
    export_decoder_with_cache(model, tmp_path, "eager")
    src = tmp_path / "model.onnx"
    record, out, fused = rewrite(src, "attention", tmp_path / "fused.onnx")
    assert len(record.changed) == 2 and "Softmax" not in [n.op_type for n in fused.graph]
    ids = np.random.default_rng(0).integers(0, 500, 9)
    want, _ = decode(src, ids, steps=4)
    np.testing.assert_allclose(decode(out, ids, steps=4)[0], want, rtol=1e-4, atol=1e-5)


def test_decoding_past_the_rotary_tables_is_one_clear_error(kv_models, tmp_path):
    from sparsec.errors import InputError

    src, _ = kv_models
    _, out, _ = rewrite(src, "attention:max_positions=16", tmp_path / "short.onnx")
    decoder = Decoder(out)
    decoder.prompt(np.arange(15))
    decoder.step(3)  # position 15, the last row
    with pytest.raises(InputError, match="rotary tables end at 16"):
        decoder.step(4)


SPARSE = "block=16,local_blocks=2,global_blocks=1"


def test_sparse_attention_lowering_equals_the_masked_layout(zoo_path, tmp_path):
    """SparseAttention (heads of 16 zero-padded to 128, past and present one buffer) against the
    same block layout as a mask, on prompts of 2 to 70 tokens in a batch of 2; the layout does
    restrict the keys (70 tokens: 5 blocks, each query block sees at most 3)."""
    from sparsec.runtime.kvcache import KVCache
    from sparsec.runtime.session import cpu_runner

    src = zoo_path("tiny-llama")
    _, masked, _ = rewrite(src, f"attention:{SPARSE},lowering=mask", tmp_path / "mask.onnx")
    record, out, model = rewrite(src, f"attention:{SPARSE},lowering=sparse,max_positions=256",
                                 tmp_path / "sparse.onnx")
    assert [s.details["lowering"] for s in record.changed] == ["sparse", "sparse"]
    ops = [n.op_type for n in model.graph]
    assert ops.count("SparseAttention") == 2 and "Softmax" not in ops
    node = next(n for n in model.graph if n.op_type == "SparseAttention")
    assert node.attributes["sparse_block_size"].value == 16 and node.inputs[3].shape[3] == 128
    assert node.inputs[0].producer().op_type == "MatMul"  # the projection's own weight, padded
    assert sum(v.name.endswith(".heads128") for v in model.graph.initializers.values()) == 6
    assert [v.name for v in model.graph.outputs][1:] == [f"present.{i}.{k}" for i in (0, 1) for k in ("key", "value")]
    runner = cpu_runner()
    session = runner.session(str(out))
    kv = KVCache.of_session(session)
    assert (kv.shared, kv.head) == (256, (16, 128))
    for seq in (2, 20, 70):
        feed = {"input_ids": np.random.default_rng(seq).integers(0, 500, (2, seq), dtype=np.int64)}
        want, dense = run_ort(masked, feed)[0], run_ort(src, feed)[0]
        cand, shared = kv.feed(feed, session.get_inputs())
        got = runner.run(session, cand, ["logits"], shared=shared)["logits"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        if seq == 70:
            assert np.abs(want - dense).max() > 1e-2  # the layout changes the logits


def test_sparse_attention_decode_keeps_one_growing_buffer(kv_models, tmp_path):
    src, models = kv_models
    _, masked, _ = rewrite(src, f"attention:{SPARSE},lowering=mask", tmp_path / "mask.onnx")
    _, out, _ = rewrite(src, f"attention:{SPARSE},lowering=sparse,max_positions=512", tmp_path / "sparse.onnx")
    ids = np.random.default_rng(2).integers(0, 500, 40)
    want, _ = decode(masked, ids, steps=30)
    got, decoder = decode(out, ids, steps=30)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(want - decode(src, ids, steps=30)[0]).max() > 1e-2  # the layout restricts 70 positions
    # one buffer per layer of 256 positions (the first size), heads padded to 128: 2 layers x K, V
    assert decoder.length == 70 and decoder.cache_bytes == 2 * 2 * 2 * 256 * 128 * 4


def test_a_covering_sparse_layout_verifies_exactly(kv_models, tmp_path, capsys):
    """A layout that keeps every block reproduces the original; `sparsec verify` feeds the shared
    buffer (the original's past padded) and compares its first positions, heads unpadded."""
    src, _ = kv_models
    out = tmp_path / "covering.onnx"
    spec = "attention:block=16,local_blocks=64,lowering=sparse,max_positions=1024"
    assert main(["compile", str(src), "--passes", spec, "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["verify", str(src), str(out), "--dim", "past_sequence=16"]) == 0
    assert "present.0.key" in capsys.readouterr().out
    narrow = tmp_path / "narrow.onnx"  # one local block: 32 positions restricted, logits move
    assert main(["compile", str(src), "--passes", "attention:block=16,local_blocks=1,lowering=sparse",
                 "-o", str(narrow), "--best-effort"]) == 0
    assert main(["verify", str(src), str(narrow), "--dim", "past_sequence=16"]) == 1


def test_a_shared_cache_needs_every_block_lowered(kv_models, tmp_path, capsys):
    src, _ = kv_models
    spec = f"attention:{SPARSE},lowering=sparse,include=*layers.0*"
    assert main(["compile", str(src), "--passes", spec, "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "lower every attention block" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_padded_heads_keep_each_half_first():
    from sparsec.runtime.kvcache import pad_heads, unpad_heads

    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
    wide = pad_heads(x, 128)
    assert wide.shape == (2, 128)
    np.testing.assert_array_equal(wide[:, :32], x[:, :32])
    np.testing.assert_array_equal(wide[:, 64:96], x[:, 32:])
    assert not wide[:, 32:64].any() and not wide[:, 96:].any()
    np.testing.assert_array_equal(unpad_heads(wide, 64), x)


def test_sparse_attention_with_biased_projections_pads_by_concatenation(zoo_path, tmp_path):
    """Qwen2's Q/K/V projections have biases: their outputs are widened by a Concat of zeros
    (no weight padding) and the result still equals the masked layout."""
    from sparsec.runtime.kvcache import KVCache
    from sparsec.runtime.session import cpu_runner

    src = zoo_path("tiny-qwen2-moe")
    _, masked, _ = rewrite(src, f"attention:{SPARSE},lowering=mask", tmp_path / "mask.onnx")
    record, out, model = rewrite(src, f"attention:{SPARSE},lowering=sparse,max_positions=256", tmp_path / "s.onnx")
    assert [s.details["lowering"] for s in record.changed] == ["sparse", "sparse"]
    assert not any(v.name.endswith(".heads128") for v in model.graph.initializers.values())
    assert sum(n.op_type == "Concat" and n.attributes["axis"].value == 4 for n in model.graph) == 6
    runner = cpu_runner()
    session = runner.session(str(out))
    feed = {"input_ids": np.random.default_rng(0).integers(0, 100, (2, 50), dtype=np.int64)}
    cand, shared = KVCache.of_session(session).feed(feed, session.get_inputs())
    got = runner.run(session, cand, ["logits"], shared=shared)["logits"]
    want = run_ort(masked, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(want - run_ort(src, feed)[0]).max() > 1e-2
