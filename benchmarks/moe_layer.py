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
    parser.add_argument("--sizes", nargs="+", metavar="ACT:H:I:E:K", help="FFNs to time instead of the default ones")
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    args = parser.parse_args()
    sizes = [(a, int(h), int(i), int(e), int(k)) for a, h, i, e, k in (s.split(":") for s in args.sizes)] \
        if args.sizes else SIZES
    dtype = np.dtype(args.dtype)
    provider = "CUDAExecutionProvider" if args.provider == "cuda" else "CPUExecutionProvider"
    if args.provider == "cuda":
        import onnxruntime as ort

        ort.preload_dlls()  # the CUDA libraries PyTorch brought (../shared/gpu/README.md)
    runner = Runner.for_providers([provider])
    # On the GPU in fp32, the same models also run on the CPU: how far the providers' outputs
    # are apart, per model (dense MatMul may use TF32 on the GPU; the MoE kernel does not).
    cpu = Runner.for_providers(["CPUExecutionProvider"]) if args.provider == "cuda" and dtype == np.float32 else None
    lowerings = ["gather", "contrib", "masked"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind, hidden, inter, experts, k in sizes:
            import onnx

            src = tmp / f"{kind}{hidden}.onnx"
            onnx.save(ffn_model(kind, hidden, inter, dtype), str(src))
            paths = {"dense": src}
            for lowering in lowerings:
                paths[lowering] = tmp / f"{kind}{hidden}-{k}-{lowering}.onnx"
                rewrite(src, paths[lowering], experts, k, lowering, dtype)
            for tokens in args.tokens:
                feed = {"X": np.random.default_rng(2).standard_normal((tokens, hidden)).astype(dtype)}
                reference = runner.run(runner.session(paths["masked"]), feed)["Y"]
                agree = max(float(np.abs(runner.run(runner.session(paths[name]), feed)["Y"] - reference).max())
                            for name in ("gather", "contrib"))
                apart = {}
                if cpu is not None:
                    for name in ("dense", "contrib"):
                        here = runner.run(runner.session(paths[name]), feed)["Y"].astype(np.float64)
                        there = cpu.run(cpu.session(paths[name]), feed)["Y"].astype(np.float64)
                        apart[name] = float(np.abs(here - there).max() / np.abs(there).max())
                speed = compare_speed(paths, feed, runner=runner, threads=args.threads, min_repeats=10)
                rows.append((kind, hidden, inter, experts, k, tokens, speed, agree, apart))
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
             f"{' --dtype float16' if dtype == np.float16 else ''}"
             f"{' --sizes ' + ' '.join(args.sizes) if args.sizes else ''}"
             f"{' --tokens ' + ' '.join(map(str, args.tokens)) if args.tokens != TOKENS else ''}`", "",
             "| FFN | H | I | E | k | ideal E/k | tokens | dense ms | gather | contrib | masked | agree |"
             + (" GPU vs CPU dense | GPU vs CPU contrib |" if cpu else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if cpu else "")]
    if cpu:
        lines[2] += (" `GPU vs CPU`: the largest difference between the same model's outputs on the two providers,"
                     " relative to the largest output.")
    for kind, hidden, inter, experts, k, tokens, speed, agree, apart in rows:
        cells = " | ".join(f"{speed.ratios[n].median:.2f}x ({speed.ratios[n].p10:.2f}-{speed.ratios[n].p90:.2f})"
                           for n in lowerings)
        lines.append(f"| {kind} | {hidden} | {inter} | {experts} | {k} | {ideal(experts, k):g} | {tokens} |"
                     f" {speed.timings['dense'].median_ms:.3f} | {cells} | {agree:.1e} |"
                     + "".join(f" {apart[n]:.1e} |" for n in ("dense", "contrib") if n in apart))
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
