"""Verification: Polygraphy compare semantics, seeded valid inputs, readable verdicts."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from sparsec.errors import InputError
from sparsec.feeds import input_specs, load_feeds, parse_dims, random_feeds, resolve_shape
from sparsec.verify import compare, tolerances_for, verify_models
from tests.helpers import FLOAT, linear, make_model, save, weights


def verdict(ref, cand, **kw):
    return compare([({}, {"y": ref}, {"y": cand})], **kw)


def test_element_fails_only_when_both_tolerances_exceeded():
    ref = np.array([1.0, 100.0, 1e-6], dtype=np.float32)
    # |d| = 0.05 > atol but <= rtol*|ref| for 100 -> passes; 1e-6 element: |d|=1e-6 <= atol.
    cand = ref + np.array([0.0, 0.05, 1e-6], dtype=np.float32)
    v = verdict(ref, cand, atol=1e-5, rtol=1e-3)
    assert v.passed and v.outputs[0].failing == 0
    v = verdict(ref, ref + np.array([0.01, 0, 0], np.float32), atol=1e-5, rtol=1e-3)
    assert not v.passed and v.outputs[0].failing == 1
    assert v.lines()[0].startswith("FAILED | output 'y' |")
    assert "1 of 3 elements beyond atol 1e-05 and rtol 0.001" in v.lines()[0]


def test_nan_shape_and_nothing_compared_fail():
    ref = np.ones(4, np.float32)
    assert not verdict(ref, np.array([1, np.nan, 1, 1], np.float32)).passed
    assert not verdict(ref, np.ones(5, np.float32)).passed
    assert "shape" in verdict(ref, np.ones(5, np.float32)).outputs[0].error
    empty = compare([])
    assert not empty.passed and "0 of 0 outputs" in empty.lines()[-1]
    missing = compare([({}, {"y": ref}, {})])
    assert not missing.passed


def test_statistics():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 16)).astype(np.float32)
    v = verdict(ref, ref, atol=0, rtol=0)
    s = v.outputs[0]
    assert v.passed and s.max_abs == 0 and s.cosine == pytest.approx(1.0) and s.row_cosine_min == pytest.approx(1.0)
    v = verdict(ref, -ref)
    assert v.outputs[0].cosine == pytest.approx(-1.0) and v.outputs[0].rel_l2 == pytest.approx(2.0)


def test_default_tolerances_per_dtype():
    assert tolerances_for(np.float32, None, None) == (1e-5, 1e-4)
    assert tolerances_for(np.float16, None, None) == (1e-3, 1e-2)
    assert tolerances_for(np.int64, None, None) == (0.0, 0.0)
    assert tolerances_for(np.float32, 0.5, None) == (0.5, 1e-4)
    assert not verdict(np.array([1, 2]), np.array([1, 3])).passed  # integers compare exactly


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


def test_verify_models_end_to_end(tmp_path):
    a = save(linear(seed=0), tmp_path / "a.onnx")
    b = save(linear(seed=0), tmp_path / "b.onnx")
    c = save(linear(seed=1), tmp_path / "c.onnx")
    specs = input_specs(ir.serde.deserialize_model(linear()))
    feeds = random_feeds(specs, samples=2)
    v = verify_models(a, b, feeds)
    assert v.passed and v.input_sets == 2 and v.outputs[0].elements == 2 * 16 * 32
    assert not verify_models(a, c, feeds).passed
