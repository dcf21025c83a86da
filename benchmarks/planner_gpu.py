"""The planner's pick against its space on the CUDA provider, fp16: MiniLM.

``benchmarks/planner_pick.py --export DIR`` writes, on the machine with the tokenizer and the
weights: the planner's pick and every other configuration (specs, held-out fidelity verdicts
in fp32, the cost model's predicted speedup for the target), an fp16 copy of the original (ORT's
float16 converter, inputs and outputs kept fp32) and the workload (16 held-out sentences).

This script, on the GPU machine, builds each configuration from the fp16 original with the same
passes and magnitude scores: speed depends on the shapes only, and magnitude keeps as many units
per site as the calibrated scores do (MoE configurations need calibration data and are left
out). Every model is timed interleaved in one process with IOBinding, ratios against the
original, and the table is written with the verdicts from the export.

    python benchmarks/planner_gpu.py --run DIR --out benchmarks/results/planner_pick_minilm_h200.md
    python benchmarks/planner_gpu.py --run DIR --batch 64 --seq 256 --out ...   # a GPU-sized workload
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def magnitude(spec: str) -> str:
    parts = []
    for part in spec.split(";"):
        pass_id, _, opts = part.partition(":")
        parts.append(f"{pass_id}:{opts + ',' if opts else ''}method=magnitude")
    return ";".join(parts)


def tiled(feed: dict[str, np.ndarray], batch: int, seq: int) -> dict[str, np.ndarray]:
    """The held-out sentences' tokens repeated into a (batch, seq) workload, every token attended."""
    ids = feed["input_ids"][feed["attention_mask"].astype(bool)]  # the real tokens, in order
    ids = np.resize(ids, batch * seq).reshape(batch, seq)
    out = {"input_ids": ids.astype(feed["input_ids"].dtype),
           "attention_mask": np.ones((batch, seq), feed["attention_mask"].dtype)}
    if "token_type_ids" in feed:
        out["token_type_ids"] = np.zeros((batch, seq), feed["token_type_ids"].dtype)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, help="tile the held-out sentences to this many rows ...")
    parser.add_argument("--seq", type=int, help="... of this many tokens (a GPU-sized workload)")
    args = parser.parse_args()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # the CUDA libraries PyTorch brought (onnxruntime-gpu >= 1.21)
        ort.preload_dlls()
    from benchmarks.planner_pick import _file, write_table
    from sparsec.model_io import load_model, save_model
    from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
    from sparsec.runtime.bench import compare_speed
    from sparsec.runtime.session import Runner

    data = json.loads((args.run / "configs.json").read_text())
    src = args.run / "minilm16.onnx"
    feed = dict(np.load(args.run / "feed.npz"))
    if args.batch or args.seq:
        feed = tiled(feed, args.batch or len(feed["input_ids"]), args.seq or feed["input_ids"].shape[1])
    built = args.run / "built"
    built.mkdir(exist_ok=True)
    paths, table = {"original": src}, {}
    for label, row in data["configs"].items():
        if not row["spec"] or "moe" in row["spec"]:
            continue
        model = load_model(src).model
        run_passes(model, parse_pass_specs(magnitude(row["spec"])), PassContext())
        paths[label] = save_model(model, built / _file(label))
        table[label] = row
    runner = Runner.for_providers(["CUDAExecutionProvider"])
    speed = compare_speed(paths, feed, baseline="original", runner=runner, min_repeats=20, max_repeats=60)
    gpu = ort.get_device()
    args.budget, args.model, args.target, args.random = data["budget"], data["model"], data["target"], sum(
        label.startswith("sampled") for label in table)
    write_table(args.out, table, {k: (r.median, r.p10, r.p90) for k, r in speed.ratios.items()},
                (data["planner"] or {}).get("profile", ""), args,
                f"ONNX Runtime {ort.__version__} CUDA provider ({gpu}, {platform.node()}), fp16 weights, IOBinding,"
                f" providers {speed.providers}; workload {' x '.join(map(str, feed['input_ids'].shape))} tokens"
                + (" (the held-out sentences' tokens tiled)" if args.batch or args.seq else ""))


if __name__ == "__main__":
    main()
