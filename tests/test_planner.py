"""The planner: options per site, the greedy choice under the budget, dropping after a miss, and
compile choosing, explaining and verifying a plan when given a budget and no passes."""

import json

import numpy as np

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
                                                                                   "moe", "attention", "quantize"
                                                                                   ].index(o["family"]),
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


def _measured(table):
    """A stand-in for the end-to-end measurement: the use of each chosen set of specs."""
    calls = []

    def measure(auto):
        def run():
            chosen = frozenset(o.spec for o in auto.options if o.status == "chosen")
            calls.append(chosen)
            auto.predicted_seconds = 1.0 - 0.1 * len(chosen)
            return table(chosen)
        return run
    return measure, calls


def _three():
    return [Option(f"s{i}", "ffn-neurons", f"o{i}", "structured", saving=1e-3 * (3 - i), use=0.3) for i in range(3)]


def test_a_combination_that_leaves_budget_unused_grows():
    from sparsec.planner import adjust

    opts = _three()
    choose(opts)
    auto = AutoPlan("cpu", "test", opts, [], 0.0, 1.0, "test")
    measure, calls = _measured(lambda chosen: 0.25 * len(chosen) / 2 if len(chosen) < 3 else 0.6)
    adjust(auto, measure(auto))
    assert calls[0] == {"o0", "o1"}  # the greedy start: 0.6 of the budget in sum (SAFETY 0.7)
    assert calls[-1] == {"o0", "o1", "o2"} and sorted(auto.specs) == ["o0", "o1", "o2"]
    opts = _three()  # a combination that spends nothing at all (its outputs unchanged) grows too
    choose(opts)
    auto = AutoPlan("cpu", "test", opts, [], 0.0, 1.0, "test")
    measure, calls = _measured(lambda chosen: 0.0)
    adjust(auto, measure(auto))
    assert calls == [{"o0", "o1"}, {"o0", "o1", "o2"}] and sorted(auto.specs) == ["o0", "o1", "o2"]


def test_growing_past_the_budget_keeps_the_last_combination_within_it():
    from sparsec.planner import adjust

    opts = _three()
    choose(opts)
    auto = AutoPlan("cpu", "test", opts, [], 0.0, 1.0, "test")
    measure, calls = _measured(lambda chosen: 0.25 if len(chosen) < 3 else 1.4)
    adjust(auto, measure(auto))
    assert calls == [{"o0", "o1"}, {"o0", "o1", "o2"}]
    assert sorted(auto.specs) == ["o0", "o1"] and auto.predicted_seconds == pytest.approx(0.8)
    assert next(o for o in opts if o.spec == "o2").status != "chosen"
    assert any("the last one within it is kept" in n for n in auto.notes)


def test_a_combination_over_the_budget_shrinks():
    from sparsec.planner import adjust

    opts = _three()
    choose(opts)
    auto = AutoPlan("cpu", "test", opts, [], 0.0, 1.0, "test")
    measure, calls = _measured(lambda chosen: 0.9 * len(chosen))
    adjust(auto, measure(auto))
    assert calls[0] == {"o0", "o1"} and 0.9 * len(calls[-1]) <= 1.0 and auto.specs == ["o0"]


def test_a_budget_keeps_a_margin_on_the_scoring_inputs():
    from sparsec.planner import CEILING, adjust

    assert 0.5 < CEILING < 0.9
    opts = _three()
    choose(opts)
    auto = AutoPlan("cpu", "test", opts, [], 0.0, 1.0, "test")
    # two options use 0.9 of the budget together: within it, but over the ceiling
    measure, calls = _measured(lambda chosen: 0.45 * len(chosen))
    adjust(auto, measure(auto), CEILING)
    assert calls[0] == {"o0", "o1"} and auto.specs == ["o0"]
    opts = _three()
    choose(opts)
    auto = AutoPlan("cpu", "test", opts, [], 0.0, 1.0, "test")
    measure, calls = _measured(lambda chosen: 0.45 * len(chosen))
    adjust(auto, measure(auto))  # no ceiling: 0.9 is within the budget and kept
    assert sorted(auto.specs) == ["o0", "o1"]


