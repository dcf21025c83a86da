"""Sparsity composed with ONNX Runtime 4-bit (MatMulNBits) and int8 quantization: SmolLM2-135M on the CPU.

Every configuration is compiled from the KV-cache export (``smollm2-kv``) as ``sparsec compile
MODEL --passes SPEC`` would (default built-in calibration; ``best_effort`` so that configurations
below the default budget are measured too), each in its own process. Fidelity: the compile's own
verdict on held-out pydoc text (perplexity ratio), and perplexity on 8 x 512 tokens of the
``docstrings`` text, which no builder, test or calibration reads. File size: the model and its
external data. Speed (``--time``, a separate step so that it can run on a quiet machine): every
model timed interleaved in one ONNX Runtime process (``compare_speed``: median and p10-p90 of
per-round ratios after warm-up) on a 512-token prompt and on one decode step with 511 cached
positions; decode tokens per second from the median decode step.

    python benchmarks/quantized_smollm2.py --build DIR     # compile + fidelity (~60 min on 2 cores)
    python benchmarks/quantized_smollm2.py --build DIR --only "int4"   # (re)build some configurations
    python benchmarks/quantized_smollm2.py --time DIR      # speed; results/quantized_smollm2_cpu.md + .json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
INT4 = "quantize:mode=int4"
CONFIGS = {
    "int8 dynamic": "quantize:mode=dynamic",
    "int4": INT4,
    "ffn 25%": "ffn-neurons:ratio=0.25",
    "ffn 25% + int4": f"ffn-neurons:ratio=0.25;{INT4}",
    "ffn 50% + int4": f"ffn-neurons:ratio=0.5;{INT4}",
    "50% unstructured + int4": f"unstructured:sparsity=0.5;{INT4}",
    # experts=8,k=6: the mildest MoE split of benchmarks/results/moe_quality_smollm2.md; int4 turns
    # its com.microsoft.MoE nodes into QMoE with 4-bit experts (and the other MatMuls into MatMulNBits)
    "moe k=6 of 8 + int4 (QMoE)": f"moe:experts=8,k=6,shared=0,lowering=contrib;{INT4}",
}


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file()) / 2**20


def compile_one(spec: str, out: Path) -> dict:
    from sparsec.compiler import compile
    from sparsec.models import build

    start = time.perf_counter()
    result = compile(build("smollm2-kv"), passes=spec, output=out, samples=1, best_effort=True)
    verdict = result.verdicts["real"]
    return {"spec": spec, "seconds": round(time.perf_counter() - start, 1), "verdict": result.judgement.status,
            "metrics": verdict.metrics, "calibration": result.calibration}


def docstring_windows() -> list[dict[str, np.ndarray]]:
    from sparsec.models import llama, text

    ids = llama.smollm2_tokenizer()(text.text("docstrings"), add_special_tokens=False)["input_ids"]
    return llama.token_windows(ids, 8, 512)


def _feed_for(session, ids: np.ndarray, past: int) -> dict[str, np.ndarray]:
    """A prompt (past=0) or a decode step after ``past`` positions, in the model's own cache shape
    (taken from the session's cache inputs)."""
    rng = np.random.default_rng(0)
    feed = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], past + ids.shape[1]), np.int64)}
    for inp in session.get_inputs():
        if inp.name.startswith("past"):
            heads, dim = inp.shape[1], inp.shape[3]
            feed[inp.name] = (rng.standard_normal((ids.shape[0], heads, past, dim)) * 0.5).astype(np.float32)
    return feed


def perplexity(dense: Path, path: Path, windows) -> dict:
    from sparsec.metrics import Perplexity
    from sparsec.runtime.session import cpu_runner

    runner = cpu_runner()
    ref, cand = runner.session(dense), runner.session(path)
    metric = Perplexity()
    for w in windows:
        metric.add(w, runner.run(ref, _feed_for(ref, w["input_ids"], 0), ["logits"]),
                   runner.run(cand, _feed_for(cand, w["input_ids"], 0), ["logits"]))
    return metric.result()


def build_all(workdir: Path, only: list[str]) -> None:
    from sparsec.models import build

    dense = build("smollm2-kv")
    windows = docstring_windows()
    saved = workdir / "table.json"
    table = json.loads(saved.read_text()) if saved.exists() else {}
    table["dense"] = {"spec": "-", "path": str(dense), "size_mb": _size_mb(Path(dense))}
    for label, spec in CONFIGS.items():
        if only and label not in only:
            continue
        out = workdir / label.replace(" ", "_").replace("%", "pct").replace("/", "of").replace("+", "p") / "model.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, __file__, "--one", spec, str(out)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{spec} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(path=str(out), size_mb=_size_mb(out), docstrings=perplexity(Path(dense), out, windows))
        table[label] = row
        print(label, json.dumps({k: row[k] for k in ("seconds", "verdict", "size_mb")}),
              f"held-out x{row['metrics'].get('perplexity_ratio', float('nan')):.3f}",
              f"docstrings x{row['docstrings']['perplexity_ratio']:.3f}", flush=True)
        (workdir / "table.json").write_text(json.dumps(table, indent=1, default=str))


