"""What refine=dsnot and sparse + low-rank (OATS) cost on top of SparseGPT, per SmolLM2 block.

The math of one decoder block of SmolLM2-135M (q, k, v, o, gate, up, down: 576/192/1536 wide)
on a Hessian of 4096 correlated tokens, for each variant in turn (interleaved, ``--reps``
rounds; the median per variant): SparseGPT alone, with ``refine=dsnot``, with
``rank_ratio=0.1``, with both. Only the per-layer math is timed; the forward passes that
capture each layer's inputs are the same for every variant, so a whole compile's ratio is
smaller than this one. Results: benchmarks/results/refine_lowrank_cost_cpu.md / .json.

    python benchmarks/refine_lowrank_cost.py --reps 3
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
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    stats = {}
    for k in sorted({s[1] for s in SHAPES.values()}):
        scale = np.exp(rng.standard_normal(k)).astype(np.float32)
        mix = (rng.standard_normal((k, k)) * 0.3 + np.eye(k)).astype(np.float32)
        x = (rng.standard_normal((args.tokens, k)).astype(np.float32) @ mix) * scale
        stats[k] = prune_methods.new_statistic("sparsegpt", k, "cpu")
        stats[k].add(x)
    layout = NMLayout(2, 4)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.reps):
        for name, opts in VARIANTS.items():
            start = time.perf_counter()
            for rows, cols in SHAPES.values():
                w = rng.standard_normal((rows, cols)).astype(np.float32)
                rank = lowrank.layer_rank(rows, cols, 0, opts.get("rank_ratio", 0.0))
                prune_methods.prune_matrix("sparsegpt", w, layout, stats[cols], rank=rank,
                                           refine=opts.get("refine", "none"))
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["sparsegpt"])
    rows = [{"variant": name, "seconds_per_block": statistics.median(t), "x_sparsegpt": statistics.median(t) / base,
             "all": t} for name, t in times.items()]
    lines = ["# Cost of refine=dsnot and sparse + low-rank on SparseGPT (2:4), one SmolLM2 block", "",
             f"Per-layer math of the 7 linears of one block, Hessian of {args.tokens} tokens, median of"
             f" {args.reps} interleaved rounds; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs,"
             f" {platform.machine()}. Command: `python benchmarks/refine_lowrank_cost.py --reps {args.reps}`", "",
             "| variant | seconds per block | x SparseGPT |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['seconds_per_block']:.2f} | {r['x_sparsegpt']:.2f} |" for r in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "refine_lowrank_cost_cpu.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "refine_lowrank_cost_cpu.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
