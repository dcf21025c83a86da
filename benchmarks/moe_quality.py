"""FFN -> MoE on the real example models: fidelity on text nothing else reads, next to speed.

* ``--model minilm`` -- all-MiniLM-L6-v2. Each config is compiled with ``sparsec.compile``
  (default calibration: what ``sparsec compile`` uses without ``--calib-samples``; and with 512
  calibration sentences); fidelity is the mean / min cosine of sentence embeddings on 256
  sentences of the ``docstrings`` text (the standard library's docstrings: read by no builder,
  test, calibration or compile-time check); speed is batch 8 x 256 tokens of that text, every
  config and the dense model timed interleaved in one process.
* ``--model smollm2`` -- SmolLM2-135M with its KV cache (``smollm2-kv``; ``lowering=auto`` puts
  the routed experts in com.microsoft.MoE for it). Fidelity is the perplexity of 8 windows of
  512 tokens of the ``docstrings`` text (prompts with an empty cache); speed is a 512-token
  prompt and the decoding of one token after 511 cached ones (tokens per second), dense and
  every config interleaved.

    python benchmarks/moe_quality.py --model minilm     # writes results/moe_quality_minilm.md
    python benchmarks/moe_quality.py --model smollm2    # about 40 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

CONFIGS = {
    "minilm": [f"moe:experts=8,k={k},shared={s}" for k in (4, 2, 1) for s in (0, -1)],
    "smollm2": ["moe:experts=8,k=6,shared=0", "moe:experts=8,k=4,shared=0", "moe:experts=8,k=4,shared=-1",
                "moe:experts=8,k=2,shared=0", "moe:experts=8,k=2,shared=-1"],
}
ZOO = {"minilm": "minilm", "smollm2": "smollm2-kv"}


def compile_one(model: str, spec: str, samples: int | None, out: Path) -> dict:
    from sparsec.compiler import compile

    start = time.perf_counter()
    from sparsec.models import build

    result = compile(build(ZOO[model]), passes=spec, output=out, calib_samples=samples, best_effort=True, samples=1)
    record = result.records[0]
    changed = record.changed
    return {"spec": spec, "calib": samples or "default", "calibration": result.calibration,
            "seconds": round(time.perf_counter() - start, 1), "ffns": len(changed),
            "active": float(np.mean([s.details["active_fraction"] for s in changed])),
            "shared": float(np.mean([s.details["shared"] / (s.details["shared"] + s.details["experts"]
                                                             * s.details["expert_size"]) for s in changed])),
            "recall": float(np.mean([s.details.get("router_recall", np.nan) for s in changed])),
            "lowering": sorted({s.details["lowering"] for s in changed}), "path": str(out)}


def minilm_fidelity(dense: Path, paths: dict[str, Path]) -> dict[str, tuple[float, float]]:
    from sparsec.metrics import SentenceEmbeddingCosine
    from sparsec.models import bert, text
    from sparsec.runtime.session import cpu_runner

    runner = cpu_runner()
    sentences = text.sentences("docstrings", 256)
    feeds = [bert.encode(sentences[i:i + 32]) for i in range(0, 256, 32)]
    reference = runner.session(dense)
    refs = [runner.run(reference, f) for f in feeds]
    out = {}
    for label, path in paths.items():
        session = runner.session(path)
        metric = SentenceEmbeddingCosine("last_hidden_state")
        for feed, ref in zip(feeds, refs):
            metric.add(feed, ref, runner.run(session, feed))
        result = metric.result()
        out[label] = (result["embedding_cosine_mean"], result["embedding_cosine_min"])
    return out


def minilm_speed_feed() -> dict[str, np.ndarray]:
    from sparsec.models import bert, text

    ids = bert.tokenizer()(text.text("docstrings"), add_special_tokens=False)["input_ids"]
    batch = np.asarray(ids[:8 * 256], np.int64).reshape(8, 256)
    return {"input_ids": batch, "attention_mask": np.ones_like(batch), "token_type_ids": np.zeros_like(batch)}


def smollm2_windows(count: int = 8, length: int = 512) -> list[dict[str, np.ndarray]]:
    from sparsec.models import llama, text

    ids = llama.smollm2_tokenizer()(text.text("docstrings"), add_special_tokens=False)["input_ids"]
    return llama.prefill(llama.token_windows(ids, count, length), 30, 3, 64)


def smollm2_fidelity(dense: Path, paths: dict[str, Path]) -> dict[str, float]:
    from sparsec.metrics import Perplexity
    from sparsec.runtime.session import cpu_runner

    runner = cpu_runner()
    feeds = smollm2_windows()
    reference = runner.session(dense)
    refs = [runner.run(reference, f, ["logits"]) for f in feeds]
    out = {"dense": Perplexity()}
    for feed, ref in zip(feeds, refs):
        out["dense"].add(feed, ref, ref)
    for label, path in paths.items():
        session = runner.session(path)
        out[label] = Perplexity()
        for feed, ref in zip(feeds, refs):
            out[label].add(feed, ref, runner.run(session, feed, ["logits"]))
    return {label: m.result()["perplexity_candidate"] for label, m in out.items()}


def decode_feed(past: int = 511) -> dict[str, np.ndarray]:
    from sparsec.models import llama

    rng = np.random.default_rng(0)
    names, _ = llama.kv_names(30)
    feed = {"input_ids": np.array([[1234]], np.int64), "attention_mask": np.ones((1, past + 1), np.int64)}
    feed.update({n: (rng.standard_normal((1, 3, past, 64)) * 0.5).astype(np.float32) for n in names})
    return feed


def main() -> None:
    from sparsec.models import build
    from sparsec.runtime.bench import compare_speed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # spec samples output: compile in a child
    args = parser.parse_args()
    if args.one:
        spec, samples, out = args.one
        print(json.dumps(compile_one(args.model, spec, int(samples) or None, Path(out))))
        return
    dense = build(ZOO[args.model])
    calibs = [0, 512] if args.model == "minilm" else [0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for samples in calibs:
            for i, spec in enumerate(CONFIGS[args.model]):
                out = Path(tmp) / f"c{samples}-{i}" / "model.onnx"
                out.parent.mkdir()
                proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", spec, str(samples),
                                       str(out)], capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{spec} failed:\n{proc.stderr[-3000:]}")
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "path"}), flush=True)
        label = lambda r: f"{r['spec']} @ {r['calib']}"  # noqa: E731
        paths = {label(r): Path(r["path"]) for r in rows}
        if args.model == "minilm":
            fidelity = minilm_fidelity(dense, paths)
            feeds = {"batch 8 x 256": minilm_speed_feed()}
        else:
            fidelity = smollm2_fidelity(dense, paths)
            feeds = {"512-token prompt": smollm2_windows(1)[0], "decode (511 cached)": decode_feed()}
        speeds = {}
        for what, feed in feeds.items():
            speeds[what] = compare_speed({"dense": dense, **paths}, feed, min_repeats=10, max_repeats=40)
            print(what, {k: round(v.median, 2) for k, v in speeds[what].ratios.items()}, flush=True)
        raw = {"rows": rows, "fidelity": fidelity, "speeds": {k: v.to_dict() for k, v in speeds.items()}}
        (RESULTS / f"moe_quality_{args.model}.json").write_text(json.dumps(raw, indent=1, default=str))
    write(args.model, rows, fidelity, speeds, label)


def write(model: str, rows: list[dict], fidelity: dict, speeds: dict, label) -> None:
    import onnxruntime

    first = next(iter(speeds.values()))
    lines = [f"# FFN -> MoE on {model}: fidelity on held-out text and CPU speed", "",
             f"ONNX Runtime {onnxruntime.__version__}, CPU, {first.threads} threads, {platform.machine()}"
             f" ({os.cpu_count()} cores). Fidelity on the `docstrings` text (the standard library's docstrings),"
             " which no builder, test or calibration reads; calibration on the first half of pydoc_data.topics."
             " `active`: the fraction of FFN neurons a token computes (shared + k experts); `recall`: the router's"
             " top-k recall against the oracle on calibration data. Speedups: dense time / MoE time, median over"
             " rounds timed interleaved (p10-p90).", f"Command: `python benchmarks/moe_quality.py --model {model}`", ""]
    speed_cols = list(speeds)
    if model == "minilm":
        head = ["config", "calibration", "active", "shared", "recall", "lowering", "emb. cosine mean",
                "emb. cosine min", *speed_cols]
    else:
        head = ["config", "calibration", "active", "shared", "recall", "lowering", "perplexity", "x dense",
                *speed_cols, "decode tokens/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if model == "smollm2":
        decode = speeds["decode (511 cached)"].timings["dense"].median_ms
        lines.append(f"| dense | - | 100% | - | - | - | {fidelity['dense']:.2f} | 1.00 |"
                     + " 1.00x |" * len(speed_cols) + f" {1000 / decode:.1f} |")
    for r in rows:
        name = label(r)
        calib = r["calibration"] or {}
        cells = [r["spec"], f"{r['calib']} ({calib.get('tokens', '?')} tokens)", f"{r['active']:.0%}", f"{r['shared']:.0%}", f"{r['recall']:.3f}",
                 "/".join(r["lowering"])]
        if model == "minilm":
            cells += [f"{fidelity[name][0]:.4f}", f"{fidelity[name][1]:.4f}"]
        else:
            cells += [f"{fidelity[name]:.2f}", f"{fidelity[name] / fidelity['dense']:.2f}"]
        cells += [f"{speeds[c].ratios[name].median:.2f}x ({speeds[c].ratios[name].p10:.2f}-{speeds[c].ratios[name].p90:.2f})"
                  for c in speed_cols]
        if model == "smollm2":
            cells.append(f"{1000 / speeds['decode (511 cached)'].timings[name].median_ms:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    out = RESULTS / f"moe_quality_{model}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
