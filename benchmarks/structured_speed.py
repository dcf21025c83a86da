"""Structured pruning on the CPU: end-to-end speedup against fidelity, side by side.

For each configuration the model is compiled (activation scores on calibration text, exit
weights refit by least squares), then dense and pruned models are timed interleaved in one
ONNX Runtime process on the CPU (2 threads, median of repeats after warm-up) and fidelity is
measured on held-out real text.

    python benchmarks/structured_speed.py --model minilm
    python benchmarks/structured_speed.py --model smollm2
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path


RESULTS = Path(__file__).parent / "results"

CONFIGS = {
    "minilm": ["ffn-neurons:ratio=0.25,method=activation", "ffn-neurons:ratio=0.5,method=activation",
               "attention-heads:ratio=0.25,method=activation",
               "ffn-neurons:ratio=0.5,method=activation;attention-heads:ratio=0.25,method=activation"],
    "smollm2": ["ffn-neurons:ratio=0.25,method=activation", "ffn-neurons:ratio=0.5,method=activation",
                "attention-heads:ratio=0.34,method=activation"],
}


def main() -> None:
    from sparsec.compiler import compile
    from sparsec.models import build, get
    from sparsec.runtime.bench import ratio_table, time_models

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    src = build(args.model)
    entry = get(args.model)
    calib = 256 if args.model == "minilm" else 32
    if args.model == "minilm":
        feeds = entry.real_inputs(1)[0]  # 16 held-out sentences
        shape = "16 sentences, padded"
    else:
        feeds = {"input_ids": entry.real_inputs(1)[0]["input_ids"]}  # 1 x 512 tokens
        shape = "1 x 512-token prompt"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"dense": src}
        for i, spec in enumerate(CONFIGS[args.model]):
            result = compile(src, passes=spec, output=Path(tmp) / f"m{i}.onnx", calib_samples=calib, samples=1)
            models[spec] = result.output
            metrics = result.verdicts["real"].metrics
            removed = sum(s.details["params_removed"] for r in result.records for s in r.changed)
            rows.append({"spec": spec, "metrics": metrics, "params_removed": removed,
                         "bytes": result.sizes["output_bytes"]})
            print(json.dumps(rows[-1]), flush=True)
        timings = time_models(models, feeds, repeats=args.repeats, threads=args.threads)
    base = timings["dense"].median_ms
    metric = "embedding cosine mean" if args.model == "minilm" else "perplexity (dense {:.2f})".format(
        rows[0]["metrics"]["perplexity_reference"])
    lines = [f"# Structured pruning on the CPU: {args.model}", "",
             f"ONNX Runtime CPU EP, {args.threads} threads, {shape}; dense and pruned models timed"
             f" interleaved in one process, median of {args.repeats} runs after 3 warm-ups. Fidelity on"
             " held-out real text; calibration on the other half. Machine:"
             f" {platform.machine()} ({platform.processor() or 'cpu'}).",
             f"Command: `python benchmarks/structured_speed.py --model {args.model}`", "",
             f"| config | params removed | {metric} | median ms | speedup |", "|---|---|---|---|---|",
             f"| dense | 0 | {'1.0000' if args.model == 'minilm' else '{:.2f}'.format(rows[0]['metrics']['perplexity_reference'])}"
             f" | {base:.2f} | 1.00x |"]
    for row in rows:
        t = timings[row["spec"]]
        fid = (f"{row['metrics']['embedding_cosine_mean']:.4f}" if args.model == "minilm"
               else f"{row['metrics']['perplexity_candidate']:.2f}")
        lines.append(f"| {row['spec']} | {row['params_removed'] / 1e6:.2f}M | {fid} | {t.median_ms:.2f} | {base / t.median_ms:.2f}x |")
    lines += ["", "Timing detail:", ""] + ratio_table(list(timings.values()), "dense")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"structured_speed_{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
