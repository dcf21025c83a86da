"""The compile driver: load -> analyze -> plan -> passes -> stage -> verify -> commit -> report.

Data flows one way; each stage returns a plain object the next takes. The output is written
into a temporary directory beside the destination, verified there against the original with
ONNX Runtime, and only then renamed into place: a model that fails verification (or falls
below ``min_cosine``) is never written, and the input is never modified.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from sparsec import __version__
from sparsec.analyze import Analysis, analyze, summarize_sparsity
from sparsec.calib import DEFAULT_SAMPLES, DEFAULT_SEQLEN, Calibration, load_calibration
from sparsec.errors import OptionError, OutputError, PassError, VerificationError
from sparsec.model_io import LoadedModel, check_output_path, fingerprint, load_model, stage_model
from sparsec.pipeline import Pass, PassContext, PassRecord, run_passes
from sparsec.plan import Plan, make_plan
from sparsec.progress import Progress, silent
from sparsec.targets import get_target
from sparsec.verify import Verdict, input_specs, load_feeds, random_feeds, verify_models


@dataclass
class CompileResult:
    """Everything a compile produced; ``report()`` is what goes into the JSON report."""

    input_path: Path
    output: Path | None
    report_paths: list[Path]
    target: str
    plan: Plan
    records: list[PassRecord]
    before: Analysis
    after: Analysis
    output_fingerprint: str
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    speed: dict[str, Any] | None = None
    passed: bool = True
    failure: str = ""
    model: ir.Model | None = field(default=None, repr=False)

    def report(self) -> dict[str, Any]:
        return {
            "sparsec": __version__,
            "input": {"path": str(self.input_path), "fingerprint": self.before.fingerprint},
            "output": {"path": str(self.output) if self.output else None,
                       "fingerprint": self.output_fingerprint},
            "target": self.target,
            "passed": self.passed,
            "failure": self.failure,
            "plan": self.plan.to_dict(),
            "records": [r.to_dict() for r in self.records],
            "calibration": self.calibration,
            "verification": {k: v.to_dict() for k, v in self.verdicts.items()},
            "sparsity_before": summarize_sparsity(self.before.weights),
            "sparsity_after": summarize_sparsity(self.after.weights),
            "weights_after": [_weight_entry(w) for w in self.after.linear_weights],
            "sizes": self.sizes,
            "speed": self.speed,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "notes": self.notes,
        }


    @property
    def report_path(self) -> Path | None:
        """The first report written (the JSON one by default)."""
        return self.report_paths[0] if self.report_paths else None


def _weight_entry(w) -> dict[str, Any]:
    return {"name": w.name, "label": w.label, "op": w.op, "shape": w.shape, "zeros": w.zeros, "nm": w.nm}


def default_output(input_path: Path) -> Path:
    """``model.onnx`` -> ``model.sparse.onnx`` beside it."""
    return input_path.with_name(input_path.stem + ".sparse.onnx")


def default_report(output: Path) -> Path:
    """``out.onnx`` -> ``out.report.json``."""
    return output.with_name(output.stem + ".report.json")


REPORT_FORMATS = (".json", ".md", ".html")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write a report; its format follows the extension (.json, .md, .html)."""
    if path.suffix == ".md":
        from sparsec.report_html import render_markdown

        text = render_markdown(report)
    elif path.suffix == ".html":
        from sparsec.report_html import render_html

        pareto = None
        if report.get("speed"):
            s, fid = report["speed"], report["speed"]["fidelity"]
            pareto = [{"label": "original", "speedup": 1.0, "fidelity": 1.0},
                      {"label": "compiled", "speedup": s["speedup"], "fidelity": fid}]
        text = render_html(report, pareto=pareto)
    else:
        text = json.dumps(report, indent=2, default=str) + "\n"
    write_text_atomic(path, text)


