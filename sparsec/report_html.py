"""Compile reports as Markdown and as one self-contained HTML file with plots.

Both render the JSON report (``CompileResult.report()``): the verdict (EXACT, WITHIN BUDGET,
BELOW BUDGET or FAILED, with its figure -- a lossy result is never shown as PASSED), the plan
and its reasons, what each pass did with every skip code explained, per-pass fidelity when
``--verify-each`` measured it, speed with its spread, size, and the verification table. The
HTML adds inline SVG plots (:mod:`sparsec.svg`; no plotting package needed): per-layer damage
(relative output error on calibration data where the method measured it, else the relative
weight change, or the fraction of parameters removed), per-layer sensitivity, speed against
fidelity, and size.
"""

from __future__ import annotations

import html
from typing import Any

from sparsec import svg
from sparsec.report import human_bytes, human_count

STATUS_CLASS = {"EXACT": "ok", "WITHIN BUDGET": "ok", "BELOW BUDGET": "bad", "FAILED": "bad"}


def _meaning(code: str) -> str:
    from sparsec.passes.patterns import Code

    return Code(code).meaning if code in Code.__members__ else ""


def _verdict(report: dict[str, Any]) -> tuple[str, str]:
    """(status, one line with the deciding figure)."""
    judgement = report.get("judgement") or {}
    status = judgement.get("status", "FAILED")
    checks = judgement.get("checks") or []
    bad = next((c for c in checks if c["status"] not in ("EXACT", "WITHIN BUDGET")), None)
    shown = bad or next((c for c in checks if c["kind"] == "budget"), None) or (checks[0] if checks else None)
    if shown is None:
        return status, status
    figure = f" {shown['value']:.6g}" if shown.get("value") is not None else ""
    return status, f"{status}: {shown['what']}{figure} {shown['threshold']}".strip()


def _verification_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for inputs, verdict in report.get("verification", {}).items():
        for out in verdict["outputs"]:
            if verdict["exact"]:
                state = "within tolerance" if out["passed"] else "beyond tolerance"
            else:
                state = "measured"
            rows.append({
                "inputs": inputs, "output": out["name"], "comparison": state if not out["error"] else out["error"],
                "cosine": f"{out['cosine']:.6f}", "max abs": f"{out['max_abs']:.2e}",
                "rel L2": f"{out['rel_l2']:.2e}", "beyond tolerance": f"{out['failing']} / {out['elements']}",
            })
        for key, value in verdict.get("metrics", {}).items():
            rows.append({"inputs": inputs, "output": f"metric: {key}",
                         "comparison": f"{value:.6g}" if isinstance(value, float) else str(value)})
    return rows


def _pass_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for r in report["records"]:
        fidelity = "-"
        if r.get("fidelity"):
            cosines = [o["cosine"] for o in r["fidelity"]["outputs"]]
            fidelity = f"min cos {min(cosines):.6f}" if cosines else "-"
        rows.append({"pass": r["pass"], "kind": r["kind"], "sites": str(r["candidates"]), "changed": str(r["changed"]),
                     "skipped": ", ".join(f"{k} {v}" for k, v in r["skipped"].items()) or "-",
                     "params": human_count(r["params_touched"]),
                     "sparsity": f"{r['sparsity']:.1%}" if r["sparsity"] is not None else "-",
                     "after this pass": fidelity, "seconds": f"{r['seconds']:.2f}"})
    return rows


