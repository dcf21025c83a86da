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
