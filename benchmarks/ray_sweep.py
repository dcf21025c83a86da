"""`sparsec sweep` in this process against the same sweep on Ray: wall time and identical figures.

Runs one sweep of ``--candidates`` pass specs on an example model (each candidate compiled with
the model's built-in calibration text and verified on its held-out text, then all timed side by
side) in-process, and again with its compiles as Ray tasks (a local cluster, or ``--ray
ADDRESS``); reports the wall time of each, Ray's start-up, and whether every figure other than
the timings (verdict, fidelity, task metrics, size, parameters removed) is identical.

    python benchmarks/ray_sweep.py --model minilm --candidates 8 --tag cpu2
    python benchmarks/ray_sweep.py --model smollm2 --candidates 8 --tag h200_16cores
    python benchmarks/ray_sweep.py --model minilm --in-process --tag cpu2_local_only

Writes benchmarks/results/ray_sweep_<model>_<tag>.md and .json. Where one command may not run
both halves (a time limit per command), run each with ``--out-json`` (that half's JSON, no
files in results/) and join them into the one table with ``--combine``:

    python benchmarks/ray_sweep.py --model smollm2 --in-process --tag h200_16cores --out-json local.json
    python benchmarks/ray_sweep.py --model smollm2 --ray --tag h200_16cores --out-json ray.json
    python benchmarks/ray_sweep.py --combine local.json ray.json --tag h200_16cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CANDIDATES = ["ffn-neurons:ratio=0.25", "ffn-neurons:ratio=0.5", "attention-heads:ratio=0.25",
              "attention-heads:ratio=0.5", "unstructured:sparsity=0.3", "unstructured:sparsity=0.5", "nm:n=2,m=4",
              "moe:experts=8,k=4", "ffn-neurons:ratio=0.75", "block:rows=16,cols=16,sparsity=0.5"]
TIMING = ("speedup", "median_ms", "speedup_p10", "speedup_p90", "pareto")
# what two halves must share to go into one table
SETTINGS = ("model", "candidates", "machine", "calib_samples", "repeats", "threads", "torch_threads")


def figures(sweep: dict) -> list[dict]:
    """A sweep's points (as in its JSON) without the timing columns (which no two runs share)."""
    return [{k: v for k, v in p.items() if k not in TIMING} for p in sweep["points"]]


def run(model: str, specs: list[str], engine, args) -> tuple[dict, float, list[float]]:
    """The sweep, its wall time, and the machine's 1-minute load average before and after it
    (other work on the machine stretches both wall times and widens the timing spread)."""
    from sparsec.sweep import sweep

    load = [os.getloadavg()[0]]
    start = time.perf_counter()
    result = sweep(model, specs, threads=args.threads, repeats=args.repeats, engine=engine,
                   calib_samples=args.calib_samples, samples=1)
    seconds = time.perf_counter() - start
    return result.to_dict(), seconds, [*load, os.getloadavg()[0]]


def measure(args) -> dict:
    """One or both halves on this machine: the settings, and each run's wall time and sweep."""
    import torch

    from sparsec.engine import make_engine
    from sparsec.models import build

    specs = CANDIDATES[:args.candidates]
    src = str(build(args.model))
    command = "python benchmarks/ray_sweep.py " + " ".join(sys.argv[1:])
    runs = {}
    if args.ray is None:
        sweep, seconds, load = run(src, specs, None, args)
        runs["in-process"] = {"seconds": seconds, "load": load, "command": command, "sweep": sweep}
    if not args.in_process:
        start = time.perf_counter()
        with make_engine(args.ray or "local", threads=args.threads) as engine:
            startup = time.perf_counter() - start
            sweep, seconds, load = run(src, specs, engine, args)
            runs["ray"] = {"seconds": seconds, "load": load, "startup_seconds": startup, "engine": engine.name,
                           "command": command, "sweep": sweep}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    return {"model": args.model, "candidates": specs, "machine": machine, "calib_samples": args.calib_samples,
            "repeats": args.repeats, "threads": args.threads, "torch_threads": torch.get_num_threads(), "runs": runs}


