"""The planner's pick against other configurations of its own space: MiniLM, SmolLM2.

The planner (``sparsec compile --min-cosine B --explain``, no passes) chooses per site. It is
compared with two families of configurations, all compiled with the same calibration data and
verified on the same held-out sentences with the same budget (``best_effort``, so the ones
below it are still measured):

* uniform: every FFN at 0/25/50/75% of its neurons and every attention block at 0/25/50% of its
  heads, or every FFN as MoE with 4 or 2 of 8 experts;
* sampled per-site combinations (``--random N``): the planner's space has about 3^12 x ... combinations, too
  many to sweep, but a combination holding an option that alone spends more than the budget
  does not meet it (drops compound), so the fastest plan within the budget is a maximal
  combination of the options that alone fit. N such combinations are drawn (seeded): the
  options in a random order, each taken while the sum of their alone-uses stays under a random
  cap between 0.8 and 1.6 of the budget, one per site.

Every configuration is then timed side by side with the original in one process (CPU), or, with
``--export DIR``, written as specs for ``benchmarks/planner_gpu.py`` to build and time on the
CUDA provider in fp16 (the machine with the GPU has neither the tokenizer nor the weights: speed
depends on shapes only, so it builds each configuration from an fp16 copy of the original with
magnitude scores, which keep as many units as the calibrated ones).

    python benchmarks/planner_pick.py --min-cosine 0.98 --random 24   # results/planner_pick_minilm.md
    python benchmarks/planner_pick.py --model smollm2 --max-ppl-increase 1.2 \
        --random 4 --workdir DIR --out benchmarks/results/planner_pick_smollm2.md
    python benchmarks/planner_pick.py --min-cosine 0.98 --random 24 --target hopper --export DIR --no-time
    python benchmarks/planner_pick.py --min-cosine 0.98 --random 24 --quantize quantize:mode=dynamic \
        --workdir DIR --out benchmarks/results/planner_pick_minilm_int8.md   # with int8 in the space
    python benchmarks/planner_pick.py --model smollm2 --max-ppl-increase 1.2 --extend --random 3 \
        --caps 0.3 0.7 --seed 1 --workdir DIR --out ...   # more combinations, lower caps, for a run in DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PICK = "planner's pick"
# SmolLM2's compiles are dearer: the uniform ones there, each with the exact attention fusion
# (it costs no fidelity, so a configuration without it is slower for nothing), and the fusion alone
SMOLLM2_UNIFORM = {"attention": "attention",
                   **{f"{label} + attention": f"{spec};attention" for label, spec in {
                       "ffn 25%": "ffn-neurons:ratio=0.25", "ffn 50%": "ffn-neurons:ratio=0.5",
                       "heads 25%": "attention-heads:ratio=0.25",
                       "ffn 25% + heads 25%": "attention-heads:ratio=0.25;ffn-neurons:ratio=0.25",
                       "moe 8, k=4": "moe:experts=8,k=4"}.items()}}


def uniform_specs(quantize: str = "") -> dict[str, str]:
    """The uniform configurations; with ``quantize`` (a quantize pass spec) also that quantization
    alone and on top of each."""
    out = {}
    for ffn, heads in itertools.product((0, 0.25, 0.5, 0.75), (0, 0.25, 0.5)):
        if not ffn and not heads:
            continue
        parts = ([f"attention-heads:ratio={heads}"] if heads else []) + ([f"ffn-neurons:ratio={ffn}"] if ffn else [])
        out[f"ffn {ffn:.0%} + heads {heads:.0%}"] = ";".join(parts)
    for k in (4, 2):
        out[f"moe 8, k={k}"] = f"moe:experts=8,k={k}"
    if quantize:
        name = quantize.split("mode=")[-1]
        out = {**out, name: quantize, **{f"{label} + {name}": f"{spec};{quantize}" for label, spec in out.items()}}
    return out


def sampled_specs(options, count: int, seed: int = 0, caps: tuple[float, float] = (0.8, 1.6),
                  first: int = 1) -> dict[str, str]:
    """``count`` maximal combinations of the options that alone fit the budget (see the module),
    their alone-uses summed up to a cap drawn from ``caps``; labels numbered from ``first``."""
    from sparsec.planner import ordered_specs

    fit = [o for o in options if o.use is not None and o.use <= 1.0 and (o.saving or 0) > 0]
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for _ in range(count * 20):
        if len(out) >= count:
            break
        cap, spent, taken = rng.uniform(*caps), 0.0, {}
        for i in rng.permutation(len(fit)):
            o = fit[i]
            if o.site not in taken and spent + o.use <= cap:
                taken[o.site], spent = o, spent + o.use
        spec = ";".join(ordered_specs(list(taken.values())))
        if spec and spec not in out.values():
            out[f"sampled {len(out) + first} ({len(taken)} sites, {spent:.0%} alone)"] = spec
    return out


def _file(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)[:60] + ".onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--min-cosine", type=float, default=0.98)
    parser.add_argument("--max-ppl-increase", type=float, help="the budget for smollm2")
    parser.add_argument("--target", default="cpu", help="the planner's target")
    parser.add_argument("--random", type=int, default=0, help="sampled per-site combinations")
    parser.add_argument("--quantize", default="", help="a quantize spec (quantize:mode=dynamic) added alone and on"
                        " top of every uniform configuration (the planner offers it on the CPU)")
    parser.add_argument("--export", type=Path, help="write specs, verdicts and an fp16 original for planner_gpu.py")
    parser.add_argument("--no-time", action="store_true", help="do not time on this CPU")
    parser.add_argument("--retime", action="store_true", help="only time the configurations a previous run left in"
                        " --workdir (its table.json), e.g. again on a quiet machine")
    parser.add_argument("--caps", type=float, nargs=2, default=(0.8, 1.6), metavar=("LO", "HI"),
                        help="the sampled combinations' summed alone-uses stop at a cap drawn from [LO, HI]"
                        " times the budget (SmolLM2's drops compound about 2x: lower caps there)")
    parser.add_argument("--seed", type=int, default=0, help="the sampled combinations' seed")
    parser.add_argument("--extend", action="store_true", help="add --random N sampled combinations to a previous"
                        " run in --workdir (its table.json and planner.report.json), then time the original, the"
                        " pick and every configuration within the budget side by side")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "sparsec" / "bench" / "planner_pick")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "planner_pick_minilm.md")
    args = parser.parse_args()
    from sparsec.compiler import compile
    from sparsec.cost import load_profile, predict
    from sparsec.data import evaluation_data
    from sparsec.model_io import load_model
    from sparsec.models import build
    from sparsec.targets import get_target

    src = build(args.model)
    if args.retime:
        saved = json.loads((args.workdir / "table.json").read_text())
        args.budget, table, profile_source = saved["budget"], saved["configs"], saved["profile"]
        args.failed = saved.get("failed", {})
        paths = {"original": src, **{label: args.workdir / row["file"] for label, row in table.items()}}
        time_and_write(args, src, paths, table, profile_source)
        return
    # compile's keyword for --max-ppl-increase is max_ppl_ratio
    budget = {"max_ppl_ratio": args.max_ppl_increase} if args.max_ppl_increase else {"min_cosine": args.min_cosine}
    args.budget = (f"--max-ppl-increase {args.max_ppl_increase}" if args.max_ppl_increase
                   else f"--min-cosine {args.min_cosine}")
    if args.extend:
        extend(args, src, budget)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    results, paths, specs = {}, {"original": src}, {}
    args.failed = {}
    pick = compile(src, target=args.target, **budget, output=args.workdir / "planner.onnx",
                   best_effort=True, calib_samples=64, explain=True)
    results[PICK], paths[PICK] = pick, args.workdir / "planner.onnx"
    specs[PICK] = ";".join(pick.auto.specs) if pick.auto else ""
    specs.update(uniform_specs(args.quantize) if args.model == "minilm" else SMOLLM2_UNIFORM)
    if args.random and pick.auto:
        specs.update(sampled_specs(pick.auto.options, args.random, seed=args.seed, caps=tuple(args.caps)))
    for label, spec in specs.items():
        if label == PICK:
            continue
        # the same calibration data as the planner's passes: 48 of its 64 sentences
        try:
            results[label] = compile(src, target=args.target, passes=spec, **budget,
                                     output=args.workdir / _file(label), best_effort=True, calib_samples=48)
        except Exception as exc:  # one configuration that cannot be built does not end the sweep
            print(label, "FAILED:", exc, flush=True)
            args.failed[label] = f"{type(exc).__name__}: {exc}"
            continue
        paths[label] = args.workdir / _file(label)
        print(label, results[label].judgement.status, flush=True)
    feed = evaluation_data(load_model(src).model, 1).feeds[0]
    profile = load_profile(get_target(args.target))
    base = predict(src, feed, profile).seconds
    predicted = {label: base / predict(path, feed, profile).seconds for label, path in paths.items() if label != "original"}

    table = {label: {"spec": specs[label], "status": r.judgement.status, "cosine": fidelity_of(args, r),
                     "predicted": predicted[label], "file": paths[label].name} for label, r in results.items()}
    profile_source = pick.auto.profile if pick.auto else ""
    (args.workdir / "table.json").write_text(json.dumps({"budget": args.budget, "profile": profile_source,
                                                         "configs": table, "failed": args.failed}, indent=1))
    if args.export:
        export(args, src, feed, table, pick)
    if args.no_time:
        return
    time_and_write(args, src, paths, table, profile_source)


def fidelity_of(args, result) -> float:
    verdict = result.verdicts.get("real") or result.verdicts.get("random")
    return verdict.metrics["perplexity_ratio"] if args.max_ppl_increase else verdict.min_cosine


def extend(args, src, budget) -> None:
    """--extend: more sampled combinations for a previous run (see the option's help)."""
    from sparsec.compiler import compile
    from sparsec.cost import load_profile, predict
    from sparsec.data import evaluation_data
    from sparsec.model_io import load_model
    from sparsec.planner import Option
    from sparsec.targets import get_target

    saved = json.loads((args.workdir / "table.json").read_text())
    table, args.failed = saved["configs"], saved.get("failed", {})
    planner = json.loads((args.workdir / "planner.report.json").read_text())["planner"]
    fields = ("site", "family", "spec", "form", "saving", "use", "status", "reason")
    options = [Option(**{k: o[k] for k in fields}) for o in planner["options"]]
    known = {row["spec"] for row in table.values()}
    first = 1 + sum(label.startswith("sampled") for label in table)
    drawn = sampled_specs(options, args.random * 4, seed=args.seed, caps=tuple(args.caps), first=first)
    specs = dict(list(((k, v) for k, v in drawn.items() if v not in known))[:args.random])
    feed = evaluation_data(load_model(src).model, 1).feeds[0]
    profile = load_profile(get_target(args.target))
    base = predict(src, feed, profile).seconds
    for i, (label, spec) in enumerate(specs.items()):
        label = f"sampled {first + i} " + label.split(" ", 2)[2]  # numbered after the ones kept
        path = args.workdir / _file(label)
        try:
            result = compile(src, target=args.target, passes=spec, **budget, output=path, best_effort=True,
                             calib_samples=48)
        except Exception as exc:
            print(label, "FAILED:", exc, flush=True)
            args.failed[label] = f"{type(exc).__name__}: {exc}"
            continue
        table[label] = {"spec": spec, "status": result.judgement.status, "cosine": fidelity_of(args, result),
                        "predicted": base / predict(path, feed, profile).seconds, "file": path.name}
        print(label, result.judgement.status, table[label]["cosine"], flush=True)
    (args.workdir / "table.json").write_text(json.dumps({**saved, "configs": table, "failed": args.failed}, indent=1))
    args.note = (f"Extended with `--extend --random {args.random} --caps {args.caps[0]} {args.caps[1]} --seed"
                 f" {args.seed}`: only the original, the pick and the configurations within the budget are timed.")
    timed = [label for label, row in table.items() if label == PICK or row["status"] in ("WITHIN BUDGET", "EXACT")]
    paths = {"original": src, **{label: args.workdir / table[label]["file"] for label in timed}}
    time_and_write(args, src, paths, table, saved["profile"])


def time_and_write(args, src, paths, table, profile_source) -> None:
    from sparsec.data import evaluation_data
    from sparsec.model_io import load_model
    from sparsec.runtime.bench import compare_speed

    feed = evaluation_data(load_model(src).model, 1).feeds[0]
    speed = compare_speed(paths, feed, baseline="original", min_repeats=12, max_repeats=40)
    write_table(args.out, table, {k: (r.median, r.p10, r.p90) for k, r in speed.ratios.items()}, profile_source, args,
                f"ONNX Runtime CPU provider, {platform.machine()}, {os.cpu_count()} cores, fp32")


def export(args, src, feed, table, pick) -> None:
    """What planner_gpu.py needs: the configurations, an fp16 original, the workload."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    args.export.mkdir(parents=True, exist_ok=True)
    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(args.export / "minilm16.onnx"))
    np.savez(args.export / "feed.npz", **feed)
    (args.export / "configs.json").write_text(json.dumps(
        {"budget": args.budget, "model": args.model, "target": args.target, "planner": pick.auto.to_dict() if pick.auto else None,
         "configs": table}, indent=1))


def write_table(out: Path, table: dict, speed: dict, profile: str, args, where: str) -> None:
    """The table of ``table``'s configurations (spec, status, cosine, predicted) with ``speed``
    (label: (median, p10, p90)); ``profile``: the planner's cost-model profile."""
    meets = [label for label, row in table.items() if row["status"] in ("WITHIN BUDGET", "EXACT") and label in speed]
    fastest = max((label for label in meets if label != PICK), key=lambda k: speed[k][0], default=None)
    picked = speed[PICK][0]
    pick_specs = [s for s in table[PICK]["spec"].split(";") if s]
    sampled = sum(label.startswith("sampled") for label in table)
    within_5 = fastest is None or picked >= 0.95 * speed[fastest][0]
    metric = "perplexity ratio" if "ppl" in args.budget else "min output cosine"
    lines = [f"# The planner's pick against its space: {args.model}, {args.budget}, target {args.target}", "",
             f"{where}. Fidelity: {metric} on held-out {'text' if 'ppl' in args.budget else 'sentences'} (the"
             " compile's verdict, fp32 on the CPU); speed: original time / model time, every model interleaved in one process, median (p10-p90)"
             " on the first held-out input set; predicted: the cost model's ratio for the target"
             f" ({'measured profile' if 'measured' in profile else 'published peaks'}).",
             f"Configurations: the planner's pick, {len(table) - 1 - sampled} uniform ones and {sampled} sampled maximal"
             " per-site combinations of the options that alone fit the budget (benchmarks/planner_pick.py says how).",
             f"Planner: {len(pick_specs)} rewrites -- " + ", ".join(f"`{s}`" for s in pick_specs) + ".",
             f"**Fastest other configuration within the budget: {fastest or 'none'}"
             + (f" ({speed[fastest][0]:.2f}x)" if fastest else "")
             + f"; the planner's pick: {picked:.2f}x ({table[PICK]['status']})"
             + f"; within 5% of the fastest: {'yes' if within_5 else 'no'}.**",
             f"Command: `python benchmarks/planner_pick.py --model {args.model} {args.budget} --random {args.random}"
             f" --target {args.target}" + (f" --quantize {args.quantize}" if args.quantize else "") + "`"
             + (f" {args.note}" if getattr(args, "note", "") else ""), "",
             f"| configuration | verdict | {metric} | predicted | speedup |", "|---|---|---|---|---|"]
    for label, row in sorted(table.items(), key=lambda kv: (kv[0] != PICK, -speed.get(kv[0], (0,))[0])):
        m, lo, hi = speed.get(label, (None, None, None))
        timed = f"{m:.2f}x ({lo:.2f}-{hi:.2f})" if m is not None else "not timed"
        lines.append(f"| {label} | {row['status']} | {row['cosine']:.4f} | {row['predicted']:.2f}x | {timed} |")
    if args.failed:
        lines += ["", "Configurations that could not be built (not timed):", ""]
        lines += [f"- {label}: {why}" for label, why in args.failed.items()]
    lines += ["", "Specs of the sampled combinations:", ""]
    lines += [f"- {label}: `{row['spec']}`" for label, row in table.items() if label.startswith("sampled")]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
