"""The ``sparsec`` command line.

Every command exits 0 on success, 1 when verification fails, 2 on bad input or usage and 3 on
an internal error. Errors are one line on stderr (``sparsec: error: ...``), never a traceback
(``--debug`` shows it).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from sparsec import __version__
from sparsec.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_VERIFY_FAILED,
    SparsecError,
    missing_package,
)


class _State:
    quiet = False
    debug = False


def _echo(line: str = "") -> None:
    if not _State.quiet:
        click.echo(line)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _progress():
    from sparsec.progress import auto

    return auto(quiet=_State.quiet)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sparsec")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors (and --json output).")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
def cli(quiet: bool, debug: bool) -> None:
    """sparsec: make an exported ONNX model sparse, verify it, and say what it gains where.

    \b
    Exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 internal error.
    """
    _State.quiet = quiet
    _State.debug = debug


_dim_option = click.option("--dim", "dims", multiple=True, metavar="NAME=N",
                           help="Value of a symbolic input dimension (repeatable), e.g. --dim sequence=128.")
_inputs_option = click.option("--inputs", type=click.Path(dir_okay=False), default=None,
                              help="A .npz of input arrays keyed by input name (or SET/name for several sets).")
_seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
_samples_option = click.option("--samples", type=click.IntRange(1, 1000), default=2, show_default=True,
                               help="Number of random input sets.")
_json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
_calib_unit_option = click.option(
    "--calib-unit", type=click.Choice(["windows", "lines"]), default=None,
    help="How a text --calib file is cut: token windows of --calib-seqlen (decoders; the default), or one"
    " sample per non-empty line with the tokenizer's special tokens (sentence encoders).")
_ray_option = click.option("--ray", "ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                           help="Run independent units of work as Ray tasks (needs the 'ray' extra): --ray alone"
                           " starts a local cluster, --ray ADDRESS connects to an existing one. Each task reserves"
                           " the cores its threads use: all of a node's by default (see docs/scale.md).")


def _engine(ray, threads):
    from sparsec.engine import make_engine

    return make_engine(ray, threads=threads)


@cli.command("compile")
@click.argument("model", required=False, type=click.Path(dir_okay=True))
@click.option("--example", metavar="NAME", help="Compile an example model from the zoo instead of MODEL (see 'sparsec zoo').")
@click.option("-t", "--target", default="cpu", show_default=True, help="Hardware target (see 'sparsec targets').")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Output model path. Default: <model>.sparse.onnx (for --example: ./<name>.sparse.onnx).")
@click.option("--passes", "passes", default=None, metavar="SPEC",
              help='Passes to run instead of the target\'s plan, e.g. "nm:n=2,m=4" (see \'sparsec passes\').')
@click.option("--report", "reports", type=click.Path(dir_okay=False), multiple=True,
              help="Report path, repeatable; format by extension: .json, .md, .html (self-contained,"
              " with plots). Default: <output>.report.json.")
@click.option("--recipe", type=click.Path(dir_okay=False), default=None,
              help="Replay a recipe (YAML/JSON: target, passes, budget, calibration, verification).")
@click.option("--save-recipe", type=click.Path(dir_okay=False), default=None,
              help="Write this compile as a recipe (YAML or JSON by extension).")
@click.option("--benchmark", is_flag=True, help="Also time original and compiled side by side on the target's providers.")
@_inputs_option
@_dim_option
@_seed_option
@_samples_option
@click.option("--min-cosine", type=click.FloatRange(-1.0, 1.0), default=None,
              help="Fidelity budget: every output's cosine against the original must reach this.")
@click.option("--min-embedding-cosine", type=click.FloatRange(-1.0, 1.0), default=None,
              help="Fidelity budget for encoders with real evaluation data: mean sentence-embedding cosine.")
@click.option("--max-ppl-increase", "max_ppl_ratio", type=click.FloatRange(1.0), default=None,
              help="Fidelity budget for decoders with real evaluation text: perplexity at most this times"
              " the original's (e.g. 1.2).")
@click.option("--max-rel-err", type=click.FloatRange(0.0), default=None,
              help="Fidelity budget: every output's relative error ||compiled - original|| / ||original||"
              " (L2, over all its elements) at most this (e.g. 0.05).")
@click.option("--best-effort", is_flag=True,
              help="Write the result even when it falls below its fidelity budget (exit 0).")
@click.option("--calib", default=None, metavar="SOURCE",
              help="Calibration data for wanda / sparsegpt / activation scores: a .npz of input sets, a"
              " text file (with --tokenizer), or 'builtin' (example models; their default).")
@click.option("--calib-samples", type=click.IntRange(1, 100000), default=None,
              help="Calibration windows (text), or sentences (encoders' built-in text, --calib-unit lines)."
              " Default 32 windows, 512 sentences.")
@click.option("--calib-seqlen", type=click.IntRange(2, 1 << 20), default=None,
              help="Tokens per calibration window (the most per line with --calib-unit lines). Default 512.")
@_calib_unit_option
@click.option("--tokenizer", default=None, metavar="PATH",
              help="Tokenizer folder or tokenizer.json for a text --calib file (read offline).")
@click.option("--verify-each", is_flag=True, help="Also measure each pass's effect against the original.")
@click.option("--explain", is_flag=True,
              help="Let the planner choose the passes (also when a budget flag is given without --passes on a target"
              " with no default plan, such as cpu) and print, per site, every option it considered: predicted"
              " gain, measured fidelity, why chosen or rejected.")
@click.option("--objective", type=click.Choice(["latency", "size", "memory"]), default=None,
              help="What the planner minimises within the budget: latency on the target (default), size (the file"
              " and its data) or memory (weights plus peak activations on the workload).")
@click.option("--constant-initializers", is_flag=True,
              help="Treat initializers that are also listed as graph inputs (old exporters list every weight so)"
              " as constants, so passes may rewrite them.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="ONNX Runtime threads.")
@click.option("--jobs", type=click.IntRange(1, 1024), default=None,
              help="Calibration-aware solves (SparseGPT, Wanda) of one stage's sites run at once in this many"
              " threads; same result. Default: one per core, at most 8.")
@_ray_option
@_json_option
def compile_cmd(model, example, target, output, passes, reports, recipe, save_recipe, benchmark, inputs,
                dims, seed, samples, min_cosine, min_embedding_cosine, max_ppl_ratio, max_rel_err, best_effort, calib,
                calib_samples, calib_seqlen, calib_unit, tokenizer, verify_each, explain, objective, constant_initializers,
                threads, jobs, ray, as_json) -> None:
    """Compile MODEL for a target: plan, prune, verify, write the model and a report."""
    from sparsec.compiler import compile as run_compile
    from sparsec.errors import VerificationError
    from sparsec.feeds import parse_dims
    from sparsec.recipe import Recipe, load_recipe, with_calibration

    progress = _progress()
    if (model is None) == (example is None):
        raise click.UsageError("give either MODEL or --example NAME")
    calibration = {"calib": calib, "calib_samples": calib_samples, "calib_seqlen": calib_seqlen,
                   "calib_unit": calib_unit, "tokenizer": tokenizer}
    if recipe is not None:
        ctx = click.get_current_context()
        given = [name for name in _RECIPE_FLAGS if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--recipe replays a compile exactly; do not also give --{given[0].replace('_', '-')}"
                                   " (only the calibration flags may override a recipe's)")
        the_recipe = with_calibration(load_recipe(recipe), **calibration)
    else:
        the_recipe = Recipe.from_options(
            target=target, passes=passes, min_cosine=min_cosine, min_embedding_cosine=min_embedding_cosine,
            max_ppl_ratio=max_ppl_ratio, max_rel_err=max_rel_err, **calibration, seed=seed, samples=samples, dims=parse_dims(dims), inputs=inputs,
            constant_initializers=constant_initializers or None, objective=objective)
    if example is not None:
        from sparsec.models import build

        model = build(example, progress=progress)
        output = output or f"{example}.sparse.onnx"
    show_plan = None if as_json else (lambda plan: [_echo(line) for line in plan.lines() + [""]])
    show_auto = None if as_json else (lambda auto: [_echo(line) for line in (
        auto.lines() if explain else auto.lines()[:1] + [f"  {s}" for s in auto.specs]) + [""]])
    try:
        with _engine(ray, threads) as engine:
            result = run_compile(model, the_recipe, output=output, report=list(reports) or None,
                                 save_recipe=save_recipe, benchmark=benchmark, verify_each=verify_each,
                                 best_effort=best_effort, progress=progress, threads=threads, on_plan=show_plan,
                                 explain=explain, on_auto=show_auto, engine=engine, jobs=jobs)
    except VerificationError as exc:
        if exc.result is not None and not as_json:
            _print_compile(exc.result)
        raise
    if as_json:
        _print_json(result.report())
        return
    _print_compile(result)


# Flags a recipe fixes (the calibration flags override a recipe's calibration: a recipe is replayed
# on the user's own export with the user's own text).
_RECIPE_FLAGS = ("target", "passes", "min_cosine", "min_embedding_cosine", "max_ppl_ratio", "max_rel_err", "seed",
                 "samples", "dims", "inputs", "constant_initializers", "objective")


def _print_compile(result) -> None:
    from sparsec.compiler import summary_rows
    from sparsec.report import format_table, human_bytes, skip_legend

    rows = summary_rows(result)
    if rows:
        for line in format_table(rows, ["pass", "kind", "sites", "changed", "skipped", "params", "sparsity", "seconds"]):
            _echo(line)
        for line in skip_legend(result.records):
            _echo(line)
        _echo()
    for record in result.records:
        if record.fidelity is not None:
            _echo(f"after pass '{record.pass_id}' ({record.fidelity['inputs']}):"
                  f" min output cosine {min((o['cosine'] for o in record.fidelity['outputs']), default=0.0):.6f}")
    for name, verdict in result.verdicts.items():
        _echo(f"verification on {name} inputs:")
        for line in verdict.lines():
            _echo("  " + line)
    if result.judgement is not None:
        _echo(f"verdict: {result.judgement.status}")
        for line in result.judgement.lines():
            _echo("  " + line)
    for note in result.notes:
        _echo(f"note: {note}")
    sizes = result.sizes
    if result.speed:
        _echo(f"speed: {result.speed['line']} ({result.speed['inputs']})")
    reports = ", ".join(map(str, result.report_paths))
    if result.output is not None:
        _echo(f"wrote {result.output} ({human_bytes(sizes['output_bytes'])}; input {human_bytes(sizes['input_bytes'])})"
              f" and {reports}")
    else:
        _echo(f"wrote no model; the report explains why: {reports}")


@cli.command("verify")
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@_inputs_option
@_dim_option
@_seed_option
@_samples_option
@click.option("--atol", type=click.FloatRange(0), default=None, help="Absolute tolerance (default per dtype).")
@click.option("--rtol", type=click.FloatRange(0), default=None, help="Relative tolerance (default per dtype).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="ONNX Runtime threads.")
@_json_option
def verify_cmd(reference, candidate, inputs, dims, seed, samples, atol, rtol, threads, as_json) -> None:
    """Check that CANDIDATE answers like REFERENCE (exit 0 PASSED, 1 FAILED).

    An element fails only where both |a-b| > atol and |a-b| > rtol*|ref|. Default tolerances
    per dtype: float32 1e-5/1e-4, float16 1e-3/1e-2, bfloat16 1e-2/5e-2; integers exact.
    """
    from sparsec.feeds import make_feeds, parse_dims
    from sparsec.model_io import load_model
    from sparsec.runtime.session import cpu_runner
    from sparsec.verify import judge, verify_models

    ref = load_model(reference)
    cand = load_model(candidate)  # same input checks for the candidate
    runner = cpu_runner(threads)
    feeds = make_feeds(ref.model, inputs=inputs, seed=seed, dims=parse_dims(dims), samples=samples,
                       check=runner.checker(ref.runnable))
    verdict = verify_models(ref.runnable, cand.runnable, feeds.sets, atol=atol, rtol=rtol, inputs=feeds.note,
                            runner=runner, progress=_progress())
    judgement = judge({"given": verdict}, exact=True)
    if as_json:
        _print_json({**verdict.to_dict(), "judgement": judgement.to_dict()})
    else:
        for line in verdict.lines():
            _echo(line)
    if not judgement.passed:
        sys.exit(EXIT_VERIFY_FAILED)


@cli.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--all", "all_weights", is_flag=True, help="List every initializer, not only linear-op weights.")
@_json_option
def inspect_cmd(model, all_weights, as_json) -> None:
    """Show op counts, parameters, and per weight its shape, sparsity and N:M compliance."""
    from sparsec.analyze import analyze
    from sparsec.model_io import fingerprint, load_model
    from sparsec.report import inspect_lines

    loaded = load_model(model)
    analysis = analyze(loaded.model, fingerprint(loaded.model))
    analysis.notes.extend(loaded.notes)
    if as_json:
        _print_json(analysis.to_dict())
        return
    for line in inspect_lines(analysis, all_weights=all_weights, path=model):
        _echo(line)
    for note in analysis.notes:
        _echo(f"note: {note}")


@cli.command("sweep")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--passes", "specs", multiple=True, required=True, metavar="SPEC",
              help="A candidate pass spec; repeat for each candidate.")
@click.option("-t", "--target", default="cpu", show_default=True)
@click.option("--calib", default=None, metavar="SOURCE")
@click.option("--calib-samples", type=click.IntRange(1, 100000), default=None)
@click.option("--calib-seqlen", type=click.IntRange(2, 1 << 20), default=None)
@_calib_unit_option
@click.option("--tokenizer", default=None, metavar="PATH")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="ORT threads for timing (default: all cores).")
@click.option("--repeats", type=click.IntRange(3, 1000), default=15, show_default=True,
              help="Timing rounds at least (more until the speed ratios are stable).")
@click.option("--report", "reports", type=click.Path(dir_okay=False), multiple=True,
              help="Report path (.json, .md or .html with the Pareto plot); repeatable.")
@_ray_option
@_json_option
def sweep_cmd(model, specs, target, calib, calib_samples, calib_seqlen, calib_unit, tokenizer, threads, repeats,
              reports, ray, as_json) -> None:
    """Compile several candidates, time them side by side, show speed against fidelity."""
    from sparsec.outputs import Outputs
    from sparsec.pipeline import parse_pass_specs
    from sparsec.sweep import sweep

    outputs = Outputs(reports=[Path(r) for r in reports])
    outputs.check()
    for spec in specs:
        parse_pass_specs(spec)  # every candidate's options are checked before any work
    with _engine(ray, threads) as engine:
        result = sweep(model, list(specs), target=target, threads=threads, repeats=repeats, progress=_progress(),
                       engine=engine, calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                       calib_unit=calib_unit, tokenizer=tokenizer, samples=1)
    stable = "" if result.stable else " (NOT STABLE: the machine is too noisy for these ratios)"
    header = [f"# sparsec sweep: {result.model}", "",
              f"Timed interleaved, {result.threads} threads, {result.repeats} rounds; speedup = median of"
              f" original / candidate per round{stable} ({result.inputs}); fidelity = min output cosine"
              " against the original.", ""]
    texts = {}
    for path in outputs.reports:
        if path.suffix == ".json":
            texts[path] = json.dumps(result.to_dict(), indent=2) + "\n"
        elif path.suffix == ".md":
            texts[path] = "\n".join(header + result.table()) + "\n"
        else:
            from sparsec.report_html import sweep_html

            texts[path] = sweep_html(result)
    outputs.commit(texts)
    if as_json:
        _print_json(result.to_dict())
        return
    for line in header[2:] + result.table():
        _echo(line)


@cli.command("analyze")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", default=None, metavar="SOURCE",
              help="Calibration data: a .npz, a text file (with --tokenizer), or 'builtin' (example models' default).")
@click.option("--calib-samples", type=click.IntRange(1, 100000), default=8, show_default=True)
@click.option("--calib-seqlen", type=click.IntRange(2, 1 << 20), default=256, show_default=True)
@_calib_unit_option
@click.option("--tokenizer", default=None, metavar="PATH")
@click.option("--levels", default="0.3,0.5,0.7", show_default=True, help="Sparsity levels to try per layer.")
@click.option("--method", type=click.Choice(["magnitude", "wanda"]), default="wanda", show_default=True,
              help="Masks to try; wanda also reports the OWL allocation.")
@click.option("--sparsity", type=click.FloatRange(0.01, 0.99), default=0.5, show_default=True,
              help="Target mean sparsity for the OWL allocation.")
@click.option("--by", type=click.Choice(["layer", "site"]), default="layer", show_default=True,
              help="Prune a whole transformer block or one weight at a time.")
@click.option("--report", "reports", type=click.Path(dir_okay=False), multiple=True,
              help="Report path (.json, .md, or .html with the sensitivity plot); repeatable.")
@_ray_option
@_json_option
def analyze_cmd(model, calib, calib_samples, calib_seqlen, calib_unit, tokenizer, levels, method, sparsity, by,
                reports, ray, as_json) -> None:
    """Per-layer sensitivity (output drop per layer per sparsity) and the OWL allocation."""
    from sparsec.data import load_calibration
    from sparsec.errors import OptionError
    from sparsec.model_io import load_model
    from sparsec.outputs import Outputs
    from sparsec.sensitivity import layer_sensitivity

    try:
        level_list = [float(x) for x in levels.split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"--levels expects numbers like 0.3,0.5, got '{levels}'") from None
    if not level_list or any(not 0 < x < 1 for x in level_list):
        raise OptionError(f"--levels must be sparsities between 0 and 1, got '{levels}'")
    outputs = Outputs(reports=[Path(r) for r in reports])
    outputs.check()
    loaded = load_model(model)
    calibration = load_calibration(calib, loaded.model, samples=calib_samples, seqlen=calib_seqlen,
                                   tokenizer=tokenizer, unit=calib_unit)
    with _engine(ray, None) as engine:
        result = layer_sensitivity(loaded.model, calibration, levels=level_list, method=method, by=by,
                                   target=sparsity, progress=_progress(), engine=engine)
    texts = {}
    for path in outputs.reports:
        if path.suffix == ".json":
            texts[path] = json.dumps(result.to_dict(), indent=2) + "\n"
        elif path.suffix == ".md":
            texts[path] = "\n".join(["# sparsec analyze: " + str(model), "", *result.lines()]) + "\n"
        else:
            from sparsec.report_html import sensitivity_html

            texts[path] = sensitivity_html(result.to_dict(), str(model))
    outputs.commit(texts)
    if as_json:
        _print_json(result.to_dict())
        return
    for line in result.lines():
        _echo(line)


@cli.command("match")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--pass", "pass_spec", required=True, metavar="SPEC",
              help='The pass whose matching to trace, with options, e.g. "ffn-neurons" or "nm:include=*ffn*".')
@click.option("--node", default=None, metavar="GLOB", help="Only candidates whose node name or site matches.")
@_json_option
def match_cmd(model, pass_spec, node, as_json) -> None:
    """Trace a pass's matching: per candidate site, MATCH or the check that failed (nothing is rewritten)."""
    from sparsec.model_io import load_model
    from sparsec.trace import trace

    result = trace(load_model(model).model, pass_spec, node)
    if as_json:
        _print_json(result.to_dict())
        return
    for row in result.rows:
        _echo(row.line())
    _echo()
    _echo(f"{result.pass_spec}: {len(result.rows)} candidate(s): "
          + ", ".join(f"{code} {n}" for code, n in result.counts().items()))
    for row in {r.status: r for r in result.rows if r.meaning}.values():
        _echo(f"  {row.status}: {row.meaning}")


