"""The compile driver: load -> analyze -> plan -> calibrate -> passes -> save -> verify -> write.

Data flows one way; each stage is a function whose input and output are plain objects that
serialize into the report (LoadedModel, Analysis, Plan, Calibration, PassRecords, Verdicts,
Judgement). Every destination is checked before the work starts; the output is written into a
temporary directory beside its destination, verified there against the original with ONNX
Runtime, judged (:func:`sparsec.verify.judge`) and only then renamed into place together with
the reports: a model that fails verification or falls below its fidelity budget is never
written (unless ``best_effort``), and the input is never modified.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from sparsec import __version__
from sparsec.analyze import Analysis, analyze, summarize_sparsity
from sparsec.data import Calibration, EvaluationData, calibration_source, evaluation_data, has_builtin_data, timing_feed
from sparsec.engine import default_jobs
from sparsec.errors import OptionError, PassError, VerificationError
from sparsec.feeds import Feeds, InputSpec, input_specs, make_feeds
from sparsec.model_io import LoadedModel, check_output_path, fingerprint, load_model, stage_model
from sparsec.outputs import Outputs
from sparsec.pipeline import Pass, PassContext, PassRecord, run_passes
from sparsec.plan import Plan, make_plan
from sparsec.progress import Progress, silent
from sparsec.recipe import Recipe, recipe_text, replayable, validate
from sparsec.runtime.session import Runner
from sparsec.runtime.staged import STAGE_BYTES
from sparsec.targets import Target, get_target
from sparsec.verify import (Judgement, Verdict, judge, shared_reference_outputs, unchanged_judgement, verify_against,
                            verify_models, verify_staged)

# Models with more weight bytes than this are compiled streamed: rewritten weights spill to
# disk, verification runs in stages (never two whole models in memory), no onnx.checker.
STREAM_BYTES = 1 << 30


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
    judgement: Judgement | None = None
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    speed: dict[str, Any] | None = None
    recipe: Recipe | None = None
    model: ir.Model | None = field(default=None, repr=False)
    auto: Any = None  # the planner's AutoPlan when it chose the passes

    @property
    def passed(self) -> bool:
        return self.judgement is not None and self.judgement.passed

    @property
    def failure(self) -> str:
        return self.judgement.failure if self.judgement is not None else ""

    def report(self) -> dict[str, Any]:
        return {
            "sparsec": __version__,
            "input": {"path": str(self.input_path), "fingerprint": self.before.fingerprint},
            "output": {"path": str(self.output) if self.output else None,
                       "fingerprint": self.output_fingerprint},
            "target": self.target,
            "passed": self.passed,
            "failure": self.failure,
            "judgement": self.judgement.to_dict() if self.judgement else None,
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
            "planner": self.auto.to_dict() if self.auto is not None else None,
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


def render_report(path: Path, report: dict[str, Any]) -> str:
    """A report as text; its format follows the extension (.json, .md, .html)."""
    import json

    if path.suffix == ".md":
        from sparsec.report_html import render_markdown

        return render_markdown(report)
    if path.suffix == ".html":
        from sparsec.report_html import render_html

        pareto = None
        if report.get("speed"):
            s = report["speed"]
            pareto = [{"label": "original", "speedup": 1.0, "fidelity": 1.0},
                      {"label": "compiled", "speedup": s["speedup"], "fidelity": s["fidelity_cosine"]}]
        return render_html(report, pareto=pareto)
    return json.dumps(report, indent=2, default=str) + "\n"


class _Clock:
    """Seconds per stage, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now


