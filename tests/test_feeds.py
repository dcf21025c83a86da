"""Model inputs: specs that say how to fill each input validly, seeded random and .npz feeds,
KV-cache inputs, and --dim checked against the model's symbolic dimensions."""

import pathlib
import tempfile

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from sparsec.errors import InputError
from sparsec.feeds import (
    check_dims, input_specs, load_feeds, make_feeds, parse_dims, random_feeds, resolve_all, resolve_shape,
)
from sparsec.model_io import load_model
from tests.helpers import FLOAT, linear, make_model, run_ort, save, weights


def _embedding_model():
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["H"]),
             helper.make_node("ReduceSum", ["H"], ["Y"], keepdims=0)]
    return make_model(nodes, [("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                              ("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
                      [("Y", FLOAT, None)], {"E": weights(37, 8)}, opset=13)


def test_input_specs_and_valid_random_inputs():
    model = ir.serde.deserialize_model(_embedding_model())
    specs = {s.name: s for s in input_specs(model)}
    assert specs["input_ids"].fill == "randint" and specs["input_ids"].high == 37
    assert specs["attention_mask"].fill == "ones"
    feeds = random_feeds(list(specs.values()), seed=3, dims={"sequence": 5}, samples=2)
    assert len(feeds) == 2 and feeds[0]["input_ids"].shape == (1, 5)
    assert feeds[0]["input_ids"].max() < 37 and feeds[0]["attention_mask"].all()
    again = random_feeds(list(specs.values()), seed=3, dims={"sequence": 5}, samples=2)
    np.testing.assert_array_equal(feeds[1]["input_ids"], again[1]["input_ids"])
    assert resolve_shape(specs["input_ids"], {}) == (1, 16)


def test_parse_dims():
    assert parse_dims(["seq=128", "batch=2"]) == {"seq": 128, "batch": 2}
    for bad in ["seq", "seq=0", "seq=x", "=3"]:
        with pytest.raises(InputError, match="--dim"):
            parse_dims([bad])


def test_load_feeds(tmp_path):
    model = ir.serde.deserialize_model(linear())
    specs = input_specs(model)
    np.savez(tmp_path / "ok.npz", X=weights(3, 64))
    assert load_feeds(tmp_path / "ok.npz", specs)[0]["X"].shape == (3, 64)
    np.savez(tmp_path / "two.npz", **{"0/X": weights(1, 64), "1/X": weights(2, 64)})
    assert [f["X"].shape[0] for f in load_feeds(tmp_path / "two.npz", specs)] == [1, 2]
    np.savez(tmp_path / "name.npz", Z=weights(3, 64))
    with pytest.raises(InputError, match="'Z' is not an input"):
        load_feeds(tmp_path / "name.npz", specs)
    np.savez(tmp_path / "shape.npz", X=weights(3, 63))
    with pytest.raises(InputError, match=r"input 'X' has shape \[3, 63\], the model expects \['B', 64\]"):
        load_feeds(tmp_path / "shape.npz", specs)
    np.savez(tmp_path / "dtype.npz", X=weights(3, 64).astype(np.float64))
    with pytest.raises(InputError, match="float64, the model expects float32"):
        load_feeds(tmp_path / "dtype.npz", specs)
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(InputError, match="not a readable .npz"):
        load_feeds(tmp_path / "junk.npz", specs)


def test_kv_cache_inputs_fill_the_mask_with_past_plus_new_tokens(zoo_path):
    model = load_model(zoo_path("tiny-llama-kv")).model
    specs = {s.name: s for s in input_specs(model)}
    assert specs["past_key_values.0.key"].role == "past" and specs["attention_mask"].role == "mask"
    assert specs["input_ids"].role == "ids"
    shapes = resolve_all(list(specs.values()), {"sequence": 5, "past_sequence": 7})
    assert shapes["input_ids"] == (1, 5) and shapes["past_key_values.1.value"] == (1, 2, 7, 16)
    assert shapes["attention_mask"] == (1, 12)
    assert resolve_all(list(specs.values()), {"total_sequence": 9})["attention_mask"] == (1, 9)  # --dim wins
    from sparsec.runtime.session import cpu_runner

    runner = cpu_runner()
    session = runner.session(zoo_path("tiny-llama-kv"))
    (feed,) = random_feeds(list(specs.values()), dims={"sequence": 5, "past_sequence": 7})
    out = runner.run(session, feed)
    assert out["logits"].shape[:2] == (1, 5) and out["present.0.key"].shape == (1, 2, 12, 16)


def test_unknown_dim_names_are_refused_with_the_models_dims():
    specs = input_specs(ir.serde.deserialize_model(_embedding_model()))
    check_dims({"sequence": 3, "input_ids.1": 4}, specs)
    with pytest.raises(InputError, match=r"no symbolic dimension 'nosuch' \(its symbolic dimensions: batch, sequence\)"):
        check_dims({"nosuch": 3}, specs)
    fixed = input_specs(ir.serde.deserialize_model(make_model(
        [helper.make_node("Relu", ["X"], ["Y"])], [("X", FLOAT, [2, 3])], [("Y", FLOAT, [2, 3])])))
    with pytest.raises(InputError, match="none: every input dimension is fixed"):
        check_dims({"batch": 2}, fixed)


def test_make_feeds_from_each_source(tmp_path):
    model = ir.serde.deserialize_model(linear())
    feeds = make_feeds(model, seed=4, samples=3)
    assert len(feeds.sets) == 3 and feeds.note == "random inputs (seed 4)"
    np.savez(tmp_path / "in.npz", X=weights(2, 64))
    assert make_feeds(model, inputs=tmp_path / "in.npz").note.startswith("inputs from")
    given = make_feeds(model, inputs=[{"X": weights(1, 64)}])
    assert given.note == "given inputs" and given.sets[0]["X"].shape == (1, 64)
    with pytest.raises(InputError, match="no symbolic dimension 'seq'"):
        make_feeds(model, dims={"seq": 2})


def audio_model(tmp_path):
    """Like silero VAD: audio [batch, samples], reflect-padded by 32 then a strided Conv; ONNX
    Runtime refuses 16 samples (a reflect pad must be shorter than the signal)."""
    nodes = [helper.make_node("Unsqueeze", ["audio", "one"], ["a1"]),
             helper.make_node("Pad", ["a1", "pads"], ["a2"], mode="reflect"),
             helper.make_node("Conv", ["a2", "W"], ["a3"], strides=[16]),
             helper.make_node("Relu", ["a3"], ["a4"]),
             helper.make_node("ReduceMean", ["a4", "two"], ["speech"], keepdims=0)]
    proto = make_model(nodes, [("audio", FLOAT, ["batch", "samples"])], [("speech", FLOAT, ["batch", 8])],
                       {"one": np.array([1], np.int64), "two": np.array([2], np.int64),
                        "pads": np.array([0, 0, 32, 0, 0, 32], np.int64), "W": weights(8, 1, 64)}, opset=18)
    return save(proto, tmp_path / "vad.onnx")


def test_generated_inputs_grow_until_the_model_runs(tmp_path, capfd):
    from sparsec.cli import main

    path = audio_model(tmp_path)
    code = main(["compile", str(path), "--passes", "nm:min_params=0", "--best-effort", "-o", str(tmp_path / "o.onnx")])
    out = capfd.readouterr()  # file descriptors: ONNX Runtime logs from C++, below Python
    assert code == 0, out.err
    assert "random inputs (seed 0), symbolic dimensions 64" in out.out and "onnxruntime" not in out.err
    # Sizes the user fixes are kept; when nothing runs, the refusal says what was tried and how to fix it.
    code = main(["verify", str(path), str(path), "--dim", "samples=8"])
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "does not run on generated inputs (symbolic dimensions [16, 64, 256] and seeds [0, 1, 2]" in err
    assert "--inputs FILE.npz or sizes with --dim NAME=N (symbolic dimensions: batch, samples)" in err


def test_a_check_in_stages_refuses_the_inputs_a_whole_session_refuses(tmp_path):
    """A streamed compile checks generated inputs by running the original in stages (a session of
    the whole model would copy every weight): the same sizes are refused and the same kept."""
    from sparsec.errors import RuntimeFailure
    from sparsec.runtime.session import cpu_runner

    path = audio_model(tmp_path)
    model = load_model(path).model
    small = random_feeds(input_specs(model), seed=0, samples=1, default=16)
    for stage_bytes in (None, 1):  # whole, then one stage per weight
        check = cpu_runner().checker(path, stage_bytes=stage_bytes)
        with pytest.raises(RuntimeFailure):
            check(small)
        assert make_feeds(model, check=check).note == "random inputs (seed 0), symbolic dimensions 64"


def test_inputs_are_valid_for_how_the_model_uses_them():
    nodes = [helper.make_node("Mod", ["x", "d"], ["m"]), helper.make_node("Unsqueeze", ["x", "axes"], ["u"]),
             helper.make_node("Reshape", ["u", "shape"], ["r"]), helper.make_node("Dropout", ["f", "ratio"], ["g"])]
    proto = make_model(nodes, [("x", TensorProto.INT64, [4]), ("d", TensorProto.INT64, [4]),
                               ("axes", TensorProto.INT64, [2]), ("shape", TensorProto.INT64, [3]),
                               ("f", FLOAT, [4]), ("ratio", FLOAT, [])],
                       [("m", TensorProto.INT64, [4]), ("r", TensorProto.INT64, None), ("g", FLOAT, [4])], opset=13)
    (feed,) = random_feeds(input_specs(ir.serde.deserialize_model(proto)), seed=1)
    assert (feed["d"] >= 1).all() and feed["axes"].tolist() == [0, 1] and feed["shape"].tolist() == [-1, 1, 1]
    assert 0 <= float(feed["ratio"]) < 0.5
    with tempfile.TemporaryDirectory() as tmp:
        run_ort(save(proto, pathlib.Path(tmp) / "m.onnx"), feed)  # ONNX Runtime accepts every one


def test_float_counts_and_resize_sizes_are_positive_whole_numbers():
    nodes = [helper.make_node("OneHot", ["i", "depth", "values"], ["o"], axis=1),
             helper.make_node("Resize", ["x", "", "", "sizes"], ["y"])]
    proto = make_model(nodes, [("i", TensorProto.INT64, [3]), ("depth", FLOAT, [1]), ("values", FLOAT, [2]),
                               ("x", FLOAT, [1, 1, 4, 4]), ("sizes", TensorProto.INT64, [4])],
                       [("o", FLOAT, None), ("y", FLOAT, None)], opset=13)
    for seed in range(3):
        (feed,) = random_feeds(input_specs(ir.serde.deserialize_model(proto)), seed=seed)
        assert float(feed["depth"][0]) >= 2 and float(feed["depth"][0]).is_integer() and (feed["sizes"] >= 1).all()
        with tempfile.TemporaryDirectory() as tmp:
            run_ort(save(proto, pathlib.Path(tmp) / "m.onnx"), feed)


def test_sequence_optional_and_string_inputs_get_values_of_their_type():
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [3])
    opt = helper.make_value_info("o", helper.make_optional_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, [2])))
    text = helper.make_tensor_value_info("t", TensorProto.STRING, [2])
    graph = helper.make_graph([helper.make_node("SequenceLength", ["s"], ["n"]),
                               helper.make_node("OptionalHasElement", ["o"], ["h"]),
                               helper.make_node("Identity", ["t"], ["t2"])], "g", [seq, opt, text],
                              [helper.make_tensor_value_info("n", TensorProto.INT64, []),
                               helper.make_tensor_value_info("h", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("t2", TensorProto.STRING, [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 10
    specs = {s.name: s for s in input_specs(ir.serde.deserialize_model(proto))}
    assert (specs["s"].container, specs["o"].container, specs["t"].fill) == ("sequence", "optional", "string")
    (feed,) = random_feeds(list(specs.values()))
    assert isinstance(feed["s"], list) and feed["s"][0].shape == (3,) and feed["t"].dtype == object
    with tempfile.TemporaryDirectory() as tmp:
        n, has, texts = run_ort(save(proto, pathlib.Path(tmp) / "m.onnx"), feed)
    assert n == 2 and has and list(texts) == list(feed["t"])
