"""The error messages docs/troubleshooting.md explains, each with the command that produces it.

Shared by tests/test_docs.py (which checks every message still appears verbatim in the doc)
and by whoever regenerates the doc.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from tests.helpers import FLOAT, linear, make_model, save, weights


def setup(tmp: Path) -> None:
    """Create the files the cases refer to, in ``tmp``."""
    (tmp / "notes.onnx").write_text("these are notes, not a model\n")
    good = save(linear(k=128, n=64), tmp / "model.onnx", external=True)
    data = good.read_bytes()
    (tmp / "truncated.onnx").write_bytes(data[: len(data) // 2])
    moved = tmp / "moved"
    moved.mkdir()
    save(linear(k=128, n=64), moved / "model.onnx", external=True)
    (moved / "model.onnx.data").unlink()
    proto = onnx.load(str(good), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secrets.bin"
    onnx.save(proto, str(tmp / "escape.onnx"))
    future = linear(k=128, n=64)
    future.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    save(future, tmp / "future.onnx")
    custom = make_model([helper.make_node("FancyOp", ["X"], ["Y"], domain="com.example")],
                        [("X", FLOAT, [2, 4])], [("Y", FLOAT, [2, 4])], extra_opsets=[("com.example", 1)])
    save(custom, tmp / "custom.onnx")
    np.savez(tmp / "inputs.npz", X=weights(2, 100))
    (tmp / "calib.txt").write_text("some calibration text " * 50)
    (tmp / "recipe.json").write_text(json.dumps({"target": "ampere", "passes": [{"id": "nm", "options": {"n": 2}}]}))


# (arguments to `sparsec`, expected exit code)
CASES = [
    (["inspect", "notes.onnx"], 2),
    (["inspect", "truncated.onnx"], 2),
    (["inspect", "moved/model.onnx"], 2),
    (["inspect", "escape.onnx"], 2),
    (["inspect", "future.onnx"], 2),
    (["compile", "model.onnx", "--target", "a100"], 2),
    (["compile", "model.onnx", "--passes", "nm:n=4,m=4"], 2),
    (["compile", "model.onnx", "--passes", "nm:sparsity=0.5"], 2),
    (["compile", "model.onnx", "--passes", "nm:method=wanda"], 2),
    (["compile", "model.onnx", "--passes", "nm:method=wanda", "--calib", "calib.txt"], 2),
    (["compile", "model.onnx", "--passes", "nm:min_params=0", "--inputs", "inputs.npz"], 2),
    (["compile", "model.onnx", "-o", "model.onnx"], 2),
    (["compile", "model.onnx", "-o", "out/model.onnx"], 2),
    (["compile", "model.onnx", "--passes", "nm:min_params=0", "-o", "pruned.onnx", "--min-cosine", "0.999"], 1),
    (["compile", "model.onnx", "--recipe", "recipe.json", "--passes", "nm"], 2),
    (["verify", "model.onnx", "custom.onnx"], 2),
]


if __name__ == "__main__":  # print what each case prints now, to update docs/troubleshooting.md
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        setup(Path(tmp))
        for args, code in CASES:
            proc = subprocess.run([sys.executable, "-m", "sparsec", *args], cwd=tmp, capture_output=True, text=True)
            print(f"`sparsec {' '.join(args)}` (exit {proc.returncode}, expected {code})\n")
            print("    " + proc.stderr.strip().replace(tmp, "/tmp/x") + "\n")
