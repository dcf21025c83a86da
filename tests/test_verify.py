"""Verification: Polygraphy compare semantics, seeded valid inputs, readable verdicts."""

import numpy as np
import onnx_ir as ir
import pytest

from sparsec.feeds import input_specs, random_feeds
from sparsec.verify import BELOW, EXACT, FAILED, WITHIN, Budget, compare, judge, tolerances_for, verify_models
from tests.helpers import linear, save


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


def test_verify_models_end_to_end(tmp_path):
    a = save(linear(seed=0), tmp_path / "a.onnx")
    b = save(linear(seed=0), tmp_path / "b.onnx")
    c = save(linear(seed=1), tmp_path / "c.onnx")
    specs = input_specs(ir.serde.deserialize_model(linear()))
    feeds = random_feeds(specs, samples=2)
    v = verify_models(a, b, feeds)
    assert v.passed and v.input_sets == 2 and v.outputs[0].elements == 2 * 16 * 32
    assert not verify_models(a, c, feeds).passed


def test_strings_empty_tensors_sequences_and_optionals_compare_equal_when_equal():
    same = {"s": np.array(["a", "bc"]), "e": np.zeros((0, 3), np.float32), "q": [np.ones(2), np.zeros(1)], "o": None}
    v = compare([({}, same, {k: (list(x) if isinstance(x, list) else x) for k, x in same.items()})])
    assert v.passed and {o.name for o in v.outputs} == {"s", "e", "q", "o"}
    assert all(o.compared == 1 for o in v.outputs)
    bad = compare([({}, same, {**same, "s": np.array(["a", "bd"]), "q": [np.ones(2)], "o": np.ones(1)})])
    failed = {o.name: o for o in bad.outputs if not o.passed}
    assert set(failed) == {"s", "q", "o"}
    assert failed["s"].failing == 1 and "sequence of 1 items != reference's 2" in failed["q"].error


def test_judge_is_the_one_verdict():
    ref = np.ones((4, 8), np.float32)
    near = compare([({}, {"y": ref}, {"y": ref * 1.001})], exact=False)
    assert judge({"random": near}, exact=True).status == FAILED
    assert judge({"random": near}, Budget(min_cosine=0.99), exact=False).status == WITHIN
    low = compare([({}, {"y": ref}, {"y": -ref})], exact=False)
    judgement = judge({"random": low}, Budget(min_cosine=0.5), exact=False)
    assert judgement.status == BELOW and not judgement.passed
    assert judgement.failure.startswith("fidelity below the budget: output 'y' cosine -1 < min_cosine 0.5")
    same = compare([({}, {"y": ref}, {"y": ref.copy()})])
    assert judge({"random": same}, exact=True).status == EXACT
    assert judge({"random": same}, exact=False).status == BELOW  # lossy with no budget is never PASSED
    assert judge({}, exact=True).status == FAILED and judge({"random": compare([])}, exact=True).status == FAILED


def test_a_reshaped_output_fails_any_budget():
    """An output whose shape changed has no fidelity: it fails whatever --min-cosine allows."""
    ref = np.ones((4, 8), np.float32)
    reshaped = compare([({}, {"y": ref}, {"y": np.ones((4, 7), np.float32)})], exact=False)
    assert reshaped.outputs[0].cosine == 0.0 and "shape [4, 7] != reference [4, 8]" in reshaped.outputs[0].error
    judgement = judge({"random": reshaped}, Budget(min_cosine=-1.0), exact=False)
    assert judgement.status == FAILED and "shape [4, 7]" in judgement.failure
    nan = compare([({}, {"y": ref}, {"y": np.full((4, 8), np.nan, np.float32)})], exact=False)
    assert judge({"random": nan}, Budget(min_cosine=-1.0), exact=False).status == FAILED


def test_task_budgets_need_their_metric():
    ref = np.ones((2, 3), np.float32)
    v = compare([({}, {"y": ref}, {"y": ref})], exact=False)
    v.metrics = {"perplexity_ratio": 1.3}
    assert judge({"real": v}, Budget(max_ppl_ratio=1.2), exact=False).status == BELOW
    assert judge({"real": v}, Budget(max_ppl_ratio=1.5), exact=False).status == WITHIN
    judgement = judge({"real": v}, Budget(min_embedding_cosine=0.9), exact=False)
    assert judgement.status == FAILED and "was not measured" in judgement.failure


def test_verify_applies_the_tolerance_floor_a_model_records(tmp_path):
    """A compiled model whose exact rewrite sums in another order records a floor; without the
    record the same differences fail at the fp32 defaults."""
    import onnx

    from sparsec.verify import TOLERANCE_FLOOR_KEY

    ref = save(linear(), tmp_path / "ref.onnx")
    moved = linear()
    w = onnx.numpy_helper.to_array(moved.graph.initializer[0]) + np.float32(1e-4)  # outputs move ~1e-3
    moved.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "W"))
    plain = save(moved, tmp_path / "plain.onnx")
    onnx.helper.set_model_props(moved, {TOLERANCE_FLOOR_KEY: "5e-3,1e-3"})
    floored = save(moved, tmp_path / "floored.onnx")
    feeds = [{"X": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}]
    assert not verify_models(ref, plain, feeds).passed
    assert verify_models(ref, floored, feeds).passed


