"""Dataset-level evaluation (SPEC section 4): accuracy and the interpretability metrics of every stage.

Three passes at most (:func:`ivpt.eval.runner.run_pass`), each shared by every metric and every stage that needs
it:

* ``train`` — the training split, only to fit the keypoint regressors (``kpr``): :class:`~.protocols.KeypointFit`;
* ``full``  — the split with the deterministic eval transform: accuracy, NMI/ARI, keypoint regression error,
  foreground IoU: :class:`~.runner.AccuracyConsumer` + :class:`~.protocols.Discovery`;
* ``crop``  — bounding-box crops of the split, clean and noisy images in ONE forward of twice the batch:
  consistency and stability: :class:`~.protocols.PartHits`.

Every meter keeps summable counts, so under torchrun each rank evaluates a disjoint shard and the counts are
summed: no sample is duplicated or dropped whatever the world size or batch size.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .. import runtime as R
from ..config import Config, ConfigError
from ..metrics import no_data_reasons
from .classes import align_classes, note_remapped
from .protocols import Discovery, KeypointFit, PartHits, StageMaps
from .runner import AccuracyConsumer, eval_loader, evaluate_accuracy, run_pass
from .table import ACCURACY_KEYS, format_table

__all__ = ["ALL_METRICS", "ACCURACY_KEYS", "evaluate", "evaluate_checkpoint", "evaluate_accuracy", "eval_loader",
           "format_table", "unsupported_metrics"]

ALL_METRICS = ("acc", "consistency", "stability", "nmi_ari", "kpr", "fg_iou")


def unsupported_metrics(cfg: Config, metrics: Iterable[str]) -> dict[str, str]:
    """The metrics of ``metrics`` that the model kind or the dataset format cannot give, each with its reason
    (``eval.json`` lists them under "skipped"). Foreground IoU also depends on masks on disk: see :func:`evaluate`."""
    from ..data import dataset_class
    from ..models import model_class

    fmt, reader = cfg.data.format, dataset_class(cfg.data.format)
    interpretability = [m for m in metrics if m != "acc"]
    if not model_class(cfg.model.kind).has_part_maps:
        return {m: f"model.kind={cfg.model.kind} has no part maps" for m in interpretability}
    reasons = {"consistency": None if reader.has_keypoints else f"{fmt} has no part keypoints",
               "stability": None if reader.has_keypoints else f"{fmt} has no part keypoints",
               "kpr": None if reader.has_keypoints else f"{fmt} has no part keypoints",
               "nmi_ari": (None if reader.has_keypoints or reader.has_part_masks
                           else f"{fmt} has no part keypoints or part masks"),
               "fg_iou": None if reader.can_have_fg_masks else f"{fmt} has no foreground masks or part masks"}
    return {m: reasons[m] for m in interpretability if reasons.get(m)}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    cfg: Config,
    *,
    split: str = "test",
    metrics: Iterable[str] = ALL_METRICS,
    info: R.DistInfo | None = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Evaluate ``model`` on ``cfg.data.root``'s ``split``; returns the eval.json content (scores in percent).

    ``class_names``: the model's classes in label order (a checkpoint's ``class_names``); a dataset that numbers
    the same classes otherwise is relabelled by name, one with other names refused (:func:`.classes.align_classes`).
    No readable image in the split is a :class:`~ivpt.data.DatasetError`, not a score of zero."""
    from ..data import (DatasetError, build_eval_transform, check_num_classes, corrupt_count_all, open_dataset,
                        reset_corrupt_count)

    def opened(split_name: str, transform, **kwargs):
        dataset = open_dataset(cfg.data, split_name, transform, **kwargs)
        check_num_classes(dataset, cfg.model.num_classes, "the model")
        return align_classes(dataset, class_names)

    requested = set(metrics)
    unknown = requested - set(ALL_METRICS)
    if unknown:
        raise ConfigError(f"unknown metric(s) {sorted(unknown)}; choose from {', '.join(ALL_METRICS)}")
    info = info or R.setup(cfg.train.device)
    e = cfg.eval
    model = model.to(info.device).eval()
    n_pro = list(cfg.model.n_pro)
    has_maps = model.has_part_maps
    stages = StageMaps(model.map_stages())
    skipped = unsupported_metrics(cfg, sorted(requested))
    active = requested - set(skipped)
    parts_needed = has_maps and bool(active - {"acc"})
    chosen = e.stage_index(len(n_pro)) if has_maps else None
    if has_maps and chosen not in stages.ids:
        chosen = stages.ids[-1]
    t0 = time.perf_counter()
    reset_corrupt_count()  # corrupt_images_skipped counts the files this evaluation could not read
    # Boxes stay unclipped by the centre crop: keypoint regression clips them per eval.protocol.
    transform = build_eval_transform(cfg.data, cfg.model.img_size, clip_box=False)

    regressors = {}
    if "kpr" in active:
        train_set = opened("train", transform, with_parts=True)
        fit = KeypointFit(stages, len(train_set.part_names), cfg)
        run_pass(model, train_set, cfg, info, [fit], desc="kpr fit (train)", progress=progress)
        regressors = fit.regressors()

    dataset = opened(split, transform, with_parts=parts_needed)
    remapped = note_remapped(dataset)
    if "fg_iou" in active and not dataset.has_fg_masks:
        skipped["fg_iou"] = f"{cfg.data.format} at {cfg.data.root} has no foreground mask for every {split} image"
        active.discard("fg_iou")
    acc = AccuracyConsumer(cfg.model.num_classes)
    consumers: list = [acc]
    discovery = None
    if parts_needed:
        by_keypoints = "nmi_ari" in active and dataset.has_keypoints
        discovery = Discovery(stages, cfg, num_parts=len(dataset.part_names), by_keypoints=by_keypoints,
                              by_part_masks="nmi_ari" in active and not by_keypoints, regressors=regressors,
                              fg_iou="fg_iou" in active)
        consumers.append(discovery)
    run_pass(model, dataset, cfg, info, consumers, desc=f"evaluate ({split})", progress=progress)
    if acc.meter.images == 0:  # summed over the processes: no rank scored anything
        raise DatasetError(f"no image of the {split} split of {getattr(dataset, 'root', cfg.data.root)} could be "
                           f"read ({len(dataset)} listed, {corrupt_count_all()} unreadable file(s) skipped), so "
                           "nothing was scored; replace the unreadable files or evaluate another split")

    hits = None
    if active & {"consistency", "stability"}:
        # The protocol resizes the whole box to the model input (no centre crop that would cut the object).
        square = build_eval_transform(cfg.data, cfg.model.img_size, square=True)
        crops = opened(split, square, with_parts=True, bbox_crop=True)
        hits = PartHits(stages, cfg, crops, noisy="stability" in active)
        run_pass(model, crops, cfg, info, [hits], desc="consistency/stability", progress=progress)

    result: dict = {}
    if "acc" in requested:
        result.update(acc.meter.compute())
    per_stage = []
    for s in stages.ids:
        row: dict = {"stage": s, "n_pro": stages.channels[s]}
        if hits is not None:
            row.update(hits.scores(s, active))
        if discovery is not None:
            row.update(discovery.scores(s))
        per_stage.append(row)
    # A metric with no data (e.g. no visible keypoint) is absent with its reason, never 0 or 100.
    scored = [acc.meter]
    if chosen is not None:
        scored += [hits.part[chosen]] if hits is not None else []
        scored += discovery.stage_meters(chosen) if discovery is not None else []
    skipped.update({m: r for m, r in no_data_reasons(scored).items() if m in requested and m not in skipped})
    if chosen is not None:
        top = next(r for r in per_stage if r["stage"] == chosen)
        result.update({k: v for k, v in top.items() if k not in ("stage", "n_pro")})
        result["stage"] = {"index": chosen, "n_pro": stages.channels[chosen], "spec": str(e.stage)}
        result["per_stage"] = per_stage
    result["eval_protocol"] = e.protocol  # corrected | reference: which way every interpretability score was measured
    result["protocol"] = asdict(e)
    result["data"] = {"root": str(Path(cfg.data.root).resolve()), "split": split, "format": cfg.data.format,
                      "images": acc.meter.images, "images_listed": len(dataset), "num_classes": cfg.model.num_classes,
                      "corrupt_images_skipped": corrupt_count_all()}
    if remapped:
        result["data"]["labels_remapped"] = True  # the dataset numbers the classes otherwise; matched by name
    result["metrics_requested"] = sorted(requested)
    if discovery is not None and (discovery.cont or discovery.pmask):
        result["nmi_ari_from"] = "keypoints" if discovery.cont else "part masks"
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
