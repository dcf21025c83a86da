"""How much `sparsec calibrate`'s profile moves between calibrations of one machine.

Runs ``sparsec.cost.calibrate`` for the CPU ``--runs`` times, each in a fresh process; with
``--against DIR`` (another sparsec installed there, e.g. ``pip install --no-deps --target DIR``
of an older wheel) it alternates the two, so both see the same machine. Reported per build: the
large-Add bandwidth, each quantized form's rate as a multiple of the float rate at each product
size, and each operator's rate: min, median and max over the runs, and max/min.

    python benchmarks/calibrate_stability.py --runs 5
    python benchmarks/calibrate_stability.py --runs 5 --against /tmp/oldsp --against-label db4df05

Writes benchmarks/results/calibrate_stability_<tag>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import site
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# run in a process that imports sparsec from `path` first (without site's .pth files, which would
# put an editable install of this tree ahead of it), or as installed
PROBE = """
import json, sys
sys.path[:0] = [p for p in {paths!r} if p]
from sparsec.cost import calibrate
from sparsec.targets import get_target
print(json.dumps(calibrate(get_target("cpu"), {threads}).to_dict()))
"""


def one(path: str | None, threads: int | None) -> dict:
    paths = [path, *site.getsitepackages()] if path else []
    command = [sys.executable, *(["-S"] if path else []), "-c", PROBE.format(paths=paths, threads=threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "max_over_min": max(values) / min(values)}


def summary(profiles: list[dict]) -> dict:
    floats = [dict(map(tuple, p["gemm"])) for p in profiles]
    out = {"bandwidth_GBs": spread([p["bandwidth"] / 1e9 for p in profiles]), "quantized": {}, "operators": {}}
    for form in profiles[0]["quantized"]:
        sizes = [f for f, _ in profiles[0]["quantized"][form]]
        out["quantized"][form] = {
            f"{f / 1e6:.0f} MFLOP": spread([dict(map(tuple, p["quantized"][form]))[f] / fl[f]
                                            for p, fl in zip(profiles, floats)]) for f in sizes}
    for op, points in profiles[0].get("op_bandwidth", {}).items():
        for i, point in enumerate(points if isinstance(points, list) else [points]):
            label = f"{op} at {point[0] / 2**20:.2g} MiB" if isinstance(point, list) else op
            out["operators"][label] = spread([(p["op_bandwidth"][op][i][1] if isinstance(point, list)
                                               else p["op_bandwidth"][op]) / 1e9 for p in profiles])
    return out


def table(data: dict) -> list[str]:
    lines = [f"# sparsec calibrate, {data['runs']} runs per build: how much the profile moves", "",
             f"Machine: {data['machine']}; each run a fresh process, the builds alternated (`{data['command']}`).",
             "Quantized rates as multiples of the same run's float rate at that product size; bandwidth and"
             " operator rates in GB/s. min / median / max over the runs, and max/min.", "",
             "| quantity | " + " | ".join(data["builds"]) + " |", "|---|" + "---|" * len(data["builds"])]

    def cell(s: dict) -> str:
        return f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f} ({s['max_over_min']:.2f}x)"

    first = data["builds"][next(iter(data["builds"]))]
    rows = [("bandwidth GB/s", ["bandwidth_GBs"])]
    rows += [(f"{form} at {size}", ["quantized", form, size]) for form, sizes in first["quantized"].items()
             for size in sizes]
    rows += [(f"{op} GB/s", ["operators", op]) for op in first["operators"]]
    for label, keys in rows:
        cells = []
        for build in data["builds"].values():
            node = build
            for k in keys:
                node = node.get(k, {}) if isinstance(node, dict) else {}
            cells.append(cell(node) if node else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--against", default=None, help="a directory with another sparsec installed")
    parser.add_argument("--against-label", default="other build")
    parser.add_argument("--tag", default="cpu2")
    args = parser.parse_args()
    builds = {"this tree": None, **({args.against_label: args.against} if args.against else {})}
    profiles: dict[str, list[dict]] = {label: [] for label in builds}
    for i in range(args.runs):
        for label, path in builds.items():
            profiles[label].append(one(path, args.threads))
            print(f"run {i + 1}/{args.runs} {label}: bandwidth {profiles[label][-1]['bandwidth'] / 1e9:.1f} GB/s",
                  flush=True)
    data = {"runs": args.runs, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": "python benchmarks/calibrate_stability.py " + " ".join(sys.argv[1:]),
            "builds": {label: summary(p) for label, p in profiles.items()}, "profiles": profiles}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"calibrate_stability_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    lines = table(data)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
