"""Where the cost model's time goes against where ONNX Runtime's goes, per operator, on this CPU.

For the original model and one candidate (default: int8 dynamic quantization, the candidate
the cost model over-predicts most in ``cost_model_cpu_quantized.md``), the predicted seconds of
every node (:func:`sparsec.cost.predict` with the saved ``sparsec calibrate`` profile) are summed
per operator, beside the measured kernel time per operator from ONNX Runtime's profiler (the
optimized graph ORT runs, so fused operators appear under their own names): median over runs
of each operator's summed kernel time in one run, and the run's own median wall time. The two
models run interleaved in one process.

    python benchmarks/cost_breakdown.py --model minilm --passes "quantize:mode=dynamic" --tag int8

Writes benchmarks/results/cost_breakdown_<model>_<tag>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
# products in the graph ORT runs (its fusions included): the rest is memory-bound work
PRODUCTS = {"MatMul", "Gemm", "MatMulInteger", "MatMulNBits", "FusedMatMul", "DynamicQuantizeMatMul",
            "MatMulIntegerToFloat", "QGemm", "FusedGemm"}


def predicted_by_op(path: Path, feed, profile) -> tuple[dict[str, list[float]], float]:
    """op -> [nodes, seconds] over the graph as written, and the whole prediction."""
    from sparsec.cost import predict

    prediction = predict(path, feed, profile)
    out: dict[str, list[float]] = {}
    for cost, seconds in prediction.nodes:
        row = out.setdefault(cost.op, [0, 0.0])
        row[0] += 1
        row[1] += seconds
    return out, prediction.seconds


def measured_by_op(trace: Path, skip: int) -> tuple[dict[str, list[float]], float]:
    """op -> [nodes per run, median seconds per run] from an ORT profile, and the median run,
    the first ``skip`` runs (warm-up) left out."""
    events = json.loads(trace.read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[skip:]
    per_run: list[dict[str, list[float]]] = [{} for _ in runs]
    starts = np.array([r[0] for r in runs])
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i < 0 or e["ts"] > runs[i][1]:
            continue
        row = per_run[i].setdefault(e["args"]["op_name"], [0, 0.0])
        row[0] += 1
        row[1] += e["dur"] * 1e-6
    ops = sorted({op for run in per_run for op in run})
    out = {op: [max(run.get(op, [0, 0.0])[0] for run in per_run),
                float(np.median([run.get(op, [0, 0.0])[1] for run in per_run]))] for op in ops}
    return out, float(np.median([(b - a) * 1e-6 for a, b in runs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--passes", default="quantize:mode=dynamic")
    parser.add_argument("--tag", default="int8", help="names the result files")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="ORT threads (default: the profile's)")
    args = parser.parse_args()

    from sparsec.compiler import compile
    from sparsec.cost import load_profile
    from sparsec.data import evaluation_data
    from sparsec.model_io import load_model
    from sparsec.models import build
    from sparsec.runtime.bench import timed_calls
    from sparsec.targets import get_target

    target = get_target("cpu")
    profile = load_profile(target)
    threads = args.threads or profile.threads or os.cpu_count()
    src = Path(build(args.model))
    feed = evaluation_data(load_model(src).model, 1).feeds[0]
    runner = target.runner(threads)
    with tempfile.TemporaryDirectory(prefix="sparsec-breakdown-") as tmp:
        candidate = Path(tmp) / "candidate.onnx"
        compile(src, passes=args.passes, output=candidate, best_effort=True, samples=1)
        paths = {"original": src, "candidate": candidate}
        sessions = {k: runner.session(p, threads=threads, spin=False, profile=Path(tmp) / k) for k, p in paths.items()}
        calls = timed_calls(runner, sessions, feed, {})
        warmup = 3
        for _ in range(warmup + args.repeats):
            for call in calls.values():  # interleaved: both see the same machine
                call()
        traces = {k: Path(s.end_profiling()) for k, s in sessions.items()}
        data = {"model": args.model, "passes": args.passes, "threads": threads, "repeats": args.repeats,
                "profile": profile.source, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "command": "python benchmarks/cost_breakdown.py " + " ".join(sys.argv[1:]), "models": {}}
        for k, path in paths.items():
            predicted, total = predicted_by_op(path, feed, profile)
            measured, run = measured_by_op(traces[k], warmup)
            data["models"][k] = {"predicted": predicted, "predicted_seconds": total,
                                 "measured": measured, "measured_run_seconds": run}
    lines = table(data)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"cost_breakdown_{args.model}_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def table(data: dict) -> list[str]:
    m = data["models"]
    lines = [f"# Cost model per operator against ONNX Runtime's profiler: {data['model']}, `{data['passes']}`", "",
             f"Machine: {data['machine']}, {data['threads']} ORT threads; {data['repeats']} runs of each model,"
             f" interleaved, after 3 warm-up runs; profile: {data['profile']}. Predicted: per node of the graph as"
             " written; measured: kernel time per operator of the graph ORT runs (its fusions under their own names),"
             f" median over runs (`{data['command']}`).", "",
             "| | original predicted ms | original measured ms | candidate predicted ms | candidate measured ms |",
             "|---|---|---|---|---|"]

    def part(which: str, side: str, products: bool) -> float:
        return sum(v[1] for op, v in m[which][side].items() if (op in PRODUCTS) == products) * 1e3

    for name, products in (("products", True), ("everything else", False)):
        lines.append(f"| {name} | {part('original', 'predicted', products):.1f} |"
                     f" {part('original', 'measured', products):.1f} | {part('candidate', 'predicted', products):.1f}"
                     f" | {part('candidate', 'measured', products):.1f} |")
    kernels = {k: sum(v[1] for v in m[k]["measured"].values()) * 1e3 for k in m}
    lines.append(f"| sum of kernels | {m['original']['predicted_seconds'] * 1e3:.1f} | {kernels['original']:.1f} |"
                 f" {m['candidate']['predicted_seconds'] * 1e3:.1f} | {kernels['candidate']:.1f} |")
    lines.append(f"| whole run (measured) | | {m['original']['measured_run_seconds'] * 1e3:.1f} | |"
                 f" {m['candidate']['measured_run_seconds'] * 1e3:.1f} |")
    pred = m["original"]["predicted_seconds"] / m["candidate"]["predicted_seconds"]
    meas = m["original"]["measured_run_seconds"] / m["candidate"]["measured_run_seconds"]
    lines += ["", f"Speedup predicted {pred:.2f}x, measured (median runs) {meas:.2f}x.", "",
              "| model | operator | nodes | predicted ms | measured ms |", "|---|---|---|---|---|"]
    for which in ("original", "candidate"):
        ops = sorted(set(m[which]["predicted"]) | set(m[which]["measured"]),
                     key=lambda op: -max(m[which]["predicted"].get(op, [0, 0])[1], m[which]["measured"].get(op, [0, 0])[1]))
        for op in ops:
            p, q = m[which]["predicted"].get(op), m[which]["measured"].get(op)
            nodes = f"{p[0] if p else 0} / {q[0] if q else 0}"
            lines.append(f"| {which} | {op} | {nodes} | {p[1] * 1e3:.2f} |" if p else f"| {which} | {op} | {nodes} | - |")
            lines[-1] += f" {q[1] * 1e3:.2f} |" if q else " - |"
    lines += ["", "Nodes: in the graph as written / in the graph ORT runs."]
    return lines


if __name__ == "__main__":
    main()
