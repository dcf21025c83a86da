"""One FFN as com.microsoft.MoE (fp32 experts) against com.microsoft.QMoE (int8 and int4 experts).

Each case builds the one-FFN model of ``moe_layer.py`` (random weights), rewrites it with
``moe:...,lowering=contrib`` (router and experts from random calibration inputs, no shared
neurons, no refit), then with the ``quantize`` pass in each mode: the MoE node becomes a QMoE
node with int8 experts (one scale per row, ``mode=dynamic``) or int4 experts (blocked,
``mode=int4``, accuracy_level 4 -- the default, int8 activations in the kernel -- and 0, float
compute). The dense FFN, the MoE and the QMoE models are timed interleaved in one process
(median ratio over rounds against the fp32 MoE, p10-p90); the file size is the saved model's
bytes (weights included); ``rel. err.`` is the largest output difference from the fp32 MoE,
relative to its largest output.

    python benchmarks/qmoe_layer.py                      # CPU, writes results/qmoe_layer_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_layer import ffn_model, rewrite  # noqa: E402 (benchmarks/ is the script's directory)

# (activation, H, I, E, k): MiniLM's and SmolLM2's FFNs.
SIZES = [("gelu", 384, 1536, 8, 2), ("swiglu", 576, 1536, 8, 2)]
TOKENS = [1, 16, 512, 2048]
QUANTIZED = {"qmoe int8": "quantize:mode=dynamic", "qmoe int4": "quantize:mode=int4",
             "qmoe int4 acc0": "quantize:mode=int4,accuracy_level=0"}


def quantize(src: Path, out: Path, spec: str) -> dict:
    from sparsec.model_io import load_model, save_model
    from sparsec.pipeline import PassContext, parse_pass_specs, run_passes

    model = load_model(src).model
    (record,) = run_passes(model, parse_pass_specs(spec), PassContext())
    assert {n.op_type for n in model.graph} >= {"QMoE"} and "MoE" not in {n.op_type for n in model.graph}, spec
    save_model(model, out)
    (node,) = [n for n in model.graph if n.op_type == "QMoE"]
    return {"block": node.attributes["block_size"].value if "block_size" in node.attributes else 0,
            "changed": len(record.changed)}


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def main() -> None:
    from sparsec.runtime.bench import compare_speed
    from sparsec.runtime.session import Runner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qmoe_layer_cpu.md"))
    args = parser.parse_args()
    runner = Runner.for_providers(["CPUExecutionProvider"])
    names = ["dense", "moe fp32", *QUANTIZED]
    rows, blocks, sizes = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind, hidden, inter, experts, k in SIZES:
            import onnx

            label = f"{kind} H{hidden} I{inter} E{experts} k{k}"
            paths = {"dense": tmp / f"{kind}{hidden}.onnx", "moe fp32": tmp / f"{kind}{hidden}-moe.onnx"}
            onnx.save(ffn_model(kind, hidden, inter, np.float32), str(paths["dense"]))
            rewrite(paths["dense"], paths["moe fp32"], experts, k, "contrib", np.float32)
            for name, spec in QUANTIZED.items():
                paths[name] = tmp / f"{kind}{hidden}-{name.replace(' ', '-')}.onnx"
                blocks[label, name] = quantize(paths["moe fp32"], paths[name], spec)["block"]
            sizes[label] = {name: size(path) for name, path in paths.items()}
            for tokens in args.tokens:
                feed = {"X": np.random.default_rng(2).standard_normal((tokens, hidden)).astype(np.float32)}
                reference = runner.run(runner.session(paths["moe fp32"]), feed)["Y"]
                errors = {name: float(np.abs(runner.run(runner.session(paths[name]), feed)["Y"] - reference).max()
                                      / np.abs(reference).max()) for name in QUANTIZED}
                speed = compare_speed(paths, feed, baseline="moe fp32", runner=runner, threads=args.threads,
                                      min_repeats=15)
                rows.append((label, tokens, speed, errors))
                print(f"{label} T{tokens}: moe {speed.timings['moe fp32'].median_ms:.3f} ms; "
                      + ", ".join(f"{n} {speed.ratios[n].median:.2f}x" for n in names), flush=True)
    import onnxruntime

    lines = ["# One FFN: com.microsoft.MoE (fp32 experts) against com.microsoft.QMoE (int8, int4 experts), CPU", "",
             f"ONNX Runtime {onnxruntime.__version__}, CPUExecutionProvider, {speed.threads} threads, machine"
             f" {platform.machine()} ({os.cpu_count()} cores), **shared with other engineers' heavy jobs while it"
             " ran**: the interleaving keeps the ratios fair, the absolute times are noisy. Speedup = median over"
             " rounds of the fp32 MoE's time / the model's time (p10-p90 in brackets); `dense` is the FFN before"
             " the MoE rewrite. Random weights; router and experts from random calibration inputs, no shared"
             " neurons, no refit; `moe:...,lowering=contrib`, then `quantize:mode=dynamic` (int8, one scale per"
             " row), `quantize:mode=int4` (blocks along K, accuracy_level 4: int8 activations in the kernel) and"
             " `quantize:mode=int4,accuracy_level=0` (float compute). `rel. err.`: largest output difference"
             " from the fp32 MoE over its largest output (the quantization error; exactness against the"
             " dequantized experts is tests/test_qmoe.py's).",
             f"Command: `{shlex.join(['python', 'benchmarks/qmoe_layer.py', *sys.argv[1:]])}`", "",
             "| FFN | tokens | MoE fp32 ms | dense | qmoe int8 | qmoe int4 | qmoe int4 acc0 | rel. err. int8 / int4 / int4 acc0 |",
             "|---|---|---|---|---|---|---|---|"]
    for label, tokens, speed, errors in rows:
        cells = " | ".join(f"{speed.ratios[n].median:.2f}x ({speed.ratios[n].p10:.2f}-{speed.ratios[n].p90:.2f})"
                           for n in ["dense", *QUANTIZED])
        lines.append(f"| {label} | {tokens} | {speed.timings['moe fp32'].median_ms:.3f} | {cells} |"
                     f" {' / '.join(f'{errors[n]:.1e}' for n in QUANTIZED)} |")
    lines += ["", "File size (the one-FFN model, weights included; int4 block size in brackets):", "",
              "| FFN | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, by_name in sizes.items():
        cells = [f"{by_name[n] / 1e6:.2f} MB" + (f" (block {blocks[label, n]})" if blocks.get((label, n)) else "")
                 for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
