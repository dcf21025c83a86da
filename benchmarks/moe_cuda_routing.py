"""Why the same MoE model's outputs differ between the CUDA and CPU providers (fp32).

The contrib lowering on one FFN (random weights; benchmarks/moe_layer.py builds it), run on both
providers: how many tokens got other experts, and how far the outputs are apart, with the CUDA
provider's TF32 on (its default) and off. Needs onnxruntime-gpu (../shared/gpu/README.md).

    python benchmarks/moe_cuda_routing.py      # results/moe_cuda_routing.md holds its output
"""
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_layer as m  # noqa: E402

ort.preload_dlls()
tmp = tempfile.mkdtemp()
for kind, h, i, e, k, t in [("swiglu", 576, 1536, 8, 2, 512), ("gelu", 384, 1536, 8, 2, 2048), ("swiglu", 576, 1536, 8, 1, 2048)]:
    src = f"{tmp}/{kind}{h}{k}.onnx"; onnx.save(m.ffn_model(kind, h, i, np.float32), src)
    out = f"{tmp}/{kind}{h}{k}c.onnx"; m.rewrite(src, out, e, k, "contrib", np.float32)
    model = onnx.load(out)
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    model.graph.output.append(onnx.helper.make_tensor_value_info(topk[0].output[1], onnx.TensorProto.INT64, None))
    onnx.save(model, out)
    x = {"X": np.random.default_rng(2).standard_normal((t, h)).astype(np.float32)}
    cpu = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(None, x)
    for tf32 in (1, 0):
        gpu = ort.InferenceSession(out, providers=[("CUDAExecutionProvider", {"use_tf32": tf32})]).run(None, x)
        flips = int((np.sort(gpu[1], 1) != np.sort(cpu[1], 1)).any(1).sum())
        rel = np.abs(gpu[0] - cpu[0]).max() / np.abs(cpu[0]).max()
        ok = ~(np.sort(gpu[1], 1) != np.sort(cpu[1], 1)).any(1)
        rel_same = np.abs(gpu[0][ok] - cpu[0][ok]).max() / np.abs(cpu[0]).max()
        print(f"{kind} H{h} k{k} T{t} use_tf32={tf32}: tokens whose experts differ {flips}/{t}; max rel diff {rel:.1e}; on the others {rel_same:.1e}", flush=True)
