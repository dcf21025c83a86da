"""The execution layer: the Runner (providers, IOBinding with shared buffers, one-line errors),
the staged runner (sequential capture with a bounded frontier) and side-by-side timing."""

import numpy as np
import pytest
from onnx import helper

from sparsec.errors import RuntimeFailure
from sparsec.graph import constant_ref
from sparsec.model_io import load_model
from sparsec.runtime.bench import compare_speed
from sparsec.runtime.session import CPU, Runner, cpu_runner
from sparsec.runtime.staged import StagedRunner, staged_outputs
from tests.helpers import FLOAT, linear, make_model, save, weights
from tests.test_data import mlp


def test_runner_drops_unavailable_providers_and_names_them():
    runner = Runner.for_providers([("NoSuchExecutionProvider", {"x": 1}), CPU], what="target 'x'")
    assert runner.provider_names == [CPU] and not runner.on_gpu
    assert "NoSuchExecutionProvider not available" in runner.notes[0] and "target 'x' ran on" in runner.notes[0]
    assert Runner.for_providers(["NoSuchExecutionProvider"]).provider_names == [CPU]


def test_session_errors_are_one_line(tmp_path):
    custom = make_model([helper.make_node("FancyOp", ["X"], ["Y"], domain="com.example")],
                        [("X", FLOAT, [2, 4])], [("Y", FLOAT, [2, 4])], extra_opsets=[("com.example", 1)])
    with pytest.raises(RuntimeFailure, match="ONNX Runtime cannot load custom.onnx") as info:
        cpu_runner().session(save(custom, tmp_path / "custom.onnx"))
    assert "\n" not in str(info.value)
    session = cpu_runner().session(save(linear(), tmp_path / "m.onnx"))
    with pytest.raises(RuntimeFailure, match="failed to run the model"):
        cpu_runner().run(session, {"X": np.ones((2, 3), np.float32)})


def test_io_binding_shares_an_input_and_an_output_buffer(tmp_path):
    # present = past + delta, written into past's buffer when shared.
    nodes = [helper.make_node("Add", ["past", "delta"], ["present"])]
    proto = make_model(nodes, [("past", FLOAT, [2, 3]), ("delta", FLOAT, [2, 3])], [("present", FLOAT, [2, 3])])
    runner = cpu_runner()
    session = runner.session(save(proto, tmp_path / "ring.onnx"))
    past, delta = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((2, 3), np.float32)
    plain = runner.run(session, {"past": past, "delta": delta})
    shared = runner.run(session, {"past": past, "delta": delta}, shared={"past": "present"})
    np.testing.assert_array_equal(shared["present"], plain["present"])
    np.testing.assert_array_equal(shared["present"], past + 1)
    np.testing.assert_array_equal(past, np.arange(6, dtype=np.float32).reshape(2, 3))  # the caller's array is untouched


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


def test_fork_continues_from_the_frontier_with_other_weights(tmp_path):
    """A fork computes from the parent's frontier with its overrides; the parent is untouched."""
    model = load_model(mlp(tmp_path)).model
    feeds = [{"X": weights(3, 16, seed=s)} for s in range(2)]
    values = {v.name: v for n in model.graph for v in n.outputs}
    runner = StagedRunner(model, feeds)
    h1 = list(runner.capture(values["h1"]))
    w2 = model.graph.initializers["W2"]
    original = w2.const_value
    constant_ref(w2).replace(np.zeros((16, 16), np.float32))
    fork = runner.fork({w2: original}, forget={values["b"]})
    for got, hidden in zip(fork.capture(values["s"]), h1):
        np.testing.assert_allclose(got, np.maximum(hidden @ original.numpy(), 0) + hidden, rtol=1e-5, atol=1e-5)
    for got, hidden in zip(runner.capture(values["s"]), h1):
        np.testing.assert_allclose(got, hidden, rtol=1e-6)  # the parent computes with the zeroed W2
    stale = runner.fork({}, forget=set())
    assert values["s"] in stale.computed  # nothing forgotten: values already computed are reused


def test_staged_outputs_equal_a_whole_run_for_any_budget(tmp_path):
    path = mlp(tmp_path)
    model = load_model(path).model
    feeds = [{"X": weights(3, 16, seed=s)} for s in range(2)]
    session = cpu_runner().session(path)
    whole = [cpu_runner().run(session, f)["Y"] for f in feeds]
    for budget in (1, 1 << 10, 1 << 30):  # a stage per weight ... one stage
        staged = staged_outputs(model, feeds, budget_bytes=budget)
        for got, want in zip(staged, whole):
            np.testing.assert_array_equal(got["Y"], want)


def test_compare_speed_interleaves_and_reports_ratios(tmp_path):
    a = save(linear(k=256, n=256), tmp_path / "a.onnx")
    b = save(linear(k=256, n=256, seed=1), tmp_path / "b.onnx")
    feed = {"X": weights(64, 256)}
    result = compare_speed({"a": a, "b": b}, feed, min_repeats=6, max_repeats=9, batch=3, threads=1)
    assert result.baseline == "a" and 6 <= result.repeats <= 9 and result.threads == 1
    assert result.ratios["a"].median == 1.0 and result.ratios["a"].spread == 0.0
    r = result.ratios["b"]
    assert r.p10 <= r.median <= r.p90 and r.median > 0
    assert result.stable == all(x.spread <= result.tolerance for x in result.ratios.values())
    assert "rounds" in result.line("b") and result.timings["b"].load_ms > 0


def test_timed_sessions_do_not_spin(tmp_path, monkeypatch):
    """An idle session's spinning threads would take the cores of the one being timed."""
    from sparsec.runtime import bench

    created = []
    original = bench.Runner.session

    def spy(self, model, **kwargs):
        session = original(self, model, **kwargs)
        created.append(session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning"))
        return session

    monkeypatch.setattr(bench.Runner, "session", spy)
    a = save(linear(k=64, n=64), tmp_path / "a.onnx")
    compare_speed({"a": a, "b": a}, {"X": weights(4, 64)}, min_repeats=2, max_repeats=2, warmup=1)
    assert created == ["0", "0"]


def test_interleaved_medians_keep_a_burst_of_other_work_to_one_round():
    """Each call's result is its median over rounds of every call in turn: a burst on the machine
    as long as 100 calls lands on one round of each probe and moves no result (timing one probe's
    rounds after the other, it would cover five of the first probe's seven). A fake clock: each
    call advances it by its cost."""
    from sparsec.runtime.bench import interleaved_medians

    now, calls_made = [0.0], [0]
    costs = [1e-3, 4e-3, 2.5e-4]

    def call(i):
        def run():
            calls_made[0] += 1
            burst = 12 < calls_made[0] <= 112  # 100 calls, right after the warm-up
            now[0] += costs[i] * (10 if burst else 1)
        return run

    times = interleaved_medians([call(i) for i in range(3)], rounds=7, round_seconds=0.02, clock=lambda: now[0])
    assert times == pytest.approx(costs)
    assert calls_made[0] > 7 * (20 + 5 + 80)  # each round: at least 0.02 s of each probe


def test_a_profiled_session_writes_each_nodes_kernel_time(tmp_path):
    import json

    src = save(linear(k=32, n=16), tmp_path / "m.onnx")
    session = cpu_runner(1).session(src, profile=tmp_path / "trace")
    session.run(None, {"X": np.ones((4, 32), np.float32)})
    trace = session.end_profiling()
    assert trace.startswith(str(tmp_path / "trace"))
    ops = {e["args"]["op_name"] for e in json.loads(open(trace).read())
           if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}
    assert ops == {"MatMul", "Relu"}
