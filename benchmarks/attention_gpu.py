"""Sparse attention on the CUDA provider, fp16: one SmolLM2-shaped decoder layer (hidden 576, 9
query heads on 3 KV heads of 64, SwiGLU 1536, rotary, KV cache; random weights, vocabulary 1024)
exported by torch.onnx dynamo in fp16, then rewritten by the ``attention`` pass:

* ``original`` -- the export (decomposed attention);
* ``fused`` -- ``attention`` (GroupQueryAttention, exact);
* ``window W`` -- ``attention:window=W`` (GroupQueryAttention's local window, full cache);
* ``window W bounded`` -- ``attention:window=W,cache=window`` (decode only: a W-position buffer);
* ``sparse L+1`` -- ``attention:block=64,local_blocks=L,global_blocks=1,lowering=sparse``
  (SparseAttention: the L most recent blocks of 64 and the first; heads zero-padded 64 -> 128,
  the KV cache one shared buffer).

Each model is timed whole (the layer) and as its attention alone: the subgraph from the Q/K/V
projections' input to the output projection's output (projections, rotary, cache and mask
handling included: SparseAttention's lowering pads the projections' weights), cut out of each
model by onnx.utils.Extractor.

Prompt: S tokens with an empty cache; decode: one token after C cached (C + 1 <= 8192, the
rotary tables' length). Every model timed
interleaved with IOBinding (inputs and outputs on the device), ratios against ``fused``.

    python benchmarks/attention_gpu.py --prepare DIR     # here: the export (needs '.[models]')
    python benchmarks/attention_gpu.py --run DIR --out results/attention_gpu_h100.md   # on the GPU machine
    # (--run rewrites the export into every variant first, with sparsec's passes)
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
PROJECTIONS: list[str] = []  # the Q/K/V projections' input name (attention.json)
SPECS = {"fused": "attention", "window 256": "attention:window=256", "window 1024": "attention:window=1024",
         "window 256 bounded": "attention:window=256,cache=window",
         "window 1024 bounded": "attention:window=1024,cache=window",
         "sparse 2+1": "attention:block=64,local_blocks=2,global_blocks=1,lowering=sparse",
         "sparse 4+1": "attention:block=64,local_blocks=4,global_blocks=1,lowering=sparse",
         "sparse 16+1": "attention:block=64,local_blocks=16,global_blocks=1,lowering=sparse"}
MASKED = "attention:block=64,local_blocks=4,global_blocks=1,lowering=mask"  # the sparse 4+1 reference


def prepare(root: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.llama import _kv_module, kv_names
    from models.zoo import export_torch

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
    print(json.dumps({"original": sum(f.stat().st_size for f in (root / "original").iterdir())}))


def rewrite(root: Path) -> None:
    """Every variant of the original, and each model's attention subgraph (here or on the GPU
    machine: the original alone travels)."""
    from sparsec.model_io import load_model, save_model
    from sparsec.pipeline import PassContext, parse_pass_specs, run_passes

    for label, spec in {**SPECS, "masked 4+1": MASKED}.items():
        loaded = load_model(root / "original" / "model.onnx").model
        (record,) = run_passes(loaded, parse_pass_specs(spec), PassContext())
        assert len(record.changed) == 1 and record.changed[0].details["lowering"] in ("gqa", "sparse", "mask"), \
            record.sites
        out = root / label.replace(" ", "_") / "model.onnx"
        out.parent.mkdir(exist_ok=True)
        save_model(loaded, out, external_data=True)
    projections, o_proj = _attention_ends(root / "original" / "model.onnx")
    (root / "attention.json").write_text(json.dumps(projections))
    for label in ("original", *SPECS):
        _extract_attention(root / label.replace(" ", "_") / "model.onnx", projections, o_proj)


def _attention_ends(path: Path) -> tuple[list[str], str]:
    """The names of the Q/K/V projections' input and of the output projection's output."""
    from sparsec.model_io import load_model
    from sparsec.passes.blocks import match_attention_block

    model = load_model(path).model
    block = next(b for b in (match_attention_block(n, model) for n in model.graph if n.op_type == "MatMul") if b)
    return [block.q.site.node.inputs[0].name], block.o.node.outputs[0].name


def _extract_attention(path: Path, projections: list[str], o_proj: str) -> None:
    """attention.onnx beside ``path``: its subgraph from the projections' input to the output
    projection's output, every graph input kept (ids and mask feed the rotary and the lengths)."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(path))
    inputs = projections + [i.name for i in model.graph.input]
    outputs = [o_proj] + [o.name for o in model.graph.output if o.name.startswith("present")]
    model = onnx.shape_inference.infer_shapes(model)
    known = {v.name for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    for name in inputs + outputs:  # contrib ops' outputs have no inferred types
        if name not in known:
            model.graph.value_info.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT16, None))
    part = Extractor(model).extract_model(inputs, outputs)
    part.ir_version = min(part.ir_version, 10)
    part.metadata_props.extend(model.metadata_props)  # the KV-cache interface
    onnx.save(part, str(path.parent / "attention.onnx"))


