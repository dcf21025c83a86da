"""Sparse attention on SmolLM2-135M (its KV-cache export), CPU: decode speed and KV-cache memory
at long contexts, next to perplexity on 8k tokens of held-out text.

Models, each made by ``sparsec.compile`` from ``smollm2-kv``:

* ``original`` -- the export as it is (decomposed attention; every step concatenates the whole
  cache into a new one);
* ``fused`` -- ``attention`` (GroupQueryAttention, exact; full cache);
* ``window W bounded`` -- ``attention:window=W,cache=window``: a KV buffer of W positions;
* ``window W + 4 sinks`` -- ``attention:window=W,sinks=4`` (GroupQueryAttention's bounded cache
  cannot pin the first tokens, so sinks need the full cache; the pattern goes in as an attention
  bias). Perplexity for every W; the decode of W = 1024 timed too.

Decode: one token after C cached ones, C = 1k, 2k, 4k, 8k (random cache contents: speed does not
depend on them; the bounded models get W of them), every model timed interleaved; tokens/s is
1000 / median ms. KV memory: the past the step reads. Perplexity: 8,192 tokens (``--ppl-windows``) of
the ``docstrings`` text (the standard library's docstrings, read by no builder, test or
calibration), each one prompt; a windowed prompt computes what bounded-cache decoding computes
(tests/test_attention.py checks that they agree token by token).

    python benchmarks/attention_decode.py     # writes results/attention_decode_cpu.md; ~30 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
WINDOWS = (256, 512, 1024)
CONTEXTS = (1024, 2048, 4096, 8191)  # a step after 8191 cached tokens is at position 8192, the last
SINKS = 4
TIMED_SINKS = (f"window 1024 + {SINKS} sinks",)  # also timed: full cache, GQA with an attention bias


def specs(windows) -> dict[str, str]:
    out = {"fused": "attention"}
    for w in windows:
        out[f"window {w} bounded"] = f"attention:window={w},cache=window"
    for w in windows:
        out[f"window {w} + {SINKS} sinks"] = f"attention:window={w},sinks={SINKS}"
    return out


def build(spec: str, out: Path) -> dict:
    from sparsec.compiler import compile
    from sparsec.models import build as zoo

    start = time.perf_counter()
    result = compile(zoo("smollm2-kv"), passes=spec, output=out, best_effort=True, samples=1)
    record = result.records[0]
    return {"spec": spec, "sites": len(record.changed), "verdict": result.judgement.status,
            "seconds": round(time.perf_counter() - start, 1)}


def long_windows(count: int, length: int) -> list[dict[str, np.ndarray]]:
    from sparsec.models import llama, text

    ids = llama.smollm2_tokenizer()(text.text("docstrings"), add_special_tokens=False)["input_ids"]
    if len(ids) < count * length:
        sys.exit(f"the docstrings text has {len(ids)} tokens, fewer than {count} x {length}")
    return llama.prefill(llama.token_windows(ids, count, length), LAYERS, KV_HEADS, HEAD_DIM)


def perplexities(paths: dict[str, Path], feeds) -> dict[str, float]:
    from sparsec.metrics import Perplexity
    from sparsec.runtime.kvcache import KVCache
    from sparsec.runtime.session import cpu_runner

    runner = cpu_runner()
    out = {}
    for label, path in paths.items():
        session = runner.session(path)
        kv = KVCache.of_session(session)
        metric = Perplexity()
        for feed in feeds:
            inputs, shared = kv.feed(feed, session.get_inputs())
            logits = {"logits": runner.run(session, inputs, ["logits"], shared=shared)["logits"]}
            metric.add(feed, logits, logits)
        out[label] = metric.result()["perplexity_candidate"]
        del session
        print(f"perplexity {label}: {out[label]:.3f}", flush=True)
    return out


def decode_feed(cached: int, held: int) -> dict[str, np.ndarray]:
    """One new token after ``cached`` tokens of which the model holds ``held`` (its buffer)."""
    from sparsec.models import llama

    rng = np.random.default_rng(0)
    names, _ = llama.kv_names(LAYERS)
    feed = {"input_ids": np.array([[1234]], np.int64), "attention_mask": np.ones((1, cached + 1), np.int64)}
    feed.update({n: (rng.standard_normal((1, KV_HEADS, held, HEAD_DIM)) * 0.5).astype(np.float32) for n in names})
    return feed


def main() -> None:
    from sparsec.models import build as zoo
    from sparsec.runtime.bench import compare_speed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=list(WINDOWS))
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--ppl-windows", type=int, default=1, help="8k-token windows of text for perplexity")
    parser.add_argument("--ppl-length", type=int, default=8192)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "sparsec" / "bench" / "attention_decode",
                        help="compiled models and finished phases are kept here; a rerun resumes")
    args = parser.parse_args()
    original = zoo("smollm2-kv")
    args.workdir.mkdir(parents=True, exist_ok=True)
    state_file = args.workdir / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"builds": {}, "ppl": {}}
    save = lambda: state_file.write_text(json.dumps(state, indent=1))  # noqa: E731
    paths = {"original": original}
    for label, spec in specs(args.windows).items():
        out = args.workdir / label.replace(" ", "_").replace("+", "") / "model.onnx"
        needed = label in TIMED_SINKS or "sinks" not in label or label not in state["ppl"]
        if needed and (label not in state["builds"] or not out.exists()):
            out.parent.mkdir(exist_ok=True)
            state["builds"][label] = build(spec, out)
            save()
        paths[label] = out
        print(label, state["builds"][label], flush=True)
    missing = {k: v for k, v in paths.items() if k not in state["ppl"]}
    if missing:
        state["ppl"].update(perplexities(missing, long_windows(args.ppl_windows, args.ppl_length)))
        save()
    timed = {k: v for k, v in paths.items() if "sinks" not in k or k in TIMED_SINKS}
    speeds = {}
    for cached in args.contexts:
        # a decode step after `cached` tokens reaches position cached + 1 (the rotary tables end at 8192)
        feeds = {label: decode_feed(cached, int(label.split()[1])) for label in timed if "bounded" in label}
        speeds[cached] = compare_speed(timed, decode_feed(cached, cached), feeds=feeds, min_repeats=10,
                                       max_repeats=30)
        print(cached, {k: round(v.median, 2) for k, v in speeds[cached].ratios.items()}, flush=True)
    write(args, state["builds"], state["ppl"], speeds, state.get("from"))


def kv_mib(positions: int) -> float:
    return 2 * LAYERS * KV_HEADS * HEAD_DIM * 4 * positions / 2 ** 20


def write(args, builds: dict, ppl: dict, speeds: dict, ppl_from: str | None = None) -> None:
    import onnxruntime

    first = next(iter(speeds.values()))
    lines = ["# Sparse attention on SmolLM2-135M: decode speed, KV memory and perplexity (CPU)", "",
             f"ONNX Runtime {onnxruntime.__version__}, CPU, {first.threads} threads, {platform.machine()}"
             f" ({os.cpu_count()} cores), fp32, batch 1. Perplexity: {args.ppl_windows} windows of"
             f" {args.ppl_length} tokens of the `docstrings` text (read by no builder, test or calibration), each one"
             " prompt. Decode: one token after C cached; speedups are original time / model time, median over"
             " rounds timed interleaved (p10-p90); tokens/s = 1000 / median ms.",
             *([f"Perplexities and compile verdicts: {ppl_from}; decode timed in this run."] if ppl_from else []),
             "Command: `" + " ".join(["python benchmarks/attention_decode.py", *sys.argv[1:]]) + "`", "", "## Perplexity at 8k context", "",
             "| model | spec | verdict at compile (512-token prompts) | perplexity | x original |", "|---|---|---|---|---|",
             f"| original | - | - | {ppl['original']:.3f} | 1.000 |"]
    for label, b in builds.items():
        lines.append(f"| {label} | `{b['spec']}` | {b['verdict']} | {ppl[label]:.3f} | {ppl[label] / ppl['original']:.3f} |")
    labels = list(first.ratios)
    lines += ["", "## Decode, one token after C cached", "",
              "| C | " + " | ".join(f"{label}" for label in labels) + " |", "|---|" + "---|" * len(labels)]
    for cached, result in speeds.items():
        cells = []
        for label in labels:
            r, t = result.ratios[label], result.timings[label]
            held = int(label.split()[1]) if "bounded" in label else cached
            cells.append(f"{1000 / t.median_ms:.1f} tok/s, {r.median:.2f}x ({r.p10:.2f}-{r.p90:.2f}),"
                         f" KV {kv_mib(held):.0f} MiB")
        lines.append(f"| {cached} | " + " | ".join(cells) + " |")
    out = RESULTS / "attention_decode_cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
