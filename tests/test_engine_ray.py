"""The engine on a local Ray cluster: sweep, compile (planner options and SparseGPT solves) and
analyze give the in-process results; a task that raises or whose worker keeps dying is named;
a worker killed once is retried.

Slow: starting the cluster alone takes 10-20 s on 2 cores. Needs the ``ray`` extra."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from sparsec.cli import main
from sparsec.engine import TaskError
from tests.helpers import file_hash, linear, save

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (a `--ray` command finds it running and reuses it)."""
    from sparsec.engine import make_engine

    # the units below live in this test module, which workers cannot import: send them by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with make_engine(True) as engine:
        yield engine


def _fail_on(x, *, bad):
    if x == bad:
        raise ValueError(f"unit {x} broke")
    return x


def _die_once(x, *, marker):
    if x == 2 and not Path(marker).exists():
        Path(marker).write_text("died")
        os._exit(1)  # the worker process dies as if killed
    return x


def _always_die(x):
    if x == 2:
        os._exit(1)
    return x


def test_ray_units_come_back_in_order_and_failures_are_named(cluster, tmp_path):
    assert cluster.map(_fail_on, [1, 2, 3], labels=list("abc"), what="unit", shared={"bad": 0}) == [1, 2, 3]
    with pytest.raises(TaskError, match=r"^sweep candidate 'nm:n=2,m=4' failed on Ray .*ValueError: unit 2 broke"):
        cluster.map(_fail_on, [1, 2, 3], labels=["compress", "nm:n=2,m=4", "unstructured"],
                    what="sweep candidate", shared={"bad": 2})
    marker = tmp_path / "died"
    assert cluster.map(_die_once, [1, 2, 3], labels=list("abc"), what="unit", shared={"marker": str(marker)}) \
        == [1, 2, 3]
    assert marker.exists()  # the second unit's worker did die, and its task was retried
    with pytest.raises(TaskError, match=r"^planner option 'b' failed on Ray .* after 2 retries"):
        cluster.map(_always_die, [1, 2, 3], labels=list("abc"), what="planner option")


def _interval(x, *, folder):
    import time

    start = time.monotonic()
    time.sleep(1.0)
    (Path(folder) / f"{x}.txt").write_text(f"{start} {time.monotonic()}")
    return x


def test_units_that_use_every_core_do_not_run_side_by_side(cluster, tmp_path):
    # each unit runs the driver's threads (one per core here): two at once on a 2-core node
    # would oversubscribe it, as 8 tasks of 16 threads each did on a 16-core node
    assert cluster.task_cpus() == cluster.node_cpus and cluster.workers == 1
    assert "1 unit at once" in cluster.name  # what a sweep's progress line shows
    assert cluster.map(_interval, [0, 1, 2], labels=list("abc"), what="unit", shared={"folder": str(tmp_path)}) \
        == [0, 1, 2]
    spans = sorted(tuple(map(float, (tmp_path / f"{x}.txt").read_text().split())) for x in range(3))
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), spans


def _figures(sweep: dict) -> list:
    """The sweep's points without the timing columns (which no two runs share)."""
    timing = {"speedup", "median_ms", "speedup_p10", "speedup_p90", "pareto"}
    return [{k: v for k, v in p.items() if k not in timing} for p in sweep["points"]]


def test_sweep_with_ray_gives_the_in_process_figures(cluster, tmp_path, capsys):
    src = save(linear(k=256, n=128), tmp_path / "m.onnx")
    specs = ["compress", "nm:n=1,m=4,min_params=0", "unstructured:sparsity=0.5,min_params=0"]
    runs = []
    for flags in ([], ["--ray"]):
        args = ["sweep", str(src), *[a for s in specs for a in ("--passes", s)], "--threads", "1", "--repeats", "3"]
        assert main([*args, "--json", *flags]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    local, remote = runs
    assert [p["label"] for p in remote["points"]] == ["original", *specs]
    assert _figures(local) == _figures(remote)
    assert remote["points"][2]["verdict"] == "BELOW BUDGET" and remote["points"][2]["fidelity"] < 0.99
    assert all(p["speedup"] > 0 for p in remote["points"])  # timed, on the timing resource


def test_compile_with_ray_writes_the_in_process_model(cluster, tmp_path):
    """SparseGPT's solves as Ray tasks: the same bytes as in this process."""
    src = save(linear(k=256, n=128), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", **{f"{i}/X": rng.standard_normal((4, 256)).astype(np.float32)
                                        for i in range(4)})
    outs = []
    for name, flags in (("local", []), ("ray", ["--ray"])):
        out = tmp_path / f"{name}.onnx"
        assert main(["compile", str(src), "--passes", "nm:method=sparsegpt,min_params=0,keep_output_layers=false",
                     "--calib", str(tmp_path / "calib.npz"), "--best-effort", "-o", str(out), *flags]) == 0
        outs.append(out)
    report = json.loads((tmp_path / "ray.report.json").read_text())
    assert report["records"][0]["sites"][0]["action"] == "changed"
    assert "sparsegpt" in " ".join(report["records"][0]["notes"])
    assert file_hash(outs[0]) == file_hash(outs[1])


def test_the_planner_with_ray_makes_the_in_process_plan(cluster, zoo_path, tmp_path, monkeypatch):
    src = zoo_path("tiny-bert")
    plans = []
    for name, flags in (("local", []), ("ray", ["--ray"])):
        monkeypatch.setenv("SPARSEC_CACHE", str(tmp_path / name / "cache"))  # nothing read from the planner's cache
        out = tmp_path / name / "out.onnx"  # one name: the model refers to its external data by name
        out.parent.mkdir()
        assert main(["compile", str(src), "--target", "cpu", "--min-cosine", "0.97", "--explain", "-o", str(out),
                     *flags]) == 0
        plans.append(json.loads((tmp_path / name / "out.report.json").read_text())["planner"])
    assert any(o["status"] == "chosen" for o in plans[0]["options"])
    assert plans[0] == plans[1]
    assert file_hash(*sorted((tmp_path / "local").glob("out.onnx*"))) == \
        file_hash(*sorted((tmp_path / "ray").glob("out.onnx*")))


def test_analyze_with_ray_gives_the_in_process_table(cluster, zoo_path, capsys):
    src = zoo_path("tiny-llama")
    runs = []
    for flags in ([], ["--ray"]):
        assert main(["analyze", str(src), "--calib-samples", "4", "--calib-seqlen", "32", "--json", *flags]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert [layer["layer"] for layer in runs[0]["layers"]] == ["m.model.layers.0", "m.model.layers.1"]
    assert runs[0] == runs[1]
