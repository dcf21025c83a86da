"""Fidelity and file size of MoE with quantized experts (com.microsoft.QMoE) on all-MiniLM-L6-v2.

Each configuration is compiled in its own process through ``sparsec.compiler.compile`` with the
compile's defaults (calibration: the example model's built-in sentences of the first half of
pydoc_data.topics) and measured against the dense model: mean / min cosine of sentence
embeddings on the compile's 64 held-out sentences (the second half of pydoc_data.topics), and
on 256 sentences of the ``docstrings`` text, which no builder, test or calibration reads.
The rows set ``moe`` (``lowering=contrib``: the MoE kernel) alone, then with
``quantize:mode=dynamic`` (int8 experts in QMoE, int8 MatMuls elsewhere) and
``quantize:mode=int4``, beside ``quantize`` alone on the dense model.

    python benchmarks/qmoe_quality.py            # writes results/qmoe_quality_minilm.md / .json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prune_quality import docstrings_fidelity  # noqa: E402 (benchmarks/ is the script's directory)

RESULTS = Path(__file__).parent / "results"
MOE = "moe:experts=8,k=2,lowering=contrib"
CONFIGS = ["quantize:mode=dynamic", "quantize:mode=int4", MOE, f"{MOE};quantize:mode=dynamic",
           f"{MOE};quantize:mode=int4", "moe:experts=8,k=4,lowering=contrib",
           "moe:experts=8,k=4,lowering=contrib;quantize:mode=int4"]


def run_one(spec: str) -> dict:
    from sparsec.compiler import compile
    from sparsec.models import build

    src = build("minilm")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        result = compile(src, passes=spec, output=out, best_effort=True)
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in out.parent.glob("model.onnx*"))
        docstrings = docstrings_fidelity("minilm", src, out)
    quant = next((r for r in result.records if r.pass_id == "quantize"), None)
    qmoe = [s for s in quant.changed if str(s.details.get("stored", "")).startswith("qmoe")] if quant else []
    return {"spec": spec, "metrics": result.verdicts["real"].metrics, "docstrings": docstrings,
            "bytes": size, "qmoe_weights": len(qmoe), "skips": quant.skip_counts() if quant else {},
            "status": result.judgement.status, "seconds": round(seconds, 1), "calibration": result.calibration}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", help="pass specs (default: the list above)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    rows = []
    for spec in args.configs or CONFIGS:
        proc = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{spec} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    write(rows, sys.argv[1:])


def write(rows: list[dict], argv: list[str]) -> None:
    from sparsec.models import build

    dense = sum(p.stat().st_size for p in Path(build("minilm")).parent.glob(Path(build("minilm")).name + "*"))
    source = next((r["calibration"]["source"] for r in rows if r.get("calibration")), "none needed")
    lines = ["# MoE with quantized experts (com.microsoft.QMoE): all-MiniLM-L6-v2, fidelity and size", "",
             f"Compiled with the compile's defaults (calibration, for `moe`: {source});"
             " embedding cosine against the dense model on its 64 held-out sentences (second half of"
             " pydoc_data.topics) and on 256 sentences of the `docstrings` text that nothing else reads. `QMoE"
             " weights`: expert weights stored in QMoE nodes (2 per FFN). MoE routers stay float (the quantize"
             " pass's default). File: the model with its external data.",
             f"Machine: {platform.machine()}; command: `{shlex.join(['python', 'benchmarks/qmoe_quality.py', *argv])}`",
             "", "| config | held-out cosine mean | min | docstrings cosine mean | min | QMoE weights | file | verdict |",
             "|---|---|---|---|---|---|---|---|", f"| dense | 1 | 1 | 1 | 1 | - | {dense / 1e6:.1f} MB | - |"]
    for r in rows:
        m, d = r["metrics"], r["docstrings"]
        lines.append(f"| `{r['spec']}` | {m['embedding_cosine_mean']:.4f} | {m['embedding_cosine_min']:.4f} |"
                     f" {d['embedding_cosine_mean']:.4f} | {d['embedding_cosine_min']:.4f} | {r['qmoe_weights']} |"
                     f" {r['bytes'] / 1e6:.1f} MB | {r['status']} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qmoe_quality_minilm.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "qmoe_quality_minilm.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