def test_deep_models_are_planned_per_group_of_consecutive_sites(zoo_path, monkeypatch):
    from sparsec import planner
    from sparsec.model_io import load_model
    from sparsec.pipeline import PassContext, parse_pass_specs

    model = load_model(zoo_path("tiny-llama")).model
    alone = planner._sites(model, PassContext())["ffn-neurons"]
    assert len(alone) == 2 and alone[0].signature == alone[1].signature  # equal shapes: one prediction
    monkeypatch.setattr(planner, "MAX_SITES", 1)
    monkeypatch.setattr(planner, "GROUPS", 1)
    (group,) = planner._sites(model, PassContext())["ffn-neurons"]
    assert "(2 ffn-neurons sites)" in group.label and len(group.regions) == 2
    (p,) = parse_pass_specs(f"ffn-neurons:ratio=0.5,include={group.include}")
    assert len(p.run(model, PassContext()).changed) == 2  # the group's patterns select exactly its sites
    (p,) = parse_pass_specs(f"ffn-neurons:ratio=0.5,include={alone[1].include}")
    fresh = load_model(zoo_path("tiny-llama")).model
    assert len(p.run(fresh, PassContext()).changed) == 1


def test_options_fitted_from_one_capture_equal_a_pass_that_captures_itself(zoo_path):
    """The planner fits every option from the unpruned model's statistics, captured once: for a
    single site that is exactly what the pass captures on its own."""
    from sparsec.data import Calibration
    from sparsec.feeds import input_specs, random_feeds
    from sparsec.model_io import load_model
    from sparsec.passes.structured_prune import DENSE_STATISTICS, dense_statistics
    from sparsec.pipeline import PassContext, parse_pass_specs
    from sparsec.planner import _sites

    src = zoo_path("tiny-llama")
    original = load_model(src).model
    calibration = Calibration(random_feeds(input_specs(original), seed=3, samples=3), "random")
    sites = _sites(original, PassContext())
    regions = [r for f in ("ffn-neurons", "attention-heads") for s in sites[f] for r in s.regions]
    ctx = PassContext(calibration=calibration)
    ctx.extras[DENSE_STATISTICS] = dense_statistics(original, regions, ctx)
    for spec in (f"ffn-neurons:ratio=0.5,method=activation,include={sites['ffn-neurons'][1].include}",
                 f"attention-heads:ratio=0.5,method=activation,include={sites['attention-heads'][1].include}"):
        models = []
        for c in (ctx, PassContext(calibration=calibration)):
            model = load_model(src).model
            (p,) = parse_pass_specs(spec)
            assert len(p.run(model, c).changed) == 1
            models.append({k: v.const_value.numpy() for k, v in model.graph.initializers.items()})
        cached, captured = models
        assert cached.keys() == captured.keys()
        assert all(np.array_equal(cached[k], captured[k]) for k in cached)
        assert any(cached[k].shape != v.const_value.shape for k, v in original.graph.initializers.items())


def test_moe_options_fitted_from_one_capture_equal_a_pass_that_captures_itself(zoo_path, tmp_path):
    """The planner captures every FFN's activations once (moe.dense_captures); an MoE option on
    one FFN fitted from them equals the pass capturing for itself, and runs no model."""
    from sparsec.data import Calibration
    from sparsec.feeds import input_specs, random_feeds
    from sparsec.model_io import load_model
    from sparsec.passes.moe import DENSE_CAPTURES, dense_captures
    from sparsec.pipeline import PassContext, parse_pass_specs
    from sparsec.planner import _sites

    src = zoo_path("tiny-llama")
    original = load_model(src).model
    calibration = Calibration(random_feeds(input_specs(original), seed=3, samples=3), "random")
    ctx = PassContext(calibration=calibration)
    ctx.extras[DENSE_CAPTURES] = dense_captures(original, ctx, tmp_path)
    assert len(ctx.extras[DENSE_CAPTURES]) == 2 and len(list(tmp_path.glob("*.npy"))) == 4
    site = _sites(original, PassContext())["ffn-neurons"][1]
    models = []
    for c in (ctx, PassContext(calibration=calibration)):
        model = load_model(src).model
        (p,) = parse_pass_specs(f"moe:experts=4,k=2,include={site.include}")
        assert len(p.run(model, c).changed) == 1
        models.append({k: v.const_value.numpy() for k, v in model.graph.initializers.items()})
    cached, captured = models
    assert cached.keys() == captured.keys() and len(cached) > len(original.graph.initializers)
    assert all(np.array_equal(cached[k], captured[k]) for k in cached)
    ctx.extras[DENSE_CAPTURES] = {k: (str(tmp_path / "ffn0.x.npy"), v[1]) for k, v in
                                  ctx.extras[DENSE_CAPTURES].items()}  # another FFN's inputs: a different fit
    model = load_model(src).model
    (p,) = parse_pass_specs(f"moe:experts=4,k=2,include={site.include}")
    p.run(model, ctx)
    assert not all(np.array_equal(v.const_value.numpy(), cached[k]) for k, v in model.graph.initializers.items())


