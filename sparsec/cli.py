"""The ``sparsec`` command line.

Every command exits 0 on success, 1 when verification fails, 2 on bad input or usage and 3 on
an internal error. Errors are one line on stderr (``sparsec: error: ...``), never a traceback
(``--debug`` shows it).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click

from sparsec import __version__
from sparsec.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_VERIFY_FAILED, SparsecError


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
@click.option("--benchmark", is_flag=True, help="Also time original and compiled side by side on the CPU.")
@_inputs_option
@_dim_option
@_seed_option
@_samples_option
@click.option("--min-cosine", type=click.FloatRange(-1.0, 1.0), default=None,
              help="Fidelity budget: fail and write nothing when an output's cosine falls below it.")
@click.option("--calib", default=None, metavar="SOURCE",
              help="Calibration data for wanda / sparsegpt / activation scores: a .npz of input sets, a"
              " text file (with --tokenizer), or 'builtin' (example models; their default).")
@click.option("--calib-samples", type=click.IntRange(1, 100000), default=None,
              help="Calibration windows (text) or sentences (encoders). Default 32.")
@click.option("--calib-seqlen", type=click.IntRange(2, 1 << 20), default=None,
              help="Tokens per calibration window. Default 512.")
@click.option("--tokenizer", default=None, metavar="PATH",
              help="Tokenizer folder or tokenizer.json for a text --calib file (read offline).")
@click.option("--verify-each", is_flag=True, help="Also measure each pass's effect against the original.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="ONNX Runtime threads for verification.")
@_json_option
def compile_cmd(model, example, target, output, passes, reports, recipe, save_recipe, benchmark, inputs,
                dims, seed, samples, min_cosine, calib, calib_samples, calib_seqlen, tokenizer, verify_each,
                threads, as_json) -> None:
    """Compile MODEL for a target: plan, prune, verify, write the model and a report."""
    from sparsec.compiler import compile as run_compile
    from sparsec.recipe import load_recipe, recipe_from, save_recipe as write_recipe
    from sparsec.verify import parse_dims

    progress = _progress()
    if (model is None) == (example is None):
        raise click.UsageError("give either MODEL or --example NAME")
    dim_values = parse_dims(dims)
    if recipe is not None:
        ctx = click.get_current_context()
        given = [name for name in ("target", "passes", "min_cosine", "calib", "calib_samples", "calib_seqlen",
                                   "tokenizer", "seed", "samples", "dims")
                 if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--recipe replays a compile exactly; do not also give --{given[0].replace('_', '-')}")
        r = load_recipe(recipe)
        target, passes, min_cosine = r.target, r.pass_objects(), r.budget.get("min_cosine")
        calib, calib_samples = r.calibration.get("source"), r.calibration.get("samples")
        calib_seqlen, tokenizer = r.calibration.get("seqlen"), r.calibration.get("tokenizer")
        seed, samples = r.verification.get("seed", 0), r.verification.get("samples", 2)
        dim_values = dict(r.verification.get("dims") or {})
    if example is not None:
        from sparsec.models import build

        model = build(example, progress=progress)
        output = output or f"{example}.sparse.onnx"
    result = run_compile(model, target=target, passes=passes, output=output, report=list(reports) or None,
                         inputs=inputs, dims=dim_values, seed=seed, samples=samples,
                         min_cosine=min_cosine, calib=calib, calib_samples=calib_samples,
                         calib_seqlen=calib_seqlen, tokenizer=tokenizer, verify_each=verify_each,
                         benchmark=benchmark, progress=progress, threads=threads)
    if save_recipe:
        write_recipe(recipe_from(result.target, result.plan.passes, min_cosine=min_cosine, calib=calib,
                                 calib_samples=calib_samples, calib_seqlen=calib_seqlen, tokenizer=tokenizer,
                                 seed=seed, samples=samples, dims=dim_values), save_recipe)
    if as_json:
        _print_json(result.report())
        return
    _print_compile(result)


def _print_compile(result) -> None:
    from sparsec.compiler import summary_rows
    from sparsec.report import format_table, human_bytes

    for line in result.plan.lines():
        _echo(line)
    _echo()
    rows = summary_rows(result)
    if rows:
        for line in format_table(rows, ["pass", "kind", "matched", "changed", "skipped", "params", "sparsity", "seconds"]):
            _echo(line)
        _echo()
    for name, verdict in result.verdicts.items():
        _echo(f"verification on {name} inputs:")
        for line in verdict.lines():
            _echo("  " + line)
    for note in result.notes:
        _echo(f"note: {note}")
    sizes = result.sizes
    if result.speed:
        sp = result.speed
        _echo(f"speed: {sp['speedup']:.2f}x ({sp['original_ms']:.2f} -> {sp['compiled_ms']:.2f} ms median,"
              f" {sp['threads']} threads, {sp['inputs']})")
    _echo(f"wrote {result.output} ({human_bytes(sizes['output_bytes'])}; input {human_bytes(sizes['input_bytes'])})"
          f" and {', '.join(map(str, result.report_paths))}")


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
    from sparsec.model_io import load_model
    from sparsec.verify import input_specs, load_feeds, parse_dims, random_feeds, verify_models

    ref = load_model(reference)
    load_model(candidate)  # same input checks for the candidate
    specs = input_specs(ref.model)
    if inputs:
        feeds, note = load_feeds(inputs, specs), f"inputs from {inputs}"
    else:
        feeds, note = random_feeds(specs, seed=seed, dims=parse_dims(dims), samples=samples), f"random inputs (seed {seed})"
    verdict = verify_models(ref.path, candidate, feeds, atol=atol, rtol=rtol, inputs=note,
                            threads=threads, progress=_progress())
    if as_json:
        _print_json(verdict.to_dict())
    else:
        for line in verdict.lines():
            _echo(line)
    if not verdict.passed:
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
@click.option("--tokenizer", default=None, metavar="PATH")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="ORT threads for timing (default: all cores).")
@click.option("--repeats", type=click.IntRange(3, 1000), default=15, show_default=True)
@click.option("--report", "reports", type=click.Path(dir_okay=False), multiple=True,
              help="Report path (.json, .md or .html with the Pareto plot); repeatable.")
@_json_option
def sweep_cmd(model, specs, target, calib, calib_samples, calib_seqlen, tokenizer, threads, repeats, reports,
              as_json) -> None:
    """Compile several candidates, time them side by side, show speed against fidelity."""
    from sparsec.compiler import write_text_atomic
    from sparsec.errors import OptionError
    from sparsec.sweep import sweep

    for path in reports:
        if Path(path).suffix not in (".json", ".md", ".html"):
            raise OptionError(f"--report {path}: unknown format (use .json, .md or .html)")
    result = sweep(model, list(specs), target=target, threads=threads, repeats=repeats, progress=_progress(),
                   calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen, tokenizer=tokenizer,
                   samples=1)
    header = [f"# sparsec sweep: {result.model}", "",
              f"Timed interleaved on the CPU, {result.threads} threads, median of {result.repeats}"
              f" ({result.inputs}); fidelity = min output cosine against the original.", ""]
    for path in map(Path, reports):
        if path.suffix == ".json":
            write_text_atomic(path, json.dumps(result.to_dict(), indent=2) + "\n")
        elif path.suffix == ".md":
            write_text_atomic(path, "\n".join(header + result.table()) + "\n")
        else:
            from sparsec.report_html import sweep_html

            write_text_atomic(path, sweep_html(result))
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
@_json_option
def analyze_cmd(model, calib, calib_samples, calib_seqlen, tokenizer, levels, method, sparsity, by, reports,
                as_json) -> None:
    """Per-layer sensitivity (output drop per layer per sparsity) and the OWL allocation."""
    from sparsec.calib import load_calibration
    from sparsec.errors import OptionError
    from sparsec.model_io import load_model
    from sparsec.models import entry_for
    from sparsec.sensitivity import layer_sensitivity

    try:
        level_list = [float(x) for x in levels.split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"--levels expects numbers like 0.3,0.5, got '{levels}'") from None
    if not level_list or any(not 0 < x < 1 for x in level_list):
        raise OptionError(f"--levels must be sparsities between 0 and 1, got '{levels}'")
    loaded = load_model(model)
    if calib is None:
        if entry_for(loaded.model.metadata_props) is None:
            raise OptionError("analyze needs --calib (a .npz of input sets, or a text file with --tokenizer)")
        calib = "builtin"
    calibration = load_calibration(calib, loaded.model, samples=calib_samples, seqlen=calib_seqlen,
                                   tokenizer=tokenizer)
    for path in reports:
        if Path(path).suffix not in (".json", ".md", ".html"):
            raise OptionError(f"--report {path}: unknown format (use .json, .md or .html)")
    result = layer_sensitivity(loaded.model, calibration, levels=level_list, method=method, by=by,
                               target=sparsity, progress=_progress())
    from sparsec.compiler import write_text_atomic

    for path in map(Path, reports):
        if path.suffix == ".json":
            write_text_atomic(path, json.dumps(result.to_dict(), indent=2) + "\n")
        elif path.suffix == ".md":
            write_text_atomic(path, "\n".join(["# sparsec analyze: " + str(model), "", *result.lines()]) + "\n")
        else:
            from sparsec.report_html import sensitivity_html

            write_text_atomic(path, sensitivity_html(result.to_dict(), str(model)))
    if as_json:
        _print_json(result.to_dict())
        return
    for line in result.lines():
        _echo(line)


def options_markdown(cls) -> list[str]:
    """A pass's options as a Markdown table (docs/passes/*.md embed exactly this)."""
    lines = ["| option | default | valid | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls.Options):
        meta = f.metadata
        if meta.get("choices"):
            valid = " / ".join(map(str, meta["choices"]))
        elif meta.get("min") is not None or meta.get("max") is not None:
            valid = f"{meta.get('min') if meta.get('min') is not None else ''}..{meta.get('max') if meta.get('max') is not None else ''}"
        else:
            valid = ""
        default = "\\|".join(f.default) if isinstance(f.default, tuple) else f.default
        default = f"`{default}`" if default != "" else "(none)"
        help_text = meta.get("help", "").replace("|", "\\|")
        lines.append(f"| `{f.name}` | {default} | {valid} | {help_text} |")
    return lines


@cli.command("passes")
@click.option("--markdown", "markdown_id", default=None, metavar="ID", help="Print one pass's options as Markdown.")
@_json_option
def passes_cmd(markdown_id, as_json) -> None:
    """List every pass with its options."""
    from sparsec.pipeline import get_pass, registry

    if markdown_id:
        for line in options_markdown(get_pass(markdown_id)):
            click.echo(line)
        return
    data = []
    for pass_id, cls in registry().items():
        options = []
        for f in dataclasses.fields(cls.Options):
            meta = f.metadata
            valid = ""
            if meta.get("choices"):
                valid = "one of " + "|".join(map(str, meta["choices"]))
            elif meta.get("min") is not None or meta.get("max") is not None:
                valid = f"{meta.get('min', '')}..{meta.get('max', '') if meta.get('max') is not None else ''}"
            default = f.default if not isinstance(f.default, tuple) else "|".join(f.default)
            options.append({"name": f.name, "default": default, "valid": valid, "help": meta.get("help", "")})
        data.append({"id": pass_id, "kind": cls.kind.value, "summary": cls.summary, "matches": cls.matches,
                     "options": options})
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
    """List the hardware targets, their execution providers and what each sparse form gains."""
    from sparsec.targets import TARGETS

    if as_json:
        _print_json([t.to_dict() for t in TARGETS.values()])
        return
    for t in TARGETS.values():
        providers = ", ".join(p if isinstance(p, str) else f"{p[0]} {p[1]}" for p in t.providers)
        _echo(f"{t.name}: {t.description}")
        _echo(f"  providers: {providers}")
        _echo(f"  default passes: {t.default_passes or '(none)'}")
        for form, gain in t.gains.items():
            _echo(f"  {form:<13} {'SPEEDUP' if gain.speedup else 'no speedup':<10} {gain.how}")
        _echo()


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
        _echo(f"{e['name']:<12} {e['kind']:<8} {'real weights' if e['real_weights'] else 'random weights'}"
              f"  {e['description']}")


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
                         output=out / "minilm.sparse.onnx", progress=progress)
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
            raise
        click.echo(f"sparsec: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("sparsec: interrupted", err=True)
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    except Exception as exc:  # a bug: one line, ask for a report
        if _State.debug:
            raise
        text = " ".join(str(exc).split())[:300]
        click.echo(f"sparsec: internal error: {type(exc).__name__}: {text}"
                   " (rerun with --debug for the traceback, and please report it)", err=True)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
