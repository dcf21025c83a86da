"""Fidelity of one-shot pruning methods on the real example models, side by side.

Each configuration is compiled in its own process (so peak memory is its own) through
``sparsec.compiler.compile`` and measured against the dense model on held-out real text:

* minilm  -- mean / min cosine of sentence embeddings on 64 held-out sentences
* smollm2 -- perplexity on 8 x 512 held-out tokens (dense on the same windows)

on the compile's own held-out inputs (the second half of pydoc_data.topics), and again on the
``docstrings`` text (the standard library's docstrings), which no builder, test or calibration
reads: 256 sentences for minilm, 8 windows of 512 tokens for smollm2.

Results go to benchmarks/results/prune_quality_<model>.md (table) and .json.

    python benchmarks/prune_quality.py --model minilm
    python benchmarks/prune_quality.py --model smollm2 --calib-samples 32
    python benchmarks/prune_quality.py --model smollm2 --suite permute-reconstruct --tag 19a

A recipe file in ``--configs`` is compiled as it says (its passes, budget and calibration):

    python benchmarks/prune_quality.py --model smollm2 --tag recipes --configs recipes/smollm2-135m-*.yaml

``--suite permute-reconstruct`` runs channel permutation (nm ``permute=true``) and block
reconstruction (``reconstruct=block``), each alone and combined, next to the method they modify.
``--suite refine-lowrank`` runs the DSnoT refinement (``refine=dsnot``) and sparse + low-rank
(OATS, ``rank_ratio``) options, each alone and with Wanda / SparseGPT, beside the plain methods
timed in the same session; its table adds the low-rank ranks and extra parameters:

    python benchmarks/prune_quality.py --model minilm --suite refine-lowrank --tag 19b

``--suite each-alone`` runs every technique alone on 2:4 SparseGPT beside SparseGPT and Wanda,
timed in the same session (the cost each adds):

    python benchmarks/prune_quality.py --model smollm2 --suite each-alone --tag each_alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
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
# Channel permutation (nm) and block reconstruction, each alone and combined, next to the method
# they modify (results: --tag 19a).
PERMUTE_RECONSTRUCT = {
    "minilm": [
        "nm:method=sparsegpt", "nm:method=sparsegpt,permute=true", "nm:method=sparsegpt,reconstruct=block",
        "nm:method=sparsegpt,permute=true,reconstruct=block", "nm:method=wanda,permute=true",
        "nm:method=wanda,permute=true,reconstruct=block",
    ],
    "smollm2": [  # most informative first: a run cut short keeps these
        "nm:method=sparsegpt", "nm:method=sparsegpt,permute=true,reconstruct=block",
        "unstructured:sparsity=0.5,method=sparsegpt,reconstruct=block", "nm:method=sparsegpt,permute=true",
        "nm:method=sparsegpt,reconstruct=block", "unstructured:sparsity=0.5,method=sparsegpt",
        "nm:method=wanda,permute=true", "nm:method=wanda,permute=true,reconstruct=block",
        "unstructured:sparsity=0.5,method=wanda,reconstruct=block",
    ],
}

# Each issue-19 technique alone on 2:4 SparseGPT, beside SparseGPT and Wanda timed in the same
# session (results: --tag each_alone).
EACH_ALONE = [
    "nm:method=sparsegpt", "nm:method=sparsegpt,permute=true", "nm:method=sparsegpt,reconstruct=block",
    "nm:method=sparsegpt,refine=dsnot", "nm:method=sparsegpt,rank_ratio=0.1", "nm:method=wanda",
]

SUITES = {
    "methods": CONFIGS,
    "each-alone": {"minilm": EACH_ALONE, "smollm2": EACH_ALONE},
    "permute-reconstruct": PERMUTE_RECONSTRUCT,
    "refine-lowrank": {
        "minilm": [
            "nm:method=wanda", "nm:method=sparsegpt",
            "nm:method=wanda,refine=dsnot", "nm:method=sparsegpt,refine=dsnot",
            "nm:method=wanda,rank_ratio=0.1", "nm:method=sparsegpt,rank_ratio=0.1",
            "nm:method=sparsegpt,rank_ratio=0.1,refine=dsnot",
        ],
        "smollm2": [
            "nm:method=sparsegpt", "nm:method=wanda,refine=dsnot", "nm:method=sparsegpt,refine=dsnot",
            "nm:method=wanda,rank_ratio=0.1", "nm:method=sparsegpt,rank_ratio=0.1",
            "nm:method=sparsegpt,rank_ratio=0.1,refine=dsnot",
            "unstructured:sparsity=0.5,method=sparsegpt", "unstructured:sparsity=0.5,method=sparsegpt,refine=dsnot",
            "unstructured:sparsity=0.5,method=sparsegpt,rank_ratio=0.1,refine=dsnot",
        ],
    },
}


def run_one(model: str, spec: str, samples: int, seqlen: int) -> dict:
    """One row: ``spec`` is a pass spec (compiled with ``samples`` x ``seqlen`` calibration) or a
    recipe file (compiled as it says, its calibration included)."""
    from sparsec.compiler import compile
    from sparsec.models import build
    from sparsec.recipe import load_recipe

    src = build(model)
    load = os.getloadavg()[0]  # other jobs on the machine stretch the times: say how busy it was
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if spec.endswith((".yaml", ".yml", ".json")):
            result = compile(src, load_recipe(spec), output=Path(tmp) / "model.onnx", best_effort=True)
        else:
            result = compile(src, passes=spec, output=Path(tmp) / "model.onnx", calib_samples=samples,
                             calib_seqlen=seqlen, samples=1, best_effort=True)
        seconds = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        docstrings = docstrings_fidelity(model, src, Path(tmp) / "model.onnx")
    record = result.records[0]
    return {
        "spec": spec, "verdict": result.judgement.status, "metrics": result.verdicts["real"].metrics, "changed": len(record.changed),
        "sparsity": record.sparsity(), "seconds": round(seconds, 1),
        "stage_seconds": {k: round(v, 1) for k, v in result.seconds.items()},
        "calibration": result.calibration,
        "peak_rss_mib": rss, "docstrings": docstrings, "load_average_at_start": round(load, 1),
        "lowrank": record.extra.get("lowrank"), "refine": record.extra.get("refine"),
    }


def docstrings_fidelity(model: str, dense: Path, pruned: Path) -> dict[str, float]:
    """The task metric on the ``docstrings`` text, which nothing that built or checked the model read."""
    from sparsec.metrics import Perplexity, SentenceEmbeddingCosine
    from sparsec.models import bert, llama, text
    from sparsec.runtime.session import cpu_runner

    if model == "minilm":
        sentences = text.sentences("docstrings", 256)
        feeds = [bert.encode(sentences[i:i + 32]) for i in range(0, 256, 32)]
        metric, outputs = SentenceEmbeddingCosine("last_hidden_state"), None
    else:
        ids = llama.smollm2_tokenizer()(text.text("docstrings"), add_special_tokens=False)["input_ids"]
        feeds, metric, outputs = llama.token_windows(ids, 8, 512), Perplexity(), ["logits"]
    runner = cpu_runner()
    reference, candidate = runner.session(dense), runner.session(pruned)
    for feed in feeds:
        metric.add(feed, runner.run(reference, feed, outputs), runner.run(candidate, feed, outputs))
    return metric.result()


def table(model: str, rows: list[dict]) -> list[str]:
    if model == "minilm":
        head = ["config", "weights", "sparsity", "emb. cosine mean", "emb. cosine min", "docstrings cosine mean",
                "docstrings cosine min", "seconds", "peak RSS MiB"]
        body = [[r["spec"], r["changed"], f"{r['sparsity']:.1%}", f"{r['metrics']['embedding_cosine_mean']:.4f}",
                 f"{r['metrics']['embedding_cosine_min']:.4f}", f"{r['docstrings']['embedding_cosine_mean']:.4f}",
                 f"{r['docstrings']['embedding_cosine_min']:.4f}", r["seconds"], f"{r['peak_rss_mib']:.0f}"]
                for r in rows]
    else:
        dense = rows[0]["metrics"]["perplexity_reference"]
        doc_dense = rows[0]["docstrings"]["perplexity_reference"]
        head = ["config", "weights", "sparsity", "perplexity", "x dense", "docstrings ppl", "docstrings x dense",
                "seconds", "peak RSS MiB"]
        body = [["dense", "-", "0%", f"{dense:.2f}", "1.00", f"{doc_dense:.2f}", "1.00", "-", "-"]]
        body += [[r["spec"], r["changed"], f"{r['sparsity']:.1%}", f"{r['metrics']['perplexity_candidate']:.2f}",
                  f"{r['metrics']['perplexity_ratio']:.2f}", f"{r['docstrings']['perplexity_candidate']:.2f}",
                  f"{r['docstrings']['perplexity_ratio']:.2f}", r["seconds"], f"{r['peak_rss_mib']:.0f}"]
                 for r in rows]
    if any(r.get("lowrank") for r in rows):
        head.insert(3, "low-rank (ranks, extra params)")
        for b, r in zip(body[-len(rows):], rows):
            lr = r.get("lowrank")
            b.insert(3, f"r {lr['ranks'][0]}..{lr['ranks'][-1]}, +{lr['extra_params'] / 1e6:.2f}M"
                     f" (+{lr['extra_params'] / lr['pruned_weights_params']:.1%})" if lr else "-")
        if model != "minilm":
            body[0].insert(3, "-")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, b)) + " |" for b in body]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--configs", nargs="*", help="pass specs or recipe files (default: the suite's list for"
                        " the model); a recipe compiles with its own calibration settings")
    parser.add_argument("--suite", choices=sorted(SUITES), default="methods",
                        help="methods: the pruning methods; permute-reconstruct: permute=true and"
                        " reconstruct=block; refine-lowrank: refine=dsnot and rank_ratio; each-alone: every"
                        " technique alone on 2:4 SparseGPT")
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--tag", help="results go to prune_quality_<model>_<tag>.md/.json")
    parser.add_argument("--rows", help="write the table from the JSON rows a run printed (its log), run nothing")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    samples = args.calib_samples or (512 if args.model == "minilm" else 32)
    if args.one:
        print(json.dumps(run_one(args.model, args.one, samples, args.calib_seqlen)))
        return
    if args.rows:  # the rows a run printed, one JSON object a line (an interrupted run's log)
        rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.startswith("{")]
        write(args, samples, rows)
        return
    rows = []
    for spec in args.configs or SUITES[args.suite][args.model]:
        proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", spec,
                               "--calib-samples", str(samples), "--calib-seqlen", str(args.calib_seqlen)],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{spec} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
        write(args, samples, rows)  # after every row: a long run stopped early keeps what it measured


def write(args: argparse.Namespace, samples: int, rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    unit = "sentences" if args.model == "minilm" else f"windows of {args.calib_seqlen} tokens"
    lines = [f"# One-shot pruning quality: {args.model}", "",
             f"Calibration: {samples} {unit} of the first half of pydoc_data.topics; fidelity on the"
             " held-out second half, and on the `docstrings` text that nothing else reads (256 sentences /"
             " 8 windows of 512 tokens). All linear layers of the transformer blocks (attention and FFN"
             " projections); heads stay dense.",
             f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}; command:"
             f" `{shlex.join(['python', 'benchmarks/prune_quality.py', *sys.argv[1:]])}`", ""]
    lines += table(args.model, rows)
    name = f"prune_quality_{args.model}" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))

if __name__ == "__main__":
    main()
