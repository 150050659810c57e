"""Figures drawn from an :class:`~ivpt.explain.core.Explanation` (or a gallery); nothing here runs the model.

All functions return RGB PIL images composed with Pillow only (no plotting library), using the palette of
:mod:`ivpt.explain.draw`, so concept ``k`` has the same colour in the region, evidence and gallery views.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .core import Explanation
from .draw import (
    concept_color,
    draw_chip,
    font,
    ink_color,
    overlay_regions,
    text_size,
)

__all__ = ["render_stage_regions", "render_evidence", "render_gallery", "stack_images"]

PAPER = (255, 255, 255)
INK = (34, 34, 34)
MUTED = (115, 115, 115)
GLOBAL_COLOR = (90, 90, 90)  # the global part (model.global_part) in the evidence figure
RULE = (225, 225, 225)
PAD = 16


def _fit(text: str, fnt: ImageFont.ImageFont, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels."""
    if text_size(text, fnt)[0] <= width:
        return text
    while text and text_size(text + "…", fnt)[0] > width:
        text = text[:-1]
    return text + "…"


def _title(draw: ImageDraw.ImageDraw, expl: Explanation, i: int, width: int, title: str | None) -> None:
    c, p = int(expl.top_classes[i, 0]), float(expl.top_probs[i, 0])
    text = f"{title or f'Image {i}'} · predicted: {expl.class_name(c)} ({p:.1%})"
    draw.text((PAD, 14), _fit(text, font(16), width - 2 * PAD), font=font(16), fill=INK)