def _skip_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    counts: dict[str, int] = {}
    for r in report["records"]:
        for code, n in r["skipped"].items():
            counts[code] = counts.get(code, 0) + n
    return [{"code": code, "sites": str(n), "meaning": _meaning(code)} for code, n in sorted(counts.items())]


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
    _, verdict = _verdict(report)
    written = report["output"]["path"]
    items = [
        ("input", f"{report['input']['path']} (fingerprint {report['input']['fingerprint']})"),
        ("output", f"{written} (fingerprint {report['output']['fingerprint']})" if written
         else "not written (see the verdict)"),
        ("target", report["target"]),
        ("verdict", verdict),
        ("size", f"{human_bytes(sizes.get('input_bytes', 0))} -> {human_bytes(sizes.get('output_bytes', 0))}"),
        ("linear weights", f"{before['linear_weights']} -> {after['linear_weights']},"
                           f" zeros {before['linear_zero_fraction']:.1%} -> {after['linear_zero_fraction']:.1%}"),
    ]
    if report.get("speed"):
        items.append(("speed", f"{report['speed']['line']} on {', '.join(report['speed']['providers'])}"
                               f" ({report['speed']['inputs']})"))
    if report.get("calibration"):
        c = report["calibration"]
        items.append(("calibration", f"{c['source']}: {c['input_sets']} input sets, {c['tokens']} tokens"))
    budget = (report.get("plan") or {}).get("budget")
    if budget:
        from sparsec.verify import Budget

        items.append(("fidelity budget", f"{Budget(**budget).describe()} ({budget['origin']})"))
    return items


def _plan_items(report: dict[str, Any]) -> list[str]:
    items = []
    for step in report["plan"]["steps"]:
        g = step["gain"]
        gain = ("gains speed" if not g["depends"] else "gains speed under some conditions") if g["speedup"] \
            else "no speed gain"
        items.append(f"`{step['spec']}` ({step['kind']}): {step['reason']} -- on {report['target']}: {gain}:"
                     f" {g['how']} ({g['evidence']})")
    return items + [f"note: {n}" for n in report["plan"]["notes"]]


def _planner_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """Every option the planner considered (empty when the user gave the passes)."""
    planner = report.get("planner") or {}
    return [{"site": o["site"], "option": o["spec"], "status": o["status"],
             "predicted saving": f"{o['saving'] * 1e3:.2f} ms" if o.get("saving") is not None else "",
             "budget use": f"{o['use']:.0%}" if o.get("use") is not None else "", "why": o["reason"]}
            for o in planner.get("options", [])]


def _planner_summary(report: dict[str, Any]) -> str:
    planner = report.get("planner") or {}
    speed = report.get("speed") or {}
    measured = speed.get("speedup")
    text = (f"{len(planner.get('specs', []))} rewrites chosen under {planner.get('budget', '')};"
            f" predicted {planner.get('predicted_speedup', 1.0):.2f}x ({planner.get('profile', '')})")
    return text + (f"; measured {measured:.2f}x" if measured else "; measured: run with --benchmark")


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# sparsec compile report", ""]
    lines += [f"- **{k}**: {v}" for k, v in _summary(report)]
    if report.get("planner"):
        lines += ["", "## Planner", "", _planner_summary(report), ""] + _md_table(_planner_rows(report))
    lines += ["", "## Plan", ""] + [f"- {item}" for item in _plan_items(report)]
    lines += ["", "## Passes", ""] + _md_table(_pass_rows(report))
    skips = _skip_rows(report)
    if skips:
        lines += ["", "Skipped sites, by code:", ""] + _md_table(skips)
    lines += ["", "## Verdict", ""] + [f"- {c['status']} | {c['what']}"
                                        + (f" {c['value']:.6g}" if c.get("value") is not None else "")
                                        + f" {c['threshold']} | {c['inputs']}".rstrip(" |")
                                        for c in (report.get("judgement") or {}).get("checks", [])]
    lines += ["", "## Verification", ""] + _md_table(_verification_rows(report))
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


# --- plots -------------------------------------------------------------------------------------

