"""Dataset-level evaluation (SPEC section 4): accuracy and the interpretability metrics of every stage.

Three passes at most, each shared by every metric and every stage that needs it:

* ``full``  — the split with the deterministic eval transform: accuracy, NMI/ARI at keypoints, keypoint
  regression error, foreground IoU;
* ``train`` — the training split, only to fit the keypoint regressors (``kpr``);
* ``crop``  — bounding-box crops of the split, clean and noisy images in ONE forward of twice the batch:
  consistency and stability.

Every meter keeps summable counts, so under torchrun each rank evaluates a disjoint shard and the counts are
summed: no sample is duplicated or dropped whatever the world size or batch size.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .config import Config, ConfigError
from . import runtime as R
from .engine.evaluate import eval_loader
from .metrics import (
    AccuracyMeter,
    ContingencyMeter,
    FgIoUMeter,
    KeypointErrorMeter,
    KeypointFitMeter,
    PartMaskMeter,
    PartMeter,
    add_protocol_noise,
    bbox_centroid_features,
    concepts_at_keypoints,
    discovery_input,
    keypoint_hits,
    no_data_reasons,
    part_frame_keypoints,
    to_bbox_frame,
)

__all__ = ["ALL_METRICS", "resolve_stage", "evaluate", "evaluate_checkpoint", "format_table", "unsupported_metrics"]

ALL_METRICS = ("acc", "consistency", "stability", "nmi_ari", "kpr", "fg_iou")
ACCURACY_KEYS = ("top1", "top5", "balanced_top1")  # the same under both eval.protocol values


def resolve_stage(spec: str | int, num_stages: int) -> int:
    """Stage index from ``eval.stage``: 'auto' → the stage with n_pro[-3] prototypes (the paper's choice; the
    final stage when there are fewer than 3), 'final' → the last, or an index (negative counts from the end)."""
    spec = str(spec)
    if spec == "auto":
        return num_stages - 3 if num_stages >= 3 else num_stages - 1
    if spec == "final":
        return num_stages - 1
    try:
        index = int(spec)
    except ValueError:
        raise ConfigError(f"eval.stage={spec!r} must be 'auto', 'final' or a stage index") from None
    if not -num_stages <= index < num_stages:
        raise ConfigError(f"eval.stage={spec} is out of range for {num_stages} stages")
    return index % num_stages


def _as_tensors(arrays: dict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def unsupported_metrics(cfg: Config, metrics: Iterable[str]) -> dict[str, str]:
    """The metrics of ``metrics`` that the model kind or the dataset format cannot give, each with its reason
    (``eval.json`` lists them under "skipped"). Foreground IoU also depends on masks on disk: see :func:`evaluate`."""
    from .data import dataset_class

    fmt, reader = cfg.data.format, dataset_class(cfg.data.format)
    interpretability = [m for m in metrics if m != "acc"]
    if cfg.model.kind not in ("ivpt", "last_layer_parts"):
        return {m: f"model.kind={cfg.model.kind} has no concept maps" for m in interpretability}
    reasons = {"consistency": None if reader.has_keypoints else f"{fmt} has no part keypoints",
               "stability": None if reader.has_keypoints else f"{fmt} has no part keypoints",
               "kpr": None if reader.has_keypoints else f"{fmt} has no part keypoints",
               "nmi_ari": (None if reader.has_keypoints or reader.has_part_masks
                           else f"{fmt} has no part keypoints or part masks")}
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
) -> dict:
    """Evaluate ``model`` on ``cfg.data.root``'s ``split``; returns the eval.json content (scores in percent)."""
    from tqdm.auto import tqdm

    from .data import build_eval_transform, check_num_classes, corrupt_count_all, open_dataset, reset_corrupt_count

    requested = set(metrics)
    unknown = requested - set(ALL_METRICS)
    if unknown:
        raise ConfigError(f"unknown metric(s) {sorted(unknown)}; choose from {', '.join(ALL_METRICS)}")
    info = info or R.setup(cfg.train.device)
    device, e = info.device, cfg.eval
    model = model.to(device).eval()
    n_pro = list(getattr(cfg.model, "n_pro", []))
    has_maps = cfg.model.kind in ("ivpt", "last_layer_parts")
    skipped = unsupported_metrics(cfg, sorted(requested))
    active = requested - set(skipped)
    parts_needed = has_maps and bool(active & {"consistency", "stability", "nmi_ari", "kpr", "fg_iou"})
    stage_ids = list(range(len(n_pro))) if cfg.model.kind == "ivpt" else [len(n_pro) - 1]
    chosen = resolve_stage(e.stage, len(n_pro)) if has_maps else None
    if has_maps and chosen not in stage_ids:
        chosen = stage_ids[-1]
    t0 = time.perf_counter()
    reset_corrupt_count()  # corrupt_images_skipped counts the files this evaluation could not read
    # Boxes stay unclipped by the centre crop: keypoint regression clips them per eval.protocol.
    transform = build_eval_transform(cfg.data, cfg.model.img_size, clip_box=False)
    bar = dict(disable=not (progress and info.is_main), leave=False, dynamic_ncols=True)

    def forward(images: torch.Tensor):
        with R.autocast(device, cfg.eval.amp):
            return model(images.to(device, non_blocking=True))

    def stage_maps(out, s: int) -> torch.Tensor:
        return out.maps[stage_ids.index(s)].float().cpu() if cfg.model.kind == "ivpt" else out.maps[-1].float().cpu()

    # ---- train pass: keypoint regressors
    regressors = {}
    if "kpr" in active:
        train_set = open_dataset(cfg.data, "train", transform, with_parts=True)
        check_num_classes(train_set, cfg.model.num_classes, "the model")
        # Meters are created up front, identically on every rank, so the all-reduces below always pair up.
        fit = {s: KeypointFitMeter(2 * (n_pro[s] - 1), len(train_set.part_names)) for s in stage_ids}
        for batch in tqdm(eval_loader(train_set, cfg, info), desc="kpr fit (train)", **bar):
            if batch is None:  # every image of the batch was unreadable (counted)
                continue
            out = forward(discovery_input(batch["image"], cfg.data.mean, cfg.data.std, e.protocol))
            hw = tuple(batch["image"].shape[-2:])
            y = to_bbox_frame(batch["keypoints"].float(), batch["bbox"].float(), hw, protocol=e.protocol)
            for s in stage_ids:
                x, act = bbox_centroid_features(stage_maps(out, s), batch["bbox"], hw,
                                                active_threshold=e.active_threshold, protocol=e.protocol)
                fit[s].update(x, y, batch["visible"], active=act)
        for s, meter in fit.items():
            meter.all_reduce(R.all_reduce_sum)
            regressors[s] = meter.fit()

    # ---- full pass: accuracy, NMI/ARI, keypoint error, foreground IoU
    dataset = open_dataset(cfg.data, split, transform, with_parts=parts_needed)
    check_num_classes(dataset, cfg.model.num_classes, "the model")
    if "fg_iou" in active and not dataset.has_fg_masks:
        skipped["fg_iou"] = f"{cfg.data.format} at {cfg.data.root} has no foreground mask for every {split} image"
        active.discard("fg_iou")
    acc = AccuracyMeter(cfg.model.num_classes)
    num_parts = len(dataset.part_names)
    by_keypoints = "nmi_ari" in active and dataset.has_keypoints
    cont = {s: ContingencyMeter(num_parts, n_pro[s]) for s in stage_ids} if by_keypoints else {}
    pmask = ({s: PartMaskMeter(num_parts + 1, n_pro[s]) for s in stage_ids}
             if "nmi_ari" in active and not by_keypoints else {})
    kerr = {s: KeypointErrorMeter() for s in regressors}
    # The reference's foreground IoU upsamples with align_corners=True (PDiscoFormer's evaluation).
    iou = {s: FgIoUMeter(align_corners=e.protocol == "reference") for s in stage_ids} if "fg_iou" in active else {}
    for batch in tqdm(eval_loader(dataset, cfg, info), desc=f"evaluate ({split})", **bar):
        if batch is None:
            continue
        out = forward(batch["image"])
        acc.update(out.logits.float().cpu(), batch["label"])
        if not parts_needed:
            continue
        hw = tuple(batch["image"].shape[-2:])
        landmarks = to_bbox_frame(batch["keypoints"].float(), batch["bbox"].float(), hw, protocol=e.protocol) \
            if kerr else None
        images = discovery_input(batch["image"], cfg.data.mean, cfg.data.std, e.protocol)
        out = out if images is batch["image"] else forward(images)  # the reference's raw [0, 1] inputs
        for s in stage_ids:
            maps = stage_maps(out, s)
            if s in cont:
                c = concepts_at_keypoints(maps, batch["keypoints"], batch["visible"], hw)
                cont[s].update(c)
            if s in pmask:
                pmask[s].update(maps, batch["part_mask"])
            if s in kerr:
                x, act = bbox_centroid_features(maps, batch["bbox"], hw, active_threshold=e.active_threshold,
                                                protocol=e.protocol)
                kerr[s].update(regressors[s], x, landmarks, batch["visible"], active=act)
            if s in iou:
                iou[s].update(maps, batch["mask"])

    # ---- crop pass: consistency and stability, clean + noisy in one forward
    part = {}
    if active & {"consistency", "stability"}:
        # The protocol resizes the whole box to the model input (no centre crop that would cut the object).
        square = build_eval_transform(cfg.data, cfg.model.img_size, square=True)
        crops = open_dataset(cfg.data, split, square, with_parts=True, bbox_crop=True)
        noisy = "stability" in active
        num_kp = len(crops.part_names)
        part = {s: PartMeter(cfg.model.num_classes, n_pro[s] - 1, num_kp, threshold=e.threshold) for s in stage_ids}
        for batch in tqdm(eval_loader(crops, cfg, info), desc="consistency/stability", **bar):
            if batch is None:
                continue
            images = batch["image"]
            b = images.shape[0]
            if noisy:
                # Noise seeded per image index: the same numbers whatever the batch size or world size.
                noisy_images = [
                    add_protocol_noise(img, std=e.noise_std, clip=e.noise_clip,
                                       generator=torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + int(i)))
                    for img, i in zip(images, batch["index"])
                ]
                images = torch.cat([images, torch.stack(noisy_images)])
            out = forward(images)
            # Part geometry lives in a part_frame × part_frame frame over the crop, placed per eval.protocol.
            kp, vis = part_frame_keypoints(batch["keypoints"], batch["visible"], images.shape[-1],
                                           **_as_tensors(crops.original_parts(batch["index"].numpy())), frame=e.part_frame,
                                           protocol=e.protocol)
            for s in stage_ids:
                maps = stage_maps(out, s)[:, :-1]
                hits = keypoint_hits(maps[:b], kp, vis, frame=e.part_frame, half_size=e.half_size)
                hits_noisy = (keypoint_hits(maps[b:], kp, vis, frame=e.part_frame,
                                            half_size=e.half_size) if noisy else None)
                part[s].update(hits, vis, batch["label"], hits_noisy=hits_noisy)

    for meter in [acc, *cont.values(), *pmask.values(), *kerr.values(), *iou.values(), *part.values()]:
        meter.all_reduce(R.all_reduce_sum)
    result: dict = {}
    if "acc" in requested:
        result.update(acc.compute())
    per_stage = []
    for s in stage_ids:
        row: dict = {"stage": s, "n_pro": n_pro[s] if n_pro else None}
        if s in part:
            scores = part[s].compute()
            row.update({k: scores[k] for k in ("consistency", "stability") if k in active and k in scores})
        if s in cont:
            row.update(cont[s].compute())
        if s in pmask:
            row.update(pmask[s].compute())
        if s in kerr:
            row.update({"kpr": v for k, v in kerr[s].compute().items() if k == "kp_error"})
        if s in iou:
            row.update({k: v for k, v in iou[s].compute().items() if k == "fg_iou"})
        per_stage.append(row)
    # A metric with no data (e.g. no visible keypoint) is absent with its reason, never 0 or 100.
    scored = [acc, *(m[chosen] for m in (part, cont, pmask, kerr, iou) if chosen in m)]
    skipped.update({m: r for m, r in no_data_reasons(scored).items() if m in requested and m not in skipped})
    if chosen is not None:
        top = next(r for r in per_stage if r["stage"] == chosen)
        result.update({k: v for k, v in top.items() if k not in ("stage", "n_pro")})
        result["stage"] = {"index": chosen, "n_pro": n_pro[chosen], "spec": str(e.stage)}
        result["per_stage"] = per_stage
    result["eval_protocol"] = e.protocol  # corrected | reference: which way every interpretability score was measured
    result["protocol"] = asdict(e)
    result["data"] = {"root": str(Path(cfg.data.root).resolve()), "split": split, "format": cfg.data.format,
                      "images": acc.images, "images_listed": len(dataset), "num_classes": cfg.model.num_classes,
                      "corrupt_images_skipped": corrupt_count_all()}
    result["metrics_requested"] = sorted(requested)
    if cont or pmask:
        result["nmi_ari_from"] = "keypoints" if cont else "part masks"
    if skipped:
        result["skipped"] = dict(sorted(skipped.items()))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def evaluate_checkpoint(checkpoint: str | Path, cfg: Config, meta: dict, *, weights: str | None = None,
                        allow_backbone_mismatch: bool = False, **kwargs) -> dict:
    """Rebuild the pretrained folder ``checkpoint`` (its ``config.json`` content is ``meta``), evaluate it with
    :func:`evaluate` (``kwargs``) and record the checkpoint's identity in the result."""
    from .checkpoint import load_pretrained
    from .model import create_model

    model = create_model(cfg.model, weights=weights)
    load_pretrained(model, checkpoint, meta=meta, allow_backbone_mismatch=allow_backbone_mismatch)
    result = evaluate(model, cfg, **kwargs)
    result["checkpoint"] = {"path": str(Path(checkpoint).resolve()), **meta.get("backbone", {})}
    return result


