"""Fidelity of one-shot pruning methods on the real example models, side by side.

Each configuration is compiled in its own process (so peak memory is its own) through
``sparsec.compiler.compile`` and measured against the dense model on held-out real text:

* minilm  -- mean / min cosine of sentence embeddings on 64 held-out sentences
* smollm2 -- perplexity on 8 x 512 held-out tokens (dense on the same windows)

Results go to benchmarks/results/prune_quality_<model>.md (table) and .json.

    python benchmarks/prune_quality.py --model minilm
    python benchmarks/prune_quality.py --model smollm2 --calib-samples 32
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CONFIGS = {
    "minilm": [
        "nm:method=magnitude", "nm:method=wanda", "nm:method=sparsegpt",
        "nm:method=sparsegpt,targets=dense",
    ],
    "smollm2": [
        "unstructured:sparsity=0.5,method=magnitude", "unstructured:sparsity=0.5,method=wanda",
        "unstructured:sparsity=0.5,method=sparsegpt", "unstructured:sparsity=0.5,method=sparsegpt,targets=dense",
        "nm:method=magnitude", "nm:method=wanda", "nm:method=sparsegpt", "nm:method=sparsegpt,targets=dense",
    ],
}


def run_one(model: str, spec: str, samples: int, seqlen: int) -> dict:
    from sparsec.compiler import compile
    from sparsec.models import build

    src = build(model)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = compile(src, passes=spec, output=Path(tmp) / "model.onnx", calib_samples=samples,
                         calib_seqlen=seqlen, samples=1)
    seconds = time.perf_counter() - start
    record = result.records[0]
    return {
        "spec": spec, "metrics": result.verdicts["real"].metrics, "changed": len(record.changed),
        "sparsity": record.sparsity(), "seconds": round(seconds, 1),
        "stage_seconds": {k: round(v, 1) for k, v in result.seconds.items()},
        "calibration": result.calibration,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def table(model: str, rows: list[dict]) -> list[str]:
    if model == "minilm":
        head = ["config", "weights", "sparsity", "emb. cosine mean", "emb. cosine min", "seconds", "peak RSS MiB"]
        body = [[r["spec"], r["changed"], f"{r['sparsity']:.1%}", f"{r['metrics']['embedding_cosine_mean']:.4f}",
                 f"{r['metrics']['embedding_cosine_min']:.4f}", r["seconds"], f"{r['peak_rss_mib']:.0f}"] for r in rows]
    else:
        dense = rows[0]["metrics"]["perplexity_reference"]
        head = ["config", "weights", "sparsity", "perplexity", "x dense", "seconds", "peak RSS MiB"]
        body = [["dense", "-", "0%", f"{dense:.2f}", "1.00", "-", "-"]]
        body += [[r["spec"], r["changed"], f"{r['sparsity']:.1%}", f"{r['metrics']['perplexity_candidate']:.2f}",
                  f"{r['metrics']['perplexity_ratio']:.2f}", r["seconds"], f"{r['peak_rss_mib']:.0f}"] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, b)) + " |" for b in body]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--configs", nargs="*", help="pass specs (default: the model's list)")
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    samples = args.calib_samples or (512 if args.model == "minilm" else 32)
    if args.one:
        print(json.dumps(run_one(args.model, args.one, samples, args.calib_seqlen)))
        return
    rows = []
    for spec in args.configs or CONFIGS[args.model]:
        proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", spec,
                               "--calib-samples", str(samples), "--calib-seqlen", str(args.calib_seqlen)],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{spec} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    unit = "sentences" if args.model == "minilm" else f"windows of {args.calib_seqlen} tokens"
    lines = [f"# One-shot pruning quality: {args.model}", "",
             f"Calibration: {samples} {unit} of the first half of pydoc_data.topics; fidelity on the"
             " held-out second half. All linear layers of the transformer blocks (attention and FFN"
             " projections); heads stay dense.",
             f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}; command:"
             f" `python benchmarks/prune_quality.py --model {args.model}"
             + (f" --calib-samples {args.calib_samples}" if args.calib_samples else "") + "`", ""]
    lines += table(args.model, rows)
    (RESULTS / f"prune_quality_{args.model}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"prune_quality_{args.model}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