def damage_map(record: dict[str, Any]) -> str | None:
    """One pass's changed sites, layers x site kinds, colored by how far each moved: the
    relative output error on calibration data where the method measured it, else the relative
    weight change, else the fraction of parameters removed or zeroed."""
    from sparsec.passes.allocation import layer_of

    sites = [s for s in record["sites"] if s["action"] == "changed" and s["site"]]
    if not sites:
        return None
    for key, what in (("output_error", "relative output error on calibration data"),
                      ("weight_change", "relative weight change ||W - W'|| / ||W||"),
                      ("sparsity_after", "fraction of parameters removed or zeroed")):
        values = [s["details"].get(key) if key != "sparsity_after" else s.get(key) for s in sites]
        if all(v is not None for v in values):
            break
    layers = list(dict.fromkeys(layer_of(s["site"]) for s in sites))
    kinds = list(dict.fromkeys(s["site"][len(layer_of(s["site"])):].lstrip(".") or s["weight"] for s in sites))
    grid: list[list[float | None]] = [[None] * len(kinds) for _ in layers]
    for s, value in zip(sites, values):
        layer = layer_of(s["site"])
        kind = s["site"][len(layer):].lstrip(".") or s["weight"]
        grid[layers.index(layer)][kinds.index(kind)] = value
    return svg.heatmap(layers, kinds, grid, title=f"{record['pass']}: {what}")


def router_plots(record: dict[str, Any]) -> str | None:
    """A MoE pass's routers: top-k recall against the oracle per layer, and each expert's load
    (fraction of token-slots, 1/E when balanced) per layer."""
    sites = [s for s in record["sites"] if s["action"] == "changed" and "router_recall" in s["details"]]
    if not sites:
        return None
    layers = [s["site"] for s in sites]
    recall = svg.lines(layers, {"recall": [s["details"]["router_recall"] for s in sites]},
                       title=f"{record['pass']}: router top-k recall against the oracle (calibration data)",
                       ylabel="recall")
    experts = max(len(s["details"]["expert_load"]) for s in sites)
    grid = [[*s["details"]["expert_load"], *[None] * (experts - len(s["details"]["expert_load"]))] for s in sites]
    load = svg.heatmap(layers, [f"expert {e}" for e in range(experts)], grid,
                       title=f"{record['pass']}: expert load (fraction of token-slots; {1 / experts:.3f} is balanced)")
    return recall + load


def sensitivity_plot(sensitivity: dict[str, Any]) -> str:
    layers = [row["layer"] for row in sensitivity["layers"]]
    series = {f"{level:.0%}": [row["drop"][str(level)] for row in sensitivity["layers"]]
              for level in sensitivity["levels"]}
    return svg.lines(layers, series, title=f"per-layer sensitivity ({sensitivity['method']} masks)",
                     ylabel="1 - output cosine", log_y=True, legend="sparsity")


def pareto_plot(points: list[dict[str, Any]]) -> str:
    """Speedup against fidelity, the Pareto front highlighted."""
    front = [p["label"] for p in points if not any(
        q is not p and q["speedup"] >= p["speedup"] and q["fidelity"] >= p["fidelity"]
        and (q["speedup"], q["fidelity"]) != (p["speedup"], p["fidelity"]) for q in points)]
    return svg.scatter([(p["label"], p["speedup"], p["fidelity"]) for p in points], front=front,
                       title="speed against fidelity", xlabel="speedup (original / compiled time)",
                       ylabel="fidelity (output cosine)")


