"""Killing compile at any moment leaves no partial model at the destination; the same input,
options and seed give byte-identical output."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from onnx import helper

from tests.helpers import FLOAT, make_model, save, weights


def stack(tmp_path):
    """Eight 512x512 layers (8 MiB of weights): big enough for kills to land mid-write."""
    nodes, inits, x = [], {}, "X"
    for i in range(8):
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"l{i}"),
                  helper.make_node("Relu", [f"h{i}"], [f"a{i}"], name=f"r{i}")]
        inits[f"W{i}"] = weights(512, 512, seed=i)
        x = f"a{i}"
    return save(make_model(nodes, [("X", FLOAT, ["B", 512])], [(x, FLOAT, ["B", 512])], inits),
                tmp_path / "src.onnx", external=True)


def compile_cmd(src, out):
    return [sys.executable, "-m", "sparsec", "--quiet", "compile", str(src), "--passes", "nm;compress", "--best-effort",
            "--seed", "7", "-o", str(out)]


@pytest.mark.integration
def test_same_input_options_seed_give_identical_bytes(tmp_path):
    src = stack(tmp_path)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        subprocess.run(compile_cmd(src, tmp_path / d / "out.onnx"), check=True)
    for name in ("out.onnx", "out.onnx.data"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.integration
def test_kill_leaves_no_partial_output(tmp_path):
    src = stack(tmp_path)
    (tmp_path / "ref").mkdir()
    subprocess.run(compile_cmd(src, tmp_path / "ref" / "out.onnx"), check=True)
    reference = {n: (tmp_path / "ref" / n).read_bytes() for n in ("out.onnx", "out.onnx.data")}
    dest = tmp_path / "dest"
    dest.mkdir()
    start = time.perf_counter()
    subprocess.run(compile_cmd(src, dest / "probe.onnx"), check=True)
    total = time.perf_counter() - start
    outcomes = []
    for fraction in np.linspace(0.3, 1.0, 8):
        proc = subprocess.Popen(compile_cmd(src, dest / "out.onnx"))
        time.sleep(total * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model = dest / "out.onnx"
        if model.exists():  # either complete and identical to an uninterrupted run...
            assert model.read_bytes() == reference["out.onnx"]
            assert (dest / "out.onnx.data").read_bytes() == reference["out.onnx.data"]
            outcomes.append("complete")
            model.unlink()
            (dest / "out.onnx.data").unlink(missing_ok=True)
        else:  # ...or absent
            outcomes.append("absent")
        assert not [p for p in dest.iterdir() if p.name.startswith("out.onnx") and p.name != "out.onnx.data"]
    assert "absent" in outcomes
    # A later run removes the temporaries the killed runs left behind.
    subprocess.run(compile_cmd(src, dest / "out.onnx"), check=True)
    leftovers = [p.name for p in dest.iterdir() if p.name.endswith(".sparsec-tmp")]
    assert leftovers == []
