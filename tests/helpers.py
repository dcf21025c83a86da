"""Micro-graph builders and small utilities for the tests."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


def make_model(nodes, inputs, outputs, initializers=(), *, opset: int = 17, ir_version: int = 10,
               name: str = "g", extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes), name,
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(a), name=k) for k, a in dict(initializers).items()],
    )
    opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in extra_opsets]]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir_version
    return model


def weights(*shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def save(model: onnx.ModelProto, path: Path, *, external: bool = False) -> Path:
    path = Path(path).resolve()
    # onnx checks whether the external data file exists relative to the working directory.
    with contextlib.chdir(path.parent):
        onnx.save(model, str(path), save_as_external_data=external,
                  location=path.name + ".data" if external else None, size_threshold=0)
    return path


def linear(op: str = "MatMul", k: int = 64, n: int = 32, *, seed: int = 0, **attrs) -> onnx.ModelProto:
    """X (B, K) -> op with a constant weight -> Relu -> Y; the weight layout follows op/attrs."""
    w = weights(k, n, seed=seed)
    if op == "Gemm" and attrs.get("transB"):
        w = w.T.copy()
    nodes = [helper.make_node(op, ["X", "W"], ["H"], name="lin", **attrs),
             helper.make_node("Relu", ["H"], ["Y"], name="act")]
    return make_model(nodes, [("X", FLOAT, ["B", k])], [("Y", FLOAT, ["B", n])], {"W": w})


def file_hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def perplexity(path, windows) -> float:
    """Next-token perplexity of a logits model on token windows, computed here independently
    of sparsec.metrics (float64 log-softmax over the model's logits, run in ORT)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    nll, count = 0.0, 0
    for feed in windows:
        ids = feed["input_ids"]
        logits = sess.run(["logits"], feed)[0].astype(np.float64)[:, :-1]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        picked = np.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0]
        nll += float((logz - picked).sum())
        count += ids[:, 1:].size
    return float(np.exp(nll / count))


def run_ort(path, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
