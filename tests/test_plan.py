"""The plan: steps and their gains on the target, default fidelity budgets, calibration-aware
defaults, and notes that say when nothing pays."""

import pytest

from sparsec.errors import OptionError
from sparsec.plan import DEFAULT_BUDGETS, make_plan
from sparsec.targets import get_target
from sparsec.verify import Budget


def test_cpu_default_plan_is_empty_and_says_why():
    plan = make_plan(get_target("cpu"))
    assert plan.steps == [] and plan.budget is None and plan.exact
    assert any("no pass by default on 'cpu'" in n for n in plan.notes)
    assert "  (no passes)" in plan.lines()


def test_ampere_default_is_2_4_through_tensorrt():
    plan = make_plan(get_target("ampere"))
    (step,) = plan.steps
    assert step.spec == "nm" and step.form == "nm-2:4" and step.kind == "lossy"
    assert step.gain.provider == "TensorrtExecutionProvider" and step.gain.depends
    assert not plan.exact and plan.budget == DEFAULT_BUDGETS[""]
    text = "\n".join(plan.lines())
    assert "gains speed under some conditions" in text and "fidelity budget: every output's cosine >= 0.99" in text


@pytest.mark.parametrize("task,expected", [
    ("encoder", "mean sentence-embedding cosine >= 0.95"),
    ("decoder", "perplexity <= 1.2x the original's"),
    ("", "every output's cosine >= 0.99"),
])
def test_default_budget_per_task(task, expected):
    plan = make_plan(get_target("cpu"), "ffn-neurons", task=task)
    assert plan.budget.origin == "default" and plan.budget.describe() == expected
    assert any("--best-effort" in line for line in plan.lines())


def test_user_budget_replaces_the_default_and_exact_plans_have_none():
    mine = Budget(min_cosine=0.5)
    assert make_plan(get_target("cpu"), "nm", task="encoder", budget=mine).budget is mine
    assert make_plan(get_target("cpu"), "nm", task="encoder", budget=Budget()).budget == DEFAULT_BUDGETS["encoder"]
    exact = make_plan(get_target("cpu"), "compress", task="decoder")
    assert exact.exact and exact.budget is None
    assert any("exact: the result must match the original" in line for line in exact.lines())


def test_calibration_aware_defaults_only_where_calibration_exists_and_the_user_left_them():
    plain = make_plan(get_target("cpu"), "nm;ffn-neurons")
    assert [s.spec for s in plain.steps] == ["nm", "ffn-neurons"] and not plain.needs_calibration
    calibrated = make_plan(get_target("cpu"), "nm;ffn-neurons", calibration="builtin")
    assert [s.spec for s in calibrated.steps] == ["nm:method=sparsegpt", "ffn-neurons:method=activation"]
    assert calibrated.needs_calibration and calibrated.calibration == "builtin"
    assert sum("calibration data is available" in n for n in calibrated.notes) == 2
    chosen = make_plan(get_target("cpu"), "nm:method=magnitude,n=1", calibration="builtin")
    assert [s.spec for s in chosen.steps] == ["nm:n=1"] and not chosen.needs_calibration


def test_no_speedup_is_said_before_pruning():
    plan = make_plan(get_target("cpu"), "nm:n=1,m=4")
    assert not plan.predicts_speedup
    assert any("predicts no speedup on 'cpu'" in n for n in plan.notes)
    assert make_plan(get_target("cpu"), "ffn-neurons").predicts_speedup


def test_plan_is_serializable_and_option_errors_surface():
    data = make_plan(get_target("hopper"), "nm;compress").to_dict()
    assert [p["id"] for p in data["passes"]] == ["nm", "compress"] and data["budget"]["min_cosine"] == 0.99
    assert "facts" not in data["steps"][0]["gain"]
    with pytest.raises(OptionError, match="unknown pass"):
        make_plan(get_target("cpu"), "prune")
