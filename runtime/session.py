"""The one way sparsec creates and runs ONNX Runtime sessions.

Everything that runs a model (verification, calibration, benchmarks, sweeps) goes through a
:class:`Runner`: it holds the execution providers of the target (those this onnxruntime build
has; the others are named in ``notes``), the thread count and the session options, and it
creates sessions, runs them (plainly or through IOBinding, which lets an input and an output
share one buffer), and runs a model in stages (:meth:`Runner.staged`). ORT's multi-line errors
become a one-line :class:`~sparsec.errors.RuntimeFailure`, and ORT's own log lines stay off the
user's terminal.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsec.errors import RuntimeFailure

CPU = "CPUExecutionProvider"
Provider = str | tuple[str, dict[str, Any]]


def _ort():
    import onnxruntime as ort

    # ORT logs kernel failures itself, in color, before raising: sparsec reports them in one
    # line, so ORT's own log stays silent (4 = fatal only).
    ort.set_default_logger_severity(4)
    return ort


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    # ORT prefixes messages with "[ONNXRuntimeError] : 1 : FAIL : "; keep the substance.
    if "] : " in text:
        text = text.split(" : ", 3)[-1]
    return text[:400]


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


def provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def create_session(
    model: str | os.PathLike | bytes,
    *,
    providers: Sequence[Provider] = (CPU,),
    threads: int | None = None,
    optimize: bool = True,
    log_severity: int = 4,
    spin: bool = True,
    profile: str | os.PathLike | None = None,
):
    """Create an ``onnxruntime.InferenceSession``.

    Args:
        model: path to an .onnx file (external data beside it) or serialized bytes.
        providers: execution providers in priority order, with options where needed.
        threads: intra-op threads; None lets ORT decide (all cores).
        optimize: apply ORT's graph optimizations (ORT_ENABLE_ALL) or none.
        log_severity: ORT log level (4 = fatal only: failures reach the user as one line).
        spin: let idle intra-op threads spin-wait for work (ORT's default). Timing several
            sessions side by side needs it off: one session's spinning threads would take the
            cores of the session being timed.
        profile: record every node's kernel time in a JSON trace whose path starts with this
            prefix (ORT's profiler; ``session.end_profiling()`` writes it and returns its path).

    Raises:
        RuntimeFailure: ORT refused the model (unsupported op, bad graph, missing provider).
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = log_severity
    if threads:
        options.intra_op_num_threads = threads
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    available = set(ort.get_available_providers())
    missing = [provider_name(p) for p in providers if provider_name(p) not in available]
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


def run_bound(session, feeds: Mapping[str, np.ndarray], *, shared: Mapping[str, str] | None = None,
              output_names: Sequence[str] | None = None, device: str = "cpu", device_id: int = 0
              ) -> dict[str, np.ndarray]:
    """Run ``session`` through IOBinding; ``shared`` maps an input to the output that writes into
    the same buffer (ORT's SparseAttention and GQA's shared past/present KV cache need that).

    Inputs are copied to ``device`` once; outputs not shared are allocated by ORT there. The
    shared outputs are returned too, asked for or not.
    """
    ort = _ort()
    shared = dict(shared or {})
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    names += [o for o in shared.values() if o not in names]  # a shared output is written whether asked or not
    try:
        binding = session.io_binding()
        values = {}
        for name, array in feeds.items():
            # A shared input is written in place: never the caller's array (on the CPU an
            # OrtValue wraps the numpy memory).
            data = np.array(array, order="C", copy=True) if name in shared else np.ascontiguousarray(array)
            values[name] = ort.OrtValue.ortvalue_from_numpy(data, device, device_id)
            binding.bind_ortvalue_input(name, values[name])
        for name in names:
            source = next((i for i, o in shared.items() if o == name), None)
            if source is not None:
                binding.bind_ortvalue_output(name, values[source])
            else:
                binding.bind_output(name, device, device_id)
        session.run_with_iobinding(binding)
        outputs = binding.copy_outputs_to_cpu()
    except Exception as exc:
        raise RuntimeFailure(f"ONNX Runtime failed to run the model: {_one_line(exc)}") from None
    return dict(zip(names, outputs))


@dataclass
class Runner:
    """How one compile (or verify, sweep, bench) runs models: providers, threads, options.

    Build it with :meth:`for_providers` (or ``Target.runner()``): providers this onnxruntime
    build lacks are dropped and named in ``notes``, the CPU provider always stays last.
    """

    providers: tuple[Provider, ...] = (CPU,)
    threads: int | None = None
    optimize: bool = True
    notes: list[str] = field(default_factory=list)

    @classmethod
    def for_providers(cls, wanted: Sequence[Provider], *, threads: int | None = None,
                      what: str = "") -> Runner:
        available = set(available_providers())
        kept = [p for p in wanted if provider_name(p) in available]
        dropped = [provider_name(p) for p in wanted if provider_name(p) not in available]
        if not any(provider_name(p) == CPU for p in kept):
            kept.append(CPU)
        notes = []
        if dropped:
            notes.append(f"{', '.join(dropped)} not available in this onnxruntime build:"
                         f" {what or 'models'} ran on {', '.join(provider_name(p) for p in kept)}")
        return cls(tuple(kept), threads, True, notes)

    @property
    def provider_names(self) -> list[str]:
        return [provider_name(p) for p in self.providers]

    @property
    def on_gpu(self) -> bool:
        return any(n in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for n in self.provider_names)

    def session(self, model: str | os.PathLike | bytes, *, threads: int | None = None, spin: bool = True,
                profile: str | os.PathLike | None = None):
        return create_session(model, providers=self.providers, threads=threads or self.threads,
                              optimize=self.optimize, spin=spin, profile=profile)

    def run(self, session, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None,
            *, shared: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        """Run a session of this runner; with ``shared`` through IOBinding (on the GPU when the
        runner has a GPU provider)."""
        if shared:
            device = "cuda" if self.on_gpu else "cpu"
            return run_bound(session, feeds, shared=shared, output_names=output_names, device=device)
        return run(session, feeds, output_names)

    def checker(self, model: str | os.PathLike, *, stage_bytes: int | None = None):
        """A function that runs ``model`` on input sets and returns its outputs (raising
        RuntimeFailure when ORT refuses one): what :func:`sparsec.feeds.make_feeds` uses to keep
        only inputs the original model runs on. The session is created on first use. With
        ``stage_bytes`` the model runs in stages of at most that many bytes of weights (a model
        too large to hold in memory twice: a whole-model session would copy every weight)."""
        session = None

        def check(feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
            nonlocal session
            if stage_bytes is not None:
                from sparsec.model_io import load_model

                from .staged import staged_outputs

                return staged_outputs(load_model(model).model, feeds, budget_bytes=stage_bytes, runner=self)
            session = session or self.session(model)
            return [self.run(session, feed) for feed in feeds]

        return check

    def staged(self, model, feeds, *, overrides=None, progress=None):
        """A :class:`~sparsec.runtime.staged.StagedRunner` of ``model`` on these providers."""
        from .staged import StagedRunner

        return StagedRunner(model, feeds, runner=self, overrides=overrides, progress=progress)


def cpu_runner(threads: int | None = None) -> Runner:
    """The runner of everything that has no target: the CPU provider."""
    return Runner((CPU,), threads)
