"""What SparseGPT costs on SmolLM2-135M: wall time, peak memory, and CPU vs CUDA agreement.

    python benchmarks/sparsegpt_cost.py --device cpu                 # 2-core machine here
    python benchmarks/sparsegpt_cost.py --device cuda --compare      # on the GPU machine

Compiles SmolLM2 with ``unstructured:sparsity=0.5,method=sparsegpt`` (all 210 linear layers of
the decoder blocks) on N calibration windows of 512 tokens, sequentially; the model runs in
ONNX Runtime on the CPU, the Hessian accumulation and OBS solves on ``--device``. ``--compare``
also prunes the first layers' weights from one set of Hessians on the CPU and on CUDA and
reports how far the results differ.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path


def compare_devices(src: Path, samples: int) -> dict:
    import numpy as np
    import torch

    from sparsec.data import load_calibration
    from sparsec.runtime.staged import StagedRunner
    from sparsec.model_io import load_model
    from sparsec.passes import prune_methods
    from sparsec.passes.unstructured_prune import UnstructuredPrunePass
    from sparsec.pipeline import PassRecord
    from sparsec.sparsity import NMLayout, UnstructuredLayout

    model = load_model(src).model
    calib = load_calibration("builtin", model, samples=samples, seqlen=512)
    sites = UnstructuredPrunePass().select_sites(model, PassRecord("x", "x", {}))[:7]  # layer 0
    runner = StagedRunner(model, calib.feeds)
    out = []
    groups: dict = {}
    for site in sites:
        groups.setdefault(site.node.inputs[1 - site.input_index], []).append(site)
    for value, group in groups.items():
        h_cpu = prune_methods.Hessian(group[0].matrix_shape[1], "cpu")
        for feed, x in zip(calib.feeds, runner.capture(value)):
            h_cpu.add(prune_methods.activation_matrix(group[0], x, feed))
        h_gpu = prune_methods.Hessian(group[0].matrix_shape[1], "cuda")
        h_gpu.h = h_cpu.h.to("cuda")
        for site in group:
            w = site.to_matrix(site.weight.numpy()).astype(np.float32)
            for layout in (UnstructuredLayout(0.5), NMLayout(2, 4)):
                a = prune_methods.prune_matrix("sparsegpt", w, layout, h_cpu)
                b = prune_methods.prune_matrix("sparsegpt", w, layout, h_gpu)
                rel = float(np.linalg.norm(a.values - b.values) / np.linalg.norm(a.values))
                out.append({"weight": site.weight.name, "layout": layout.name,
                            "mask_agreement": float((a.mask == b.mask).mean()), "values_rel_diff": rel})
    return {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "sites": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--spec", default="unstructured:sparsity=0.5,method=sparsegpt")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from sparsec.compiler import compile
    from sparsec.models import build

    src = build("smollm2")
    result_data: dict = {"machine": platform.machine(), "cpus": os.cpu_count(), "device": args.device,
                         "samples": args.samples, "spec": args.spec}
    if args.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = compile(src, passes=f"{args.spec},device={args.device}", output=Path(tmp) / "m.onnx",
                         calib_samples=args.samples, calib_seqlen=512, samples=1)
    result_data["total_seconds"] = round(time.perf_counter() - start, 1)
    result_data["stage_seconds"] = {k: round(v, 1) for k, v in result.seconds.items()}
    result_data["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result_data["metrics"] = result.verdicts["real"].metrics
    result_data["notes"] = result.records[0].notes
    if args.device == "cuda":
        import torch

        result_data["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if args.compare:
        result_data["compare"] = compare_devices(src, min(args.samples, 16))
    text = json.dumps(result_data, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
