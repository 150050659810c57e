"""The interpretability protocols of docs/method.md §4 as consumers of :func:`ivpt.eval.runner.run_pass`.

* :class:`KeypointFit` — on the training split: fits one keypoint regressor per stage (``kpr``).
* :class:`Discovery` — on the evaluated split: NMI/ARI at keypoints (or over part masks), keypoint regression
  error, foreground IoU, per stage.
* :class:`PartHits` — on bounding-box crops of the split, clean and noisy images in ONE forward of twice the batch:
  consistency and stability, per stage.

``eval.protocol`` (corrected | reference) decides where keypoints, boxes and centroids are placed and what the
model sees; see docs/deviations.md. Every meter keeps summable counts, exact under torchrun.
"""
from __future__ import annotations

import torch

from ..config import Config
from ..metrics import (
    ContingencyMeter,
    FgIoUMeter,
    KeypointErrorMeter,
    KeypointFitMeter,
    PartMaskMeter,
    PartMeter,
    SumState,
    add_protocol_noise,
    bbox_centroid_features,
    concepts_at_keypoints,
    discovery_input,
    keypoint_hits,
    part_frame_keypoints,
    to_bbox_frame,
)
from .runner import Forward

__all__ = ["StageMaps", "KeypointFit", "Discovery", "PartHits"]


class StageMaps:
    """The part maps an eval-mode output holds (``model.map_stages()``): ``ids`` are their stage indices (IVPT:
    every stage of ``model.n_pro``; single-map models: one), ``channels[s]`` their channel count (background
    last), and ``of(out, s)`` the maps (B, channels[s], H, W) of stage ``s`` on the CPU."""

    def __init__(self, map_stages: list[tuple[int, int]]) -> None:
        self.ids = [s for s, _ in map_stages]
        self.channels = dict(map_stages)

    def of(self, out, s: int) -> torch.Tensor:
        return out.maps[self.ids.index(s)].float().cpu()


class KeypointFit:
    """Least-squares keypoint regressors, one per stage, from soft concept centroids in the bbox frame."""

    def __init__(self, stages: StageMaps, num_keypoints: int, cfg: Config) -> None:
        self.stages, self.cfg = stages, cfg
        # Created up front, identically on every rank, so the all-reduces always pair up.
        self.fit = {s: KeypointFitMeter(2 * (stages.channels[s] - 1), num_keypoints) for s in stages.ids}

    def update(self, batch: dict, forward: Forward) -> None:
        e, d = self.cfg.eval, self.cfg.data
        out = forward(discovery_input(batch["image"], d.mean, d.std, e.protocol))
        hw = tuple(batch["image"].shape[-2:])
        y = to_bbox_frame(batch["keypoints"].float(), batch["bbox"].float(), hw, protocol=e.protocol)
        for s in self.stages.ids:
            x, act = bbox_centroid_features(self.stages.of(out, s), batch["bbox"], hw,
                                            active_threshold=e.active_threshold, protocol=e.protocol)
            self.fit[s].update(x, y, batch["visible"], active=act)

    def meters(self) -> list[SumState]:
        return list(self.fit.values())

    def regressors(self) -> dict:
        return {s: meter.fit() for s, meter in self.fit.items()}


