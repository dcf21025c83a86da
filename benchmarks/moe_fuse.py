"""A transformers MoE decoder as exported against its ``moe-fuse`` rewrite, side by side.

Builds random-weight Mixtral- and OLMoE-style decoders (transformers' ``batched_mm`` experts:
every (token, slot) pair gathers its expert's weights and runs a batched matrix-vector product)
at two sizes, exports them with torch.onnx dynamo, lowers their MoE blocks to
``com.microsoft.MoE`` with ``moe-fuse``, checks the outputs agree, and times both interleaved in
one process (median ratio over rounds, p10-p90) on prompts of several lengths.

    python benchmarks/moe_fuse.py                       # CPU, writes results/moe_fuse_cpu.md
    python benchmarks/moe_fuse.py --provider cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (family, hidden, expert size, experts, k, layers)
SIZES = [("mixtral", 256, 512, 8, 2, 2), ("olmoe", 256, 512, 8, 2, 2), ("mixtral", 512, 1024, 8, 2, 2)]
TOKENS = [1, 16, 128, 512]
VOCAB = 1024
MAX_GATHER_BYTES = 3 << 30  # the exported form gathers (tokens * k, 2I, H) weights: skip beyond this


def build(family: str, hidden: int, inter: int, experts: int, k: int, layers: int, folder: Path) -> Path:
    from sparsec.models.llama import export_decoder
    from sparsec.models.moe import tiny_moe_model

    model = tiny_moe_model(family, hidden=hidden, layers=layers, experts=experts, k=k, expert_size=inter,
                           vocab=VOCAB)
    export_decoder(model, folder, f"bench-{family}")
    return folder / "model.onnx"


def fuse(src: Path, out: Path) -> int:
    from sparsec.model_io import load_model, save_model
    from sparsec.pipeline import PassContext, parse_pass_specs, run_passes

    model = load_model(src).model
    (record,) = run_passes(model, parse_pass_specs("moe-fuse"), PassContext())
    save_model(model, out)
    return len(record.changed)


def main() -> None:
    from sparsec.runtime.bench import compare_speed
    from sparsec.runtime.session import Runner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    provider = "CUDAExecutionProvider" if args.provider == "cuda" else "CPUExecutionProvider"
    runner = Runner.for_providers([provider])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for family, hidden, inter, experts, k, layers in SIZES:
            folder = tmp / f"{family}{hidden}"
            folder.mkdir()
            src = build(family, hidden, inter, experts, k, layers, folder)
            fused = tmp / f"{family}{hidden}-fused.onnx"
            blocks = fuse(src, fused)
            for tokens in TOKENS:
                if tokens * k * 2 * inter * hidden * 4 > MAX_GATHER_BYTES:
                    continue
                feed = {"input_ids": np.random.default_rng(tokens).integers(0, VOCAB, (1, tokens), dtype=np.int64)}
                want = runner.run(runner.session(src), feed)["logits"]
                got = runner.run(runner.session(fused), feed)["logits"]
                diff = float(np.abs(got - want).max())
                speed = compare_speed({"exported": src, "fused": fused}, feed, runner=runner, threads=args.threads,
                                      min_repeats=10)
                rows.append((family, hidden, inter, experts, k, layers, blocks, tokens, speed, diff))
                r = speed.ratios["fused"]
                print(f"{family} H{hidden} I{inter} E{experts} k{k} T{tokens}: exported"
                      f" {speed.timings['exported'].median_ms:.2f} ms, fused {r.median:.2f}x; max diff {diff:.1e}",
                      flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"moe_fuse_{args.provider}.md")
    import onnxruntime

    lines = [f"# Exported MoE decoders against their moe-fuse rewrite ({args.provider.upper()}, float32)", "",
             f"ONNX Runtime {onnxruntime.__version__}, {provider}, {speed.threads} threads, machine"
             f" {platform.machine()} ({os.cpu_count()} cores). Random-weight transformers decoders (vocabulary"
             f" {VOCAB}, batched_mm experts) exported with torch.onnx dynamo; `moe-fuse` lowers every MoE block to"
             " com.microsoft.MoE. Both timed interleaved in one process on one prompt of `tokens` tokens (batch 1):"
             " speedup = median over rounds of exported time / fused time (p10-p90). `max diff`: the largest"
             " difference of the logits. Prompts whose gathered expert weights would pass 3 GiB are left out.",
             f"Command: `python benchmarks/moe_fuse.py{' --provider cuda' if args.provider == 'cuda' else ''}`", "",
             "| model | H | I per expert | E | k | layers | blocks fused | tokens | exported ms | fused speedup |"
             " max diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for family, hidden, inter, experts, k, layers, blocks, tokens, speed, diff in rows:
        r = speed.ratios["fused"]
        lines.append(f"| {family} | {hidden} | {inter} | {experts} | {k} | {layers} | {blocks} | {tokens} |"
                     f" {speed.timings['exported'].median_ms:.2f} | {r.median:.2f}x ({r.p10:.2f}-{r.p90:.2f}) |"
                     f" {diff:.1e} |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
