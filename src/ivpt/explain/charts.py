"""Training curves as inline SVG line charts (no plotting library): small multiples, one per logged quantity.

Reads the trainer's ``log.csv`` (columns epoch, step, lr_head, lr_concepts, total, the eight loss terms,
img_per_s, elapsed_s); unknown columns are ignored and missing ones skipped.
"""
from __future__ import annotations

import csv
import math
from html import escape
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["read_log", "line_chart_svg", "training_charts"]

SERIES_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
FONT_FAMILY = "DejaVu Sans, Helvetica, Arial, sans-serif"

# (title, columns, log scale) of each chart, in display order.
CHARTS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("total loss", ("total",), False),
    ("classification", ("classification",), False),
    ("consistency", ("consistency",), False),
    ("orthogonality", ("orthogonality",), False),
    ("equivariance", ("equivariance",), False),
    ("presence", ("presence",), False),
    ("background presence", ("bg_presence",), False),
    ("total variation", ("tv",), False),
    ("entropy", ("entropy",), False),
    ("learning rate", ("lr_head", "lr_concepts"), True),
    ("throughput (img/s)", ("img_per_s",), False),
)


def read_log(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of a CSV log as float arrays (blank or non-numeric cells become NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    out = {}
    for name in rows[0]:
        values = []
        for row in rows:
            try:
                values.append(float(row.get(name) or "nan"))
            except ValueError:
                values.append(math.nan)
        out[name] = np.array(values, dtype=np.float64)
    return out


def _nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 × 10^k apart) covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000 or a < 1e-2:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:.3g}"


def line_chart_svg(
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    *,
    title: str,
    width: int = 300,
    height: int = 180,
    log_y: bool = False,
    xlabel: str = "step",
    boundaries: Sequence[float] = (),
) -> str:
    """A line chart as SVG text.

    Args:
        x: (T,) x values shared by all series.
        series: name → (T,) y values; NaN points are gaps.
        log_y: logarithmic y axis (non-positive values are dropped).
        boundaries: x positions to mark with faint vertical lines (e.g. epoch starts).
    """
    xs = np.asarray(x, dtype=np.float64)
    ys = {k: np.asarray(v, dtype=np.float64) for k, v in series.items()}
    if log_y:
        ys = {k: np.where(v > 0, v, np.nan) for k, v in ys.items()}
    left, right, bottom = 46, 10, 30
    top = 26 + 11 * (len(ys) - 1)  # room for one legend line per series above the plot
    pw, ph = width - left - right, height - top - bottom
    finite = np.concatenate([v[np.isfinite(v)] for v in ys.values()] or [np.array([])])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="{FONT_FAMILY}" font-size="10">',
           f'<text x="{left}" y="15" font-size="12" font-weight="bold" fill="#222">{escape(title)}</text>']
    if finite.size == 0 or xs.size == 0:
        out.append(f'<text x="{left}" y="{top + ph / 2}" fill="#888">no data</text></svg>')
        return "\n".join(out)
    lo, hi = float(finite.min()), float(finite.max())
    if log_y:
        lo, hi = math.log10(lo), math.log10(hi)
    pad = (hi - lo) * 0.06 or (abs(hi) * 0.1 or 1.0)
    lo, hi = lo - pad, hi + pad
    x_lo, x_hi = float(np.nanmin(xs)), float(np.nanmax(xs))
    if x_hi <= x_lo:
        x_hi = x_lo + 1.0

    def px(v: float) -> float:
        return left + (v - x_lo) / (x_hi - x_lo) * pw

    def py(v: float) -> float:
        v = math.log10(v) if log_y else v
        return top + (1 - (v - lo) / (hi - lo)) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#e2e2e2"/>')
    for b in boundaries:
        if x_lo < b < x_hi:
            out.append(f'<line x1="{px(b):.1f}" x2="{px(b):.1f}" y1="{top}" y2="{top + ph}" stroke="#ececec"/>')
    if log_y:
        yticks = [10.0**e for e in range(math.ceil(lo), math.floor(hi) + 1)]
    else:
        yticks = _nice_ticks(lo, hi)
    for t in yticks:
        y = py(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e6e6e6"/>')
        out.append(f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end" fill="#666">{_fmt(t)}</text>')
    for t in _nice_ticks(x_lo, x_hi, 5):
        xx = px(t)
        out.append(f'<text x="{xx:.1f}" y="{top + ph + 13}" text-anchor="middle" fill="#666">{_fmt(t)}</text>')
    out.append(f'<text x="{left + pw}" y="{height - 3}" text-anchor="end" fill="#888">{escape(xlabel)}</text>')
    legend_x = left + pw
    for j, (name, v) in enumerate(ys.items()):
        color = SERIES_COLORS[j % len(SERIES_COLORS)]
        segments, current = [], []
        for a, b in zip(xs, v):
            if math.isfinite(a) and math.isfinite(b):
                current.append(f"{px(a):.1f},{py(b):.1f}")
            elif current:
                segments.append(current)
                current = []
        if current:
            segments.append(current)
        for seg in segments:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{color}"/>')
            else:
                out.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{color}" stroke-width="1.6" '
                           f'stroke-linejoin="round"><title>{escape(name)}</title></polyline>')
        last = v[np.isfinite(v)]
        # One series: the title names it, so show only its last value; several: name each.
        prefix = f"{name} " if len(ys) > 1 else "last "
        label = f"{prefix}{_fmt(float(last[-1]))}" if last.size else name
        out.append(f'<text x="{legend_x}" y="{15 + 11 * j}" text-anchor="end" fill="{color}">'
                   f"{escape(label)}</text>")
    out.append("</svg>")
    return "\n".join(out)


def training_charts(log: dict[str, np.ndarray], *, width: int = 300, height: int = 180) -> list[str]:
    """One SVG chart per logged quantity present in ``log`` (see :data:`CHARTS`), x = optimiser step."""
    if not log:
        return []
    length = len(next(iter(log.values())))
    x = log.get("step", np.arange(length, dtype=np.float64))
    boundaries: list[float] = []
    if "epoch" in log:
        ep = log["epoch"]
        boundaries = [float(x[j]) for j in range(1, length) if ep[j] != ep[j - 1]]
    charts = []
    for title, columns, log_y in CHARTS:
        present = {c: log[c] for c in columns if c in log and np.isfinite(log[c]).any()}
        if present:
            charts.append(line_chart_svg(x, present, title=title, width=width, height=height, log_y=log_y,
                                         boundaries=boundaries))
    return charts