def _legend(draw: ImageDraw.ImageDraw, x: int, y: int, width: int, items: list[tuple[int, float]],
            height: int) -> None:
    """Colour chips 'k  area%' for the concepts of one stage, in columns that fit ``height``."""
    fnt = font(12)
    row_h = 20
    per_col = max(1, height // row_h)
    cols = max(1, -(-len(items) // per_col))
    col_w = width // cols
    for j, (k, share) in enumerate(items):
        cx, cy = x + (j // per_col) * col_w, y + (j % per_col) * row_h
        draw_chip(draw, (cx, cy), f"{k:>2}", concept_color(k), fnt=fnt, anchor_center=False, outline=None)
        text = f"{share:.0%}" if share >= 0.005 else "<1%"
        draw.text((cx + 30, cy + 3), text, font=fnt, fill=MUTED)


def render_stage_regions(expl: Explanation, i: int, *, size: int = 224, alpha: float = 0.5,
                         title: str | None = None) -> Image.Image:
    """Image ``i`` with every stage's argmax concept regions overlaid, one row per stage (fine to coarse).

    The first row shows the input and the top predictions; each stage row shows the regions (concept ids at
    their centroids, boundaries in white, background left uncoloured) and a legend of the concepts present with
    the share of the image each claims.

    Args:
        expl: an explanation; ``i`` indexes its batch.
        size: side of each image panel in pixels.
        alpha: opacity of the concept colours.
        title: heading (default 'Image i'), followed by the predicted class.
    """
    label_w, legend_w, title_h = 150, 220, 46
    width = PAD + label_w + size + PAD + legend_w + PAD
    rows = expl.num_stages + 1
    height = title_h + rows * (size + PAD) + PAD // 2
    fig = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(fig)
    _title(draw, expl, i, width, title)
    f_head, f_sub = font(14), font(12)
    x_img, x_leg = PAD + label_w, PAD + label_w + size + PAD

    def row_label(y: int, lines: list[str]) -> None:
        draw.text((PAD, y + 6), lines[0], font=f_head, fill=INK)
        for j, line in enumerate(lines[1:]):
            draw.text((PAD, y + 28 + 17 * j), _fit(line, f_sub, label_w - 8), font=f_sub, fill=MUTED)

    y = title_h
    image = expl.images[i]
    shown = Image.fromarray(image).resize(_fit_size(image.shape[:2], size), Image.BICUBIC)
    fig.paste(shown, (x_img, y))
    row_label(y, ["input", f"{image.shape[1]} x {image.shape[0]} px"])
    draw.text((x_leg, y + 4), "top classes", font=f_sub, fill=MUTED)
    for j in range(min(5, expl.top_classes.shape[1])):
        c, p = int(expl.top_classes[i, j]), float(expl.top_probs[i, j])
        draw.text((x_leg, y + 24 + 19 * j), _fit(f"{p:6.1%}  {expl.class_name(c)}", f_sub, legend_w),
                  font=f_sub, fill=INK if j == 0 else MUTED)

    for s in range(expl.num_stages):
        y += size + PAD
        draw.line([(PAD, y - PAD // 2), (width - PAD, y - PAD // 2)], fill=RULE, width=1)
        maps = expl.maps[s][i]
        n = maps.shape[0]
        fig.paste(overlay_regions(image, maps, size=size, alpha=alpha), (x_img, y))
        labels = expl.labels[s][i]
        shares = np.bincount(labels.ravel().astype(np.int64), minlength=n) / labels.size
        present = [(k, float(shares[k])) for k in np.argsort(-shares[:-1], kind="stable") if shares[k] > 0]
        coarse = " · coarse" if s == expl.num_stages - 1 else ""
        row_label(y, [f"stage {s}{coarse}", expl.stage_title(s), f"{len(present)} of {n - 1} concepts",
                      f"background {shares[-1]:.0%}"])
        _legend(draw, x_leg, y + 4, legend_w, present, size - 8)
    return fig


def _signed(v: float) -> str:
    """'+1.23' / '-0.45', and '0.00' rather than a signed zero for values that round to it."""
    text = f"{v:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def _fit_size(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(width, height) with the longer side ``size`` keeping the aspect ratio of ``hw``."""
    h, w = hw
    scale = size / max(h, w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def render_evidence(expl: Explanation, i: int, *, classes: int = 3, size: int = 224,
                    title: str | None = None) -> Image.Image:
    """Why image ``i`` got its top classes: each coarse concept's contribution to each class logit.

    Left: the final stage's regions (coloured as the bars). Right: one block per top class, one horizontal bar
    per coarse concept (and one for the global part, ``model.global_part``), rightwards for positive and leftwards
    for negative contributions, on one shared scale; the contributions of a class add up to its logit.

    Args:
        classes: how many of the top classes to show.
        size: side of the region panel in pixels.
        title: heading (default 'Image i'), followed by the predicted class.
    """
    N = expl.num_coarse
    k = min(classes, expl.top_classes.shape[1])
    chosen = [int(c) for c in expl.top_classes[i, :k]]
    present = expl.present[-1][i]
    rows = [(f"concept {n}", concept_color(n), bool(present[n]), expl.evidence[i, n]) for n in range(N)]
    if np.any(expl.global_evidence[i]):  # exactly zero without model.global_part
        rows.append(("global", GLOBAL_COLOR, True, expl.global_evidence[i]))
    ev = np.stack([r[3] for r in rows])  # (rows, C)
    shown = ev[:, chosen]
    # The axis spans [min(0, lowest), max(0, highest)] so that all-positive evidence uses the full width.
    lo, hi = min(0.0, float(shown.min())), max(0.0, float(shown.max()))
    span = max(hi - lo, 1e-12)

    chip_w, bar_w, value_w, row_h, head_h, gap = 84, 230, 96, 21, 40, 14
    left_w = value_w if lo < 0 else 8  # room for labels of negative bars only when there are some
    panel_w = chip_w + left_w + bar_w + value_w
    block_h = head_h + len(rows) * row_h + gap
    title_h = 46
    width = PAD + size + 2 * PAD + panel_w + PAD
    height = max(title_h + size + 44, title_h + k * block_h + PAD)
    fig = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(fig, "RGBA")
    _title(draw, expl, i, width, title)
    f_head, f_sub = font(14), font(12)

    fig.paste(overlay_regions(expl.images[i], expl.maps[-1][i], size=size), (PAD, title_h))
    draw.text((PAD, title_h + size + 8), f"final stage: {N} coarse concepts", font=f_sub, fill=MUTED)

    x0 = PAD + size + 2 * PAD
    bar_x = x0 + chip_w + left_w
    zero = bar_x + int(round(-lo / span * bar_w))
    for j, c in enumerate(chosen):
        y = title_h + j * block_h
        name = f"#{j + 1}  {expl.class_name(c)}"
        stats = f"p {float(expl.probs[i, c]):.1%} · logit {_signed(float(expl.logits[i, c]))}"
        sw = text_size(stats, f_sub)[0]
        draw.text((x0, y + 2), _fit(name, f_head, panel_w - sw - 12), font=f_head, fill=INK)
        draw.text((x0 + panel_w - sw, y + 4), stats, font=f_sub, fill=MUTED)
        top = y + head_h - 12
        draw.line([(zero, top - 3), (zero, top + len(rows) * row_h)], fill=(160, 160, 160), width=1)
        for n, (label_text, color, here, _) in enumerate(rows):
            ry = top + n * row_h
            draw_chip(draw, (x0, ry), label_text, color if here else (200, 200, 200), fnt=f_sub,
                      anchor_center=False, outline=None, pad=2)
            v = float(ev[n, c])
            length = max(int(round(abs(v) / span * bar_w)), 1)
            box = (zero, ry + 2, zero + length, ry + row_h - 4) if v >= 0 else (zero - length, ry + 2, zero,
                                                                                 ry + row_h - 4)
            draw.rectangle(box, fill=(*color, 235 if here else 90))
            label = _signed(v) + ("" if here else " (absent)")
            tx = box[2] + 4 if v >= 0 else box[0] - 4 - text_size(label, f_sub)[0]
            draw.text((tx, ry + 3), label, font=f_sub, fill=ink_color(color) if here else MUTED)
        draw.text((x0, top + len(rows) * row_h + 1),
                  f"sum of contributions = logit {_signed(float(ev[:, c].sum()))}", font=font(11), fill=MUTED)
    return fig


def render_gallery(
    gallery: dict[int, Sequence[tuple[int, np.ndarray, float]]],
    *,
    cell: int = 96,
    stage: int | None = None,
) -> dict[int, Image.Image]:
    """One image per concept row: the concept's top patches, framed in its colour, with image index and score.

    Args:
        gallery: the output of :func:`ivpt.explain.concept_gallery` (concept → [(image index, crop, score)]).
        cell: side of each patch in pixels.
        stage: shown in the row label when given.
    Returns:
        concept → RGB image of that concept's row.
    """
    label_w, caption_h, frame = 104, 18, 3
    out = {}
    f_sub = font(11)
    for k, items in gallery.items():
        count = max(len(items), 1)
        width = label_w + count * (cell + 8) + 4
        height = cell + caption_h + 10
        row = Image.new("RGB", (width, height), PAPER)
        draw = ImageDraw.Draw(row)
        color = concept_color(k)
        draw_chip(draw, (6, 8), f"concept {k}", color, fnt=font(13), anchor_center=False, outline=None)
        if stage is not None:
            draw.text((8, 34), f"stage {stage}", font=f_sub, fill=MUTED)
        if not items:
            draw.text((label_w, cell // 2), "never the strongest anywhere", font=f_sub, fill=MUTED)
        for j, (index, crop, score) in enumerate(items):
            x = label_w + j * (cell + 8)
            draw.rectangle((x, 4, x + cell - 1, 4 + cell - 1), fill=color)
            inner = Image.fromarray(crop).resize((cell - 2 * frame, cell - 2 * frame), Image.BICUBIC)
            row.paste(inner, (x + frame, 4 + frame))
            draw.text((x + 2, cell + 8), _fit(f"#{index} · {score:.2f}", f_sub, cell), font=f_sub, fill=MUTED)
        out[int(k)] = row
    return out


def stack_images(images: Sequence[Image.Image], *, gap: int = 6) -> Image.Image:
    """Images one under the other on white, left-aligned (e.g. all rows of :func:`render_gallery`)."""
    if not images:
        return Image.new("RGB", (1, 1), PAPER)
    width = max(im.width for im in images)
    height = sum(im.height for im in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, height), PAPER)
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height + gap
    return out