def time_all(workdir: Path, threads: int) -> dict:
    from sparsec.runtime.bench import compare_speed
    from sparsec.runtime.session import cpu_runner

    table = {label: row for label, row in json.loads((workdir / "table.json").read_text()).items()
             if label == "dense" or label in CONFIGS}  # rows of configurations since dropped stay out
    models = {label: row["path"] for label, row in table.items()}
    runner = cpu_runner()
    ids = docstring_windows()[0]["input_ids"]
    speeds = {}
    for what, (tokens, past) in {"512-token prompt": (ids, 0), "decode (511 cached)": (ids[:, :1], 511)}.items():
        feeds = {label: _feed_for(runner.session(path), tokens, past) for label, path in models.items()}
        speeds[what] = compare_speed(models, feeds["dense"], feeds=feeds, threads=threads, min_repeats=10,
                                     max_repeats=30)
        print(what, {k: round(v.median, 2) for k, v in speeds[what].ratios.items()}, flush=True)
    decode = speeds["decode (511 cached)"]
    vs_int4 = {label: decode.ratio(label, "int4").__dict__ for label in models}
    return {"table": table, "speeds": {k: v.to_dict() for k, v in speeds.items()}, "vs_int4": vs_int4,
            "threads": threads,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores"}


def render(raw: dict, command: str) -> list[str]:
    import onnxruntime

    table, speeds = raw["table"], raw["speeds"]
    decode = speeds["decode (511 cached)"]
    dense_ppl = table["int4"]["metrics"]["perplexity_reference"]
    doc_dense = table["int4"]["docstrings"]["perplexity_reference"]
    lines = ["# Sparsity + ONNX Runtime 4-bit / int8: SmolLM2-135M on the CPU", "",
             f"ONNX Runtime {onnxruntime.__version__} CPU EP, {raw['threads']} threads, {raw['machine']}.",
             "Every model compiled from the KV-cache export as `sparsec compile MODEL --passes SPEC` does (default"
             " built-in calibration: the first half of pydoc_data.topics). Fidelity: the compile's verdict (perplexity"
             " on held-out pydoc windows, ratio to dense) and perplexity on 8 x 512 tokens of the standard library's"
             " docstrings, which nothing that built or checked a model reads. Speed: every model timed interleaved in"
             " one process, per-round ratios to dense, median (p10-p90); decode is one token after 511 cached"
             " positions. File: the .onnx and its external data.",
             "`int4` is `quantize:mode=int4` (ORT MatMulNBitsQuantizer: 4-bit blocks of 128 with zero points,"
             " accuracy level 4, every MatMul incl. the LM head); `int8 dynamic` is `quantize:mode=dynamic` (MatMulInteger).",
             "Attention-head removal is not in the table: `attention-heads` leaves this KV-cache export alone, as"
             " removing KV heads would change the shape of its past / present cache inputs and outputs"
             " (UNKNOWN_LAYOUT x 30; it prunes heads of the export without a cache).",
             f"Command: `{command}`", "",
             "| model | passes | verdict (default budget) | held-out ppl (x dense) | docstrings ppl (x dense) | file MB"
             " | prompt vs dense | decode vs dense | decode vs int4 alone | decode tokens/s |", "|" + "---|" * 10]
    for label, row in table.items():
        if label == "dense":
            held, doc, verdict = f"{dense_ppl:.2f} (1.00)", f"{doc_dense:.2f} (1.00)", "-"
        else:
            m, d = row["metrics"], row["docstrings"]
            held = f"{m['perplexity_candidate']:.2f} ({m['perplexity_ratio']:.2f})"
            doc, verdict = f"{d['perplexity_candidate']:.2f} ({d['perplexity_ratio']:.2f})", row["verdict"]
        cells = [label, f"`{row['spec']}`", verdict, held, doc, f"{row['size_mb']:.0f}"]
        for what in speeds:
            r = speeds[what]["ratios"][label]
            cells.append(f"{r['median']:.2f}x ({r['p10']:.2f}-{r['p90']:.2f})")
        r = raw["vs_int4"][label]
        cells.append(f"{r['median']:.2f}x ({r['p10']:.2f}-{r['p90']:.2f})")
        cells.append(f"{1000 / decode['timings'][label]['median_ms']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, help="compile every configuration into DIR and measure fidelity")
    parser.add_argument("--time", type=Path, help="time the models built in DIR; write the results table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), default=[],
                        help="with --build: only these configurations (the others built earlier are kept)")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(compile_one(args.one[0], Path(args.one[1])), default=str))
    elif args.build:
        build_all(args.build, args.only)
    elif args.time:
        raw = time_all(args.time, args.threads)
        command = shlex.join(["python", "benchmarks/quantized_smollm2.py", "--time", "DIR", "--threads",
                              str(args.threads)])
        lines = render(raw, f"python benchmarks/quantized_smollm2.py --build DIR && {command}")
        (RESULTS / "quantized_smollm2_cpu.json").write_text(json.dumps(raw, indent=1, default=str))
        (RESULTS / "quantized_smollm2_cpu.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    else:
        parser.error("give --build DIR or --time DIR")


if __name__ == "__main__":
    main()
