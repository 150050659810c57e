"""HTML pages, from the jinja2 templates in ``templates/`` (autoescaped): the ``ivpt explain`` index (figure files
beside it: IVPT's concepts, or Prompt-CAM's trait maps) and the self-contained ``ivpt report`` (every figure inlined
as a PNG data URI, so the one file can be mailed or archived). Both pages end with a tiny script that, after load,
writes ``data-images-ok="ok/total"`` on <body>, so a headless browser's DOM dump shows whether every image decoded
(the tests rely on it).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch
from jinja2 import Environment, PackageLoader
from torch import nn

from ..eval import registry
from ..models import IVPT, PromptCAM
from .charts import training_figure
from .core import (IMAGENET_MEAN, IMAGENET_STD, Explanation, HierarchyAccumulator, _depth, _device, _eval_mode,
                   denormalise, explain, paper_stage, prototype_count, run_batches)
from .draw import data_uri, save_figure
from .gallery import GalleryAccumulator, batch_indices, collate_images, loader_for
from .hierarchy import render_hierarchy
from .render import render_evidence, render_gallery, render_part_map, render_stage_regions, render_traits
from .traits import TraitExplanation, explain_traits

__all__ = ["write_explained_images", "write_trait_images", "build_report", "report_checkpoint", "read_metrics"]

TEMPLATES = Environment(loader=PackageLoader("ivpt.explain", "templates"), autoescape=True, trim_blocks=True,
                        lstrip_blocks=True)


def _prediction(expl: Any, i: int, label: Any = None, k: int = 3) -> dict:
    """The top-``k`` classes of image ``i`` of ``expl`` (anything with ``top_classes``, ``top_probs`` and
    ``class_name``) and, given the ``label``, the true class and whether the top one is it."""
    label = None if label is None else int(label)
    top = [(expl.class_name(int(c)), float(p)) for c, p in zip(expl.top_classes[i, :k], expl.top_probs[i, :k])]
    return {"top": top, "truth": None if label is None else expl.class_name(label),
            "right": label is not None and int(expl.top_classes[i, 0]) == label}


def write_explained_images(expl: Explanation, names: Sequence[str], out: str | Path, *, classes: int = 3,
                           size: int = 224, fmt: str = "png") -> Path:
    """Write, for every image of ``expl``, ``<stem>_evidence``, ``<stem>_regions`` and ``<stem>_hierarchy`` as
    ``fmt`` (png, svg or pdf), and ``index.html`` showing them (PDFs are linked: browsers do not show them inline).

    ``names``: one display name per image (file names); stems are prefixed with the position so that two inputs
    with the same name do not overwrite each other. Returns the path of ``index.html``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for i, name in enumerate(names):
        stem = f"{i:02d}_{Path(name).stem}"
        for kind, fig in (("evidence", render_evidence(expl, i, classes=classes, size=size, title=name)),
                          ("regions", render_stage_regions(expl, i, size=size, title=name)),
                          ("hierarchy", render_hierarchy(expl, i))):
            save_figure(fig, out / f"{stem}_{kind}.{fmt}", fmt)
        images.append({"name": name, "stem": stem, "prediction": _prediction(expl, i)})
    index = out / "index.html"
    index.write_text(TEMPLATES.get_template("explain.html.j2").render(title="IVPT explanations", images=images,
                                                                       fmt=fmt))
    return index