def options_markdown(cls) -> list[str]:
    """A pass's options as a Markdown table (docs/passes/*.md embed exactly this)."""
    from sparsec.pipeline import option_infos

    lines = ["| option | default | valid | meaning |", "|---|---|---|---|"]
    for info in option_infos(cls):
        valid = info.valid.removeprefix("one of ").replace("|", " / ")
        default = info.default_text().replace("|", "\\|")
        default = f"`{default}`" if default != "" else "(none)"
        help_text = info.help.replace("|", "\\|")
        lines.append(f"| `{info.name}` | {default} | {valid} | {help_text} |")
    return lines


@cli.command("passes")
@click.option("--markdown", "markdown_id", default=None, metavar="ID", help="Print one pass's options as Markdown.")
@_json_option
def passes_cmd(markdown_id, as_json) -> None:
    """List every pass with its options."""
    from sparsec.pipeline import get_pass, option_infos, registry

    if markdown_id:
        for line in options_markdown(get_pass(markdown_id)):
            click.echo(line)
        return
    data = []
    for pass_id, cls in registry().items():
        options = [{"name": o.name, "default": o.default_text(), "valid": o.valid, "help": o.help,
                    "search": list(o.search) if o.search else None} for o in option_infos(cls)]
        data.append({"id": pass_id, "kind": "/".join(k.value for k in cls.kinds), "summary": cls.summary,
                     "matches": cls.matches, "options": options})
    if as_json:
        _print_json(data)
        return
    for entry in data:
        _echo(f"{entry['id']} [{entry['kind']}]: {entry['summary']}")
        _echo(f"  matches: {entry['matches']}")
        for opt in entry["options"]:
            valid = f" ({opt['valid']})" if opt["valid"] else ""
            _echo(f"  {opt['name']}={opt['default']!s:<10} {opt['help']}{valid}")
        _echo()