def size_plot(sizes: dict[str, int]) -> str:
    return svg.bars(["input", "output"], [sizes.get("input_bytes", 0) / 2**20, sizes.get("output_bytes", 0) / 2**20],
                    title="model + external data", unit="MiB")


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f0f0f0}.ok{color:#070;font-weight:bold}.bad{color:#b00;font-weight:bold}svg{max-width:100%;margin:0.5em 0}
code{background:#f4f4f4;padding:1px 3px}"""


def _html_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, parts: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(parts) + "</body></html>")


def render_html(report: dict[str, Any], *, sensitivity: dict[str, Any] | None = None,
                pareto: list[dict[str, Any]] | None = None) -> str:
    """One self-contained HTML page (plots inline as SVG)."""
    status, _ = _verdict(report)
    parts = ["<h1>sparsec compile report</h1>",
             "<h2 id='summary'>Model</h2><table>" + "".join(
                 f"<tr><th>{html.escape(k)}</th><td class='{STATUS_CLASS.get(status, '') if k == 'verdict' else ''}'>"
                 f"{html.escape(v)}</td></tr>" for k, v in _summary(report)) + "</table>",
             "<h2 id='plan'>Plan</h2><ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in _plan_items(report))
             + "</ul>",
             "<h2 id='passes'>Passes</h2>" + _html_table(_pass_rows(report))]
    if report.get("planner"):
        parts.insert(2, f"<h2 id='planner'>Planner</h2><p>{html.escape(_planner_summary(report))}</p>"
                     + _html_table(_planner_rows(report)))
    skips = _skip_rows(report)
    if skips:
        parts.append("<p>Skipped sites, by code:</p>" + _html_table(skips))
    checks = (report.get("judgement") or {}).get("checks", [])
    parts.append("<h2 id='verdict'>Verdict</h2>" + _html_table([
        {"status": c["status"], "criterion": c["what"], "figure": f"{c['value']:.6g}" if c.get("value") is not None else "",
         "bound": c["threshold"], "inputs": c["inputs"]} for c in checks]))
    parts.append("<h2 id='verification'>Verification</h2>" + _html_table(_verification_rows(report)))
    plots = []
    maps = [m for m in (damage_map(r) for r in report.get("records", [])) if m]
    if maps:
        plots.append(("damage", "Per-site damage", "".join(maps)))
    routers = [m for m in (router_plots(r) for r in report.get("records", [])) if m]
    if routers:
        plots.append(("routers", "Routers", "".join(routers)))
    if sensitivity:
        plots.append(("sensitivity", "Per-layer sensitivity", sensitivity_plot(sensitivity)))
    if pareto:
        plots.append(("pareto", "Speed against fidelity", pareto_plot(pareto)))
    plots.append(("size", "Size before and after", size_plot(report.get("sizes", {}))))
    parts += [f"<h2 id='{anchor}'>{title}</h2>{data}" for anchor, title, data in plots]
    if report.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"]) + "</ul>")
    return _page("sparsec report", parts)


def sweep_html(sweep) -> str:
    """A sweep's table and Pareto plot as one self-contained HTML page."""
    points = [{"label": p.label, "speedup": p.speedup, "fidelity": p.fidelity} for p in sweep.points]
    rows = [{"config": p.label, "verdict": p.verdict or "-", "fidelity (min cos)": f"{p.fidelity:.4f}",
             "speedup (p10-p90)": f"{p.speedup:.2f}x ({p.speedup_p10:.2f}-{p.speedup_p90:.2f})",
             "median ms": f"{p.median_ms:.2f}", "size MiB": f"{p.output_bytes / 2**20:.1f}",
             "Pareto": "*" if p.pareto else ""} for p in sweep.points]
    stable = "" if sweep.stable else " The ratios did not settle: the machine was too noisy."
    return _page("sparsec sweep", [
        f"<h1>sparsec sweep</h1><p>{html.escape(sweep.model)}: timed interleaved, {sweep.threads} threads,"
        f" {sweep.repeats} rounds ({html.escape(sweep.inputs)}).{stable}</p>", _html_table(rows),
        f"<h2 id='pareto'>Speed against fidelity</h2>{pareto_plot(points)}"])


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
    return _page("sparsec analyze", [
        f"<h1>sparsec analyze</h1><p>{html.escape(model)}: output drop (1 - cosine) when only one layer is pruned"
        f" ({html.escape(sensitivity['method'])} masks, unstructured), on {html.escape(sensitivity['inputs'])}.</p>",
        _html_table(rows), f"<h2 id='sensitivity'>Per-layer sensitivity</h2>{sensitivity_plot(sensitivity)}"])
