"""Static HTML pages: the ``ivpt explain`` index (images beside it) and the self-contained ``ivpt report``.

Both pages carry inline CSS and a tiny inline script that, after the window's load event, counts the <img>
elements that decoded (``complete`` and ``naturalWidth > 0``) and writes ``data-images-ok="ok/total"`` on
<body>; a headless browser's DOM dump then shows whether every image displays (the tests rely on it). The report
embeds every figure as a base64 PNG data URI and every chart and hierarchy as inline SVG, so the one file can be
mailed or archived; no server is needed.
"""
from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..models import IVPT
from .charts import training_charts
from .core import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Explanation,
    HierarchyAccumulator,
    _depth,
    denormalise,
    explain,
    paper_stage,
    run_batches,
)
from .draw import concept_color, hex_color, overlay_regions
from .gallery import GalleryAccumulator, batch_indices, collate_images, loader_for
from .hierarchy import hierarchy_svg, render_hierarchy
from .render import render_evidence, render_gallery, render_stage_regions

__all__ = ["METRICS", "write_explained_images", "build_report", "page", "png_data_uri", "read_metrics"]

CSS = """
:root { --ink:#222; --muted:#6b6b6b; --rule:#e5e5e5; --accent:#1f77b4; --card:#fff; --bg:#f5f6f8; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:15px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; }
header { background:#1d2733; color:#fff; padding:22px 32px 18px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:600; }
header .sub { color:#b9c3cf; font-size:13px; }
nav { position:sticky; top:0; z-index:2; background:#fff; border-bottom:1px solid var(--rule); padding:8px 32px; }
nav a { color:var(--accent); text-decoration:none; margin-right:18px; font-size:14px; }
main { max-width:1240px; margin:0 auto; padding:8px 32px 48px; }
section { margin-top:28px; }
h2 { font-size:18px; margin:0 0 4px; }
p.note { color:var(--muted); margin:0 0 12px; font-size:13px; max-width:900px; }
.card { background:var(--card); border:1px solid var(--rule); border-radius:8px; padding:16px; margin-bottom:16px;
        box-shadow:0 1px 2px rgba(0,0,0,.04); }
.metrics { display:flex; flex-wrap:wrap; gap:12px; }
.metric { background:#fff; border:1px solid var(--rule); border-radius:8px; padding:10px 16px; min-width:140px; }
.metric .v { font-size:24px; font-weight:600; }
.metric .v small { font-size:13px; font-weight:400; color:var(--muted); }
.metric .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.charts { display:grid; grid-template-columns:repeat(auto-fill, minmax(300px, 1fr)); gap:10px; }
.charts svg { background:#fff; border:1px solid var(--rule); border-radius:6px; width:100%; height:auto; }
.scroll { overflow-x:auto; }
.gallery img { display:block; margin:4px 0; max-width:100%; }
.sample h3 { margin:0 0 6px; font-size:16px; }
.sample .figs { display:flex; flex-wrap:wrap; gap:16px; align-items:flex-start; }
.sample figure { margin:0; }
figure img { max-width:100%; height:auto; border:1px solid var(--rule); border-radius:4px; }
figcaption { color:var(--muted); font-size:12px; margin-top:4px; }
.ok { color:#2ca02c; font-weight:600; } .bad { color:#d62728; font-weight:600; }
details summary { cursor:pointer; color:var(--accent); margin:8px 0; }
table.table { border-collapse:collapse; font-size:13px; margin-top:12px; }
table.table th, table.table td { padding:4px 14px 4px 0; border-bottom:1px solid var(--rule); text-align:right; }
table.table th { color:var(--muted); font-weight:600; }
table.table th:first-child, table.table td:first-child { text-align:left; }
.swatch { display:inline-block; width:11px; height:11px; border-radius:2px; vertical-align:-1px; margin-right:4px; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:24px; }
"""

