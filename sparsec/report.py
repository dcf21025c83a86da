"""Text rendering of sparsec's results. Results are data; this module only displays them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sparsec.analyze import Analysis, summarize_sparsity


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}G"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, indent: str = "") -> list[str]:
    """Left-aligned fixed-width table lines (header, rule, rows)."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: indent + "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return [line(columns), indent + "  ".join("-" * w for w in widths)] + [line(r) for r in cells]


def skip_legend(records) -> list[str]:
    """One line per skip code that occurs in ``records``: the code, its count and its meaning."""
    from collections import Counter

    from sparsec.passes.patterns import Code

    counts = Counter(s.code for r in records for s in r.skipped)
    lines = []
    for code, n in sorted(counts.items()):
        meaning = Code(code).meaning if code in Code.__members__ else ""
        lines.append(f"  {code} ({n}): {meaning}")
    return (["skip codes:"] + lines) if lines else []


def inspect_lines(analysis: Analysis, *, all_weights: bool = False, path: str = "") -> list[str]:
    """What ``sparsec inspect`` prints."""
    out = []
    if path:
        out.append(f"model {path}")
    out.append(f"  fingerprint {analysis.fingerprint}, ir_version {analysis.ir_version}, opsets "
               + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in analysis.opsets.items())
               + (f", producer {analysis.producer}" if analysis.producer else ""))
    for kind, values in (("input", analysis.inputs), ("output", analysis.outputs)):
        for v in values:
            out.append(f"  {kind} {v['name']}: {v['dtype']} {v['shape']}")
    out.append(f"  parameters {human_count(analysis.params)} ({human_bytes(analysis.weight_bytes)})")
    ops = ", ".join(f"{op} {n}" for op, n in analysis.op_counts.items())
    out.append(f"  ops ({sum(analysis.op_counts.values())} nodes): {ops}")
    summary = summarize_sparsity(analysis.weights)
    out.append(
        f"  linear weights {summary['linear_weights']} ({human_count(summary['linear_params'])} params),"
        f" zeros {summary['linear_zero_fraction']:.1%}, N:M compliant: "
        + (", ".join(f"{k} {v}" for k, v in summary["nm_compliant"].items()) or "none")
    )
    weights = analysis.weights if all_weights else analysis.linear_weights
    rows = [{
        "weight": w.name, "op": w.op or "-", "site": w.label or "-", "shape": "x".join(map(str, w.shape)) or "scalar",
        "dtype": w.dtype.lower(), "zeros": f"{w.zeros:.1%}",
        "N:M": ",".join(w.nm) or "-", "axis": "-" if w.reduce_axis is None else w.reduce_axis,
    } for w in weights]
    if rows:
        out.append("")
        out.extend(format_table(rows, ["weight", "op", "site", "shape", "dtype", "zeros", "N:M", "axis"], indent="  "))
    return out