def compile(
    model: str | os.PathLike | LoadedModel,
    recipe: Recipe | None = None,
    *,
    output: str | os.PathLike | None = None,
    report: str | os.PathLike | list[str | os.PathLike] | None = None,
    save_recipe: str | os.PathLike | None = None,
    benchmark: bool = False,
    verify_each: bool = False,
    explain: bool = False,
    on_auto: Callable[[Any], None] | None = None,
    best_effort: bool = False,
    progress: Progress | None = None,
    threads: int | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    engine: Any = None,
    jobs: int | None = None,
    shared_references: str | os.PathLike | None = None,
    **options: Any,
) -> CompileResult:
    """Compile an ONNX model; write the result and its reports.

    Args:
        model: path of the input model (never modified) or an already loaded model.
        recipe: what to compile (target, passes, budget, calibration, verification). Instead
            of a recipe, give its fields as keyword ``options``: target, passes (a pass spec or
            pass objects; None takes the target's plan), min_cosine, min_embedding_cosine,
            max_ppl_ratio, max_rel_err, calib (a .npz, a text file with tokenizer, 'builtin', a callable or a
            DataSource), calib_samples, calib_seqlen, tokenizer, calib_unit (how a text file is cut:
            'windows' or 'lines'), seed, samples, dims, inputs.
        output: the compiled model's path; default ``<input>.sparse.onnx``.
        report: report path(s); the format follows the extension (.json, .md, .html).
            Default ``<output>.report.json``.
        save_recipe: also write the recipe of this compile (YAML or JSON by extension).
        benchmark: also time the original and the compiled model side by side.
        verify_each: also measure each pass's effect against the original, in its record.
        best_effort: write the result even when it falls below its fidelity budget.
        progress: where progress goes; silent by default.
        threads: ONNX Runtime intra-op threads.
        on_plan: called with the plan as soon as it is made (the CLI prints it first).
        explain: let the planner choose the passes (it also does when a budget is given without
            passes on a target with no default plan).
        on_auto: called with the planner's AutoPlan (every option considered) when it ran.
        engine: where independent units run (the planner's options, the solves of a stage's
            sites): a :class:`sparsec.engine.Engine`; default in this process. The result does
            not depend on it.
        jobs: in this process, solves of one stage run at once in this many threads (default:
            one per core, at most 8); the result does not depend on it.
        shared_references: a folder where the original's outputs on the verification inputs
            are kept: compiles of the same model on the same inputs that share it run the
            original once (a sweep's candidates do). Not used by models verified in stages.

    Raises:
        InputError, OptionError, OutputError: bad input (exit code 2), before any work.
        VerificationError: the result failed verification or its budget (exit code 1);
            nothing was written but the reports.
    """
    progress = progress or silent()
    clock = _Clock()
    if recipe is not None and options:
        raise OptionError(f"give either a recipe or compile options, not both ('{next(iter(options))}')")
    recipe = recipe if recipe is not None else Recipe.from_options(**options)
    validate(recipe, "compile")
    target = get_target(recipe.target)
    loaded = load_stage(model, progress, recipe.constant_initializers)
    outputs = output_stage(loaded, output, report, save_recipe)
    clock.lap("load")
    analysis = analyze_stage(loaded, progress)
    # the planner chooses: asked for (--explain, --objective), or a budget on a target without a default plan
    planning = recipe.passes is None and (explain or recipe.objective != "latency"
                                          or (not recipe.fidelity_budget().empty and not target.default_passes))
    evaluation = evaluation_data(loaded.model, notes=loaded.notes) or held_out_stage(loaded, recipe, planning)
    clock.lap("analyze")
    runner = target.runner(threads)
    auto = calibration = None
    if planning:
        recipe, auto, calibration = auto_stage(loaded, recipe, target, analysis, evaluation, runner, progress,
                                               best_effort, engine)
        if on_auto is not None:
            on_auto(auto)
    plan = plan_stage(target, recipe, loaded.model, evaluation, chosen_by="the planner" if auto else "")
    if on_plan is not None:
        on_plan(plan)
    calibration = calibration or calibrate_stage(plan, recipe, loaded.model, progress)
    streamed = analysis.weight_bytes > STREAM_BYTES
    feeds = feeds_stage(loaded, recipe, runner, streamed) if verify_each else None
    specs = input_specs(loaded.model)  # the original's inputs (a pass may change them: a shared KV cache)
    clock.lap("calibrate")
    with _spill(streamed, outputs.model):
        ctx = PassContext(target=target, calibration=calibration, seed=recipe.seed, progress=progress, runner=runner,
                          engine=engine, jobs=jobs or default_jobs())
        after_each = _pass_verifier(loaded, feeds, runner, progress) if verify_each else None
        records = run_passes(loaded.model, plan.passes, ctx, after_each=after_each)
        clock.lap("passes")
        result = CompileResult(
            input_path=loaded.path, output=None, report_paths=outputs.reports, target=target.name, plan=plan,
            records=records, before=analysis, after=analysis, output_fingerprint="",
            notes=list(loaded.notes) + list(runner.notes), model=loaded.model, auto=auto,
            calibration=calibration.to_dict() if calibration is not None else None,
            recipe=replayable(recipe, plan.passes))
        with progress.task("analyzing the result"):
            result.output_fingerprint = fingerprint(loaded.model)
            result.after = analyze(loaded.model, result.output_fingerprint)
        with progress.task(f"writing {outputs.model.name}"):
            # The output keeps the input's layout: external data when the input had some.
            staged = stage_model(loaded.model, outputs.model, protect=(loaded.path, *loaded.external_files),
                                 external_data=True if loaded.external_files else None)
        clock.lap("save")
        with staged:
            _check_model(staged.path, loaded, streamed, result.notes)
            if not any(r.changed for r in records):
                result.judgement = unchanged_judgement()
            else:
                feeds = feeds or feeds_stage(loaded, recipe, runner, streamed, specs)
                result.verdicts = verify_stage(loaded, staged, plan, feeds, evaluation, runner, streamed, progress,
                                               shared_references, analysis.fingerprint)
                result.judgement = judge(result.verdicts, plan.budget, exact=plan.exact)
            clock.lap("verify")
            if benchmark:
                primary = result.verdicts.get("real") or result.verdicts.get("random")
                result.speed = bench_stage(loaded, staged.path, result.judgement,
                                           primary.min_cosine if primary is not None else 1.0, runner, threads,
                                           progress)
                clock.lap("benchmark")
            result.sizes = {"input_bytes": loaded.total_bytes,
                            "output_bytes": sum(f.stat().st_size for f in (staged.path, staged.data_file) if f)}
            write = result.passed or best_effort
            if write:
                result.output = outputs.model
                if not result.passed:
                    result.notes.append("written below its fidelity budget because --best-effort was given")
            result.seconds = clock.seconds
            outputs.commit(_texts(result, outputs, write), staged if write else None)
        if write and streamed:  # the in-memory model reads spilled weights that are about to go
            result.model = load_model(result.output).model
    if not result.passed and not best_effort:
        raise VerificationError(result.failure, result)
    return result


