"""The planner: options per site, the greedy choice under the budget, dropping after a miss, and
compile choosing, explaining and verifying a plan when given a budget and no passes."""

import json

import pytest

from sparsec.cli import main
from sparsec.planner import SAFETY, AutoPlan, Option, choose, drop_weakest


def options():
    return [Option("ffn0", "ffn-neurons", "a", "structured", saving=3e-3, use=0.30),
            Option("ffn0", "ffn-neurons", "b", "structured", saving=1e-3, use=0.05),
            Option("ffn1", "ffn-neurons", "c", "structured", saving=2e-3, use=0.10),
            Option("att0", "attention-heads", "d", "structured", saving=1e-3, use=0.60),
            Option("att1", "attention-heads", "e", "structured", saving=5e-4, use=0.02,
                   status="rejected", reason="no kernel")]


def test_greedy_takes_the_best_saving_per_budget_use_one_per_site_within_the_budget():
    opts = options()
    choose(opts)
    chosen = {o.spec for o in opts if o.status == "chosen"}
    # b (0.02 ms per 1%), c (0.02), a (0.01): one per site, so a is skipped for b; d would exceed SAFETY
    assert chosen == {"b", "c"} and sum(o.use for o in opts if o.status == "chosen") <= SAFETY
    assert "another option of this site" in next(o for o in opts if o.spec == "a").reason
    assert next(o for o in opts if o.spec == "e").status == "rejected"  # rejected options stay out
    choose(opts, 0.12)  # a tighter limit (a combination used more than its options' sum): b alone fits
    assert {o.spec for o in opts if o.status == "chosen"} == {"b"}
    choose(opts)
    auto = AutoPlan("cpu", "test", opts, ["b", "c"], 1e-2 - 3e-3, 1e-2, "test")
    assert drop_weakest(auto)
    dropped = [o for o in opts if o.reason.startswith("dropped")]
    assert len(dropped) == 1 and dropped[0].spec in ("b", "c") and dropped[0].status == "rejected"
    assert len(auto.specs) == 1 and dropped[0].spec not in auto.specs  # nothing else takes its place
    assert auto.predicted_seconds == pytest.approx(1e-2 - sum(o.saving for o in opts if o.status == "chosen"))


def test_compile_with_a_budget_and_no_passes_plans_explains_and_verifies(zoo_path, tmp_path, capsys):
    src = zoo_path("tiny-bert")
    out = tmp_path / "auto.onnx"
    assert main(["compile", str(src), "--target", "cpu", "--min-cosine", "0.97", "--explain", "-o", str(out),
                 "--save-recipe", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "planner for 'cpu'" in text and "chosen" in text and "rejected" in text and "chosen by the planner" in text
    report = json.loads((tmp_path / "auto.report.json").read_text())
    planner = report["planner"]
    chosen = [o for o in planner["options"] if o["status"] == "chosen"]
    assert chosen and all(o["use"] <= SAFETY and o["saving"] > 0 for o in chosen)
    assert planner["predicted_speedup"] > 1 and report["judgement"]["status"] == "WITHIN BUDGET"
    # N:M has no kernel on the CPU: the planner never offers it there; MoE and heads are judged
    assert {o["family"] for o in planner["options"]} >= {"ffn-neurons", "moe", "attention-heads"}
    recipe = json.loads((tmp_path / "r.json").read_text())
    assert [p["id"] for p in recipe["passes"]] == [o["spec"].split(":")[0] for o in
                                                    sorted(chosen, key=lambda o: (["attention-heads", "ffn-neurons",
                                                                                   "moe", "attention"].index(o["family"]),
                                                                                  o["spec"]))]


def test_a_budget_nothing_meets_writes_nothing(zoo_path, tmp_path, capsys):
    src = zoo_path("tiny-bert")
    out = tmp_path / "auto.onnx"
    assert main(["compile", str(src), "--target", "cpu", "--min-cosine", "0.9999999", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "found no rewrite that gains speed" in err and not out.exists()
    assert main(["compile", str(src), "--target", "cpu", "--min-cosine", "0.9999999", "-o", str(out),
                 "--best-effort"]) == 0  # asked to write anyway: the model unchanged
    report = json.loads((tmp_path / "auto.report.json").read_text())
    assert report["planner"]["specs"] == [] and report["records"] == [] and out.exists()


@pytest.mark.parametrize("flag", ["--passes", "--recipe"])
def test_explicit_passes_are_not_planned(zoo_path, tmp_path, capsys, flag):
    src = zoo_path("tiny-bert")
    if flag == "--passes":
        args = ["--passes", "ffn-neurons:ratio=0.25", "--min-cosine", "0.9"]
    else:
        (tmp_path / "r.yaml").write_text("target: cpu\npasses:\n  - {id: ffn-neurons, options: {ratio: 0.25}}\n")
        args = ["--recipe", str(tmp_path / "r.yaml")]
    assert main(["compile", str(src), *args, "-o", str(tmp_path / "o.onnx")]) == 0
    assert "planner for" not in capsys.readouterr().out


def test_reports_show_every_option_and_predicted_against_measured(zoo_path, tmp_path):
    from html.parser import HTMLParser

    src = zoo_path("tiny-bert")
    out = tmp_path / "auto.onnx"
    assert main(["compile", str(src), "--min-cosine", "0.97", "-o", str(out), "--benchmark",
                 "--report", str(tmp_path / "r.html"), "--report", str(tmp_path / "r.md")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "## Planner" in md and "predicted" in md and "measured" in md and "rejected" in md
    page = (tmp_path / "r.html").read_text()
    assert "id='planner'" in page and page.count("<tr>") > 10
    HTMLParser().feed(page)