@cli.command("targets")
@_json_option
def targets_cmd(as_json) -> None:
    """List the hardware targets, their execution providers and what each sparse form gains, with the evidence."""
    from sparsec.targets import FORMS, targets

    if as_json:
        _print_json([t.to_dict() for t in targets().values()])
        return
    for t in targets().values():
        providers = ", ".join(p if isinstance(p, str) else f"{p[0]} {p[1]}" for p in t.providers)
        _echo(f"{t.name}: {t.description}")
        _echo(f"  providers: {providers}")
        _echo(f"  default passes: {t.default_passes or '(none)'}")
        _echo(_hardware_line(t))
        for form in FORMS:
            gain = t.gain(form)
            word = ("DEPENDS" if gain.depends else "SPEEDUP") if gain.speedup else "no speedup"
            _echo(f"  {form:<23} {word:<10} {gain.how}")
            _echo(f"  {'':<23} {'':<10} evidence: {gain.evidence}")
            for fact in gain.facts:
                if fact.provider != gain.provider:
                    _echo(f"  {'':<23} {'':<10} {fact.provider}: {fact.speedup}: {fact.how}")
        _echo()


def _hardware_line(target) -> str:
    """What the cost model starts from: peaks, bandwidth, and a measured profile if there is one."""
    from sparsec.cost import profile_path

    hw = target.hardware
    if not hw:
        return "  hardware: (no figures)"
    peaks = ", ".join(f"{k} {v / 1e12:g}" for k, v in hw.get("peak_flops", {}).items())
    sparse = ", ".join(f"{k} {v / 1e12:g}" for k, v in hw.get("sparse_flops", {}).items())
    line = (f"  hardware: {hw.get('devices', '')}; peak TFLOP/s {peaks}" + (f"; 2:4 sparse {sparse}" if sparse else "")
            + f"; {hw.get('bandwidth', 0) / 1e9:g} GB/s ({hw.get('sources', '')})")
    profile = profile_path(target.name)
    return line + (f"\n  measured profile: {profile}" if profile.exists() else "")