# --- the stages ------------------------------------------------------------------------------

def load_stage(model: str | os.PathLike | LoadedModel, progress: Progress,
               constant_initializers: bool = False) -> LoadedModel:
    with progress.task("loading model"):
        if isinstance(model, LoadedModel):
            return model
        return load_model(model, constant_initializers=constant_initializers)


def output_stage(loaded: LoadedModel, output, report, save_recipe) -> Outputs:
    """Every destination of the compile, checked before any work."""
    out_path = Path(output) if output is not None else default_output(loaded.path)
    check_output_path(out_path, protect=(loaded.path, *loaded.external_files), model=loaded.model)
    if report is None:
        reports = [default_report(out_path)]
    else:
        reports = [Path(r) for r in (report if isinstance(report, list) else [report])]
    outputs = Outputs(out_path, reports, Path(save_recipe) if save_recipe is not None else None)
    outputs.check()
    return outputs


def analyze_stage(loaded: LoadedModel, progress: Progress) -> Analysis:
    with progress.task("analyzing"):
        return analyze(loaded.model, fingerprint(loaded.model))


def plan_stage(target: Target, recipe: Recipe, model: ir.Model, evaluation: EvaluationData | None,
               chosen_by: str = "") -> Plan:
    """The plan for ``target``: the recipe's passes or the target's, and the fidelity budget."""
    source = recipe.calibration.get("source")
    available = ""
    if source is not None:
        available = str(source) if isinstance(source, (str, os.PathLike)) else "user data"
    elif has_builtin_data(model):  # evaluation_data has already noted a missing tokenizer
        available = "builtin"
    plan = make_plan(target, recipe.pass_objects(), task=evaluation.task if evaluation else "",
                     budget=recipe.fidelity_budget(), calibration=available, chosen_by=chosen_by)
    _check_packages(plan.passes)  # after the calibration-aware defaults are chosen
    return plan