def format_table(result: dict) -> str:
    """A readable summary of an eval.json dict."""
    names = [("top1", "top-1"), ("top5", "top-5"), ("balanced_top1", "balanced top-1"),
             ("consistency", "consistency"), ("stability", "stability"), ("nmi", "NMI"), ("ari", "ARI"),
             ("part_purity", "part purity"), ("part_coverage", "part coverage"),
             ("kpr", "keypoint error (lower better)"), ("fg_iou", "foreground IoU")]
    # Accuracy is measured one way; every interpretability score depends on eval.protocol (docs/deviations.md).
    protocol = result.get("eval_protocol", "corrected")
    lines = [f"{'metric':<32}{'value':>10}  protocol"]
    for key, label in names:
        if key in result:
            lines.append(f"{label:<32}{result[key]:>10.2f}  {'-' if key in ACCURACY_KEYS else protocol}")
    if "stage" in result:
        st = result["stage"]
        lines.append(f"(interpretability at stage {st['index']}, {st['n_pro']} prototypes, eval.stage={st['spec']})")
    if result.get("per_stage"):
        keys = [k for k in ("consistency", "stability", "nmi", "ari", "part_purity", "part_coverage", "kpr", "fg_iou")
                if any(k in r for r in result["per_stage"])]
        lines.append("")
        width = {k: max(13, len(k) + 2) for k in keys}
        lines.append(f"per stage, eval.protocol={protocol}:")
        lines.append(f"{'stage':<7}{'n_pro':>6}" + "".join(f"{k:>{width[k]}}" for k in keys))
        for r in result["per_stage"]:
            lines.append(f"{r['stage']:<7}{r['n_pro']:>6}" + "".join(
                f"{r[k]:>{width[k]}.2f}" if k in r else f"{'-':>{width[k]}}" for k in keys))
    for metric, reason in result.get("skipped", {}).items():
        lines.append(f"skipped {metric}: {reason}")
    return "\n".join(lines)