# Written after load so that a headless browser's --dump-dom reports whether every image decoded.
IMAGE_CHECK_JS = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-ok', ok + '/' + imgs.length);
});
"""

# Known metric keys of eval.json (values in percent), their labels and whether lower is better.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("top1", "top-1 accuracy", "%"),
    ("top5", "top-5 accuracy", "%"),
    ("balanced_top1", "balanced top-1", "%"),
    ("consistency", "consistency", "%"),
    ("stability", "stability", "%"),
    ("nmi", "NMI", ""),
    ("ari", "ARI", ""),
    ("kpr", "keypoint error ↓", ""),
    ("fg_iou", "foreground IoU", "%"),
    ("stage", "scored stage", "stage"),
)


def png_data_uri(img: Image.Image) -> str:
    """``data:image/png;base64,...`` of ``img``."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def page(title: str, body: str, *, header: str = "") -> str:
    """A complete HTML document with the shared CSS and the image check script."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title>"
        f"<style>{CSS}</style></head>\n<body>\n{header}<main>\n{body}\n</main>\n"
        f"<footer>generated by ivpt</footer>\n<script>{IMAGE_CHECK_JS}</script>\n</body></html>\n"
    )


def _prediction_html(expl: Any, i: int, *, label: int | None = None, k: int = 3) -> str:
    """The top-``k`` prediction of image ``i`` of ``expl`` (an :class:`Explanation` or a :class:`_Prediction`:
    anything with ``top_classes``, ``top_probs`` and ``class_name``), marked right or wrong against ``label``."""
    items = []
    for j in range(min(k, expl.top_classes.shape[1])):
        c, p = int(expl.top_classes[i, j]), float(expl.top_probs[i, j])
        name = escape(expl.class_name(c))
        items.append(f"<b>{name}</b> {p:.1%}" if j == 0 else f"{name} {p:.1%}")
    text = " · ".join(items)
    if label is not None:
        right = int(expl.top_classes[i, 0]) == label
        mark = '<span class="ok">✓</span>' if right else '<span class="bad">✗</span>'
        text = f"{mark} true: {escape(expl.class_name(label))} — predicted: {text}"
    else:
        text = f"predicted: {text}"
    return f'<p class="note">{text}</p>'


@dataclass
class _Prediction:
    """What a model without IVPT's concept hierarchy shows of a batch: the top classes and its one part map."""

    top_classes: np.ndarray  # (B, k)
    top_probs: np.ndarray  # (B, k)
    maps: np.ndarray | None  # (B, n, h, w) part maps (background last), or None without any
    class_names: Sequence[str] | None

    def class_name(self, c: int) -> str:
        if self.class_names is not None and 0 <= c < len(self.class_names):
            return str(self.class_names[c])
        return f"class {c}"


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, class_names: Sequence[str] | None, k: int = 5) -> _Prediction:
    """One eval-mode forward of any model kind: its top-``k`` classes and the last of its part maps, if any."""
    was_training = model.training
    model.eval()
    try:
        out = model(images.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
    probs = out.logits.float().softmax(dim=-1)
    top_p, top_c = probs.topk(min(k, probs.shape[-1]), dim=-1)
    maps = out.maps[-1].float().cpu().numpy() if out.maps else None
    return _Prediction(top_c.cpu().numpy(), top_p.cpu().numpy(), maps, class_names)


def _part_map_figure(image: np.ndarray, maps: np.ndarray | None, size: int = 224) -> Image.Image:
    """The input, and beside it the part map's argmax regions when the model has one."""
    panels = [Image.fromarray(image).resize((size, size), Image.BICUBIC)]
    if maps is not None:
        panels.append(overlay_regions(image, maps, size=size))
    fig = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), max(p.height for p in panels)),
                    (255, 255, 255))
    x = 0
    for panel in panels:
        fig.paste(panel, (x, 0))
        x += panel.width + 8
    return fig


@dataclass
class _Written:
    name: str
    regions: str
    evidence: str
    hierarchy_png: str
    hierarchy_svg: str