def _check_packages(passes) -> None:
    """Before any work: SparseGPT's solve runs in torch (the ``calib`` extra)."""
    import importlib.util

    from sparsec.errors import missing_package

    for p in passes:
        if getattr(p.options, "method", "") == "sparsegpt" and importlib.util.find_spec("torch") is None:
            raise missing_package("torch", f"pass '{p.id}' with method=sparsegpt")


def auto_stage(loaded: LoadedModel, recipe: Recipe, target: Target, analysis: Analysis,
               evaluation: EvaluationData | None, runner: Runner, progress: Progress, best_effort: bool,
               engine: Any = None):
    """The planner chooses the passes: (the recipe with them, the AutoPlan, the calibration sets
    the passes fit on). Nothing within the budget: VerificationError, or with ``best_effort`` no
    passes (the model is written unchanged)."""
    import dataclasses

    from sparsec import planner
    from sparsec.data import DEFAULT_SAMPLES, DEFAULT_SEQLEN
    from sparsec.plan import DEFAULT_BUDGETS

    source = calibration_source(recipe.calibration.get("source"), loaded.model,
                                tokenizer=recipe.calibration.get("tokenizer"), unit=recipe.calibration.get("unit"),
                                needed_by="the planner (it measures each option's fidelity)")
    with progress.task("preparing calibration data"):
        # twice the window default (also for sentences: every option is fitted and scored on them);
        # a quarter is kept out of the fitting to score the options on
        calibration = source.calibration(loaded.model, recipe.calibration.get("samples") or 2 * DEFAULT_SAMPLES,
                                         recipe.calibration.get("seqlen") or DEFAULT_SEQLEN)
    calibration, scoring = planner.split(calibration)
    budget = recipe.fidelity_budget()
    if budget.empty:
        budget = DEFAULT_BUDGETS[evaluation.task if evaluation else ""]
    workload = evaluation.feeds[0] if evaluation is not None else feeds_stage(loaded, recipe, runner, False).sets[0]
    metrics = evaluation.metrics if evaluation is not None else (lambda: [])
    auto = planner.plan(loaded.runnable, target, budget, calibration=calibration, scoring=scoring, workload=workload,
                        metrics=metrics, seed=recipe.seed, runner=runner, progress=progress,
                        fingerprint=analysis.fingerprint, objective=recipe.objective, engine=engine)
    planner.settle(auto, loaded.runnable, target, budget, calibration=calibration, scoring=scoring, workload=workload,
                   metrics=metrics, seed=recipe.seed, runner=runner, progress=progress)
    if not auto.specs and not best_effort:
        gain = "gains speed" if recipe.objective == "latency" else f"shrinks the {recipe.objective}"
        raise VerificationError(f"the planner found no rewrite that {gain} on '{target.name}' within"
                                f" {budget.describe()} (--explain says why for each site; --best-effort writes"
                                " the model unchanged)")
    return dataclasses.replace(recipe, passes=";".join(auto.specs) if auto.specs else []), auto, calibration


def held_out_stage(loaded: LoadedModel, recipe: Recipe, planning: bool) -> EvaluationData | None:
    """For a model with no evaluation data of its own: real inputs from the end of a text --calib
    file, which calibration (from its start) never reads; a note says what was used or why not."""
    from sparsec.data import DEFAULT_SAMPLES, DEFAULT_SEQLEN, TextSource, default_samples

    spec = recipe.calibration.get("source")
    if not isinstance(spec, (str, os.PathLike)):
        return None
    source = calibration_source(spec, loaded.model, tokenizer=recipe.calibration.get("tokenizer"),
                                unit=recipe.calibration.get("unit"))
    if not isinstance(source, TextSource):
        return None
    samples = recipe.calibration.get("samples")
    reserved = samples or (2 * DEFAULT_SAMPLES if planning else default_samples(source, loaded.model))
    evaluation, note = source.held_out(loaded.model, reserved, recipe.calibration.get("seqlen") or DEFAULT_SEQLEN)
    loaded.notes.append(f"fidelity on real text: {note}" if evaluation is not None else
                        f"no real-text fidelity from --calib {spec}: {note}; fidelity is measured on random inputs")
    return evaluation