def test_a_harsher_option_is_not_tried_where_a_milder_one_already_spends_too_much():
    from sparsec.planner import _milder_over

    opts = [Option("ffn0", "ffn-neurons", "ffn-neurons:ratio=0.25,include=a", "structured", saving=1e-3, use=0.9),
            Option("ffn0", "ffn-neurons", "ffn-neurons:ratio=0.5,include=a", "structured"),
            Option("ffn0", "moe", "moe:experts=8,k=4,include=a", "moe"),
            Option("ffn1", "ffn-neurons", "ffn-neurons:ratio=0.5,include=b", "structured")]
    assert _milder_over(opts[1], opts) is opts[0]
    assert _milder_over(opts[2], opts) is None and _milder_over(opts[3], opts) is None  # other family, other site
    opts[0].use = SAFETY  # within what one option may spend: the harsher one is tried
    assert _milder_over(opts[1], opts) is None


def test_objective_size_plans_for_the_smallest_file_within_the_budget(zoo_path, tmp_path, capsys):
    """--objective size: options are valued by the bytes they take off the file (ONNX Runtime's
    quantization among them, whatever the target's speed), and the plan's predicted size is the
    size of the file written."""
    from sparsec.cost import file_bytes

    src = zoo_path("tiny-bert")
    out = tmp_path / "small.onnx"
    assert main(["compile", str(src), "--target", "cpu", "--min-cosine", "0.9", "--objective", "size", "--explain",
                 "-o", str(out), "--save-recipe", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "objective size: predicted" in text and "MiB" in text
    planner = json.loads((tmp_path / "small.report.json").read_text())["planner"]
    assert planner["objective"] == "size"
    chosen = [o for o in planner["options"] if o["status"] == "chosen"]
    assert chosen and all(o["saving"] > 0 for o in chosen)
    assert any(o["family"] == "quantize" for o in chosen)  # a quarter or an eighth of the bytes: the best per use
    written = file_bytes(out)
    assert written < file_bytes(src) - 0.5 * sum(o["saving"] for o in chosen)  # tiny-bert: mostly its embedding
    assert planner["predicted_seconds"] == pytest.approx(written, rel=0.02)  # the predicted size is the real one
    assert json.loads((tmp_path / "r.json").read_text())["objective"] == "size"


def test_memory_footprint_counts_weights_and_the_peak_of_live_values(tmp_path):
    """X (8, 64) -> MatMul W1 (64, 32) -> Relu -> MatMul W2 (32, 16) -> Y: at most two values
    live at once; a compressed weight counts as the dense weight it is rebuilt into."""
    from onnx import TensorProto, helper, numpy_helper

    from sparsec.cost import footprint
    from sparsec.model_io import load_model, save_model
    from sparsec.pipeline import PassContext, parse_pass_specs, run_passes

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal((32, 16)).astype(np.float32)
    w1[:, ::2] = 0  # half zeros: compress packs it
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["H"]), helper.make_node("Relu", ["H"], ["R"]),
             helper.make_node("MatMul", ["R", "W2"], ["Y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", 64])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", 16])],
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    feed = {"X": np.ones((8, 64), np.float32)}
    f = footprint(path, feed)
    x, h, y = 8 * 64 * 4, 8 * 32 * 4, 8 * 16 * 4
    assert f.weight_bytes == w1.nbytes + w2.nbytes
    assert f.activation_bytes == max(x + h, h + h, h + y)  # X+H, then H+R, then R+Y
    assert f.memory_bytes == f.weight_bytes + f.activation_bytes and f.file_bytes == path.stat().st_size
    model = load_model(path).model
    (record,) = run_passes(model, parse_pass_specs("compress:min_params=0"), PassContext())
    assert len(record.changed) == 1
    packed = save_model(model, tmp_path / "packed.onnx")
    g = footprint(packed, feed)
    assert g.weight_bytes == f.weight_bytes and g.activation_bytes == f.activation_bytes
    assert g.file_bytes < f.file_bytes


def test_a_bug_in_one_option_is_reported_as_one_and_the_plan_goes_on(zoo_path, tmp_path, capsys, monkeypatch):
    from sparsec.passes import moe

    def broken(self, model, ctx):
        raise ZeroDivisionError("a stand-in bug")

    monkeypatch.setattr(moe.FfnToMoePass, "run", broken)
    src = zoo_path("tiny-bert")
    monkeypatch.setenv("SPARSEC_CACHE", str(tmp_path))  # no option results cached by other tests
    out = tmp_path / "auto.onnx"
    assert main(["compile", str(src), "--target", "cpu", "--min-cosine", "0.97", "--explain",
                 "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "internal error in the pass (ZeroDivisionError: a stand-in bug)" in text
    assert "a sparsec bug; please report it" in text and out.exists()


def test_a_re_plan_takes_options_from_the_cache_until_the_profile_is_measured_again(zoo_path, tmp_path, monkeypatch):
    import dataclasses

    from sparsec import cost, planner

    monkeypatch.setenv("SPARSEC_CACHE", str(tmp_path))  # no option results cached by other tests
    scored = []
    score = planner.score_option
    monkeypatch.setattr(planner, "score_option", lambda job, **kw: scored.append(job[1]) or score(job, **kw))
    profile = cost.load_profile

    def plan(name: str) -> dict:
        assert main(["compile", str(zoo_path("tiny-bert")), "--target", "cpu", "--min-cosine", "0.97",
                     "-o", str(tmp_path / f"{name}.onnx")]) == 0
        return json.loads((tmp_path / f"{name}.report.json").read_text())["planner"]

    first = plan("first")
    tried = len(scored)
    assert tried >= 4
    again = plan("again")  # the same model, budget and profile: every option comes from the cache
    assert len(scored) == tried and again["options"] == first["options"]
    # the same machine measured again (same `source`, other rates): the savings are stale
    monkeypatch.setattr(cost, "load_profile", lambda target: dataclasses.replace(
        profile(target), bandwidth=profile(target).bandwidth / 2))
    plan("remeasured")
    assert len(scored) == 2 * tried


def test_a_relative_error_budget_plans_and_judges_on_every_outputs_relative_l2_error(zoo_path, tmp_path, capsys):
    src = zoo_path("tiny-bert")
    out = tmp_path / "auto.onnx"
    assert main(["compile", str(src), "--target", "cpu", "--max-rel-err", "0.2", "--explain", "-o", str(out),
                 "--save-recipe", str(tmp_path / "r.json")]) == 0
    assert "every output's relative L2 error <= 0.2" in capsys.readouterr().out
    report = json.loads((tmp_path / "auto.report.json").read_text())
    assert report["judgement"]["status"] == "WITHIN BUDGET"
    checks = [c for c in report["judgement"]["checks"] if "relative L2 error" in c["what"]]
    assert checks and all(c["value"] <= 0.2 for c in checks)
    measured = [o for o in report["planner"]["options"] if o["use"] is not None]
    # a lossy option spends the budget: its error over the bound (0 if the budget were not read)
    assert any(o["use"] > 0.01 for o in measured) and any(o["status"] == "chosen" for o in measured)
    assert json.loads((tmp_path / "r.json").read_text())["budget"] == {"max_rel_err": 0.2}
    assert main(["compile", str(src), "--recipe", str(tmp_path / "r.json"), "-o", str(tmp_path / "again.onnx")]) == 0
    assert main(["compile", str(src), "--target", "cpu", "--max-rel-err", "-1", "-o", str(tmp_path / "x.onnx")]) == 2
