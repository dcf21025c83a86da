"""What refine=dsnot and sparse + low-rank (OATS) cost on top of SparseGPT, per SmolLM2 block.

The math of one decoder block of SmolLM2-135M (q, k, v, o, gate, up, down: 576/192/1536 wide)
on a Hessian of 4096 correlated tokens, for each variant in turn (interleaved, ``--reps``
rounds; the median per variant): SparseGPT alone, with ``refine=dsnot``, with
``rank_ratio=0.1``, with both. Only the per-layer math is timed; the forward passes that
capture each layer's inputs are the same for every variant, so a whole compile's ratio is
smaller than this one. Results: benchmarks/results/refine_lowrank_cost_<tag>.md / .json
(tag: cpu, or the GPU's name with ``--device cuda``).

    python benchmarks/refine_lowrank_cost.py --reps 3
    python benchmarks/refine_lowrank_cost.py --reps 3 --device cuda --tag cuda_h200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
          "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
VARIANTS = {"sparsegpt": {}, "+dsnot": {"refine": "dsnot"}, "+rank_ratio=0.1": {"rank_ratio": 0.1},
            "+rank_ratio=0.1+dsnot": {"refine": "dsnot", "rank_ratio": 0.1}}


def main() -> None:
    import torch

    from sparsec.passes import lowrank, prune_methods
    from sparsec.sparsity import NMLayout

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the math runs")
    parser.add_argument("--tag", default=None, help="results file suffix (default: the device)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    stats = {}
    for k in sorted({s[1] for s in SHAPES.values()}):
        scale = np.exp(rng.standard_normal(k)).astype(np.float32)
        mix = (rng.standard_normal((k, k)) * 0.3 + np.eye(k)).astype(np.float32)
        x = (rng.standard_normal((args.tokens, k)).astype(np.float32) @ mix) * scale
        stats[k] = prune_methods.new_statistic("sparsegpt", k, args.device)
        stats[k].add(x)
    layout = NMLayout(2, 4)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.reps + 1):  # the first round warms up (CUDA context, kernels, allocator) and is dropped
        for name, opts in VARIANTS.items():
            start = time.perf_counter()
            for rows, cols in SHAPES.values():
                w = rng.standard_normal((rows, cols)).astype(np.float32)
                rank = lowrank.layer_rank(rows, cols, 0, opts.get("rank_ratio", 0.0))
                prune_methods.prune_matrix("sparsegpt", w, layout, stats[cols], rank=rank,
                                           refine=opts.get("refine", "none"))
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    times = {name: t[1:] for name, t in times.items()}
    base = statistics.median(times["sparsegpt"])
    rows = [{"variant": name, "seconds_per_block": statistics.median(t), "x_sparsegpt": statistics.median(t) / base,
             "all": t} for name, t in times.items()]
    where = (f"math on {torch.cuda.get_device_name()}" if args.device == "cuda"
             else f"torch threads {torch.get_num_threads()}")
    tag = args.tag or args.device
    command = "python benchmarks/refine_lowrank_cost.py --reps {}{}".format(
        args.reps, f" --device {args.device} --tag {tag}" if args.device != "cpu" or args.tag else "")
    lines = ["# Cost of refine=dsnot and sparse + low-rank on SparseGPT (2:4), one SmolLM2 block", "",
             f"Per-layer math of the 7 linears of one block, Hessian of {args.tokens} tokens, median of"
             f" {args.reps} interleaved rounds after one warm-up round; {where}, {os.cpu_count()} CPUs,"
             f" {platform.machine()}. Command: `{command}`", "",
             "| variant | seconds per block | x SparseGPT |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['seconds_per_block']:.2f} | {r['x_sparsegpt']:.2f} |" for r in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"refine_lowrank_cost_{tag}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"refine_lowrank_cost_{tag}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
