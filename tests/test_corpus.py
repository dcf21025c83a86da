"""ONNX's backend test models (about 2,000 graphs no one here wrote) through compile and verify:
no internal error, every model verifies against itself, and no model that ONNX Runtime runs on
its own stored inputs is refused. A deterministic sample runs by default; --runslow runs all."""

import pytest

from tests.corpus import cases, run_case, summarize, write_corpus


def _check(outcomes):
    summary = summarize(outcomes)
    assert summary["internal_errors"] == [], summary["internal_errors"][:5]
    assert summary["self_verification_failures"] == [], summary["self_verification_failures"][:5]
    assert summary["compile_verification_failures"] == [], summary["compile_verification_failures"][:5]
    assert summary["false_refusals"] == [], summary["false_refusals"][:5]
    assert summary["ort_runs_with_stored_inputs"] >= 0.75 * summary["models"]  # the corpus is what it claims
    # verify may ask for --inputs (sizes that must agree), but then runs on the stored ones
    stored = {o.name: o.with_inputs.get("verify") for o in outcomes}
    assert all(stored[name] == 0 for name, _ in summary["verify_refusals_of_runnable_models"])
    return summary


def test_a_sample_of_the_corpus():
    _check([run_case(case) for case in cases(write_corpus(), 120)])


@pytest.mark.slow
def test_the_whole_corpus():
    outcomes = [run_case(case) for case in cases(write_corpus())]
    assert len(outcomes) >= 2000
    summary = _check(outcomes)
    assert summary["compiles_that_changed_and_verified"]["nm_constant"] >= 16  # rewrites ran, not only skips


def test_onnx_attention_models_take_a_pattern_and_a_long_window_changes_nothing(tmp_path):
    """ONNX's own Attention test models (opset 23/24: 3-D and 4-D, GQA, cross-attention, masks,
    past and present, softcap, qk outputs), none written here: each the attention pass rewrites
    must load, and with a window longer than any sequence give what the original gives in
    ONNX Runtime; a short window must change the output."""
    import glob
    from pathlib import Path

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from sparsec.model_io import load_model, save_model
    from sparsec.pipeline import PassContext, parse_pass_specs, run_passes

    def tensor(path):
        proto = onnx.TensorProto()
        proto.ParseFromString(Path(path).read_bytes())
        return numpy_helper.to_array(proto)

    checked = changed_by_window = 0
    for case in sorted(glob.glob(str(write_corpus() / "node" / "test_attention*"))):
        original = Path(case) / "model.onnx"
        try:
            session = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
            feed = {i.name: tensor(f) for i, f in
                    zip(session.get_inputs(), sorted(glob.glob(f"{case}/test_data_set_0/input_*.pb")))}
            want = session.run(None, feed)
        except Exception:  # noqa: BLE001 -- ONNX Runtime cannot run this original (bf16 on CPU, ...)
            continue
        outs = {}
        for spec in ("attention:window=100000", "attention:window=1"):
            model = load_model(original).model
            (record,) = run_passes(model, parse_pass_specs(spec), PassContext())
            if record.changed:
                outs[spec] = ort.InferenceSession(str(save_model(model, tmp_path / "out.onnx")),
                                                  providers=["CPUExecutionProvider"]).run(None, feed)
        if not outs:
            continue
        checked += 1
        for got, ref in zip(outs["attention:window=100000"], want):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=case)
        changed_by_window += any(not np.allclose(g, r) for g, r in zip(outs["attention:window=1"], want))
    assert checked >= 60 and changed_by_window >= checked // 2, (checked, changed_by_window)
