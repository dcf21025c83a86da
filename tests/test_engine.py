"""The engine: independent units in this process (in order, or in threads) with failures named;
the solves of a stage's sites in threads bit-identical to one after the other; the planner's
options independent of the order they run in; a clear line when ray is missing.

The same against a local Ray cluster: tests/test_engine_ray.py (slow)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper

from sparsec.cli import main
from sparsec.engine import InProcess, TaskError, make_engine
from sparsec.errors import DependencyError, InputError, OptionError
from tests.helpers import linear, make_model, save, weights


def _double(x, *, offset=0):
    return 2 * x + offset


def _fail_on(x, *, bad):
    if x == bad:
        raise ValueError(f"unit {x} broke")
    return x


def _input_error(x):
    raise InputError("the file is bad")


@pytest.mark.parametrize("threads", [1, 3])
def test_in_process_units_come_back_in_order_with_the_shared_arguments(threads):
    out = InProcess().map(_double, [1, 2, 3, 4], labels=list("abcd"), what="unit", shared={"offset": 1},
                          threads=threads)
    assert out == [3, 5, 7, 9]


@pytest.mark.parametrize("threads", [1, 3])
def test_a_unit_that_raises_stops_the_run_with_its_name(threads):
    with pytest.raises(TaskError, match=r"^sweep candidate 'nm:n=2,m=4' failed: ValueError: unit 2 broke$") as info:
        InProcess().map(_fail_on, [1, 2, 3], labels=["compress", "nm:n=2,m=4", "unstructured"],
                        what="sweep candidate", shared={"bad": 2}, threads=threads)
    assert info.value.exit_code == 3


def test_a_sparsec_error_keeps_its_type_and_exit_code_and_names_the_unit():
    with pytest.raises(InputError) as info:
        InProcess().map(_input_error, [1], labels=["ffn-neurons:ratio=0.5"], what="planner option")
    assert str(info.value) == "planner option 'ffn-neurons:ratio=0.5': the file is bad"
    assert info.value.exit_code == 2


def test_missing_ray_is_one_line_with_the_pip_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    with pytest.raises(DependencyError, match=r"--ray needs the package 'ray'.*pip install '\.\[ray\]'"):
        make_engine(True)
    src = save(linear(), tmp_path / "m.onnx")
    assert main(["sweep", str(src), "--passes", "compress", "--ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install '.[ray]'" in err[0]


def test_a_ray_address_that_is_not_one_is_refused_before_connecting():
    with pytest.raises(OptionError, match="--ray ADDRESS expects host:port"):
        make_engine("model.onnx")


@pytest.mark.parametrize("node, torch_threads, omp, threads, expected", [
    (16, 16, None, None, 16),  # the defaults: every core of the node, one unit at a time
    (16, 4, "4", 4, 4),  # threads limited everywhere: four units per node
    (16, 4, "4", None, 16),  # ONNX Runtime's default is still one thread per core
    (16, 4, "16", 4, 16),  # BLAS's threads count too
    (8, 16, None, 32, 8),  # never more than a node has (such a task would never run)
])
def test_a_ray_task_reserves_the_cores_its_threads_use(monkeypatch, node, torch_threads, omp, threads, expected):
    from sparsec.engine import THREAD_VARIABLES, RayEngine

    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if omp:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(node)))
    engine = RayEngine.__new__(RayEngine)  # no cluster: the arithmetic alone
    engine.node_cpus, engine.torch_threads, engine.threads = node, torch_threads, threads
    assert engine.task_cpus() == expected
    assert engine.task_cpus(num_gpus=1) == 1  # a solve on the GPU: one task per GPU, not per node


def test_without_ray_nothing_imports_ray():
    code = ("import sys; import sparsec.cli, sparsec.sweep, sparsec.planner, sparsec.sensitivity, sparsec.compiler;"
            " from sparsec.engine import make_engine; make_engine(None).map(abs, [-1], labels=['a'], what='unit');"
            " assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _stage_model(tmp_path):
    """Three MatMuls reading one value (like q, k, v): one stage, three independent solves."""
    sizes = (48, 32, 16)
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"proj{i}") for i in range(3)]
    return save(make_model(nodes, [("x", TensorProto.FLOAT, [8, 64])],
                           [(f"y{i}", TensorProto.FLOAT, [8, n]) for i, n in enumerate(sizes)],
                           {f"w{i}": weights(64, n, seed=i) for i, n in enumerate(sizes)}), tmp_path / "stage.onnx")


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_solves_of_a_stage_in_threads_equal_the_sequential_run(tmp_path, method):
    from sparsec.data import Calibration
    from sparsec.model_io import load_model
    from sparsec.pipeline import PassContext, parse_pass_specs

    src = _stage_model(tmp_path)
    rng = np.random.default_rng(0)
    calibration = Calibration([{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(4)], "random")
    results = []
    for jobs in (1, 3):
        model = load_model(src).model
        (p,) = parse_pass_specs(f"nm:n=2,m=4,method={method},min_params=0,keep_output_layers=false")
        record = p.run(model, PassContext(calibration=calibration, jobs=jobs))
        results.append(({k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()},
                        json.dumps(record.to_dict(), sort_keys=True, default=str)))
    (sequential, seq_record), (threaded, thr_record) = results
    original = load_model(src).model.graph.initializers
    assert sorted(sequential) == ["w0", "w1", "w2"]
    for name, w in sequential.items():
        assert not np.array_equal(w, original[name].const_value.numpy())  # really pruned
        assert (w.reshape(16, 4, -1) != 0).sum(axis=1).max() <= 2  # 2:4 along the reduction axis
        assert np.array_equal(w, threaded[name]), name  # bit-identical
    assert seq_record == thr_record  # the same sites, figures and order


class _Reversed(InProcess):
    """Runs units last to first (results still in order): independent units give the same plan."""

    def map(self, fn, items, *, labels, what, shared=None, num_gpus=0, threads=1):
        return super().map(fn, items[::-1], labels=list(labels)[::-1], what=what, shared=shared)[::-1]


def test_the_planners_options_do_not_depend_on_the_order_they_run_in(zoo_path, tmp_path, monkeypatch):
    from sparsec.compiler import compile

    src = zoo_path("tiny-bert")
    plans = []
    for name, engine in (("in-order", None), ("reversed", _Reversed())):
        monkeypatch.setenv("SPARSEC_CACHE", str(tmp_path / name))  # no option read from the planner's cache
        result = compile(src, target="cpu", min_cosine=0.97, explain=True, output=tmp_path / f"{name}.onnx",
                         engine=engine)
        plans.append(result.auto.to_dict())
    assert plans[0]["options"] and any(o["status"] == "chosen" for o in plans[0]["options"])
    assert sum(o["use"] is not None for o in plans[0]["options"]) >= 4  # options were really measured
    assert plans[0] == plans[1]
