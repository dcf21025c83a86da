"""Sparse attention on the CUDA provider, fp16: one SmolLM2-shaped decoder layer (hidden 576, 9
query heads on 3 KV heads of 64, SwiGLU 1536, rotary, KV cache; random weights, vocabulary 1024)
exported by torch.onnx dynamo in fp16, then rewritten by the ``attention`` pass:

* ``original`` -- the export (decomposed attention);
* ``fused`` -- ``attention`` (GroupQueryAttention, exact);
* ``window W`` -- ``attention:window=W`` (GroupQueryAttention's local window, full cache);
* ``window W bounded`` -- ``attention:window=W,cache=window`` (decode only: a W-position buffer).

Prompt: S tokens with an empty cache; decode: one token after C cached (C + 1 <= 8192, the
rotary tables' length). Every model timed
interleaved with IOBinding (inputs and outputs on the device), ratios against ``fused``.

    python benchmarks/attention_gpu.py --prepare DIR     # here: export and rewrite (needs '.[models]')
    python benchmarks/attention_gpu.py --run DIR --out results/attention_gpu_h100.md   # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 576, 9, 3, 64, 1024
LENGTHS = (1024, 2048, 4096, 8192)
SPECS = {"fused": "attention", "window 256": "attention:window=256", "window 1024": "attention:window=1024",
         "window 256 bounded": "attention:window=256,cache=window",
         "window 1024 bounded": "attention:window=1024,cache=window"}


def prepare(root: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.llama import _kv_module, kv_names
    from models.zoo import export_torch
    from sparsec.model_io import load_model, save_model
    from sparsec.pipeline import PassContext, parse_pass_specs, run_passes

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=1536, num_hidden_layers=1,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval().half()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=8192)
    past_len, total = torch.export.Dim("past_sequence", max=8192), torch.export.Dim("total_sequence", max=16384)
    ids = torch.arange(8, dtype=torch.int64).reshape(2, 4)
    past = [torch.randn(2, KV_HEADS, 3, HEAD_DIM).half() for _ in range(2)]
    past_names, present_names = kv_names(1)
    (root / "original").mkdir(parents=True, exist_ok=True)
    export_torch(_kv_module(model), (ids, torch.ones(2, 7, dtype=torch.int64), *past), root / "original",
                 zoo_name="attention-gpu-layer", input_names=["input_ids", "attention_mask", *past_names],
                 output_names=["logits", *present_names],
                 dynamic_shapes=[{0: batch, 1: seq}, {0: batch, 1: total}, tuple([{0: batch, 2: past_len}] * 2)])
    for label, spec in SPECS.items():
        loaded = load_model(root / "original" / "model.onnx").model
        (record,) = run_passes(loaded, parse_pass_specs(spec), PassContext())
        assert len(record.changed) == 1 and record.changed[0].details["lowering"] == "gqa", record.sites
        out = root / label.replace(" ", "_") / "model.onnx"
        out.parent.mkdir(exist_ok=True)
        save_model(loaded, out, external_data=True)
    print(json.dumps({p.name: sum(f.stat().st_size for f in p.iterdir()) for p in root.iterdir()}))


def feed(new: int, cached: int, held: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {"input_ids": rng.integers(0, VOCAB, (1, new), dtype=np.int64),
           "attention_mask": np.ones((1, cached + new), np.int64)}
    for name in ("past_key_values.0.key", "past_key_values.0.value"):
        out[name] = (rng.standard_normal((1, KV_HEADS, cached if held is None else held, HEAD_DIM)) * 0.5
                     ).astype(np.float16)
    return out


def run(root: Path, out: Path) -> None:
    import onnxruntime as ort

    from sparsec.runtime.bench import compare_speed
    from sparsec.runtime.session import Runner

    ort.preload_dlls()
    runner = Runner.for_providers(["CUDAExecutionProvider"])
    paths = {"original": root / "original" / "model.onnx",
             **{label: root / label.replace(" ", "_") / "model.onnx" for label in SPECS}}
    # exactness on the device: fused against the original, prompt of 512 tokens
    check = feed(512, 0)
    ref = runner.run(runner.session(paths["original"]), check)["logits"].astype(np.float32)
    got = runner.run(runner.session(paths["fused"]), check)["logits"].astype(np.float32)
    fused_diff = float(np.abs(ref - got).max() / np.abs(ref).max())
    rows = []
    prompt_models = {k: v for k, v in paths.items() if "bounded" not in k}
    for n in LENGTHS:
        r = compare_speed(prompt_models, feed(n, 0), baseline="fused", runner=runner, min_repeats=10, max_repeats=30)
        rows.append(("prompt", n, r))
        print("prompt", n, {k: round(v.median, 2) for k, v in r.ratios.items()}, flush=True)
    for n in (*LENGTHS[:-1], LENGTHS[-1] - 1):  # the rotary tables end at position 8191
        per = {label: feed(1, n, int(label.split()[1])) for label in paths if "bounded" in label}
        r = compare_speed(paths, feed(1, n), baseline="fused", runner=runner, min_repeats=10, max_repeats=30,
                          feeds=per)
        rows.append(("decode", n, r))
        print("decode", n, {k: round(v.median, 2) for k, v in r.ratios.items()}, flush=True)
    lines = ["# Sparse attention on the CUDA provider: one SmolLM2-shaped layer, fp16", "",
             f"ONNX Runtime {ort.__version__}, CUDAExecutionProvider, {platform.machine()} ({os.cpu_count()} cores),"
             " IOBinding (inputs and outputs on the device). One decoder layer with SmolLM2's attention and FFN"
             f" sizes, random weights, vocabulary {VOCAB}, batch 1. Ratios: `fused` time / model time (so `original`"
             " below 1 means the fusion alone is faster), median over interleaved rounds (p10-p90); ms: the"
             f" model's median. Fused against original on a 512-token prompt: max relative difference"
             f" {fused_diff:.1e} (fp16).",
             "Command: `python benchmarks/attention_gpu.py --prepare DIR` here, then"
             " `python benchmarks/attention_gpu.py --run DIR` on the GPU machine", ""]
    labels = list(paths)
    for phase in ("prompt", "decode"):
        shown = [label for label in labels if phase == "decode" or "bounded" not in label]
        lines += [f"## {phase.capitalize()} ({'S new tokens, empty cache' if phase == 'prompt' else 'one token after C cached'})",
                  "", f"| {'S' if phase == 'prompt' else 'C'} | " + " | ".join(shown) + " |",
                  "|---|" + "---|" * len(shown)]
        for kind, n, r in rows:
            if kind != phase:
                continue
            cells = [f"{r.ratios[label].median:.2f}x ({r.ratios[label].p10:.2f}-{r.ratios[label].p90:.2f}),"
                     f" {r.timings[label].median_ms:.3f} ms" for label in shown]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", type=Path)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "attention_gpu_h100.md")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
    if args.run:
        run(args.run, args.out)


if __name__ == "__main__":
    main()