def test_verifying_against_kept_reference_outputs_equals_running_both(tmp_path):
    from sparsec.verify import reference_outputs, verify_against

    a = save(linear(seed=0), tmp_path / "a.onnx")
    c = save(linear(seed=1), tmp_path / "c.onnx")
    feeds = random_feeds(input_specs(ir.serde.deserialize_model(linear())), samples=3)
    refs = reference_outputs(a, feeds)
    both, kept = verify_models(a, c, feeds, exact=False), verify_against(refs, c, feeds, exact=False)
    assert kept.input_sets == 3 and kept.outputs[0].cosine == pytest.approx(both.outputs[0].cosine, abs=1e-12)
    assert kept.outputs[0].cosine < 0.9  # a different model: the comparison saw it
    assert verify_against(refs, a, feeds).passed
    one_set = sum(v.nbytes for v in refs[0].values())
    assert len(reference_outputs(a, feeds, max_bytes=one_set + 1)) == 1  # only what fits, at least one


def test_large_outputs_compare_in_chunks_to_the_same_figures():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((3, 1000, 1500)).astype(np.float32)  # several chunks
    cand = ref + 0.1 * rng.standard_normal(ref.shape).astype(np.float32)
    a, b = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
    s = verdict(ref, cand, exact=False).outputs[0]
    assert s.cosine == pytest.approx(a @ b / np.sqrt((a @ a) * (b @ b)), abs=1e-12)
    assert s.max_abs == pytest.approx(np.abs(a - b).max()) and s.elements == ref.size
    assert s.median_abs == pytest.approx(np.median(np.abs(a - b)), rel=0.02)
    rows = (ref.astype(np.float64) * cand).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(cand, axis=-1)
    assert s.row_cosine_min == pytest.approx(rows.min(), abs=1e-9)
    assert compare([({}, {"y": ref}, {"y": cand})], outputs=False).outputs == []


def test_shared_reference_outputs_run_the_reference_once_per_model_inputs_and_runner(tmp_path):
    from sparsec.errors import RuntimeFailure
    from sparsec.runtime.session import cpu_runner
    from sparsec.verify import StoredOutputs, reference_outputs, shared_reference_outputs

    a = save(linear(seed=0), tmp_path / "a.onnx")
    feeds = random_feeds(input_specs(ir.serde.deserialize_model(linear())), samples=2)
    folder = tmp_path / "refs"
    first = shared_reference_outputs(a, feeds, folder, model_key="a")
    assert isinstance(first, StoredOutputs) and len(first) == 2
    expected = reference_outputs(a, feeds)
    for got, want in zip(first, expected):
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    gone = tmp_path / "missing.onnx"  # the same key: read back, the reference never runs
    again = shared_reference_outputs(gone, feeds, folder, model_key="a")
    assert np.array_equal(again[1]["Y"], expected[1]["Y"])
    # another model, other inputs or other threads are other outputs: each runs the reference
    for other in ({"model_key": "b"}, {"model_key": "a", "runner": cpu_runner(threads=1)}):
        with pytest.raises(RuntimeFailure, match="cannot load missing.onnx"):
            shared_reference_outputs(gone, feeds, folder, **other)
    with pytest.raises(RuntimeFailure, match="cannot load missing.onnx"):
        shared_reference_outputs(gone, feeds[:1], folder, model_key="a")
    # outputs the caller has are stored without running anything
    given = [{"Y": np.full((1, 32), 7, np.float32)}]
    assert shared_reference_outputs(gone, feeds[:1], folder, model_key="c", outputs=given)[0]["Y"][0, 0] == 7
    # any output name, numpy's own argument names included, comes back in its order
    named = [{"file": np.ones(2, np.float32), "allow_pickle": np.zeros(3, np.int64)}]
    back = shared_reference_outputs(gone, feeds[:1], folder, model_key="d", outputs=named)[0]
    assert list(back) == ["file", "allow_pickle"] and back["allow_pickle"].dtype == np.int64
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no partial copies left


def test_max_rel_err_bounds_every_outputs_relative_l2_error():
    ref = np.ones((4, 8), np.float32)
    ref[0, 0] = 1e-6  # an element near zero: its own relative error is huge, the output's is not
    cand = ref * np.float32(1.1)
    cand[0, 0] = 1e-3
    v = compare([({}, {"y": ref, "z": ref}, {"y": cand, "z": ref})], exact=False)
    rel = {o.name: o.rel_l2 for o in v.outputs}
    assert rel["y"] == pytest.approx(0.1, rel=1e-3) and rel["z"] == 0.0
    below = judge({"real": v}, Budget(max_rel_err=0.05), exact=False)
    assert below.status == BELOW and "output 'y' relative L2 error" in below.failure
    assert judge({"real": v}, Budget(max_rel_err=0.11), exact=False).status == WITHIN
    assert "relative L2 error <= 0.05" in Budget(max_rel_err=0.05).describe()
    assert not Budget(max_rel_err=0.05).empty