def combine(parts: list[dict]) -> dict:
    """The halves of one comparison, measured by separate commands, as one result."""
    first = parts[0]
    runs = {}
    for part in parts:
        differ = [k for k in SETTINGS if part.get(k) != first.get(k)]
        if differ:
            sys.exit(f"cannot combine: the halves differ in {', '.join(differ)}")
        for name, r in part["runs"].items():
            if name in runs:
                sys.exit(f"cannot combine: two '{name}' runs")
            runs[name] = r
    return {**{k: first.get(k) for k in SETTINGS}, "runs": runs}


def with_verdict(data: dict) -> dict:
    """``data`` with ``identical_figures``: None unless it holds both runs."""
    runs = data["runs"]
    identical = None
    if {"in-process", "ray"} <= runs.keys():
        identical = figures(runs["in-process"]["sweep"]) == figures(runs["ray"]["sweep"])
    return {**{k: v for k, v in data.items() if k != "runs"}, "identical_figures": identical, "runs": runs}


def table(data: dict, tag: str) -> list[str]:
    from sparsec.sweep import Sweep, SweepPoint

    runs, identical = data["runs"], data["identical_figures"]
    commands = list(dict.fromkeys(f"`{r['command']}`" for r in runs.values() if "command" in r))
    lines = [f"# sweep of {len(data['candidates'])} candidates on {data['model']}: in-process vs Ray ({tag})", "",
             f"Machine: {data['machine']}. Each candidate compiled with {data['calib_samples']} calibration samples"
             " of the built-in text and verified on its held-out text (pydoc evaluation split), then all timed side"
             f" by side (at least {data.get('repeats', 15)} repeats) ({'; '.join(commands)}).",
             f"Threads: ONNX Runtime {data.get('threads') or 'one per core'}, torch and BLAS"
             f" {data.get('torch_threads') or 'one per core'} (`OMP_NUM_THREADS`), in both runs.", "",
             "| run | wall s (sweep) | Ray start-up s | engine | load before / after |", "|---|---|---|---|---|"]
    for name, r in runs.items():
        load = " / ".join(f"{x:.1f}" for x in r["load"]) if "load" in r else "-"
        lines.append(f"| {name} | {r['seconds']:.1f} | {r.get('startup_seconds', 0):.1f} | {r.get('engine', '-')}"
                     f" | {load} |")
    if identical is not None:
        lines += ["", f"Figures other than timings (verdict, fidelity, task metrics, size, parameters removed)"
                  f" identical: **{'yes' if identical else 'NO'}**."]
    for name, r in runs.items():
        sweep = Sweep(**{**r["sweep"], "points": [SweepPoint(**p) for p in r["sweep"]["points"]]})
        lines += ["", f"## {name}", "", *sweep.table()]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="an example model (sparsec zoo list)")
    parser.add_argument("--candidates", type=int, default=8, help=f"how many of the {len(CANDIDATES)} specs")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                      help="only the Ray run (a local cluster, or ADDRESS)")
    mode.add_argument("--in-process", action="store_true", help="only the in-process run")
    mode.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                      help="measure nothing: join halves written with --out-json into the results (one half"
                           " alone: its table, no verdict on identical figures)")
    parser.add_argument("--tag", required=True, help="names the result files (machine, cores)")
    parser.add_argument("--out-json", type=Path, default=None,
                        help="write the JSON here (for --combine) and no files in results/")
    parser.add_argument("--threads", type=int, default=None, help="ORT threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calib-samples", type=int, default=16)
    args = parser.parse_args()

    if args.combine:
        data = combine([json.loads(p.read_text()) for p in args.combine])
    else:
        data = measure(args)
    data = with_verdict(data)
    lines = table(data, args.tag)
    text = json.dumps(data, indent=2) + "\n"
    if args.out_json:
        args.out_json.write_text(text)
    else:
        RESULTS.mkdir(exist_ok=True)
        stem = RESULTS / f"ray_sweep_{data['model']}_{args.tag}"
        stem.with_suffix(".json").write_text(text)
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