def calibrate_stage(plan: Plan, recipe: Recipe, model: ir.Model, progress: Progress) -> Calibration | None:
    """Calibration input sets, when a pass needs them or the user gave some."""
    spec = recipe.calibration.get("source")
    if spec is None and not plan.needs_calibration:
        return None
    needed_by = next((f"pass '{s.pass_id}' ({s.spec})" for s in plan.steps if s.calibrated), "a pass")
    source = calibration_source(spec, model, tokenizer=recipe.calibration.get("tokenizer"),
                                unit=recipe.calibration.get("unit"), needed_by=needed_by)
    with progress.task("preparing calibration data"):
        from sparsec.data import DEFAULT_SEQLEN, default_samples

        return source.calibration(model, recipe.calibration.get("samples") or default_samples(source, model),
                                  recipe.calibration.get("seqlen") or DEFAULT_SEQLEN)


def feeds_stage(loaded: LoadedModel, recipe: Recipe, runner: Runner, streamed: bool,
                specs: list[InputSpec] | None = None) -> Feeds:
    """The input sets to verify on: the user's, or generated ones the original model runs on
    (``specs``: its inputs, taken before the passes; streamed: it runs in stages, as it will in
    verification, since a whole-model session would copy every weight into memory)."""
    check = runner.checker(loaded.runnable, stage_bytes=STAGE_BYTES if streamed else None)
    return make_feeds(loaded.model, inputs=recipe.verification.get("inputs"), seed=recipe.seed,
                      dims=recipe.verification.get("dims"), samples=recipe.verification.get("samples", 2),
                      check=check, specs=specs)


def verify_stage(loaded: LoadedModel, staged, plan: Plan, feeds: Feeds, evaluation: EvaluationData | None,
                 runner: Runner, streamed: bool, progress: Progress, shared: str | os.PathLike | None = None,
                 model_key: str = "") -> dict[str, Verdict]:
    """The staged output against the original: on the input sets, and on real inputs if any.
    The original runs only where its outputs are not known: the generated input sets' were
    computed when the sets were checked, and ``shared`` (a folder) may hold them from an
    earlier compile of the same model."""
    inputs = {"random": (feeds.sets, feeds.note, (), feeds.outputs)}
    if evaluation is not None:
        inputs["real"] = (evaluation.feeds, evaluation.note, evaluation.metrics(), None)
    verdicts = {}
    for name, (sets, note, metrics, reference) in inputs.items():
        if streamed:  # never two whole models in memory: both run stage by stage
            with progress.task(f"verifying in stages on {name} inputs"):
                # the original's outputs on generated inputs were computed when they were checked
                verdicts[name] = verify_staged(load_model(loaded.runnable).model, load_model(staged.path).model, sets,
                                               inputs=note, exact=plan.exact, metrics=metrics, runner=runner,
                                               progress=progress, floor=plan.tolerance_floor,
                                               reference_outputs=reference)
        else:
            if shared is not None:
                reference = shared_reference_outputs(loaded.runnable, sets, shared, model_key=model_key,
                                                     runner=runner, outputs=reference)
            if reference is not None:
                verdicts[name] = verify_against(reference, staged.path, sets, inputs=note, exact=plan.exact,
                                                metrics=metrics, runner=runner, progress=progress,
                                                floor=plan.tolerance_floor)
            else:
                verdicts[name] = verify_models(loaded.runnable, staged.path, sets, inputs=note, exact=plan.exact,
                                               metrics=metrics, runner=runner, progress=progress,
                                               floor=plan.tolerance_floor)
    return verdicts


def bench_stage(loaded: LoadedModel, candidate: Path, judgement: Judgement, fidelity: float, runner: Runner,
                threads: int | None, progress: Progress) -> dict[str, Any]:
    """Original against compiled, interleaved, on a real input when the model has some."""
    from sparsec.runtime.bench import compare_speed

    feed, note = timing_feed(loaded.model)
    with progress.task("timing original and compiled side by side"):
        speed = compare_speed({"original": loaded.runnable, "compiled": candidate}, feed, runner=runner,
                              threads=threads)
    ratio, t = speed.ratios["compiled"], speed.timings
    return {"original_ms": t["original"].median_ms, "compiled_ms": t["compiled"].median_ms,
            "speedup": ratio.median, "speedup_p10": ratio.p10, "speedup_p90": ratio.p90,
            "repeats": speed.repeats, "stable": speed.stable, "threads": speed.threads,
            "providers": speed.providers, "inputs": note, "line": speed.line("compiled"),
            "fidelity": judgement.status, "fidelity_cosine": fidelity,
            "session_ms": {"original": t["original"].load_ms, "compiled": t["compiled"].load_ms}}


