"""Dataset-level evaluation (docs/method.md §4): accuracy and the interpretability metrics of every stage.

The metrics are the entries of :mod:`ivpt.eval.registry`; each names the pass it consumes and builds its consumer.
Two passes at most (:func:`ivpt.eval.runner.run_pass`), each shared by every metric and every stage that needs it,
plus any pass a consumer runs for itself:

* ``full`` — the split with the deterministic eval transform: accuracy, the decision scores, NMI/ARI, keypoint
  regression error, foreground IoU (:class:`~.runner.AccuracyConsumer`, :class:`~.builtin.DecisionConsumer`,
  :class:`~.protocols.Discovery`); KPR's consumer first fits its regressors on the ``train`` split
  (:class:`~.protocols.KeypointFit`);
* ``crop``  — bounding-box crops of the split, clean and noisy images in ONE forward of twice the batch:
  consistency and stability: :class:`~.protocols.PartHits`.

Every meter keeps summable counts, so under torchrun each rank evaluates a disjoint shard and the counts are
summed: no sample is duplicated or dropped whatever the world size or batch size.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .. import runtime as R
from ..config import Config, ConfigError
from .classes import align_classes, note_remapped
from .protocols import StageMaps
from .registry import DEFAULT_METRICS, METRICS, EvalContext, Metric, no_data_reasons, unsupported
from .runner import run_pass

__all__ = ["evaluate", "evaluate_checkpoint", "unsupported_metrics"]


def unsupported_metrics(cfg: Config, metrics: Iterable[str]) -> dict[str, str]:
    """The metrics of ``metrics`` that the model kind or the dataset format cannot give, each with its reason
    (``eval.json`` lists them under "skipped"; :func:`ivpt.eval.registry.unsupported`). What the files on disk
    lack (e.g. foreground masks) is found when the split is open: see :func:`evaluate`."""
    from ..data import dataset_class
    from ..models import model_class

    names = [m for m in metrics if m in METRICS]
    return unsupported(model_class(cfg.model.kind), dataset_class(cfg.data.format), names)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    cfg: Config,
    *,
    split: str = "test",
    metrics: Iterable[str] = DEFAULT_METRICS,
    info: R.DistInfo | None = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Evaluate ``model`` on ``cfg.data.root``'s ``split``; returns the eval.json content (scores in percent).

    ``metrics``: ``--metrics`` names of :mod:`ivpt.eval.registry` (default: every default one). ``class_names``:
    the model's classes in label order (a checkpoint's ``class_names``); a dataset that numbers the same classes
    otherwise is relabelled by name, one with other names refused (:func:`.classes.align_classes`). No readable
    image in the split is a :class:`~ivpt.data.DatasetError`, not a score of zero."""
    from ..data import (DatasetError, build_eval_transform, check_num_classes, corrupt_count_all, open_dataset,
                        reset_corrupt_count)

    def opened(split_name: str, transform, *, bbox_crop: bool = cfg.data.bbox_crop, **kwargs):
        # the run's data.bbox_crop, as training and its test pass read images; the crop protocols always crop
        dataset = open_dataset(cfg.data, split_name, transform, bbox_crop=bbox_crop, **kwargs)
        check_num_classes(dataset, cfg.model.num_classes, "the model")
        return align_classes(dataset, class_names)

    requested = set(metrics)
    unknown = requested - set(METRICS)
    if unknown:
        raise ConfigError(f"unknown metric(s) {sorted(unknown)}; choose from {', '.join(METRICS)}")
    info = info or R.setup(cfg.train.device)
    e = cfg.eval
    model = model.to(info.device).eval()
    n_pro = list(getattr(cfg.model, "n_pro", ()))  # the kinds with concept stages; eval.stage indexes them
    has_maps = model.has_part_maps
    stages = StageMaps(model.map_stages())
    skipped = unsupported_metrics(cfg, sorted(requested))
    active = requested - set(skipped)
    chosen = (e.stage_index(len(n_pro)) if n_pro else stages.ids[-1]) if has_maps else None
    if has_maps and chosen not in stages.ids:
        chosen = stages.ids[-1]
    t0 = time.perf_counter()
    reset_corrupt_count()  # corrupt_images_skipped counts the files this evaluation could not read
    # Boxes stay unclipped by the centre crop: keypoint regression clips them per eval.protocol.
    transform = build_eval_transform(cfg.data, cfg.model.img_size, clip_box=False)

    def run(dataset, consumers: list, desc: str) -> None:
        run_pass(model, dataset, cfg, info, consumers, desc=desc, progress=progress)

    def of_pass(name: str) -> list[Metric]:
        # accuracy runs in every evaluation: it counts the scored images (reported only when requested)
        return [m for m in METRICS.values() if m.on == name and (m.name in active or m.name == "acc")]

    by_metric: dict[str, Any] = {}  # metric name -> its consumer (metrics naming one factory share it)

    def prepare(dataset, metrics_of_pass: list[Metric]) -> list:
        """Drop the metrics the files on disk cannot give, then build one consumer per factory."""
        for m in metrics_of_pass:
            ctx = EvalContext(model, cfg, info, stages, dataset, frozenset(active), split, transform, opened, run)
            reason = m.available(ctx) if m.available is not None and m.name in active else None
            if reason:
                skipped[m.name] = reason
                active.discard(m.name)
        ctx = EvalContext(model, cfg, info, stages, dataset, frozenset(active), split, transform, opened, run)
        built: dict[Any, Any] = {}
        for m in metrics_of_pass:
            if m.name in active or m.name == "acc":
                if m.consumer not in built:
                    built[m.consumer] = m.consumer(ctx)
                by_metric[m.name] = built[m.consumer]
        return list(built.values())

    full = of_pass("full")
    dataset = opened(split, transform, with_parts=any(m.needs_parts for m in full if m.name in active))
    remapped = note_remapped(dataset)
    run(dataset, prepare(dataset, full), f"evaluate ({split})")
    images = by_metric["acc"].meter.images
    if images == 0:  # summed over the processes: no rank scored anything
        raise DatasetError(f"no image of the {split} split of {getattr(dataset, 'root', cfg.data.root)} could be "
                           f"read ({len(dataset)} listed, {corrupt_count_all()} unreadable file(s) skipped), so "
                           "nothing was scored; replace the unreadable files or evaluate another split")

    crop = [m for m in of_pass("crop") if m.name in active]
    if crop:
        # The protocol resizes the whole box to the model input (no centre crop that would cut the object).
        square = build_eval_transform(cfg.data, cfg.model.img_size, square=True)
        crops = opened(split, square, with_parts=any(m.needs_parts for m in crop), bbox_crop=True)
        consumers = prepare(crops, crop)
        if consumers:
            run(crops, consumers, "/".join(m.name for m in crop if m.name in active))

    computed = [m for m in METRICS.values() if m.name in by_metric]
    cache: dict[tuple[int, int | None], dict] = {}

    def scores_of(m: Metric, stage: int | None) -> dict[str, float]:
        consumer = by_metric[m.name]
        key = (id(consumer), stage)
        if key not in cache:
            cache[key] = consumer.scores(stage)
        return {k: cache[key][k] for k in m.keys if k in cache[key]}

    result: dict = {}
    for m in computed:
        if not m.per_stage and m.name in requested:
            result.update(scores_of(m, None))
    per_stage = []
    for s in stages.ids:
        row: dict = {"stage": s, "n_pro": stages.channels[s]}
        for m in computed:
            if m.per_stage:
                row.update(scores_of(m, s))
        per_stage.append(row)
    # A metric with no data (e.g. no visible keypoint) is absent with its reason, never 0 or 100.
    scored: list = []
    for m in computed:
        if m.per_stage and chosen is None:
            continue
        meters = getattr(by_metric[m.name], "scored_meters", None)
        for meter in meters(chosen if m.per_stage else None) if meters is not None else []:
            if not any(meter is seen for seen in scored):
                scored.append(meter)
    skipped.update({m: r for m, r in no_data_reasons(scored).items() if m in requested and m not in skipped})
    if chosen is not None:
        top = next(r for r in per_stage if r["stage"] == chosen)
        result.update({k: v for k, v in top.items() if k not in ("stage", "n_pro")})
        result["stage"] = {"index": chosen, "n_pro": stages.channels[chosen], "spec": str(e.stage)}
        result["per_stage"] = per_stage
    result["eval_protocol"] = e.protocol  # corrected | reference: which way every interpretability score was measured
    result["protocol"] = asdict(e)
    result["data"] = {"root": str(Path(cfg.data.root).resolve()), "split": split, "format": cfg.data.format,
                      "images": images, "images_listed": len(dataset), "num_classes": cfg.model.num_classes,
                      "corrupt_images_skipped": corrupt_count_all()}
    if remapped:
        result["data"]["labels_remapped"] = True  # the dataset numbers the classes otherwise; matched by name
    result["metrics_requested"] = sorted(requested)
    for consumer in {id(c): c for c in by_metric.values()}.values():
        notes = getattr(consumer, "notes", None)
        if notes is not None:
            result.update(notes())  # e.g. "nmi_ari_from": keypoints | part masks
    if skipped:
        result["skipped"] = dict(sorted(skipped.items()))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def evaluate_checkpoint(checkpoint: str | Path, cfg: Config, meta: dict, *, weights: str | None = None,
                        allow_backbone_mismatch: bool = False, **kwargs) -> dict:
    """Rebuild the pretrained folder ``checkpoint`` (its ``config.json`` content is ``meta``), evaluate it with
    :func:`evaluate` (``kwargs``) and record the checkpoint's identity in the result."""
    from ..models import load_model

    model = load_model(checkpoint, cfg.model, meta, weights=weights, allow_backbone_mismatch=allow_backbone_mismatch)
    names = meta.get("class_names")  # written by the trainer in label order
    if isinstance(names, list) and len(names) == cfg.model.num_classes:
        kwargs.setdefault("class_names", [str(n) for n in names])
    result = evaluate(model, cfg, **kwargs)
    result["checkpoint"] = {"path": str(Path(checkpoint).resolve()), **meta.get("backbone", {})}
    return result