def write_explained_images(expl: Explanation, names: Sequence[str], out: str | Path, *,
                           classes: int = 3, size: int = 224) -> Path:
    """Write, for every image of ``expl``, ``<stem>_regions.png``, ``<stem>_evidence.png``,
    ``<stem>_hierarchy.png`` (and the same hierarchy as ``.svg``), plus ``index.html`` showing them.

    Args:
        names: one display name per image (file names); stems are prefixed with the position so that two inputs
            with the same name do not overwrite each other.
    Returns:
        path of ``index.html``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, name in enumerate(names):
        stem = f"{i:02d}_{Path(name).stem}"
        render_stage_regions(expl, i, size=size, title=name).save(out / f"{stem}_regions.png")
        render_evidence(expl, i, classes=classes, size=size, title=name).save(out / f"{stem}_evidence.png")
        render_hierarchy(expl, i).save(out / f"{stem}_hierarchy.png")
        (out / f"{stem}_hierarchy.svg").write_text(hierarchy_svg(expl, i))
        written.append(_Written(name, f"{stem}_regions.png", f"{stem}_evidence.png", f"{stem}_hierarchy.png",
                                f"{stem}_hierarchy.svg"))
    cards = []
    for i, w in enumerate(written):
        cards.append(
            f'<div class="card sample"><h3>{escape(w.name)}</h3>{_prediction_html(expl, i)}<div class="figs">'
            f'<figure><img src="{escape(w.evidence)}" alt="class evidence per coarse concept">'
            "<figcaption>Contribution of each coarse concept to the top class logits.</figcaption></figure>"
            f'<figure><img src="{escape(w.regions)}" alt="concept regions of every stage">'
            "<figcaption>Concept regions, one row per stage (fine → coarse).</figcaption></figure>"
            f'<figure><img src="{escape(w.hierarchy_png)}" alt="concept hierarchy">'
            f'<figcaption>Fine → coarse assignment in this image (<a href="{escape(w.hierarchy_svg)}">SVG</a>).'
            "</figcaption></figure></div></div>"
        )
    header = ('<header><h1>IVPT explanations</h1>'
              f'<div class="sub">{len(written)} image(s) · colours mark concept ids of each stage</div></header>')
    index = out / "index.html"
    index.write_text(page("IVPT explanations", "\n".join(cards), header=header))
    return index


def read_metrics(path: str | Path | None) -> dict[str, Any]:
    """Metrics from an ``eval.json`` (percent values) if ``path`` exists; a training ``metrics.json`` (fractions
    under ``test_*`` keys) is converted to the same keys. Missing file → empty dict."""
    if path is None or not Path(path).is_file():
        return {}
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        return {}
    if not any(k for k, _, _ in METRICS if k in data):
        converted = {k[len("test_"):]: 100 * v for k, v in data.items()
                     if k.startswith("test_") and isinstance(v, (int, float)) and k != "test_images"}
        return converted
    return data


def _number(value: Any, unit: str) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return escape(str(value))
    if not math.isfinite(value):
        return "–"
    return f"{value:.1f}" + ("<small>%</small>" if unit == "%" else "")


def _metric_cards(metrics: dict[str, Any]) -> str:
    """Cards for the known eval.json keys that are present, and the per-stage table when there is one."""
    cards = []
    for key, label, unit in METRICS:
        value = metrics.get(key)
        if value is None:
            continue
        if key == "stage" and isinstance(value, dict):  # {"index", "n_pro", "spec"} as ivpt eval writes it
            text = f"{escape(str(value.get('index')))}<small> ({escape(str(value.get('n_pro')))} prototypes)</small>"
        elif isinstance(value, dict):
            continue
        else:
            text = _number(value, unit)
        cards.append(f'<div class="metric"><div class="k">{escape(label)}</div><div class="v">{text}</div></div>')
    html = f'<div class="metrics">{"".join(cards)}</div>' if cards else ""
    rows = metrics.get("per_stage")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        keys = [k for k, _, _ in METRICS if k != "stage" and any(k in r for r in rows)]
        labels = {k: lab for k, lab, _ in METRICS}
        units = {k: u for k, _, u in METRICS}
        head = "".join(f"<th>{escape(labels[k])}</th>" for k in keys)
        body = "".join(
            f"<tr><td>{escape(str(r.get('stage')))}</td><td>{escape(str(r.get('n_pro')))}</td>"
            + "".join(f"<td>{_number(r[k], units[k]) if k in r else '–'}</td>" for k in keys) + "</tr>"
            for r in rows
        )
        html += (f'<div class="card scroll"><table class="table"><thead><tr><th>stage</th><th>n_pro</th>{head}'
                 f"</tr></thead><tbody>{body}</tbody></table></div>")
    return html


def _legend_html(count: int) -> str:
    return " ".join(
        f'<span><span class="swatch" style="background:{hex_color(concept_color(k))}"></span>{k}</span>'
        for k in range(count)
    )


def build_report(
    model: nn.Module,
    dataset: Any,
    out: str | Path,
    *,
    metrics: dict[str, Any] | None = None,
    log: dict[str, np.ndarray] | None = None,
    samples: int = 8,
    class_names: Sequence[str] | None = None,
    title: str = "IVPT report",
    subtitle: str = "",
    batch_size: int = 32,
    num_workers: int = 0,
    limit: int | None = None,
    gallery_topk: int = 8,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Path:
    """Write ``out/index.html``: metrics, training curves, the dataset-level hierarchy, prototype galleries of the
    final stage and the paper's stage, and ``samples`` explained images — one self-contained file.

    Any model kind: without IVPT's fine→coarse assignments (every other kind) the hierarchy section says why it
    is empty, the gallery shows the model's one part map (none for ``linear``, and the section says so) and each
    sample shows the prediction beside the input and its part map.

    The hierarchy and galleries come from ONE pass over ``dataset`` (items: dicts with ``image`` normalised,
    ``label`` and ``index``), or over its first ``limit`` items.

    Args:
        metrics: eval.json content (percent values); None or empty: the section says none was found.
        log: training log columns (see :func:`ivpt.explain.charts.read_log`).
        samples: how many images, evenly spread over the dataset, to explain.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_pro, depth = list(model.cfg.n_pro), _depth(model)
    m = len(n_pro) - 1
    kind = getattr(model, "kind", "") or type(model).__name__
    # Only IVPT assigns fine concepts to coarse ones (hierarchy, per-concept evidence); the other kinds have one
    # part map at most (FrozenViT.map_stages), shown as a gallery and beside each sample.
    concepts = isinstance(model, IVPT)
    map_stages = model.map_stages() if getattr(model, "has_part_maps", False) else []
    names = list(class_names) if class_names is not None else getattr(dataset, "class_names", None)
    total = len(dataset)
    used = total if limit is None else min(limit, total)
    subset = dataset if used == total else torch.utils.data.Subset(dataset, range(used))

    # section anchor's stage → index into the output's maps
    if concepts:
        gallery_stages = {s: s for s in [m] + [s for s in [paper_stage(n_pro)] if s is not None and s != m]}
    else:
        gallery_stages = {map_stages[-1][0]: -1} if map_stages else {}
    galleries = {s: GalleryAccumulator(i, topk=gallery_topk, mean=mean, std=std) for s, i in gallery_stages.items()}
    hierarchy = HierarchyAccumulator() if concepts else None
    seen = 0
    loader = loader_for(subset, batch_size=batch_size, num_workers=num_workers)
    for batch, x, output in run_batches(model, loader):
        indices = batch_indices(batch, seen, x.shape[0])
        for acc in galleries.values():
            acc.update(x, output, indices)
        if hierarchy is not None:
            hierarchy.update(output)
        seen += x.shape[0]
    dataset_hierarchy = hierarchy.result(n_pro, depth) if hierarchy is not None and seen else None

    picks = sorted({int(round(v)) for v in np.linspace(0, used - 1, min(samples, used))}) if used else []
    items = [dataset[j] for j in picks]
    items = [it for it in items if it is not None]
    sample_html = []
    if items:
        batch = collate_images(items)
        assert batch is not None
        chunks = [batch["image"][s : s + batch_size] for s in range(0, len(items), batch_size)]
        if concepts:
            expls = [explain(model, x, class_names=names, mean=mean, std=std) for x in chunks]
        else:
            preds = [_predict(model, x, names) for x in chunks]
            pixels = [denormalise(x, mean=mean, std=std) for x in chunks]
        for b, item in enumerate(items):
            label = item.get("label")
            label = int(label) if label is not None else None
            name = f"image #{int(item.get('index', picks[b]))}"
            if not concepts:
                pred, i = preds[b // batch_size], b % batch_size
                figure = png_data_uri(_part_map_figure(pixels[b // batch_size][i],
                                                       None if pred.maps is None else pred.maps[i]))
                caption = ("The input and the model's part map (argmax regions, background uncoloured)."
                           if pred.maps is not None else f"The input (model.kind={escape(kind)} has no part maps).")
                sample_html.append(
                    f'<div class="card sample"><h3>{name}</h3>'
                    f"{_prediction_html(pred, i, label=label)}<div class=\"figs\">"
                    f'<figure><img src="{figure}" alt="input and part map"><figcaption>{caption}</figcaption>'
                    "</figure></div></div>"
                )
                continue
            expl, i = expls[b // batch_size], b % batch_size
            regions = png_data_uri(render_stage_regions(expl, i, title=name))
            evidence = png_data_uri(render_evidence(expl, i, title=name))
            sample_html.append(
                f'<div class="card sample"><h3>{name}</h3>'
                f"{_prediction_html(expl, i, label=label)}<div class=\"figs\">"
                f'<figure><img src="{evidence}" alt="class evidence"><figcaption>Coarse-concept contributions to '
                "the top logits, and the global part's where the model has one (together they add up to the logit)."
                "</figcaption></figure>"
                f'<figure><img src="{regions}" alt="concept regions"><figcaption>Concept regions per stage, fine '
                "to coarse.</figcaption></figure></div>"
                f'<details><summary>hierarchy of this image</summary><div class="scroll">{hierarchy_svg(expl, i)}'
                "</div></details></div>"
            )

    sections = []
    nav = []

    def section(anchor: str, heading: str, note: str, content: str) -> None:
        nav.append(f'<a href="#{anchor}">{escape(heading)}</a>')
        sections.append(f'<section id="{anchor}"><h2>{escape(heading)}</h2><p class="note">{note}</p>{content}'
                        "</section>")

    cards = _metric_cards(metrics or {})
    section("metrics", "Metrics", "From eval.json (percent; keypoint error is lower-better)." if cards else
            "No eval.json found next to the checkpoint — run <code>ivpt eval</code> or pass <code>--eval</code>.",
            cards)
    charts = training_charts(log or {})
    section("training", "Training", "Logged every few optimiser steps; faint vertical lines mark epochs."
            if charts else "No log.csv found — pass <code>--log</code>.",
            f'<div class="charts">{"".join(charts)}</div>' if charts else "")
    if dataset_hierarchy is not None:
        section(
            "hierarchy", "Concept hierarchy",
            f"How each intermediate concept feeds the {n_pro[-1] - 1} coarse concepts, averaged over the {seen} "
            "images where it claims at least one patch. Colours: concept ids of each stage (coarse: "
            f"{_legend_html(n_pro[-1] - 1)}). Hover nodes and edges for exact values.",
            f'<div class="card scroll">{hierarchy_svg(dataset_hierarchy)}</div>',
        )
    else:
        why = (f"model.kind={escape(kind)} has no concept hierarchy: only IVPT assigns fine concepts to coarse ones."
               if not concepts else "No image of the dataset could be read, so there is no hierarchy to show.")
        section("hierarchy", "Concept hierarchy", why, "")
    for s, index in gallery_stages.items():
        rows = render_gallery(galleries[s].result(), stage=s)
        if not concepts:
            which = f"the part map of model.kind={escape(kind)} ({map_stages[-1][1] - 1} parts and background)"
        else:
            which = "final stage (the coarse concepts the classifier reads)" if s == m else \
                "the paper's scored stage (n_pro[-3] prototypes)"
        imgs = "".join(f'<img src="{png_data_uri(im)}" alt="stage {s} concept {k}">' for k, im in rows.items())
        section(f"gallery-{s}", f"Prototypes of stage {s}" if concepts else "Parts",
                f"{which}: for every concept, the {gallery_topk} images whose map peaks highest, cropped around the "
                "peak; captions give image index and peak value.", f'<div class="card gallery">{imgs}</div>')
    if not gallery_stages:
        section("galleries", "Prototypes", f"model.kind={escape(kind)} has no part maps, so there is no gallery.", "")
    section("samples", "Explained images" if concepts else "Predictions",
            f"{len(sample_html)} images spread evenly over the dataset.", "".join(sample_html))

    header = (f"<header><h1>{escape(title)}</h1><div class=\"sub\">{escape(subtitle)}</div></header>"
              f'<nav>{"".join(nav)}</nav>')
    path = out / "index.html"
    path.write_text(page(title, "\n".join(sections), header=header))
    return path


def report_checkpoint(checkpoint: str | Path, out: str | Path, *, data_root: str | None = None,
                      split: str = "test", samples: int = 8, eval_file: str | Path | None = None,
                      log_file: str | Path | None = None, limit: int | None = None, gallery_topk: int = 8,
                      weights: str | None = None, device: str = "auto", batch_size: int = 32, num_workers: int = 0,
                      allow_backbone_mismatch: bool = False) -> Path:
    """:func:`build_report` for the pretrained folder ``checkpoint`` of a run: its run's dataset split, its
    ``eval.json`` (else the trainer's ``metrics.json``) and ``log.csv`` beside it, its class names. Returns
    the path of ``out/index.html``."""
    from ..data import check_num_classes
    from ..eval.classes import align_classes, note_remapped
    from ..runs import class_names_of, load_run, open_split
    from .charts import read_log

    checkpoint = Path(checkpoint)
    model, cfg, meta = load_run(checkpoint, weights=weights, device=device,
                                allow_backbone_mismatch=allow_backbone_mismatch)
    root = data_root or cfg.data.root
    dataset = open_split(cfg, split, root=root)
    # "true" marks need the checkpoint's label order: the same classes numbered otherwise are relabelled by name
    check_num_classes(dataset, cfg.model.num_classes, "the model")
    dataset = align_classes(dataset, class_names_of(meta, cfg.model.num_classes))
    note_remapped(dataset)
    run_dir = checkpoint.resolve().parent
    if eval_file is None:
        eval_file = run_dir / "eval.json"
        if not eval_file.is_file():
            eval_file = run_dir / "metrics.json"  # the trainer's test accuracy, when no evaluation was run
    log_file = Path(log_file) if log_file else run_dir / "log.csv"
    names = class_names_of(meta, cfg.model.num_classes) or list(getattr(dataset, "class_names", []) or []) or None
    m = cfg.model
    subtitle = (f"{checkpoint} · model.kind={m.kind} · {m.backbone} at {m.img_size}px · "
                f"n_pro {','.join(map(str, m.n_pro))} · "
                f"{m.num_classes} classes · {split} split of {root} ({len(dataset)} images)")
    return build_report(
        model, dataset, out, metrics=read_metrics(eval_file), log=read_log(log_file) if log_file.is_file() else None,
        samples=samples, class_names=names, title=f"IVPT report — {run_dir.name}", subtitle=subtitle,
        batch_size=batch_size, num_workers=num_workers, limit=limit, gallery_topk=gallery_topk,
        mean=cfg.data.mean, std=cfg.data.std,
    )
