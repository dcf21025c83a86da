"""Small charts as inline SVG: the plots of sparsec's HTML reports, with no plotting package.

Each function returns one ``<svg>`` element (a string) that renders in any browser and keeps
the report a single self-contained file. Values are data: every mark carries a ``<title>``
with its figure, so a hover shows the number.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
FONT = "font-family='system-ui,sans-serif' font-size='11'"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' viewBox='0 0 {width} {height}'"
            f" role='img' aria-label='{_e(title)}'><text x='{width / 2:.0f}' y='16' text-anchor='middle' {FONT}"
            f" font-weight='bold'>{_e(title)}</text>{''.join(body)}</svg>")


def _color(value: float, low: float, high: float) -> str:
    """A light-to-dark blue ramp (viridis-like enough to read; monotonic in lightness)."""
    t = 0.0 if high <= low else min(1.0, max(0.0, (value - low) / (high - low)))
    r, g, b = (int(247 - t * (247 - 8)), int(251 - t * (251 - 48)), int(255 - t * (255 - 107)))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(rows: Sequence[str], cols: Sequence[str], grid: Sequence[Sequence[float | None]], *, title: str,
            fmt: str = "{:.3f}") -> str:
    """Rows x columns of cells colored by value (None: empty), each with its figure."""
    values = [v for row in grid for v in row if v is not None]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    label_w = 8 + 6 * max((len(r) for r in rows), default=4)
    cell_w, cell_h, top = 70, 18, 30 + 6 * max((len(c) for c in cols), default=4) // 2
    # Room for the rotated column labels on the right, the title and the range line.
    width = max(label_w + cell_w * len(cols) + 80, 7 * len(title) + 40, label_w + 320)
    height = top + cell_h * len(rows) + 30
    body = []
    for j, col in enumerate(cols):
        x = label_w + cell_w * j + cell_w / 2
        body.append(f"<text x='{x:.0f}' y='{top - 6}' text-anchor='start' {FONT}"
                    f" transform='rotate(-30 {x:.0f} {top - 6})'>{_e(col)}</text>")
    for i, row in enumerate(rows):
        y = top + cell_h * i
        body.append(f"<text x='{label_w - 4}' y='{y + 13}' text-anchor='end' {FONT}>{_e(row)}</text>")
        for j, value in enumerate(grid[i]):
            if value is None:
                continue
            x = label_w + cell_w * j
            fill = _color(value, low, high)
            ink = "#fff" if (value - low) > 0.55 * (high - low) and high > low else "#222"
            figure = fmt.format(value)
            body.append(f"<rect x='{x}' y='{y}' width='{cell_w - 2}' height='{cell_h - 2}' fill='{fill}'>"
                        f"<title>{_e(row)} / {_e(col)}: {_e(figure)}</title></rect>"
                        f"<text x='{x + cell_w / 2 - 1:.0f}' y='{y + 12}' text-anchor='middle' {FONT} fill='{ink}'>"
                        f"{_e(figure)}</text>")
    body.append(f"<text x='{label_w}' y='{height - 8}' {FONT}>range {_e(fmt.format(low))} (light) to"
                f" {_e(fmt.format(high))} (dark)</text>")
    return _svg(width, height, body, title)


def _ticks(low: float, high: float, log: bool) -> list[float]:
    if log:
        return [10.0 ** e for e in range(math.floor(low), math.ceil(high) + 1)]
    step = (high - low) / 4 or 1.0
    return [low + step * i for i in range(5)]


def lines(labels: Sequence[str], series: dict[str, Sequence[float]], *, title: str, ylabel: str,
          log_y: bool = False, legend: str = "") -> str:
    """One polyline per series over categorical x labels."""
    width, height, left, right, top, bottom = 720, 340, 70, 120, 30, 110
    values = [v for vs in series.values() for v in vs if v is not None and (v > 0 or not log_y)]
    if not values:
        values = [1.0]
    tr = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    low, high = tr(min(values)), tr(max(values))
    if high == low:
        high, low = high + 0.5, low - 0.5
    px = lambda i: left + (width - left - right) * (i / max(1, len(labels) - 1))  # noqa: E731
    py = lambda v: top + (height - top - bottom) * (1 - (tr(v) - low) / (high - low))  # noqa: E731
    body = [f"<line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' stroke='#888'/>",
            f"<line x1='{left}' y1='{height - bottom}' x2='{width - right}' y2='{height - bottom}' stroke='#888'/>",
            f"<text x='14' y='{(top + height - bottom) / 2:.0f}' {FONT} transform='rotate(-90 14"
            f" {(top + height - bottom) / 2:.0f})' text-anchor='middle'>{_e(ylabel)}</text>"]
    for tick in _ticks(low, high, log_y):
        value = tick if log_y else tick
        if not low <= (math.log10(value) if log_y else value) <= high + 1e-12:
            continue
        y = py(value)
        body.append(f"<text x='{left - 4}' y='{y + 4:.0f}' text-anchor='end' {FONT}>{value:.2g}</text>"
                    f"<line x1='{left}' y1='{y:.1f}' x2='{width - right}' y2='{y:.1f}' stroke='#eee'/>")
    for i, label in enumerate(labels):
        x = px(i)
        body.append(f"<text x='{x:.0f}' y='{height - bottom + 12}' {FONT} text-anchor='end'"
                    f" transform='rotate(-50 {x:.0f} {height - bottom + 12})'>{_e(label)}</text>")
    for k, (name, vs) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        points = [(px(i), py(v), v) for i, v in enumerate(vs) if v is not None and (v > 0 or not log_y)]
        body.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='"
                    + " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in points) + "'/>")
        body.extend(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3' fill='{color}'><title>{_e(name)}, {_e(labels[i])}:"
                    f" {v:.3g}</title></circle>" for i, (x, y, v) in enumerate(points))
        body.append(f"<rect x='{width - right + 10}' y='{top + 16 * k}' width='10' height='10' fill='{color}'/>"
                    f"<text x='{width - right + 24}' y='{top + 9 + 16 * k}' {FONT}>{_e(name)}</text>")
    if legend:
        body.append(f"<text x='{width - right + 10}' y='{top - 6}' {FONT}>{_e(legend)}</text>")
    return _svg(width, height, body, title)


def scatter(points: Sequence[tuple[str, float, float]], *, title: str, xlabel: str, ylabel: str,
            front: Sequence[str] = ()) -> str:
    """Labelled points (label, x, y); the labels in ``front`` joined by a line (a Pareto front)."""
    width, height, left, right, top, bottom = 600, 380, 70, 40, 30, 50
    xs, ys = [p[1] for p in points] + [1.0], [p[2] for p in points]
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = min(ys), max(ys)
    xpad, ypad = max(0.05, (xhi - xlo) * 0.1), max(1e-3, (yhi - ylo) * 0.1)
    xlo, xhi, ylo, yhi = xlo - xpad, xhi + xpad, ylo - ypad, yhi + ypad
    px = lambda v: left + (width - left - right) * (v - xlo) / (xhi - xlo)  # noqa: E731
    py = lambda v: top + (height - top - bottom) * (1 - (v - ylo) / (yhi - ylo))  # noqa: E731
    body = [f"<line x1='{left}' y1='{height - bottom}' x2='{width - right}' y2='{height - bottom}' stroke='#888'/>",
            f"<line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' stroke='#888'/>",
            f"<text x='{(left + width - right) / 2:.0f}' y='{height - 10}' text-anchor='middle' {FONT}>{_e(xlabel)}</text>",
            f"<text x='14' y='{(top + height - bottom) / 2:.0f}' {FONT} transform='rotate(-90 14"
            f" {(top + height - bottom) / 2:.0f})' text-anchor='middle'>{_e(ylabel)}</text>",
            f"<line x1='{px(1.0):.1f}' y1='{top}' x2='{px(1.0):.1f}' y2='{height - bottom}' stroke='#bbb'"
            " stroke-dasharray='4 3'/>"]
    for tick in _ticks(xlo, xhi, False):
        body.append(f"<text x='{px(tick):.0f}' y='{height - bottom + 14}' text-anchor='middle' {FONT}>{tick:.2f}</text>")
    for tick in _ticks(ylo, yhi, False):
        body.append(f"<text x='{left - 4}' y='{py(tick) + 4:.0f}' text-anchor='end' {FONT}>{tick:.3f}</text>")
    on_front = sorted((p for p in points if p[0] in front), key=lambda p: p[1])
    if len(on_front) > 1:
        body.append("<polyline fill='none' stroke='#d62728' stroke-width='1.5' points='"
                    + " ".join(f"{px(x):.1f},{py(y):.1f}" for _, x, y in on_front) + "'/>")
    for label, x, y in points:
        color = "#d62728" if label in front else "#1f77b4"
        body.append(f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='4' fill='{color}'><title>{_e(label)}:"
                    f" {x:.2f}x, {y:.4f}</title></circle><text x='{px(x) + 6:.0f}' y='{py(y) - 6:.0f}' {FONT}>"
                    f"{_e(label if len(label) < 40 else label[:37] + '...')}</text>")
    return _svg(width, height, body, title)


def bars(labels: Sequence[str], values: Sequence[float], *, title: str, unit: str) -> str:
    """Horizontal bars with their figures."""
    width, left, bar_h = 520, 80, 22
    height = 40 + bar_h * len(labels) + 20
    top = max(values, default=1.0) or 1.0
    body = []
    for i, (label, value) in enumerate(zip(labels, values)):
        y = 30 + bar_h * i
        w = (width - left - 120) * value / top
        body.append(f"<text x='{left - 6}' y='{y + 14}' text-anchor='end' {FONT}>{_e(label)}</text>"
                    f"<rect x='{left}' y='{y}' width='{w:.1f}' height='{bar_h - 6}' fill='{PALETTE[i % 2]}'>"
                    f"<title>{_e(label)}: {value:.1f} {_e(unit)}</title></rect>"
                    f"<text x='{left + w + 6:.0f}' y='{y + 14}' {FONT}>{value:.1f} {_e(unit)}</text>")
    return _svg(width, height, body, title)
