"""`sparsec sweep` in this process against the same sweep on Ray: wall time and identical figures.

Runs one sweep of ``--candidates`` pass specs on an example model (each candidate compiled with
the model's built-in calibration text and verified on its held-out text, then all timed side by
side) in-process, and again with its compiles as Ray tasks (a local cluster, or ``--ray
ADDRESS``); reports the wall time of each, Ray's start-up, and whether every figure other than
the timings (verdict, fidelity, task metrics, size, parameters removed) is identical.

    python benchmarks/ray_sweep.py --model minilm --candidates 8 --tag cpu2
    python benchmarks/ray_sweep.py --model smollm2 --candidates 8 --tag h200_16cores
    python benchmarks/ray_sweep.py --model minilm --in-process --tag cpu2_local_only

Writes benchmarks/results/ray_sweep_<model>_<tag>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CANDIDATES = ["ffn-neurons:ratio=0.25", "ffn-neurons:ratio=0.5", "attention-heads:ratio=0.25",
              "attention-heads:ratio=0.5", "unstructured:sparsity=0.3", "unstructured:sparsity=0.5", "nm:n=2,m=4",
              "moe:experts=8,k=4", "ffn-neurons:ratio=0.75", "block:rows=16,cols=16,sparsity=0.5"]
TIMING = ("speedup", "median_ms", "speedup_p10", "speedup_p90", "pareto")


def figures(sweep) -> list[dict]:
    """The sweep's points without the timing columns (which no two runs share)."""
    return [{k: v for k, v in p.items() if k not in TIMING} for p in sweep.to_dict()["points"]]


def run(model: str, specs: list[str], engine, args) -> tuple[object, float]:
    from sparsec.sweep import sweep

    start = time.perf_counter()
    result = sweep(model, specs, threads=args.threads, repeats=args.repeats, engine=engine,
                   calib_samples=args.calib_samples, samples=1)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="an example model (sparsec zoo list)")
    parser.add_argument("--candidates", type=int, default=8, help=f"how many of the {len(CANDIDATES)} specs")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                      help="only the Ray run (a local cluster, or ADDRESS)")
    mode.add_argument("--in-process", action="store_true", help="only the in-process run")
    parser.add_argument("--tag", required=True, help="names the result files (machine, cores)")
    parser.add_argument("--threads", type=int, default=None, help="ORT threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calib-samples", type=int, default=16)
    args = parser.parse_args()

    from sparsec.engine import make_engine
    from sparsec.models import build

    specs = CANDIDATES[:args.candidates]
    src = str(build(args.model))
    runs = {}
    if args.ray is None:
        result, seconds = run(src, specs, None, args)
        runs["in-process"] = {"seconds": seconds, "sweep": result}
    if not args.in_process:
        start = time.perf_counter()
        with make_engine(args.ray or "local") as engine:
            startup = time.perf_counter() - start
            result, seconds = run(src, specs, engine, args)
            runs["ray"] = {"seconds": seconds, "startup_seconds": startup, "engine": engine.name, "sweep": result}
    identical = None
    if len(runs) == 2:
        identical = figures(runs["in-process"]["sweep"]) == figures(runs["ray"]["sweep"])
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    data = {"model": args.model, "candidates": specs, "machine": machine, "calib_samples": args.calib_samples,
            "identical_figures": identical,
            "runs": {k: {**{n: v for n, v in r.items() if n != "sweep"}, "sweep": r["sweep"].to_dict()}
                     for k, r in runs.items()}}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"ray_sweep_{args.model}_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [f"# sweep of {len(specs)} candidates on {args.model}: in-process vs Ray ({args.tag})", "",
             f"Machine: {machine}. Each candidate compiled with {args.calib_samples} calibration samples of the"
             " built-in text and verified on its held-out text (pydoc evaluation split), then all timed side by side"
             " (`python benchmarks/ray_sweep.py " + " ".join(os.sys.argv[1:]) + "`).", "",
             "| run | wall s (sweep) | Ray start-up s | engine |", "|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['seconds']:.1f} | {r.get('startup_seconds', 0):.1f} | {r.get('engine', '-')} |")
    if identical is not None:
        lines += ["", f"Figures other than timings (verdict, fidelity, task metrics, size, parameters removed)"
                  f" identical: **{'yes' if identical else 'NO'}**."]
    for name, r in runs.items():
        lines += ["", f"## {name}", "", *r["sweep"].table()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
