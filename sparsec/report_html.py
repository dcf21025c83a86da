"""Compile reports as Markdown and as one self-contained HTML file with plots.

Both render the JSON report (``CompileResult.report()``): model summary, the plan and its
reasons, what each pass did, size before and after, the verification table; the HTML adds
plots drawn with matplotlib and embedded as PNG data: a per-layer sparsity heat map, the
per-layer sensitivity (when ``sparsec analyze`` data is given), and speed against fidelity
(when compile measured speed with ``--benchmark``).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from sparsec.report import human_bytes, human_count


def _verification_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for inputs, verdict in report.get("verification", {}).items():
        for out in verdict["outputs"]:
            rows.append({
                "inputs": inputs, "output": out["name"],
                "verdict": ("PASSED" if out["passed"] else "FAILED") if verdict["exact"] else "fidelity",
                "cosine": f"{out['cosine']:.6f}", "max abs": f"{out['max_abs']:.2e}",
                "rel L2": f"{out['rel_l2']:.2e}", "failing": f"{out['failing']} / {out['elements']}",
            })
        for key, value in verdict.get("metrics", {}).items():
            rows.append({"inputs": inputs, "output": f"metric: {key}",
                         "verdict": f"{value:.6g}" if isinstance(value, float) else str(value)})
    return rows


def _pass_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    return [{"pass": r["pass"], "kind": r["kind"], "sites": str(r["candidates"]), "changed": str(r["changed"]),
             "skipped": ", ".join(f"{k} {v}" for k, v in r["skipped"].items()) or "-",
             "params": human_count(r["params_touched"]),
             "sparsity": f"{r['sparsity']:.1%}" if r["sparsity"] is not None else "-",
             "seconds": f"{r['seconds']:.2f}"} for r in report["records"]]


def _md_table(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return ["(none)"]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return out


def _summary(report: dict[str, Any]) -> list[tuple[str, str]]:
    sizes = report.get("sizes", {})
    before, after = report["sparsity_before"], report["sparsity_after"]
    items = [
        ("input", f"{report['input']['path']} (fingerprint {report['input']['fingerprint']})"),
        ("output", f"{report['output']['path']} (fingerprint {report['output']['fingerprint']})"),
        ("target", report["target"]),
        ("result", "PASSED" if report["passed"] else f"FAILED: {report['failure']}"),
        ("size", f"{human_bytes(sizes.get('input_bytes', 0))} -> {human_bytes(sizes.get('output_bytes', 0))}"),
        ("linear weights", f"{before['linear_weights']} -> {after['linear_weights']},"
                           f" zeros {before['linear_zero_fraction']:.1%} -> {after['linear_zero_fraction']:.1%}"),
    ]
    if report.get("speed"):
        s = report["speed"]
        items.append(("speed", f"{s['speedup']:.2f}x on the CPU EP ({s['original_ms']:.2f} -> {s['compiled_ms']:.2f}"
                               f" ms median, {s['inputs']}, {s['threads']} threads)"))
    if report.get("calibration"):
        c = report["calibration"]
        items.append(("calibration", f"{c['source']}: {c['input_sets']} input sets, {c['tokens']} tokens"))
    return items


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# sparsec compile report", ""]
    lines += [f"- **{k}**: {v}" for k, v in _summary(report)]
    lines += ["", "## Plan", ""]
    for step in report["plan"]["steps"]:
        gain = "gains speed" if step["gain"]["speedup"] else "no speed gain"
        lines.append(f"- `{step['spec']}` ({step['kind']}): {step['reason']} -- on {report['target']}: {gain}:"
                     f" {step['gain']['how']} ({step['gain']['evidence']})")
    lines += [f"- note: {n}" for n in report["plan"]["notes"]]
    lines += ["", "## Passes", ""] + _md_table(_pass_rows(report))
    lines += ["", "## Verification", ""] + _md_table(_verification_rows(report))
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


# --- plots -------------------------------------------------------------------------------------

def check_html_dependencies() -> None:
    """HTML reports draw their plots with matplotlib: say how to get it before any work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from sparsec.errors import OptionError

        raise OptionError("HTML reports need matplotlib: pip install 'sparsec[report]'") from None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def sparsity_heatmap(weights: list[dict[str, Any]]) -> str | None:
    """Layers (rows) x weight kinds (columns), colored by the fraction of zeros."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from sparsec.passes.allocation import layer_of

    linear = [w for w in weights if w.get("op") and w.get("label")]
    if not linear:
        return None
    layers = list(dict.fromkeys(layer_of(w["label"]) for w in linear))
    kinds = list(dict.fromkeys(w["label"][len(layer_of(w["label"])):].lstrip(".") or w["name"] for w in linear))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for w in linear:
        layer = layer_of(w["label"])
        kind = w["label"][len(layer):].lstrip(".") or w["name"]
        grid[layers.index(layer), kinds.index(kind)] = w["zeros"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.0 + 0.28 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_title("fraction of zeros per weight")
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _png(fig)


def sensitivity_plot(sensitivity: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    layers = [row["layer"] for row in sensitivity["layers"]]
    for level in sensitivity["levels"]:
        ax.plot(range(len(layers)), [row["drop"][str(level)] for row in sensitivity["layers"]], marker="o",
                label=f"{level:.0%}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("1 - output cosine")
    ax.set_title(f"per-layer sensitivity ({sensitivity['method']} masks)")
    ax.legend(title="sparsity")
    return _png(fig)


def pareto_plot(points: list[dict[str, Any]]) -> str:
    """Speedup against fidelity, the Pareto front highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["speedup"] for p in points]
    ys = [p["fidelity"] for p in points]
    ax.scatter(xs, ys)
    for p in points:
        ax.annotate(p["label"], (p["speedup"], p["fidelity"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = sorted((p for p in points if not any(q["speedup"] >= p["speedup"] and q["fidelity"] >= p["fidelity"]
                                                  and q is not p and (q["speedup"], q["fidelity"]) != (p["speedup"], p["fidelity"])
                                                  for q in points)), key=lambda p: p["speedup"])
    ax.plot([p["speedup"] for p in front], [p["fidelity"] for p in front], color="tab:red", label="Pareto front")
    ax.ticklabel_format(useOffset=False)
    low, high = min(xs), max(xs)
    pad = max(0.05, (high - low) * 0.1)
    ax.set_xlim(min(low, 1.0) - pad, max(high, 1.0) + pad)
    ax.set_xlabel("speedup (original / compiled time)")
    ax.set_ylabel("fidelity (output cosine)")
    ax.legend()
    return _png(fig)


def size_plot(sizes: dict[str, int]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 2.2))
    values = [sizes.get("input_bytes", 0) / 2**20, sizes.get("output_bytes", 0) / 2**20]
    ax.barh(["input", "output"], values, color=["tab:gray", "tab:blue"])
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f} MiB", va="center", fontsize=8)
    ax.set_xlabel("model + external data, MiB")
    return _png(fig)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f0f0f0}.ok{color:#070}.bad{color:#b00}img{max-width:100%;margin:0.5em 0}code{background:#f4f4f4;padding:1px 3px}"""


def _html_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: dict[str, Any], *, sensitivity: dict[str, Any] | None = None,
                pareto: list[dict[str, Any]] | None = None) -> str:
    """One self-contained HTML page (plots embedded as PNG data URIs)."""
    status = "ok" if report["passed"] else "bad"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sparsec report</title><style>{_CSS}</style>"
             "</head><body><h1>sparsec compile report</h1>",
             "<h2 id='summary'>Model</h2><table>" + "".join(
                 f"<tr><th>{html.escape(k)}</th><td class='{status if k == 'result' else ''}'>{html.escape(v)}</td></tr>"
                 for k, v in _summary(report)) + "</table>",
             "<h2 id='plan'>Plan</h2><ul>"]
    for step in report["plan"]["steps"]:
        gain = "gains speed" if step["gain"]["speedup"] else "no speed gain"
        parts.append(f"<li><code>{html.escape(step['spec'])}</code> ({step['kind']}): {html.escape(step['reason'])}"
                     f"<br>on {html.escape(report['target'])}: <b>{gain}</b>: {html.escape(step['gain']['how'])}"
                     f" ({html.escape(step['gain']['evidence'])})</li>")
    parts += [f"<li>note: {html.escape(n)}</li>" for n in report["plan"]["notes"]]
    parts.append("</ul><h2 id='passes'>Passes</h2>" + _html_table(_pass_rows(report)))
    parts.append("<h2 id='verification'>Verification</h2>" + _html_table(_verification_rows(report)))
    plots = []
    heat = sparsity_heatmap(report.get("weights_after", []))
    if heat:
        plots.append(("sparsity", "Per-layer sparsity", heat))
    if sensitivity:
        plots.append(("sensitivity", "Per-layer sensitivity", sensitivity_plot(sensitivity)))
    if pareto:
        plots.append(("pareto", "Speed against fidelity", pareto_plot(pareto)))
    plots.append(("size", "Size before and after", size_plot(report.get("sizes", {}))))
    for anchor, title, data in plots:
        parts.append(f"<h2 id='{anchor}'>{title}</h2><img alt='{title}' src='data:image/png;base64,{data}'>")
    if report.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def sweep_html(sweep) -> str:
    """A sweep's table and Pareto plot as one self-contained HTML page."""
    points = [{"label": p.label, "speedup": p.speedup, "fidelity": p.fidelity} for p in sweep.points]
    rows = [{"config": p.label, "fidelity (min cos)": f"{p.fidelity:.4f}", "speedup": f"{p.speedup:.2f}x",
             "median ms": f"{p.median_ms:.2f}", "size MiB": f"{p.output_bytes / 2**20:.1f}",
             "Pareto": "*" if p.pareto else ""} for p in sweep.points]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>sparsec sweep</title><style>{_CSS}</style>"
            f"</head><body><h1>sparsec sweep</h1><p>{html.escape(sweep.model)}: timed interleaved on the CPU,"
            f" {sweep.threads} threads, median of {sweep.repeats} ({html.escape(sweep.inputs)}).</p>"
            f"{_html_table(rows)}<h2 id='pareto'>Speed against fidelity</h2>"
            f"<img alt='Pareto plot' src='data:image/png;base64,{pareto_plot(points)}'></body></html>")