def _checker(path: Path) -> str:
    """'' when onnx.checker (full_check) accepts the model, else its first line."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # the checker raises several types
        return " ".join(str(exc).split())[:300]
    return ""


# Models with more weight bytes than this are compiled streamed: rewritten weights spill to
# disk, verification runs in stages (never two whole models in memory), no onnx.checker.
STREAM_BYTES = 1 << 30


def compile(
    model: str | os.PathLike | LoadedModel,
    *,
    target: str = "cpu",
    passes: str | list[Pass] | None = None,
    output: str | os.PathLike | None = None,
    report: str | os.PathLike | list[str | os.PathLike] | None = None,
    inputs: str | os.PathLike | None = None,
    dims: dict[str, int] | None = None,
    seed: int = 0,
    samples: int = 2,
    min_cosine: float | None = None,
    calib: str | None = None,
    calib_samples: int | None = None,
    calib_seqlen: int | None = None,
    tokenizer: str | None = None,
    verify_each: bool = False,
    benchmark: bool = False,
    progress: Progress | None = None,
    threads: int | None = None,
) -> CompileResult:
    """Compile an ONNX model for ``target``; write the result and a JSON report.

    Args:
        model: path of the input model (never modified) or an already loaded model.
        target: a name from ``sparsec targets``.
        passes: a pass spec (``"nm:n=2,m=4"``) or pass objects; None takes the target's plan.
        output: the compiled model's path; default ``<input>.sparse.onnx``.
        report: report path(s); the format follows the extension (.json, .md, .html; HTML
            needs matplotlib for its plots). Default ``<output>.report.json``.
        inputs: a .npz of input sets to verify on; default ``samples`` seeded random sets.
        dims: values for symbolic input dimensions (``{"sequence": 128}``).
        seed: seed of the random inputs (and of any randomized pass).
        samples: number of random input sets.
        min_cosine: fidelity budget: fail (and write nothing) when an output's cosine against
            the original falls below it (on real inputs for zoo models, else random inputs).
        calib: calibration data for calibration-aware methods (wanda, sparsegpt): a .npz of
            input sets, a text file (with ``tokenizer``), or ``builtin`` (example models; the
            default for them when a pass needs calibration).
        calib_samples: calibration windows (text) or sentences (encoders); default 32.
        calib_seqlen: tokens per calibration window; default 512.
        tokenizer: tokenizer folder or tokenizer.json for a text ``calib`` file.
        verify_each: also measure each pass's effect against the original, in its record.
        benchmark: also time the original and the compiled model side by side on the CPU
            (median of repeats; the ratio goes into the report as ``speed``).
        progress: where progress goes; silent by default.
        threads: ONNX Runtime intra-op threads for verification.

    Raises:
        InputError, OptionError, OutputError: bad input (exit code 2).
        VerificationError: the result failed verification (exit code 1); nothing was written.
    """
    progress = progress or silent()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = seconds.get(stage, 0.0) + now - clock
        clock = now

    tgt = get_target(target)
    plan = make_plan(tgt, passes)  # option errors surface before any heavy work
    with progress.task("loading model"):
        loaded = model if isinstance(model, LoadedModel) else load_model(model)
    out_path = Path(output) if output is not None else default_output(loaded.path)
    if report is None:
        report_paths = [default_report(out_path)]
    else:
        report_paths = [Path(r) for r in (report if isinstance(report, list) else [report])]
    check_output_path(out_path, protect=(loaded.path, *loaded.external_files), model=loaded.model)
    for path in report_paths:
        if path.suffix not in REPORT_FORMATS:
            raise OptionError(f"--report {path}: unknown format '{path.suffix}' (use {', '.join(REPORT_FORMATS)})")
        if not path.resolve().parent.is_dir():
            raise OutputError(f"{path}: directory {path.parent} does not exist")
    lap("load")
    with progress.task("analyzing"):
        before = analyze(loaded.model, fingerprint(loaded.model))
    specs = input_specs(loaded.model)
    feeds = load_feeds(inputs, specs) if inputs else random_feeds(specs, seed=seed, dims=dims, samples=samples)
    feeds_note = f"inputs from {inputs}" if inputs else f"random inputs (seed {seed})"
    lap("analyze")

    streamed = before.weight_bytes > STREAM_BYTES
    stack = contextlib.ExitStack()
    if streamed:
        from sparsec.graph import spilling
        from sparsec.model_io import TMP_SUFFIX

        spill_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.{os.getpid()}.", suffix=TMP_SUFFIX,
                                          dir=out_path.parent if str(out_path.parent) else "."))
        stack.callback(shutil.rmtree, spill_dir, ignore_errors=True)
        stack.enter_context(spilling(spill_dir))
    with stack:
        ctx = PassContext(target=tgt, seed=seed, progress=progress)
        if calib is not None or any(p.needs_calibration() for p in plan.passes):
            with progress.task("preparing calibration data"):
                ctx.calibration = _calibration(loaded, calib, calib_samples, calib_seqlen, tokenizer)
        lap("calibrate")
        after_each = _pass_verifier(loaded, feeds, feeds_note, threads, progress) if verify_each else None
        records = run_passes(loaded.model, plan.passes, ctx, after_each=after_each)
        lap("passes")

        result = CompileResult(
            input_path=loaded.path, output=None, report_paths=report_paths, target=tgt.name, plan=plan,
            records=records, before=before, after=before, output_fingerprint="",
            notes=list(loaded.notes), model=loaded.model,
            calibration=ctx.calibration.to_dict() if ctx.calibration is not None else None,
        )
        with progress.task("analyzing the result"):
            result.output_fingerprint = fingerprint(loaded.model)
            result.after = analyze(loaded.model, result.output_fingerprint)
        with progress.task(f"writing {out_path.name}"):
            # The output keeps the input's layout: external data when the input had some.
            staged = stage_model(loaded.model, out_path, protect=(loaded.path, *loaded.external_files),
                                 external_data=True if loaded.external_files else None)
        lap("save")
        with staged:
            problem = "" if streamed else _checker(staged.path)
            if problem:
                if _checker(loaded.path):
                    result.notes.append(f"onnx.checker rejects the input model too: {problem}")
                else:
                    raise PassError(f"the compiled model fails onnx.checker: {problem}")
            if streamed:
                result.notes.append(f"{before.weight_bytes / 2**30:.1f} GiB of weights: compiled streamed"
                                    " (weights spilled to disk, verification in stages, onnx.checker skipped)")
                from sparsec.verify import verify_staged

                with progress.task("verifying in stages"):
                    result.verdicts = {"random": verify_staged(load_model(loaded.path).model, load_model(staged.path).model,
                                                               feeds, inputs=feeds_note, exact=plan.exact, progress=progress)}
            else:
                result.verdicts = _verify(loaded, staged.path, plan, feeds, feeds_note, threads, progress)
            lap("verify")
            result.passed, result.failure = _judge(result.verdicts, plan, min_cosine)
            if benchmark:
                result.speed = _benchmark(loaded, staged.path, result.verdicts, feeds, progress)
                lap("benchmark")
            result.sizes = {"input_bytes": loaded.total_bytes,
                            "output_bytes": sum(f.stat().st_size for f in (staged.path, staged.data_file) if f)}
            if result.passed:
                result.output = staged.commit()
                if streamed:  # the in-memory model reads spilled weights that are about to go
                    result.model = load_model(result.output).model
        lap("commit")
        result.seconds = seconds
        data = result.report()
        for path in report_paths:
            write_report(path, data)
        if not result.passed:
            raise VerificationError(result.failure)
        return result


def _benchmark(loaded: LoadedModel, candidate: Path, verdicts: dict[str, Verdict], feeds,
               progress: Progress) -> dict[str, Any]:
    """Original against compiled on the CPU, interleaved, on real inputs when there are some."""
    from sparsec.models import entry_for
    from sparsec.runtime.bench import time_models

    entry = entry_for(loaded.model.metadata_props)
    if entry is not None and entry.real_inputs is not None:
        feed, note = entry.real_inputs(1)[0], entry.inputs_note
    else:
        feed, note = feeds[0], "random inputs"
    threads = os.cpu_count() or 1
    with progress.task("timing original and compiled side by side"):
        t = time_models({"original": loaded.path, "compiled": candidate}, feed, threads=threads)
    verdict = verdicts.get("real") or verdicts["random"]
    return {"original_ms": t["original"].median_ms, "compiled_ms": t["compiled"].median_ms,
            "speedup": t["original"].median_ms / t["compiled"].median_ms, "threads": threads,
            "inputs": note, "fidelity": verdict.min_cosine,
            "session_ms": {"original": t["original"].load_ms, "compiled": t["compiled"].load_ms}}


def _calibration(loaded: LoadedModel, spec: str | None, samples: int | None, seqlen: int | None,
                 tokenizer: str | None) -> Calibration:
    from sparsec.models import entry_for

    if spec is None:
        if entry_for(loaded.model.metadata_props) is None:
            raise OptionError("a calibration-aware method needs --calib (a .npz of input sets, or a"
                              " text file with --tokenizer)")
        spec = "builtin"
    return load_calibration(spec, loaded.model, samples=samples or DEFAULT_SAMPLES,
                            seqlen=seqlen or DEFAULT_SEQLEN, tokenizer=tokenizer)


def _verify(loaded: LoadedModel, candidate: Path, plan: Plan, feeds, feeds_note: str,
            threads: int | None, progress: Progress) -> dict[str, Verdict]:
    verdicts = {"random": verify_models(loaded.path, candidate, feeds, inputs=feeds_note,
                                        exact=plan.exact, threads=threads, progress=progress)}
    from sparsec.models import entry_for

    entry = entry_for(loaded.model.metadata_props)
    if entry is not None and entry.real_inputs is not None:
        with progress.task(f"preparing real inputs for '{entry.name}'"):
            real = entry.real_inputs(entry.real_sets)
        verdicts["real"] = verify_models(
            loaded.path, candidate, real, inputs=entry.inputs_note, exact=plan.exact,
            metrics=entry.metrics() if entry.metrics else (), threads=threads, progress=progress)
    return verdicts


def _judge(verdicts: dict[str, Verdict], plan: Plan, min_cosine: float | None) -> tuple[bool, str]:
    """Exact plans must match to tolerance; lossy ones must meet the cosine budget, if any."""
    if plan.exact:
        for name, verdict in verdicts.items():
            if not verdict.passed:
                bad = next(o for o in verdict.outputs if not o.passed) if verdict.outputs else None
                return False, (f"exact rewrite changed the outputs on {name} inputs: "
                               + (bad.line() if bad else "no outputs compared"))
        return True, ""
    if min_cosine is not None:
        verdict = verdicts.get("real") or verdicts["random"]
        low = [o for o in verdict.outputs if o.cosine < min_cosine]
        if low or not verdict.outputs:
            return False, (f"fidelity below the budget: output '{low[0].name}' cosine"
                           f" {low[0].cosine:.6f} < min_cosine {min_cosine}" if low
                           else "no outputs compared")
    return True, ""


def _pass_verifier(loaded: LoadedModel, feeds, feeds_note: str, threads: int | None, progress: Progress):
    """An after-each-pass hook measuring the model so far against the original."""

    def after(p: Pass, record: PassRecord, model: ir.Model) -> None:
        with tempfile.TemporaryDirectory(prefix="sparsec-verify-") as tmp:
            with stage_model(model, Path(tmp) / "model.onnx", external_data=True) as staged:
                verdict = verify_models(loaded.path, staged.path, feeds, inputs=feeds_note,
                                        exact=p.kind.value == "exact", threads=threads,
                                        progress=progress)
        record.fidelity = verdict.to_dict()
        if p.kind.value == "exact" and not verdict.passed:
            raise VerificationError(f"pass '{p.id}' is exact but changed the outputs: {verdict.lines()[0]}")

    return after


def summary_rows(result: CompileResult) -> list[dict[str, Any]]:
    """One row per pass for the summary table."""
    rows = []
    for record in result.records:
        sparsity = record.sparsity()
        rows.append({
            "pass": record.pass_id, "kind": record.kind, "matched": len(record.sites),
            "changed": len(record.changed),
            "skipped": ", ".join(f"{k} {v}" for k, v in record.skip_counts().items()) or "-",
            "params": record.params_touched,
            "sparsity": f"{sparsity:.1%}" if sparsity is not None else "-",
            "seconds": f"{record.seconds:.2f}",
        })
    return rows



def compile_any(model: Any, **options: Any) -> CompileResult:
    """:func:`compile` for a path, a loaded model, an ``onnx.ModelProto`` or an ``onnx_ir.Model``."""
    if isinstance(model, (str, os.PathLike, LoadedModel)):
        return compile(model, **options)
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    if not isinstance(model, ir.Model):
        raise OptionError(f"compile takes a path, an onnx.ModelProto or an onnx_ir.Model, not {type(model).__name__}")
    if options.get("output") is None:
        raise OptionError("give output=... when compiling an in-memory model")
    with tempfile.TemporaryDirectory(prefix="sparsec-input-") as tmp:
        from sparsec.model_io import save_model

        path = save_model(model, Path(tmp) / "input.onnx", external_data=True)
        return compile(path, **options)
