"""The cost model against measurement on this CPU: predicted against measured speedup for candidate
configurations across the zoo (structured, MoE, attention, weight sparsity, combinations).

Each candidate is compiled by ``sparsec.compile`` (``best_effort``: fidelity is not the point
here); its speedup is predicted by :func:`sparsec.cost.predict` (the profile of ``sparsec
calibrate``, measured first in the same run) and measured by
:func:`sparsec.runtime.bench.compare_speed` (every candidate of a model interleaved with the
original in one process, median of rounds). Reported: Spearman's rank correlation and whether
the prediction is on the right side of 1 (within +-3% counts as "no change") for every candidate.

    python benchmarks/cost_model.py      # writes results/cost_model_cpu.md; ~15 min on 2 cores
    python benchmarks/cost_model.py --models minilm --quantized --out benchmarks/results/cost_model_cpu_quantized.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEADBAND = 0.03

CANDIDATES = {
    "minilm": {
        "ffn 25%": "ffn-neurons:ratio=0.25",
        "ffn 50%": "ffn-neurons:ratio=0.5",
        "ffn 75%": "ffn-neurons:ratio=0.75",
        "heads 25%": "attention-heads:ratio=0.25",
        "heads 50%": "attention-heads:ratio=0.5",
        "ffn 50% + heads 25%": "attention-heads:ratio=0.25;ffn-neurons:ratio=0.5",
        "moe 8, k=4": "moe:experts=8,k=4",
        "moe 8, k=2": "moe:experts=8,k=2",
        "moe 8, k=1": "moe:experts=8,k=1",
        "2:4 weights": "nm:n=2,m=4",
        "unstructured 50%": "unstructured:sparsity=0.5",
        "attention window 32 (mask)": "attention:window=32",
    },
    "smollm2": {
        "attention fused": "attention",
        "attention window 128": "attention:window=128",
        "ffn 50%": "ffn-neurons:ratio=0.5",
        "ffn 50% + fused": "ffn-neurons:ratio=0.5;attention",
        "moe 8, k=4": "moe:experts=8,k=4",
    },
}


# ONNX Runtime's quantization, alone and under structured pruning (--quantized): the planner weighs
# these at the quantized rates `sparsec calibrate` measures.
QUANTIZED = {
    "minilm": {
        "int8": "quantize:mode=dynamic",
        "int4": "quantize:mode=int4",
        "ffn 50% + int8": "ffn-neurons:ratio=0.5;quantize:mode=dynamic",
        "heads 25% + int8": "attention-heads:ratio=0.25;quantize:mode=dynamic",
        "ffn 75% + heads 50% + int8": "attention-heads:ratio=0.5;ffn-neurons:ratio=0.75;quantize:mode=dynamic",
        "ffn 50% + int4": "ffn-neurons:ratio=0.5;quantize:mode=int4",
    },
}


def workload(name: str):
    from sparsec.data import evaluation_data
    from sparsec.model_io import load_model
    from sparsec.models import build

    data = evaluation_data(load_model(build(name)).model, 1)
    return data.feeds[0]


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def side(x: float) -> int:
    return 0 if abs(x - 1) <= DEADBAND else (1 if x > 1 else -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CANDIDATES))
    parser.add_argument("--quantized", action="store_true",
                        help="also the quantized candidates (int8 dynamic, int4, with structured pruning)")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "sparsec" / "bench" / "cost_model")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cost_model_cpu.md")
    args = parser.parse_args()
    from sparsec.compiler import compile
    from sparsec.cost import calibrate, predict, save_profile
    from sparsec.models import build
    from sparsec.runtime.bench import compare_speed
    from sparsec.targets import get_target

    target = get_target("cpu")
    profile = calibrate(target)
    save_profile(profile, "cpu")
    print("profile:", profile.source, flush=True)
    rows = []
    for model in args.models:
        src = build(model)
        feed = workload(model)
        paths = {"original": src}
        candidates = {**CANDIDATES[model], **(QUANTIZED.get(model, {}) if args.quantized else {})}
        for label, spec in candidates.items():
            path = args.workdir / model / f"{label.replace(' ', '_').replace('%', 'pc').replace(':', '').replace(',', '')}.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                compile(src, passes=spec, output=path, best_effort=True, samples=1)
            paths[label] = path
        predicted = {label: predict(path, feed, profile).seconds for label, path in paths.items()}
        measured = compare_speed(paths, feed, baseline="original", min_repeats=12, max_repeats=40)
        for label, spec in candidates.items():
            r = measured.ratios[label]
            rows.append({"model": model, "candidate": label, "spec": spec,
                         "predicted": predicted["original"] / predicted[label], "measured": r.median,
                         "p10": r.p10, "p90": r.p90, "predicted_ms": predicted[label] * 1e3,
                         "measured_ms": measured.timings[label].median_ms})
            print(rows[-1], flush=True)
        rows.append({"model": model, "candidate": "original", "spec": "", "predicted": 1.0, "measured": 1.0,
                     "p10": 1.0, "p90": 1.0, "predicted_ms": predicted["original"] * 1e3,
                     "measured_ms": measured.timings["original"].median_ms, "baseline": True})
    cands = [r for r in rows if not r.get("baseline")]
    rho = spearman([r["predicted"] for r in cands], [r["measured"] for r in cands])
    right = [side(r["predicted"]) == side(r["measured"]) for r in cands]
    lines = ["# Cost model against measurement, CPU", "",
             f"ONNX Runtime CPU provider, {platform.machine()}, {os.cpu_count()} cores. Profile: {profile.source}."
             f" Workload: each model's first held-out evaluation input set (MiniLM: 16 sentences; SmolLM2: one"
             f" 512-token window). Predicted: `sparsec.cost.predict` on the original and the candidate; measured:"
             f" original time / candidate time, interleaved, median (p10-p90).",
             f"**Spearman rank correlation {rho:.3f} over {len(cands)} candidates; prediction on the right side of 1"
             f" (+-{DEADBAND:.0%} = no change) for {sum(right)} of {len(cands)}.**",
             f"Command: `{' '.join(['python', 'benchmarks/cost_model.py', *sys.argv[1:]])}`", "",
             "| model | candidate | spec | predicted | measured | side right | predicted ms | measured ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "" if r.get("baseline") else ("yes" if side(r["predicted"]) == side(r["measured"]) else "NO")
        lines.append(f"| {r['model']} | {r['candidate']} | `{r['spec']}` | {r['predicted']:.2f}x |"
                     f" {r['measured']:.2f}x ({r['p10']:.2f}-{r['p90']:.2f}) | {ok} | {r['predicted_ms']:.1f} |"
                     f" {r['measured_ms']:.1f} |")
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"spearman": rho, "rows": rows, "profile": profile.to_dict()},
                                                        indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