class Discovery:
    """Part-discovery metrics on the evaluated split: NMI/ARI between ground-truth parts and argmax concepts (at
    visible keypoints, or over part-mask pixels), keypoint regression error and foreground IoU."""

    def __init__(self, stages: StageMaps, cfg: Config, *, num_parts: int, by_keypoints: bool, by_part_masks: bool,
                 regressors: dict, fg_iou: bool) -> None:
        self.stages, self.cfg, self.regressors = stages, cfg, regressors
        channels, ids = stages.channels, stages.ids
        self.cont = {s: ContingencyMeter(num_parts, channels[s]) for s in ids} if by_keypoints else {}
        self.pmask = {s: PartMaskMeter(num_parts + 1, channels[s]) for s in ids} if by_part_masks else {}
        self.kerr = {s: KeypointErrorMeter() for s in regressors}
        # The reference's foreground IoU upsamples with align_corners=True (PDiscoFormer's evaluation).
        reference = cfg.eval.protocol == "reference"
        self.iou = {s: FgIoUMeter(align_corners=reference) for s in ids} if fg_iou else {}

    def update(self, batch: dict, forward: Forward) -> None:
        e, d = self.cfg.eval, self.cfg.data
        hw = tuple(batch["image"].shape[-2:])
        landmarks = (to_bbox_frame(batch["keypoints"].float(), batch["bbox"].float(), hw, protocol=e.protocol)
                     if self.kerr else None)
        out = forward(discovery_input(batch["image"], d.mean, d.std, e.protocol))  # reference: raw [0, 1] inputs
        for s in self.stages.ids:
            maps = self.stages.of(out, s)
            if s in self.cont:
                self.cont[s].update(concepts_at_keypoints(maps, batch["keypoints"], batch["visible"], hw))
            if s in self.pmask:
                self.pmask[s].update(maps, batch["part_mask"])
            if s in self.kerr:
                x, act = bbox_centroid_features(maps, batch["bbox"], hw, active_threshold=e.active_threshold,
                                                protocol=e.protocol)
                self.kerr[s].update(self.regressors[s], x, landmarks, batch["visible"], active=act)
            if s in self.iou:
                self.iou[s].update(maps, batch["mask"])

    def meters(self) -> list[SumState]:
        return [*self.cont.values(), *self.pmask.values(), *self.kerr.values(), *self.iou.values()]

    def scores(self, s: int) -> dict[str, float]:
        row: dict[str, float] = {}
        if s in self.cont:
            row.update(self.cont[s].compute())
        if s in self.pmask:
            row.update(self.pmask[s].compute())
        if s in self.kerr:
            row.update({"kpr": v for k, v in self.kerr[s].compute().items() if k == "kp_error"})
        if s in self.iou:
            row.update({k: v for k, v in self.iou[s].compute().items() if k == "fg_iou"})
        return row

    def stage_meters(self, s: int) -> list[SumState]:
        return [m[s] for m in (self.cont, self.pmask, self.kerr, self.iou) if s in m]

    scored_meters = stage_meters

    def notes(self) -> dict[str, str]:
        """eval.json's "nmi_ari_from": where NMI/ARI were measured."""
        if not (self.cont or self.pmask):
            return {}
        return {"nmi_ari_from": "keypoints" if self.cont else "part masks"}


class PartHits:
    """Consistency and stability (Huang et al.) on box crops: per stage, which visible keypoints fall in the box
    around each foreground concept's peak, on clean images and on images with the protocol's seeded noise."""

    def __init__(self, stages: StageMaps, cfg: Config, crops, *, noisy: bool) -> None:
        self.stages, self.cfg, self.crops, self.noisy = stages, cfg, crops, noisy
        num_kp = len(crops.part_names)
        self.part = {s: PartMeter(cfg.model.num_classes, stages.channels[s] - 1, num_kp, threshold=cfg.eval.threshold)
                     for s in stages.ids}

    def update(self, batch: dict, forward: Forward) -> None:
        e = self.cfg.eval
        images = batch["image"]
        b = images.shape[0]
        if self.noisy:
            # Noise seeded per image index: the same numbers whatever the batch size or world size.
            noisy_images = [
                add_protocol_noise(img, std=e.noise_std, clip=e.noise_clip,
                                   generator=torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + int(i)))
                for img, i in zip(images, batch["index"])
            ]
            images = torch.cat([images, torch.stack(noisy_images)])
        out = forward(images)
        # Part geometry lives in a part_frame × part_frame frame over the crop, placed per eval.protocol.
        original = {k: torch.from_numpy(v) for k, v in self.crops.original_parts(batch["index"].numpy()).items()}
        kp, vis = part_frame_keypoints(batch["keypoints"], batch["visible"], images.shape[-1], **original,
                                       frame=e.part_frame, protocol=e.protocol)
        for s in self.stages.ids:
            maps = self.stages.of(out, s)[:, :-1]
            hits = keypoint_hits(maps[:b], kp, vis, frame=e.part_frame, half_size=e.half_size)
            hits_noisy = (keypoint_hits(maps[b:], kp, vis, frame=e.part_frame, half_size=e.half_size)
                          if self.noisy else None)
            self.part[s].update(hits, vis, batch["label"], hits_noisy=hits_noisy)

    def meters(self) -> list[SumState]:
        return list(self.part.values())

    def scores(self, s: int, wanted: set[str] | None = None) -> dict[str, float]:
        scores = self.part[s].compute()
        return {k: scores[k] for k in ("consistency", "stability") if (wanted is None or k in wanted) and k in scores}

    def scored_meters(self, s: int) -> list[SumState]:
        return [self.part[s]]
