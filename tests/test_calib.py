"""Calibration data sources and the staged runner (sequential capture with a bounded frontier)."""


import numpy as np
import pytest
from onnx import helper

from sparsec.data import load_calibration
from sparsec.runtime.staged import StagedRunner
from sparsec.errors import InputError
from sparsec.graph import constant_ref
from sparsec.model_io import load_model
from tests.helpers import FLOAT, make_model, save, weights


def mlp(tmp_path):
    """X -> MatMul W1 -> Relu -> MatMul W2 -> Relu -> MatMul W3 -> Y, plus a skip Add."""
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["a"], name="l1"), helper.make_node("Relu", ["a"], ["h1"]),
             helper.make_node("MatMul", ["h1", "W2"], ["b"], name="l2"), helper.make_node("Relu", ["b"], ["h2"]),
             helper.make_node("Add", ["h2", "h1"], ["s"]),
             helper.make_node("MatMul", ["s", "W3"], ["Y"], name="l3")]
    proto = make_model(nodes, [("X", FLOAT, ["B", 16])], [("Y", FLOAT, ["B", 8])],
                       {"W1": weights(16, 16, seed=1), "W2": weights(16, 16, seed=2), "W3": weights(16, 8, seed=3)})
    return save(proto, tmp_path / "mlp.onnx")


def test_staged_capture_matches_full_model_and_sees_earlier_changes(tmp_path):
    path = mlp(tmp_path)
    model = load_model(path).model
    feeds = [{"X": weights(4, 16, seed=s)} for s in range(3)]
    values = {v.name: v for n in model.graph for v in n.outputs}
    runner = StagedRunner(model, feeds)
    h1 = list(runner.capture(values["h1"]))
    for feed, got in zip(feeds, h1):
        np.testing.assert_allclose(got, np.maximum(feed["X"] @ weights(16, 16, seed=1), 0), rtol=1e-5, atol=1e-5)
    # The frontier keeps h1 (read by l2 and the Add) and nothing else.
    assert set(runner.store[0]) == {values["h1"]}
    # Change W2 before its stage is built: the next capture computes with the new weights.
    w2 = constant_ref(model.graph.initializers["W2"])
    w2.replace(np.zeros((16, 16), np.float32))
    s = list(runner.capture(values["s"]))
    for got, hidden in zip(s, h1):
        np.testing.assert_allclose(got, hidden, rtol=1e-6)  # relu(h1 @ 0) + h1 == h1
    assert set(runner.store[0]) == {values["s"]}


def test_dense_overrides_run_the_original_weights(tmp_path):
    model = load_model(mlp(tmp_path)).model
    original = model.graph.initializers["W1"].const_value
    constant_ref(model.graph.initializers["W1"]).replace(np.zeros((16, 16), np.float32))
    feeds = [{"X": weights(2, 16)}]
    h1 = next(n for n in model.graph if n.name == "l1").outputs[0]
    dense = StagedRunner(model, feeds, overrides={model.graph.initializers["W1"]: original})
    pruned = StagedRunner(model, feeds)
    np.testing.assert_allclose(next(dense.capture(h1)), feeds[0]["X"] @ original.numpy(), rtol=1e-5)
    assert not next(pruned.capture(h1)).any()


def test_npz_text_and_builtin_sources(tmp_path, zoo_path):
    model = load_model(mlp(tmp_path)).model
    np.savez(tmp_path / "c.npz", **{"0/X": weights(2, 16), "1/X": weights(3, 16)})
    calib = load_calibration(str(tmp_path / "c.npz"), model)
    assert len(calib.feeds) == 2 and "c.npz" in calib.source
    np.savez(tmp_path / "bad.npz", X=weights(2, 15))
    with pytest.raises(InputError, match=r"input 'X' has shape \[2, 15\], the model expects \['B', 16\]"):
        load_calibration(str(tmp_path / "bad.npz"), model)
    with pytest.raises(InputError, match="example models only"):
        load_calibration("builtin", model)
    with pytest.raises(InputError, match="no such file"):
        load_calibration(str(tmp_path / "none.txt"), model)

    llama = load_model(zoo_path("tiny-llama")).model
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    with pytest.raises(InputError, match="needs --tokenizer"):
        load_calibration(str(text), llama)
    from sparsec.models.bert import minilm_dir

    calib = load_calibration(str(text), llama, samples=3, seqlen=64, tokenizer=str(minilm_dir() / "tokenizer.json"))
    assert [f["input_ids"].shape for f in calib.feeds] == [(3, 64)] and calib.tokens == 192
    with pytest.raises(InputError, match="tokens, 1000 x 512"):
        load_calibration(str(text), llama, samples=1000, tokenizer=str(minilm_dir()))
    calib = load_calibration("builtin", llama, samples=16, seqlen=32)
    assert [f["input_ids"].shape for f in calib.feeds] == [(8, 32), (8, 32)]
    assert "first half" in calib.source

    bert = load_model(zoo_path("tiny-bert")).model
    calib = load_calibration("builtin", bert, samples=20, seqlen=64)
    assert sum(f["input_ids"].shape[0] for f in calib.feeds) == 20
    assert set(calib.feeds[0]) == {"input_ids", "attention_mask", "token_type_ids"}
