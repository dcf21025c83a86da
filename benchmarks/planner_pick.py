"""The planner's pick against a sweep of uniform configurations, MiniLM on this CPU.

The planner (``sparsec compile --min-cosine B``, no passes) chooses per site; the sweep compiles
every uniform combination of the same families -- each FFN at 0/25/50/75% of its neurons, each
attention block at 0/25/50% of its heads, or every FFN as MoE with 4 or 2 of 8 experts -- with
the same calibration data. Every candidate is verified on the held-out sentences with the same
budget (``best_effort``, so the ones below it are still measured) and all are timed side by side
with the original in one process. Reported: which meet the budget, the fastest that does, and
the planner's pick.

The planner's own space is larger (a ratio per site), so it can meet budgets no uniform
configuration meets; a full sweep of its space (5 x 5 x ... options per site) is not feasible.

    python benchmarks/planner_pick.py --min-cosine 0.98   # writes results/planner_pick_minilm.md
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def uniform_specs() -> dict[str, str]:
    out = {}
    for ffn, heads in itertools.product((0, 0.25, 0.5, 0.75), (0, 0.25, 0.5)):
        if not ffn and not heads:
            continue
        parts = ([f"attention-heads:ratio={heads}"] if heads else []) + ([f"ffn-neurons:ratio={ffn}"] if ffn else [])
        out[f"ffn {ffn:.0%} + heads {heads:.0%}"] = ";".join(parts)
    for k in (4, 2):
        out[f"moe 8, k={k}"] = f"moe:experts=8,k={k}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-cosine", type=float, default=0.98)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "sparsec" / "bench" / "planner_pick")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "planner_pick_minilm.md")
    args = parser.parse_args()
    from sparsec.compiler import compile
    from sparsec.data import evaluation_data
    from sparsec.model_io import load_model
    from sparsec.models import build
    from sparsec.runtime.bench import compare_speed

    src = build("minilm")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results, paths = {}, {"original": src}
    pick = compile(src, min_cosine=args.min_cosine, output=args.workdir / "planner.onnx", best_effort=True,
                   calib_samples=64)
    results["planner's pick"] = pick
    paths["planner's pick"] = args.workdir / "planner.onnx"
    for label, spec in uniform_specs().items():
        path = args.workdir / f"{label.replace(' ', '_').replace('%', 'pc').replace('+', 'p').replace(',', '')}.onnx"
        # the same calibration data as the planner's passes: 48 of its 64 sentences
        results[label] = compile(src, passes=spec, min_cosine=args.min_cosine, output=path, best_effort=True,
                                 calib_samples=48)
        paths[label] = path
        print(label, results[label].judgement.status, flush=True)
    feed = evaluation_data(load_model(src).model, 1).feeds[0]
    speed = compare_speed(paths, feed, baseline="original", min_repeats=12, max_repeats=40)

    def fidelity(result) -> float:
        verdict = result.verdicts.get("real") or result.verdicts.get("random")
        return verdict.min_cosine

    meets = {label: r for label, r in results.items() if r.judgement.status == "WITHIN BUDGET"}
    fastest = max((label for label in meets if label != "planner's pick"), key=lambda k: speed.ratios[k].median,
                  default=None)
    picked = speed.ratios["planner's pick"]
    lines = [f"# The planner's pick against uniform configurations: MiniLM, --min-cosine {args.min_cosine}", "",
             f"ONNX Runtime CPU provider, {platform.machine()}, {os.cpu_count()} cores. Fidelity: min output cosine"
             " on the held-out sentences (the compile's verdict); speed: original time / model time, every model"
             " interleaved in one process, median (p10-p90) on 16 held-out sentences.",
             f"Planner: {len(pick.auto.specs) if pick.auto else 0} rewrites -- "
             + ", ".join(f"`{s}`" for s in (pick.auto.specs if pick.auto else [])) + ".",
             f"**Fastest uniform configuration within the budget: {fastest or 'none'}"
             + (f" ({speed.ratios[fastest].median:.2f}x)" if fastest else "")
             + f"; the planner's pick: {picked.median:.2f}x ({pick.judgement.status}).**",
             "Command: `python benchmarks/planner_pick.py --min-cosine " + f"{args.min_cosine}`", "",
             "| configuration | verdict | min output cosine | speedup |", "|---|---|---|---|"]
    for label, result in results.items():
        r = speed.ratios[label]
        lines.append(f"| {label} | {result.judgement.status} | {fidelity(result):.4f} | {r.median:.2f}x"
                     f" ({r.p10:.2f}-{r.p90:.2f}) |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
