"""A model beyond protobuf's 2 GB limit: compile it with bounded memory.

Builds the ``large-decoder`` example (about 3.4 GB of random float32 weights, written without
torch), then runs ``sparsec compile`` on it in a child process (2:4 pruning of every MatMul
weight except the head, then compressed storage) while sampling the child's memory every 0.1 s
from /proc. Reported: peak RSS, peak anonymous memory (RssAnon: what the process really holds;
memory-mapped weights are file-backed and the kernel can drop them), the largest single tensor,
time, and the verification verdict (run in stages).

    python benchmarks/large_model.py                      # magnitude -> results/large_model.md
    python benchmarks/large_model.py --method sparsegpt   # -> results/large_model_sparsegpt.md

With ``--method sparsegpt`` the compile is calibration-aware: ``--calib-samples`` sets of
``--calib-seqlen`` random token ids (the weights are random too, so no text is more real), the
layers captured stage by stage and each stage's sites solved (``--jobs`` threads). Its bound:
the largest layer's weight and SparseGPT's K x K Hessian with the copies the solve makes, plus
one stage's activations (tokens x width x 4 bytes).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def per_stage(samples: list[tuple[float, int]], stages: dict[str, float], total: float) -> str:
    """The peak of the samples within each compile stage. The stages ran back to back and the
    last ended as the child exited, so their windows are laid out back from the end (the
    child's start-up before its first stage is not in any)."""
    windows, end = [], total
    for name, seconds in reversed(list(stages.items())):
        windows.append((name, end - seconds, end))
        end -= seconds
    parts = []
    for name, a, b in reversed(windows):
        inside = [anon for t, anon in samples if a <= t <= b]
        if inside:
            parts.append(f"{name} {max(inside) / 2**20:,.0f} MiB")
    return ", ".join(parts)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("magnitude", "sparsegpt"), default="magnitude")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=128)
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args()

    import numpy as np

    from sparsec.model_io import load_model
    from sparsec.models import build

    start = time.perf_counter()
    src = build("large-decoder")
    build_s = time.perf_counter() - start
    loaded = load_model(src)
    sizes = [v.const_value.nbytes for v in loaded.model.graph.initializers.values()]
    largest, total = max(sizes), sum(sizes)
    pruned = [s for name, s in zip(loaded.model.graph.initializers, sizes) if ".mlp." in name]
    hidden, ffn = (loaded.model.graph.initializers["layers.0.mlp.down_proj.weight"].shape[i] for i in (1, 0))
    del loaded
    with tempfile.TemporaryDirectory(dir=Path(src).parent) as tmp:
        out = Path(tmp) / "large.sparse.onnx"
        passes = "nm;compress"
        cmd = [sys.executable, "-m", "sparsec", "--quiet", "compile", str(src), "-o", str(out), "--samples", "1",
               "--dim", "sequence=8", "--json", "--best-effort"]  # random weights: fidelity is not the point
        if args.method == "sparsegpt":
            rng = np.random.default_rng(0)
            calib = Path(tmp) / "calib.npz"
            np.savez(calib, **{f"{i}/input_ids": rng.integers(0, 32000, (1, args.calib_seqlen))
                               for i in range(args.calib_samples)})
            passes = "nm:method=sparsegpt;compress"
            cmd += ["--calib", str(calib)] + (["--jobs", str(args.jobs)] if args.jobs else [])
        cmd += ["--passes", passes]
        peak = {"VmRSS": 0, "RssAnon": 0}
        samples: list[tuple[float, int]] = []  # (seconds since start, RssAnon)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def sample() -> None:
            while proc.poll() is None:
                try:
                    status = _status(proc.pid)
                except (FileNotFoundError, ProcessLookupError):
                    break
                for key in peak:
                    peak[key] = max(peak[key], status.get(key, 0))
                samples.append((time.perf_counter() - start, status.get("RssAnon", 0)))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        stdout, stderr = proc.communicate()
        sampler.join()
        seconds = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"compile failed ({proc.returncode}): {stderr[-2000:]}")
        report = json.loads(stdout)
        out_bytes = report["sizes"]["output_bytes"]
    verdict = report["verification"]["random"]
    mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    command = "python benchmarks/large_model.py" + "".join(f" {a}" for a in sys.argv[1:])
    rows = []
    if args.method == "sparsegpt":
        layer, hessian = max(pruned), 4 * ffn * ffn
        stage = args.calib_samples * args.calib_seqlen * ffn * 4
        rows = [f"| largest pruned layer (weight) | {mib(layer)} |",
                f"| its SparseGPT Hessian (K x K float32, K = {ffn}) | {mib(hessian)} |",
                f"| one stage's activations ({args.calib_samples} x {args.calib_seqlen} tokens, width {ffn}) |"
                f" {mib(stage)} |",
                f"| peak anonymous memory / (layer + Hessian + stage) | {peak['RssAnon'] / (layer + hessian + stage):.1f}x |",
                f"| stage seconds | {', '.join(f'{k} {v:.0f}' for k, v in report['seconds'].items())} |",
                f"| notes | {'; '.join(report['records'][0]['notes'])} |"]
    lines = [
        "# A model over 2 GB: streamed compile" + (" with SparseGPT" if args.method == "sparsegpt" else ""), "",
        f"`large-decoder`: {total / 2**30:.2f} GiB of float32 weights in {len(sizes)} tensors, largest"
        f" {mib(largest)} (built in {build_s:.0f} s without torch). Command: `{command}`;"
        f" machine {platform.machine()}, {os.cpu_count()} cores.", "",
        f"`sparsec compile large-decoder --passes \"{passes}\"` in a child process, memory sampled every 0.1 s:", "",
        "| measure | value |", "|---|---|",
        f"| wall time | {seconds:.0f} s |",
        f"| peak RSS (includes memory-mapped weight pages) | {mib(peak['VmRSS'])} |",
        f"| peak anonymous memory (RssAnon) | {mib(peak['RssAnon'])} |",
        f"| largest tensor | {mib(largest)} |",
        f"| peak anonymous memory above the largest tensor | {mib(peak['RssAnon'] - largest)} |",
        f"| peak anonymous memory per compile stage | {per_stage(samples, report['seconds'], seconds)} |",
        *rows,
        f"| weights pruned (2:4) | {report['records'][0]['changed']} |",
        f"| file size in -> out | {mib(report['sizes']['input_bytes'])} -> {mib(out_bytes)} |",
        f"| verification | {verdict['inputs']}: min output cosine"
        f" {min(o['cosine'] for o in verdict['outputs']):.4f} |",
    ]
    RESULTS.mkdir(exist_ok=True)
    name = "large_model.md" if args.method == "magnitude" else "large_model_sparsegpt.md"
    (RESULTS / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
