"""One FFN against its MoE rewrite, side by side: every lowering, at several sizes and token counts.

Each case builds a one-FFN model with random weights (ReLU, GELU or SwiGLU), rewrites it with
the ``moe`` pass (router and experts from random calibration inputs, no refit, no shared
neurons: the rewrite at its barest), and times the dense model and the gather, contrib and
masked lowerings interleaved in one process (median ratio over rounds, p10-p90), on the
providers of the machine (``--provider cuda`` with onnxruntime-gpu). Also checks every
lowering against the masked one (same routing, same experts).

    python benchmarks/moe_layer.py                     # CPU, writes results/moe_layer_cpu.md
    python benchmarks/moe_layer.py --provider cuda --dtype float16
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (activation, H, I, E, k): MiniLM's and SmolLM2's FFNs, and a larger FFN.
SIZES = [("gelu", 384, 1536, 8, 2), ("relu", 384, 1536, 8, 2), ("swiglu", 576, 1536, 8, 2),
         ("swiglu", 576, 1536, 8, 1), ("swiglu", 1024, 4096, 16, 2)]
TOKENS = [1, 16, 512, 2048]


def ffn_model(kind: str, hidden: int, inter: int, dtype) -> "onnx.ModelProto":  # noqa: F821
    rng = np.random.default_rng(0)
    tp = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = lambda *s: (rng.standard_normal(s) * s[0] ** -0.5).astype(dtype)  # noqa: E731
    inits = {"Wu": w(hidden, inter), "Wd": w(inter, hidden)}
    nodes = [helper.make_node("MatMul", ["X", "Wu"], ["u"], name="up")]
    if kind == "swiglu":
        inits["Wg"] = w(hidden, inter)
        nodes += [helper.make_node("MatMul", ["X", "Wg"], ["g"], name="gate"), helper.make_node("Sigmoid", ["g"], ["s"]),
                  helper.make_node("Mul", ["g", "s"], ["a"]), helper.make_node("Mul", ["a", "u"], ["h"])]
    else:
        nodes.append(helper.make_node("Gelu" if kind == "gelu" else "Relu", ["u"], ["h"]))
    nodes.append(helper.make_node("MatMul", ["h", "Wd"], ["Y"], name="down"))
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("X", tp, ["tokens", hidden])],
                              [helper.make_tensor_value_info("Y", tp, ["tokens", hidden])],
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return model


def rewrite(src: Path, out: Path, experts: int, k: int, lowering: str, dtype) -> None:
    from sparsec.data import Calibration
    from sparsec.model_io import load_model, save_model
    from sparsec.pipeline import PassContext, parse_pass_specs, run_passes

    model = load_model(src).model
    hidden = model.graph.inputs[0].shape[1]
    rng = np.random.default_rng(1)
    calib = Calibration([{"X": rng.standard_normal((2048, hidden)).astype(dtype)}], "random")
    spec = f"moe:experts={experts},k={k},lowering={lowering},shared=0,refit=false"
    (record,) = run_passes(model, parse_pass_specs(spec), PassContext(calibration=calib))
    assert len(record.changed) == 1, record.sites
    save_model(model, out)


def main() -> None:
    from sparsec.runtime.bench import compare_speed
    from sparsec.runtime.session import Runner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype = np.dtype(args.dtype)
    provider = "CUDAExecutionProvider" if args.provider == "cuda" else "CPUExecutionProvider"
    runner = Runner.for_providers([provider])
    lowerings = ["gather", "contrib", "masked"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind, hidden, inter, experts, k in SIZES:
            import onnx

            src = tmp / f"{kind}{hidden}.onnx"
            onnx.save(ffn_model(kind, hidden, inter, dtype), str(src))
            paths = {"dense": src}
            for lowering in lowerings:
                paths[lowering] = tmp / f"{kind}{hidden}-{k}-{lowering}.onnx"
                rewrite(src, paths[lowering], experts, k, lowering, dtype)
            for tokens in TOKENS:
                feed = {"X": np.random.default_rng(2).standard_normal((tokens, hidden)).astype(dtype)}
                reference = runner.run(runner.session(paths["masked"]), feed)["Y"]
                agree = max(float(np.abs(runner.run(runner.session(paths[name]), feed)["Y"] - reference).max())
                            for name in ("gather", "contrib"))
                speed = compare_speed(paths, feed, runner=runner, threads=args.threads, min_repeats=10)
                rows.append((kind, hidden, inter, experts, k, tokens, speed, agree))
                line = ", ".join(f"{n} {speed.ratios[n].median:.2f}x" for n in lowerings)
                print(f"{kind} H{hidden} I{inter} E{experts} k{k} T{tokens}: dense"
                      f" {speed.timings['dense'].median_ms:.3f} ms; {line}", flush=True)
    ideal = lambda e, k: e / k  # noqa: E731
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"moe_layer_{args.provider}{'_fp16' if dtype == np.float16 else ''}.md")
    lines = [f"# One FFN against its MoE rewrite ({args.provider.upper()}, {args.dtype})", "",
             f"ONNX Runtime {__import__('onnxruntime').__version__}, {provider}, {speed.threads} threads, machine"
             f" {platform.machine()} ({os.cpu_count()} cores). Dense and the three lowerings timed interleaved in one"
             " process; speedup = median over rounds of dense time / MoE time (p10-p90 in brackets). Random weights,"
             " router and experts from random calibration inputs, no shared neurons, no refit. `agree`: the largest"
             " difference of the gather and contrib outputs from the masked lowering's (same routing).",
             f"Command: `python benchmarks/moe_layer.py{' --provider cuda' if args.provider == 'cuda' else ''}"
             f"{' --dtype float16' if dtype == np.float16 else ''}`", "",
             "| FFN | H | I | E | k | ideal E/k | tokens | dense ms | gather | contrib | masked | agree |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, hidden, inter, experts, k, tokens, speed, agree in rows:
        cells = " | ".join(f"{speed.ratios[n].median:.2f}x ({speed.ratios[n].p10:.2f}-{speed.ratios[n].p90:.2f})"
                           for n in lowerings)
        lines.append(f"| {kind} | {hidden} | {inter} | {experts} | {k} | {ideal(experts, k):g} | {tokens} |"
                     f" {speed.timings['dense'].median_ms:.3f} | {cells} | {agree:.1e} |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
