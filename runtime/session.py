"""The one way sparsec creates and runs ONNX Runtime sessions.

Everything that runs a model (verification, calibration, benchmarks) goes through
:func:`create_session` and :func:`run`, so providers, threads and error messages are handled
in one place. ORT's multi-line errors become a one-line :class:`RuntimeFailure`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sparsec.errors import RuntimeFailure

CPU = "CPUExecutionProvider"


def _ort():
    import onnxruntime as ort

    return ort


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    # ORT prefixes messages with "[ONNXRuntimeError] : 1 : FAIL : "; keep the substance.
    if "] : " in text:
        text = text.split(" : ", 3)[-1]
    return text[:400]


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


def create_session(
    model: str | os.PathLike | bytes,
    *,
    providers: Sequence[str | tuple[str, dict]] = (CPU,),
    threads: int | None = None,
    optimize: bool = True,
    log_severity: int = 3,
):
    """Create an ``onnxruntime.InferenceSession``.

    Args:
        model: path to an .onnx file (external data beside it) or serialized bytes.
        providers: execution providers in priority order, with options where needed.
        threads: intra-op threads; None lets ORT decide (all cores).
        optimize: apply ORT's graph optimizations (ORT_ENABLE_ALL) or none.
        log_severity: ORT log level (3 = errors only).

    Raises:
        RuntimeFailure: ORT refused the model (unsupported op, bad graph, missing provider).
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = log_severity
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    available = set(ort.get_available_providers())
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    missing = [n for n in names if n not in available]
    if missing:
        raise RuntimeFailure(
            f"execution provider {missing[0]} is not available in this onnxruntime build"
            f" (available: {', '.join(sorted(available))})"
        )
    source = str(model) if isinstance(model, (str, os.PathLike)) else model
    try:
        return ort.InferenceSession(source, sess_options=options, providers=list(providers))
    except Exception as exc:
        where = Path(model).name if isinstance(model, (str, os.PathLike)) else "model"
        raise RuntimeFailure(f"ONNX Runtime cannot load {where}: {_one_line(exc)}") from None


def run(session, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Run ``session`` on ``feeds``; return outputs by name."""
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, dict(feeds))
    except Exception as exc:
        raise RuntimeFailure(f"ONNX Runtime failed to run the model: {_one_line(exc)}") from None
    return dict(zip(names, values))