def attention_feed(full: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The attention subgraph's input: the layer's plus a random (normalized) hidden state."""
    rng = np.random.default_rng(1)
    out = dict(full)
    out[PROJECTIONS[0]] = rng.standard_normal((1, full["input_ids"].shape[1], HIDDEN)).astype(np.float16)
    return out


def feed(new: int, cached: int, held: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {"input_ids": rng.integers(0, VOCAB, (1, new), dtype=np.int64),
           "attention_mask": np.ones((1, cached + new), np.int64)}
    for name in ("past_key_values.0.key", "past_key_values.0.value"):
        out[name] = (rng.standard_normal((1, KV_HEADS, cached if held is None else held, HEAD_DIM)) * 0.5
                     ).astype(np.float16)
    return out


def _metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def run(root: Path, out: Path) -> None:
    import onnxruntime as ort

    from sparsec.runtime.bench import compare_speed
    from sparsec.runtime.kvcache import KVCache
    from sparsec.runtime.session import Runner

    ort.preload_dlls()
    if not (root / "attention.json").exists():
        rewrite(root)
    PROJECTIONS[:] = json.loads((root / "attention.json").read_text())
    runner = Runner.for_providers(["CUDAExecutionProvider"])
    labels = ["original", *SPECS]

    def path(label: str, part: str = "model") -> Path:
        return root / label.replace(" ", "_") / f"{part}.onnx"

    kv = {label: KVCache.of(_metadata(path(label))) for label in labels}

    def per_model(base: dict, shown: list[str], new: int, cached: int, part: str) -> dict[str, dict]:
        """Inputs of their own: a bounded cache takes W positions, a shared one its buffer."""
        own = {}
        for label in shown:
            if kv[label].window is not None:
                own[label] = feed(new, cached, kv[label].window)
            elif kv[label].shared is not None:
                own[label] = kv[label].feed(base)[0]
            else:
                continue
            if part == "attention":
                own[label] = attention_feed(own[label])
        return own

    def logits(label: str, inputs: dict) -> np.ndarray:
        inputs, shared = kv.get(label, KVCache()).feed(inputs)
        session = runner.session(path(label))
        return runner.run(session, inputs, ["logits"], shared=shared)["logits"].astype(np.float32)

    # exactness on the device: fused against the original (512 tokens); SparseAttention against
    # the same layout as a mask (1,024 tokens: 16 blocks, each seeing at most 5)
    check = feed(512, 0)
    ref = logits("original", check)
    fused_diff = float(np.abs(ref - logits("fused", check)).max() / np.abs(ref).max())
    check = feed(1024, 0)
    masked = logits("masked 4+1", check)
    sparse_diff = float(np.abs(masked - logits("sparse 4+1", check)).max() / np.abs(masked).max())
    layout_effect = float(np.abs(masked - logits("fused", check)).max() / np.abs(masked).max())
    rows = []
    for part in ("model", "attention"):
        paths = {label: path(label, part) for label in labels}
        prompt_models = {k: v for k, v in paths.items() if "bounded" not in k}
        for n in LENGTHS:
            base = feed(n, 0)
            main_feed = attention_feed(base) if part == "attention" else base
            r = compare_speed(prompt_models, main_feed, baseline="fused", runner=runner, min_repeats=10,
                              max_repeats=30, feeds=per_model(base, list(prompt_models), n, 0, part))
            rows.append((part, "prompt", n, r))
            print(part, "prompt", n, {k: round(v.median, 2) for k, v in r.ratios.items()}, flush=True)
        for n in (*LENGTHS[:-1], LENGTHS[-1] - 1):  # the rotary tables end at position 8191
            base = feed(1, n)
            main_feed = attention_feed(base) if part == "attention" else base
            r = compare_speed(paths, main_feed, baseline="fused", runner=runner, min_repeats=10, max_repeats=30,
                              feeds=per_model(base, list(paths), 1, n, part))
            rows.append((part, "decode", n, r))
            print(part, "decode", n, {k: round(v.median, 2) for k, v in r.ratios.items()}, flush=True)
    lines = ["# Sparse attention on the CUDA provider: one SmolLM2-shaped layer, fp16", "",
             f"ONNX Runtime {ort.__version__}, CUDAExecutionProvider, {platform.machine()} ({os.cpu_count()} cores),"
             " IOBinding (inputs and outputs on the device). One decoder layer with SmolLM2's attention and FFN"
             f" sizes, random weights, vocabulary {VOCAB}, batch 1. Ratios: `fused` time / model time (so `original`"
             " below 1 means the fusion alone is faster), median over interleaved rounds (p10-p90); ms: the"
             " model's median. `sparse L+1`: SparseAttention with the L most recent blocks of 64 and the first"
             " (2+1: 192 keys at most, 4+1: 320, 16+1: 1,088), heads zero-padded to 128.",
             f"Checks on the device (max difference / max logit, fp16): fused against original, 512-token prompt"
             f" {fused_diff:.1e}; sparse 4+1 against the same layout as a mask (lowering=mask), 1,024-token prompt"
             f" {sparse_diff:.1e} (the layout itself moves the logits by {layout_effect:.1e} from dense).",
             "Command: `python benchmarks/attention_gpu.py --prepare DIR` here, then"
             " `python benchmarks/attention_gpu.py --run DIR` on the GPU machine", ""]
    titles = {"model": "the whole layer", "attention": "attention alone (Q/K/V projections to the output"
                                                       " projection, included)"}
    for part in ("model", "attention"):
        for phase in ("prompt", "decode"):
            shown = [label for label in labels if phase == "decode" or "bounded" not in label]
            what = "S new tokens, empty cache" if phase == "prompt" else "one token after C cached"
            lines += [f"## {phase.capitalize()}, {titles[part]} ({what})", "",
                      f"| {'S' if phase == 'prompt' else 'C'} | " + " | ".join(shown) + " |",
                      "|---|" + "---|" * len(shown)]
            for kind, ph, n, r in rows:
                if kind != part or ph != phase:
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