def sensitivity_html(sensitivity: dict[str, Any], model: str) -> str:
    """``sparsec analyze`` as one self-contained HTML page: the table and the sensitivity plot."""
    rows = []
    for layer in sensitivity["layers"]:
        row = {"layer": layer["layer"], "params": human_count(layer["params"])}
        row.update({f"{float(k):.0%}": f"{v:.2e}" for k, v in layer["drop"].items()})
        alloc = (sensitivity.get("allocation") or {}).get("layers", {}).get(layer["layer"])
        if alloc:
            row["outliers"] = f"{alloc['outlier_ratio']:.2%}"
            row["OWL sparsity"] = f"{alloc['sparsity']:.1%}"
        rows.append(row)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>sparsec analyze</title><style>{_CSS}</style>"
            f"</head><body><h1>sparsec analyze</h1><p>{html.escape(model)}: output drop (1 - cosine) when only"
            f" one layer is pruned ({html.escape(sensitivity['method'])} masks, unstructured), on"
            f" {html.escape(sensitivity['inputs'])}.</p>{_html_table(rows)}<h2 id='sensitivity'>Per-layer"
            f" sensitivity</h2><img alt='sensitivity' src='data:image/png;base64,{sensitivity_plot(sensitivity)}'>"
            "</body></html>")