def _texts(result: CompileResult, outputs: Outputs, written: bool) -> dict[Path, str]:
    """The reports (and recipe) of a compile; the recipe only when the model is written."""
    data = result.report()
    texts = {path: render_report(path, data) for path in outputs.reports}
    if outputs.recipe is not None and written:
        texts[outputs.recipe] = recipe_text(result.recipe, outputs.recipe)
    return texts


def _check_model(path: Path, loaded: LoadedModel, streamed: bool, notes: list[str]) -> None:
    """onnx.checker (full_check) on the staged output, unless streamed; a rejection that the
    input shares is a note, anything else a bug."""
    if streamed:
        notes.append(f"{loaded.total_bytes / 2**30:.1f} GiB model: compiled streamed"
                     " (weights spilled to disk, verification in stages, onnx.checker skipped)")
        return
    problem = _checker(path)
    if problem:
        if _checker(loaded.runnable):
            notes.append(f"onnx.checker rejects the input model too: {problem}")
        else:
            raise PassError(f"the compiled model fails onnx.checker: {problem}")


def _checker(path: Path) -> str:
    """'' when onnx.checker (full_check) accepts the model, else its first line."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # the checker raises several types
        return " ".join(str(exc).split())[:300]
    return ""


@contextlib.contextmanager
def _spill(streamed: bool, out_path: Path):
    """While compiling a model over STREAM_BYTES, rewritten weights go to a file beside the output."""
    if not streamed:
        yield
        return
    from sparsec.graph import spilling
    from sparsec.model_io import TMP_SUFFIX

    spill_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.{os.getpid()}.", suffix=TMP_SUFFIX,
                                      dir=out_path.parent if str(out_path.parent) else "."))
    try:
        with spilling(spill_dir):
            yield
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)


def _pass_verifier(loaded: LoadedModel, feeds: Feeds, runner: Runner, progress: Progress):
    """An after-each-pass hook measuring the model so far against the original."""

    def after(p: Pass, record: PassRecord, model: ir.Model) -> None:
        with tempfile.TemporaryDirectory(prefix="sparsec-verify-") as tmp:
            with stage_model(model, Path(tmp) / "model.onnx", external_data=True) as staged:
                verdict = verify_models(loaded.runnable, staged.path, feeds.sets, inputs=feeds.note,
                                        exact=p.kind.value == "exact", runner=runner, progress=progress,
                                        floor=p.reorder_tolerance)
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
            "pass": record.pass_id, "kind": record.kind, "sites": len(record.sites),
            "changed": len(record.changed),
            "skipped": ", ".join(f"{k} {v}" for k, v in record.skip_counts().items()) or "-",
            "params": record.params_touched,
            "sparsity": f"{sparsity:.1%}" if sparsity is not None else "-",
            "seconds": f"{record.seconds:.2f}",
        })
    return rows


def compile_any(model: Any, recipe: Recipe | None = None, **options: Any) -> CompileResult:
    """:func:`compile` for a path, a loaded model, an ``onnx.ModelProto`` or an ``onnx_ir.Model``."""
    if isinstance(model, (str, os.PathLike, LoadedModel)):
        return compile(model, recipe, **options)
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    if not isinstance(model, ir.Model):
        raise OptionError(f"compile takes a path, an onnx.ModelProto or an onnx_ir.Model, not {type(model).__name__}")
    if options.get("output") is None:
        raise OptionError("give output=... when compiling an in-memory model")
    with tempfile.TemporaryDirectory(prefix="sparsec-input-") as tmp:
        from sparsec.model_io import save_model

        path = save_model(model, Path(tmp) / "input.onnx", external_data=True)
        return compile(path, recipe, **options)