def write_trait_images(expl: TraitExplanation, names: Sequence[str], out: str | Path, *, size: int = 224,
                       fmt: str = "png") -> Path:
    """Write, for every image of ``expl``, ``<stem>_traits`` as ``fmt`` (png, svg or pdf; :func:`render_traits`)
    and ``index.html`` showing them; stems as :func:`write_explained_images`. Returns the path of ``index.html``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for i, name in enumerate(names):
        stem = f"{i:02d}_{Path(name).stem}"
        save_figure(render_traits(expl, i, size=size, title=name), out / f"{stem}_traits.{fmt}", fmt)
        images.append({"name": name, "stem": stem, "prediction": _prediction(expl, i)})
    index = out / "index.html"
    index.write_text(TEMPLATES.get_template("traits.html.j2").render(title="Prompt-CAM trait maps", images=images,
                                                                      fmt=fmt, heads=expl.num_heads))
    return index


def read_metrics(path: str | Path | None) -> dict[str, Any]:
    """Metrics from an ``eval.json`` (percent values) if ``path`` exists; a training ``metrics.json`` (fractions
    under ``test_*`` keys) is converted to the same keys. Missing file → empty dict."""
    data = json.loads(Path(path).read_text()) if path is not None and Path(path).is_file() else {}
    if not isinstance(data, dict):
        return {}
    if not any(registry.score_of(k) is not None for k in data):
        return {k[len("test_"):]: 100 * v for k, v in data.items()
                if k.startswith("test_") and isinstance(v, (int, float)) and k != "test_images"}
    return data


def _value(value: Any, score: registry.Score) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if not math.isfinite(value):
        return "–"
    unit = {"%": " %", "% of box": " % of box"}.get(score.unit, "")
    return f"{value:.{score.digits}f}{unit}"


def _metric_rows(metrics: dict[str, Any]) -> tuple[list[dict], dict | None, str]:
    """(one row per score of the registry present in ``metrics``: label, value, direction, what it measures;
    the per-stage table; where interpretability was scored)."""
    known = [s for _, s in registry.scores()]
    better = {"↑": "↑ higher is better", "↓": "↓ lower is better"}
    rows = [{"label": s.label, "value": _value(metrics[s.key], s), "better": better[s.better],
             "description": s.description} for s in known if isinstance(metrics.get(s.key), (int, float))]
    stage = metrics.get("stage")
    scored = (f"stage {stage.get('index')} ({prototype_count(int(stage['n_pro']))})"
              if isinstance(stage, dict) and isinstance(stage.get("n_pro"), int) else "")
    per_stage = metrics.get("per_stage")
    if not (isinstance(per_stage, list) and per_stage and all(isinstance(r, dict) for r in per_stage)):
        return rows, None, scored
    shown = [s for s in known if any(s.key in r for r in per_stage)]
    table = {"labels": [s.report_label for s in shown], "rows": [
        [str(r.get("stage")), prototype_count(int(r["n_pro"])) if isinstance(r.get("n_pro"), int) else "–"]
        + [_value(r[s.key], s) if s.key in r else "–" for s in shown] for r in per_stage]}
    return rows, table, scored


def build_report(model: nn.Module, dataset: Any, out: str | Path, *, metrics: dict[str, Any] | None = None,
                 log: dict[str, np.ndarray] | None = None, samples: int = 8, class_names: Sequence[str] | None = None,
                 title: str = "IVPT report", subtitle: str = "", batch_size: int = 32, num_workers: int = 0,
                 limit: int | None = None, gallery_topk: int = 8, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> Path:
    """Write ``out/index.html``: metrics, training curves, the dataset-level hierarchy, prototype galleries of the
    final stage and the paper's stage, and ``samples`` explained images (evenly spread) — one self-contained file.

    Any model kind: without IVPT's fine→coarse assignments (every other kind) the hierarchy section says why it
    is empty, the gallery shows the model's one part map (none for ``linear``, and the section says so) and each
    sample shows the prediction beside the input and its part map (Prompt-CAM: its trait maps,
    :func:`~.render.render_traits`).

    The hierarchy and galleries come from ONE pass over ``dataset`` (items: dicts with ``image`` normalised,
    ``label``, ``index`` and, for the galleries' part captions, ``keypoints`` and ``visible``), or over its first
    ``limit`` items. ``metrics``: eval.json content (percent values); ``log``: :func:`~.charts.read_log` columns.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_pro = list(getattr(model.cfg, "n_pro", ()))  # the kinds with concept stages (model.n_pro)
    m = len(n_pro) - 1
    kind = getattr(model, "kind", "") or type(model).__name__
    # Only IVPT assigns fine concepts to coarse ones (hierarchy, per-concept evidence); the other kinds have one
    # part map at most (FrozenViT.map_stages), shown as a gallery and beside each sample.
    concepts = isinstance(model, IVPT)
    traits = isinstance(model, PromptCAM)  # per-head trait maps of the predicted class
    map_stages = model.map_stages() if getattr(model, "has_part_maps", False) else []
    names = list(class_names) if class_names is not None else getattr(dataset, "class_names", None)
    used = len(dataset) if limit is None else min(limit, len(dataset))
    subset = dataset if used == len(dataset) else torch.utils.data.Subset(dataset, range(used))
    if concepts:  # gallery stage → index into the output's maps
        stages = {s: s for s in dict.fromkeys([m, paper_stage(n_pro)]) if s is not None}
    else:
        stages = {map_stages[-1][0]: -1} if map_stages else {}
    galleries = {s: GalleryAccumulator(i, topk=gallery_topk, mean=mean, std=std) for s, i in stages.items()}
    hierarchy, seen = HierarchyAccumulator(), 0
    for batch, x, output in run_batches(model, loader_for(subset, batch_size=batch_size, num_workers=num_workers)):
        for acc in galleries.values():
            acc.update(x, output, batch_indices(batch, seen, x.shape[0]), batch)
        if concepts:
            hierarchy.update(output)
        seen += x.shape[0]

    picks = sorted({int(round(v)) for v in np.linspace(0, used - 1, min(samples, used))}) if used else []
    items = [it for it in (dataset[j] for j in picks) if it is not None]
    cards = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        x = collate_images(chunk)["image"]  # type: ignore[index]
        if concepts or traits:
            expl = (explain if concepts else explain_traits)(model, x, class_names=names, mean=mean, std=std)
        else:
            expl = _predict(model, x, names)
        pixels = denormalise(x, mean=mean, std=std)
        for i, item in enumerate(chunk):
            name = f"image #{int(item.get('index', picks[start + i]))}"
            card = {"name": name, "prediction": _prediction(expl, i, item.get("label"))}
            if concepts:
                card.update(evidence=data_uri(render_evidence(expl, i, title=name)),
                            regions=data_uri(render_stage_regions(expl, i, title=name)),
                            hierarchy=data_uri(render_hierarchy(expl, i)))
            elif traits:
                card.update(traits=data_uri(render_traits(expl, i, title=name)))
            else:
                card.update(part_map=data_uri(render_part_map(pixels[i], None if expl.maps is None
                                                              else expl.maps[i])), has_maps=expl.maps is not None)
            cards.append(card)

    part_names = getattr(dataset, "part_names", None) or None
    gallery_cards = []
    for s, acc in galleries.items():
        captions, summary = acc.captions(names, part_names)
        gallery_cards.append({
            "stage": s, "which": "parts" if not concepts else "final" if s == m else "paper", "parts": bool(summary),
            "count": prototype_count(map_stages[-1][1] if not concepts else n_pro[s]),
            "src": data_uri(render_gallery(acc.result(), stage=s, captions=captions, summary=summary), dpi=100)})
    rows, per_stage, scored = _metric_rows(metrics or {})
    training = training_figure(log or {})
    path = out / "index.html"
    path.write_text(TEMPLATES.get_template("report.html.j2").render(
        title=title, subtitle=subtitle, kind=kind, concepts=concepts, traits=traits, metrics=rows,
        per_stage=per_stage, scored_stage=scored, training=data_uri(training) if training is not None else None,
        hierarchy=data_uri(render_hierarchy(hierarchy.result(n_pro, _depth(model)))) if concepts and seen else None,
        seen=seen, coarse=prototype_count(n_pro[-1]) if n_pro else "", galleries=gallery_cards, topk=gallery_topk,
        samples=cards))
    return path


def _predict(model: nn.Module, images: torch.Tensor, class_names: Sequence[str] | None, k: int = 5
             ) -> SimpleNamespace:
    """What a model without IVPT's concept hierarchy shows of a batch: its top classes and its one part map."""
    with _eval_mode(model):
        out = model(images.to(_device(model)))
    top_p, top_c = out.logits.float().softmax(dim=-1).topk(min(k, out.logits.shape[-1]), dim=-1)
    return SimpleNamespace(
        top_classes=top_c.cpu().numpy(), top_probs=top_p.cpu().numpy(),
        maps=out.maps[-1].float().cpu().numpy() if out.maps else None,  # (B, n, h, w), background last
        class_name=lambda c: str(class_names[c]) if class_names is not None and 0 <= c < len(class_names)
        else f"class {c}")


def report_checkpoint(checkpoint: str | Path, out: str | Path, *, data_root: str | None = None,
                      split: str = "test", samples: int = 8, eval_file: str | Path | None = None,
                      log_file: str | Path | None = None, limit: int | None = None, gallery_topk: int = 8,
                      weights: str | None = None, device: str = "auto", batch_size: int = 32, num_workers: int = 0,
                      allow_backbone_mismatch: bool = False) -> Path:
    """:func:`build_report` for the pretrained folder ``checkpoint`` of a run: its run's dataset split (with
    keypoints when the format has them, for the gallery captions), its ``eval.json`` (else the trainer's
    ``metrics.json``) and ``log.csv`` beside it, its class names. Returns the path of ``out/index.html``."""
    from ..data import build_eval_transform, check_num_classes, dataset_class, open_dataset
    from ..eval.classes import align_classes, note_remapped
    from ..runs import class_names_of, load_run
    from .charts import read_log

    checkpoint = Path(checkpoint)
    model, cfg, meta = load_run(checkpoint, weights=weights, device=device,
                                allow_backbone_mismatch=allow_backbone_mismatch)
    root = data_root or cfg.data.root
    dataset = open_dataset(cfg.data, split, build_eval_transform(cfg.data, cfg.model.img_size), root=root,
                           with_parts=dataset_class(cfg.data.format).has_keypoints, bbox_crop=cfg.data.bbox_crop)
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
    mc = cfg.model
    stages = (f"prototypes per stage: {', '.join(str(n - 1) for n in mc.n_pro)} foreground + background "
              f"(model.n_pro={','.join(map(str, mc.n_pro))}) · " if hasattr(mc, "n_pro") else "")
    subtitle = (f"{checkpoint} · model.kind={mc.kind} · {mc.backbone} at {mc.img_size}px · {stages}"
                f"{mc.num_classes} classes · {split} split of {root} ({len(dataset)} images)")
    return build_report(
        model, dataset, out, metrics=read_metrics(eval_file), log=read_log(log_file) if log_file.is_file() else None,
        samples=samples, class_names=names, title=f"IVPT report — {run_dir.name}", subtitle=subtitle,
        batch_size=batch_size, num_workers=num_workers, limit=limit, gallery_topk=gallery_topk,
        mean=cfg.data.mean, std=cfg.data.std)
