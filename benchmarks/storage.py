"""Compressed storage: file sizes, session start-up cost, and bit-exactness, side by side.

For each model: prune (2:4 magnitude; 90% unstructured magnitude), alone and followed by ONNX
Runtime's int8 dynamic quantization (``quantize:mode=dynamic``: int8 codes, pruned codes are the
zero point 0), then ``compress``. Reports
the bytes of the pruned weights before and after compression, the whole files, the median
ONNX Runtime session-creation time (constant folding rebuilds the weights there) of the pruned
and the compressed model, interleaved, and whether their outputs are bit-identical.

    python benchmarks/storage.py --model minilm
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    from sparsec.compiler import compile
    from sparsec.models import build, get
    from sparsec.runtime.bench import time_session_creation
    from sparsec.runtime.session import create_session, run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    src = build(args.model)
    feeds = get(args.model).real_inputs(1)[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in ("nm", "unstructured:sparsity=0.9", "nm;quantize:mode=dynamic",
                     "unstructured:sparsity=0.9;quantize:mode=dynamic"):
            pruned = compile(src, passes=spec, output=Path(tmp) / "p.onnx", samples=1, best_effort=True).output
            packed = compile(pruned, passes="compress", output=Path(tmp) / "c.onnx", samples=1)
            record = packed.records[0]
            before = sum(s.details["bytes_before"] for s in record.changed)
            after = sum(s.details["bytes_after"] for s in record.changed)
            files = {p.name: sum(f.stat().st_size for f in (p, p.with_name(p.name + ".data")) if f.exists())
                     for p in (Path(src), pruned, packed.output)}
            startup = time_session_creation({"pruned": pruned, "compressed": packed.output}, repeats=args.repeats)
            a = run(create_session(pruned), feeds)
            b = run(create_session(packed.output), feeds)
            identical = all(a[k].tobytes() == b[k].tobytes() for k in a)
            rows.append((spec, len(record.changed), before, after, files, startup, identical))
    lines = [f"# Compressed storage: {args.model}", "",
             "Pruned weights stored as non-zero values (int8 codes: codes other than the zero point) + a 1-bit"
             " mask, rebuilt by a constant-folded"
             " subgraph at session creation. Session creation timed interleaved (median of"
             f" {args.repeats}); outputs compared byte for byte on held-out inputs. Machine:"
             f" {platform.machine()}. Command: `python benchmarks/storage.py --model {args.model}`", "",
             "| pruning | weights | pruned-weight bytes | compressed | ratio | file (+data) dense / pruned / compressed | session start pruned / compressed | outputs |",
             "|---|---|---|---|---|---|---|---|"]
    for spec, n, before, after, files, startup, identical in rows:
        sizes = " / ".join(f"{v / 2**20:.1f} MiB" for v in files.values())
        lines.append(f"| {spec} | {n} | {before / 2**20:.1f} MiB | {after / 2**20:.1f} MiB | {after / before:.1%} |"
                     f" {sizes} | {startup['pruned']:.0f} / {startup['compressed']:.0f} ms |"
                     f" {'bit-identical' if identical else 'DIFFER'} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"storage_{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
