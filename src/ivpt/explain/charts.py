"""Training curves from the trainer's ``log.csv``: one matplotlib figure of small multiples, x = optimiser step.

Panels, each drawn when its columns are in the log: the total loss and each loss term, validation accuracy
(``val_*`` columns), concept health (``alive_s*``: share of a stage's foreground prototypes that win at least 1 %
of the pixels; ``entropy_s*``: mean normalised map entropy; both logged once per epoch, one line per stage), the
learning rates and throughput. Unknown columns are ignored; blank cells are gaps.
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..config import LOSS_TERMS

__all__ = ["read_log", "chart_panels", "training_figure"]


def read_log(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of a CSV log as float arrays (blank or non-numeric cells become NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def number(text: str | None) -> float:
        try:
            return float(text or "nan")
        except ValueError:
            return math.nan

    return {name: np.array([number(r.get(name)) for r in rows]) for name in (rows[0] if rows else [])}


def _matching(log: dict[str, np.ndarray], pattern: str) -> tuple[str, ...]:
    return tuple(sorted((c for c in log if re.fullmatch(pattern, c)), key=lambda c: (len(c), c)))


def chart_panels(log: dict[str, np.ndarray]) -> list[tuple[str, tuple[str, ...], str]]:
    """(title, columns, y scale) of every panel ``log`` can fill, in display order: total loss, validation
    accuracy and concept health first, then each loss term, the learning rates and throughput."""
    panels = [("total loss", ("total",), "linear"),
              ("validation accuracy (%)", _matching(log, r"val_(\w+_)?top1"), "linear"),
              ("validation part share", ("val_part_share",), "linear"),
              ("concepts alive", _matching(log, r"alive_s\d+"), "linear"),
              ("map entropy", _matching(log, r"entropy_s\d+"), "linear")]
    panels += [(f"loss: {t.replace('_', ' ')}", (t,), "linear") for t in LOSS_TERMS]
    panels += [("learning rate", ("lr_head", "lr_concepts"), "log"), ("throughput (img/s)", ("img_per_s",), "linear")]
    return [(title, shown, scale) for title, cols, scale in panels
            if (shown := tuple(c for c in cols if c in log and np.isfinite(log[c]).any()))]


def training_figure(log: dict[str, np.ndarray], *, columns: int = 4) -> Figure | None:
    """The panels of :func:`chart_panels` in a grid, each series labelled with its last value; faint vertical
    lines mark epochs. None for an empty log."""
    panels = chart_panels(log) if log else []
    if not panels:
        return None
    length = len(next(iter(log.values())))
    x = log.get("step", np.arange(length, dtype=np.float64))
    epochs = [float(x[j]) for j in range(1, length) if "epoch" in log and log["epoch"][j] != log["epoch"][j - 1]]
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(2.9 * columns, 2.0 * rows), layout="constrained")
    for j, (title, cols, scale) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, j + 1)
        for c in cols:
            keep = np.isfinite(log[c]) & np.isfinite(x) & ((log[c] > 0) if scale == "log" else True)
            # validation and health columns are filled once per epoch: their points are joined and marked
            ax.plot(x[keep], log[c][keep], lw=1.4, marker="o" if keep.sum() < 0.5 * length or keep.sum() < 3
                    else None, ms=3, label=f"{c} {log[c][keep][-1]:.3g}")
        for b in epochs:
            ax.axvline(b, color="#e4e4e4", lw=0.8, zorder=0)
        ax.set_yscale(scale)
        last = "" if len(cols) > 1 else f" · last {log[cols[0]][np.isfinite(log[cols[0]])][-1]:.3g}"
        ax.set_title(title + last, fontsize=8.5, loc="left")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25)
        ax.spines[["top", "right"]].set_visible(False)
        if len(cols) > 1:
            ax.legend(fontsize=6.5, frameon=False)
        if j >= len(panels) - columns:
            ax.set_xlabel("step", fontsize=7)
    return fig
