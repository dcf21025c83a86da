"""Block-sparse attention layouts on SmolLM2-135M: perplexity on 8k tokens of held-out text, next to
the GroupQueryAttention windows of as many keys, and what the first block (the attention sinks of
a block layout) is worth.

Models, each made by ``sparsec.compile`` from ``smollm2-kv`` (CPU, fp32):

* ``fused`` -- ``attention`` (GroupQueryAttention, exact: the dense reference);
* ``window W`` / ``window W + 4 sinks`` -- GroupQueryAttention with a window (and sinks);
* ``blocks L+G`` -- ``attention:block=64,local_blocks=L,global_blocks=G,lowering=sparse``:
  SparseAttention (heads zero-padded to 128, the KV cache one shared buffer), the layouts the GPU
  benchmark (attention_gpu.py) times. SparseAttention computes exactly what the same layout as a
  mask does (tests/test_attention.py), so these are the layouts' own perplexities.

Perplexity: 8,192 tokens of the ``docstrings`` text (read by no builder, test or calibration), one
prompt each, as in attention_decode.py.

    python benchmarks/attention_layouts.py     # writes results/attention_layouts_cpu.md
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from attention_decode import build, long_windows, perplexities  # noqa: E402

SPECS = {
    "fused": "attention",
    "window 256": "attention:window=256",
    "window 256 + 4 sinks": "attention:window=256,sinks=4",
    "window 1024": "attention:window=1024",
    "blocks 4+0": "attention:block=64,local_blocks=4,lowering=sparse",
    "blocks 2+1": "attention:block=64,local_blocks=2,global_blocks=1,lowering=sparse",
    "blocks 4+1": "attention:block=64,local_blocks=4,global_blocks=1,lowering=sparse",
    "blocks 16+1": "attention:block=64,local_blocks=16,global_blocks=1,lowering=sparse",
    "blocks 4+1 + 2 random": "attention:block=64,local_blocks=4,global_blocks=1,random_blocks=2,lowering=sparse",
}
KEYS = {"fused": "all", "window 256": "256", "window 256 + 4 sinks": "260", "window 1024": "1,024",
        "blocks 4+0": "193-256", "blocks 2+1": "129-192", "blocks 4+1": "257-320", "blocks 16+1": "1,025-1,088",
        "blocks 4+1 + 2 random": "385-448"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ppl-windows", type=int, default=1, help="8k-token windows of text for perplexity")
    parser.add_argument("--ppl-length", type=int, default=8192)
    parser.add_argument("--workdir", type=Path,
                        default=Path.home() / ".cache" / "sparsec" / "bench" / "attention_layouts")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "attention_layouts_cpu.md")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for label, spec in SPECS.items():
        path = args.workdir / f"{label.replace(' ', '_').replace('+', 'p')}.onnx"
        if not path.exists():
            print(label, build(spec, path), flush=True)
        paths[label] = path
    ppl = perplexities(paths, long_windows(args.ppl_windows, args.ppl_length))
    dense = ppl["fused"]
    lines = ["# Block-sparse attention layouts on SmolLM2-135M: perplexity at 8k tokens", "",
             f"ONNX Runtime CPU provider, fp32, {platform.machine()}. Perplexity over {args.ppl_windows} x"
             f" {args.ppl_length} tokens of held-out text (the standard library's docstrings), each window one"
             " prompt. Keys: how many keys a query at the end of the window sees (blocks of 64: the L most"
             " recent blocks, the query's own included, and G first ones). Speed of the same layouts on a GPU:"
             " [attention_gpu_h200.md](attention_gpu_h200.md).",
             "Command: `python benchmarks/attention_layouts.py`", "",
             "| model | spec | keys per query | perplexity | against dense |", "|---|---|---|---|---|"]
    for label, spec in SPECS.items():
        lines.append(f"| {label} | `{spec}` | {KEYS[label]} | {ppl[label]:.2f} | {ppl[label] / dense:.3f}x |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