@cli.command("bench")
@click.argument("original", type=click.Path(dir_okay=False))
@click.argument("compiled", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--target", default="cpu", show_default=True, help="Run on this target's execution providers.")
@click.option("--mode", type=click.Choice(["prompt", "decode"]), default="prompt", show_default=True,
              help="decode: one new token after --context cached ones (KV-cache models).")
@click.option("--context", type=click.IntRange(1, 1 << 20), default=None,
              help="decode: cached tokens (default 512); prompt: the sequence length (default: the model's"
              " real inputs or 16).")
@click.option("--inputs", default=None, metavar="FILE.npz", help="Time on these inputs.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=N", help="Size of a symbolic dimension.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="ONNX Runtime threads.")
@_json_option
def bench_cmd(original, compiled, target, mode, context, inputs, dims, threads, as_json) -> None:
    """Time ORIGINAL and each COMPILED model side by side: interleaved rounds after warm-up, median and p10-p90 of the ratio."""
    from sparsec.feeds import input_specs, make_feeds, parse_dims
    from sparsec.model_io import load_model
    from sparsec.runtime.bench import compare_speed, ratio_table
    from sparsec.runtime.kvcache import KVCache
    from sparsec.targets import get_target

    runner = get_target(target).runner(threads)
    loaded = load_model(original)
    specs = input_specs(loaded.model)
    sizes = dict(parse_dims(dims))
    if mode == "decode":
        if not any(s.role == "past" for s in specs):
            raise click.UsageError("--mode decode needs a KV-cache model (past_key_values.* inputs)")
        cached = context or 512
        for spec in specs:
            for axis, dim in enumerate(spec.shape):
                if isinstance(dim, str) and spec.role == "past" and axis == 2:
                    sizes.setdefault(dim, cached)
                elif isinstance(dim, str) and spec.role == "ids" and axis == 1:
                    sizes.setdefault(dim, 1)
    elif context:
        for spec in specs:
            if spec.role in ("ids", "") and len(spec.shape) > 1 and isinstance(spec.shape[1], str):
                sizes.setdefault(spec.shape[1], context)
    if inputs is None and not sizes:
        from sparsec.data import timing_feed

        feed, note = timing_feed(loaded.model)
    else:
        feeds = make_feeds(loaded.model, inputs=inputs, dims=sizes or None, check=runner.checker(original))
        feed, note = feeds.sets[0], feeds.note
    del loaded
    models = {"original": original, **{str(p): p for p in compiled}}
    own = {}
    for label, path in models.items():  # bounded and shared KV caches take inputs of their own
        kv = KVCache.of(load_model(path).model.metadata_props)  # also refuses a bad file with one line
        if not kv.plain:
            own[label] = kv.feed(feed)[0]
    with _progress().task("timing the models side by side"):
        result = compare_speed(models, feed, baseline="original", runner=runner, threads=threads, feeds=own)
    if as_json:
        _print_json({"inputs": note, "mode": mode, **result.to_dict()})
        return
    _echo(f"{mode} on {note}; {', '.join(result.providers)}, {result.threads} threads, {result.repeats} rounds"
          + ("" if result.stable else " (NOT STABLE: the ratios did not settle)"))
    for line in ratio_table(list(result.timings.values()), "original"):
        _echo(line)


@cli.command("calibrate")
@click.option("--target", default="cpu", show_default=True, help="The target this machine stands for.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="ONNX Runtime threads (default: all).")
@_json_option
def calibrate_cmd(target, threads, as_json) -> None:
    """Measure this machine for the cost model (products, ONNX Runtime's int8 and 4-bit products on the CPU,
    memory bandwidth, the rates of layer norms, Gelu, Softmax, Transpose and Where on the CPU, per-node
    overhead) and store the profile.

    A GPU target is measured on its CUDA provider in fp16: run it on the machine with the GPU."""
    from sparsec.cost import calibrate, save_profile
    from sparsec.targets import get_target

    the_target = get_target(target)
    with _progress().task("measuring products (float and quantized), bandwidth, operators and node overhead"):
        profile = calibrate(the_target, threads)
    path = save_profile(profile, target)
    if as_json:
        _print_json({**profile.to_dict(), "path": str(path)})
        return
    rates = ", ".join(f"{f / 1e6:.3g} MFLOP: {r / 1e9:.1f} GFLOP/s" for f, r in profile.gemm)
    _echo(f"products: {rates}")
    for form, points in profile.quantized.items():
        _echo(f"{form} products: " + ", ".join(f"{f / 1e6:.3g} MFLOP: {r / 1e9:.1f} GFLOP/s" for f, r in points))
    _echo(f"memory bandwidth: {profile.bandwidth / 1e9:.1f} GB/s; per-node overhead: {profile.overhead * 1e6:.1f} us")
    if profile.op_bandwidth:
        _echo("operators (GB/s at the sizes measured, against the bandwidth above): "
              + "; ".join(f"{op} " + ", ".join(f"{b / 2**20:.2g} MiB {r / 1e9:.1f}" for b, r in points)
                          for op, points in profile.op_bandwidth.items()))
    if profile.attention:
        _echo("attention (GroupQueryAttention, causal prompts): "
              + ", ".join(f"{f / 1e6:.3g} MFLOP: {r / 1e9:.1f} GFLOP/s" for f, r in profile.attention))
    _echo(f"wrote {path} (compile's planner uses it for target '{target}' on this host; where models are"
          f" compiled on another machine, copy it there as {path.parent / (target + '.json')})")


@cli.group("zoo")
def zoo_cmd() -> None:
    """Example models: list them, or export one to a file."""


@zoo_cmd.command("list")
@_json_option
def zoo_list(as_json) -> None:
    """List the example models."""
    from sparsec.models import entries

    data = [e.to_dict() for e in entries().values()]
    if as_json:
        _print_json(data)
        return
    for e in data:
        _echo(f"{e['name']:<14} {e['kind']:<8} {'real weights' if e['real_weights'] else 'random weights':<15}"
              f" {e['size']:>9}  {e['description']}")
        _echo(f"{'':<14} needs: {e['needs']}")


@zoo_cmd.command("export")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(), required=True, help="Where to write the model.")
def zoo_export(name, output) -> None:
    """Export example model NAME (cached) and save it to OUTPUT."""
    from sparsec.model_io import load_model, save_model
    from sparsec.models import build

    path = build(name, progress=_progress())
    save_model(load_model(path).model, output, external_data=True)
    _echo(f"wrote {output}")


@cli.command("demo")
@click.option("--target", default="ampere", show_default=True, help="Hardware target.")
@click.option("--output-dir", type=click.Path(file_okay=False), default="sparsec-demo", show_default=True)
def demo_cmd(target, output_dir) -> None:
    """Compile all-MiniLM-L6-v2 (real weights, bundled) with 2:4 pruning and show the result."""
    from sparsec.compiler import compile as run_compile
    from sparsec.models import build

    progress = _progress()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build("minilm", progress=progress)
    result = run_compile(model, target=target, passes=None if target in ("ampere", "hopper") else "nm:n=2,m=4",
                         output=out / "minilm.sparse.onnx", progress=progress, best_effort=True,
                         on_plan=lambda plan: [_echo(line) for line in plan.lines() + [""]])
    _print_compile(result)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn every failure into an exit code and one line."""
    try:
        rv = cli.main(args=argv, prog_name="sparsec", standalone_mode=False)
        return rv if isinstance(rv, int) else EXIT_OK
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"sparsec: error: {exc.format_message()}{hint}", err=True)
        return EXIT_BAD_INPUT
    except click.exceptions.Abort:
        click.echo("sparsec: aborted", err=True)
        return 130
    except SparsecError as exc:
        if _State.debug:
            traceback.print_exc()
        click.echo(f"sparsec: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("sparsec: interrupted", err=True)
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    except Exception as exc:  # a bug: one line, ask for a report
        missing = missing_package(exc.name or "") if isinstance(exc, ModuleNotFoundError) else None
        if missing is not None:  # an optional package: the pip command
            click.echo(f"sparsec: error: {missing}", err=True)
            return missing.exit_code
        if _State.debug:
            traceback.print_exc()
        text = " ".join(str(exc).split())[:300]
        click.echo(f"sparsec: internal error: {type(exc).__name__}: {text}"
                   " (rerun with --debug for the traceback, and please report it)", err=True)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
