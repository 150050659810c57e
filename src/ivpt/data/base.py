"""The dataset class every annotated reader shares: split selection, image checks, item assembly.

A reader subclasses :class:`AnnotatedDataset`, names its format and capabilities, and implements :meth:`read`,
which parses the files of its official layout into :class:`Records` (one row per image). Everything else — the
official split, ``indices`` from a validation carve, missing-image reports, loading, joint transforms, and the
``keypoints`` / ``bbox`` / ``mask`` / ``part_mask`` items — lives here once.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from .common import CORRUPT_IMAGES, DatasetError, MissingFileError, load_image, report_missing
from .transforms import Sample, apply_transform, is_joint

__all__ = ["AnnotatedDataset", "Records", "boxes_from_corners", "require_file"]

logger = logging.getLogger("ivpt.data")


@dataclass(frozen=True)
class Records:
    """What a dataset's annotation files say, one row per image (N images, P parts, C classes).

    Attributes:
        paths: (N,) absolute image paths.
        labels: (N,) int64 labels in 0..C-1.
        splits: (N,) official split name of each image ("train", "test", and "val" where the release has one).
        class_names: C names, label order.
        boxes: (N, 4) float64 box edges x0, y0, x1, y1 (pixel-centre coordinates, see transforms), or None.
        keypoints: (N, P, 2) float64, (0, 0) where not visible, or None.
        visible: (N, P) bool, or None.
        part_names: P names of the keypoints or of the part-mask labels.
        fg_masks: (N,) paths of foreground masks (files may be absent: the release ships them separately), or None.
        part_masks: (N,) paths of part label masks, or None.
        extra: reader-specific metadata (original ids, hierarchy, ...).
    """

    paths: list[Path]
    labels: np.ndarray
    splits: np.ndarray
    class_names: list[str]
    boxes: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    visible: np.ndarray | None = None
    part_names: list[str] = field(default_factory=list)
    fg_masks: list[Path] | None = None
    part_masks: list[Path] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def require_file(path: Path, fmt: str, layout: str) -> Path:
    """``path`` if it is a file, else a :class:`MissingFileError` naming it and showing the expected layout."""
    if not path.is_file():
        raise MissingFileError(f"missing dataset file {path}\ndata.format={fmt} expects the layout of the official "
                               f"release under data.root:\n{layout.rstrip()}")
    return path


def boxes_from_corners(x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray) -> np.ndarray:
    """(N, 4) box edges from 1-based inclusive pixel corners (PASCAL VOC, Stanford Cars): columns x1-1 .. x2-1
    have centres at those 0-based positions, so the edges are x1 - 1.5 and x2 - 0.5."""
    return np.stack([np.asarray(v, dtype=np.float64) + d for v, d in ((x1, -1.5), (y1, -1.5), (x2, -0.5),
                                                                     (y2, -0.5))], axis=1)


@functools.lru_cache(maxsize=8)
def _read_cached(cls: type[AnnotatedDataset], root: str, stamp: tuple) -> Records:
    return cls.read(Path(root))


class AnnotatedDataset:
    """One split of a dataset in its official layout.

    Args:
        root: dataset folder (the layout is in the subclass's ``LAYOUT``).
        split: one of the class's ``SPLITS`` ("train", "test", "all", and "val" where the release has one).
        transform: a joint transform (:mod:`ivpt.data.transforms`); a plain image-only callable is accepted when
            ``with_parts`` is false; None: to tensor + ImageNet normalisation only.
        indices: positions within the split to keep; item ``i`` is split item ``indices[i]``.
        with_parts: add the annotations the dataset has (see the ``has_*`` flags) to the items.
        bbox_crop: crop each image to its bounding box before ``transform`` (datasets with boxes only).

    Items are dicts: ``image`` float (3, H, W); ``label`` int; ``index`` int; ``augment`` (a ``data.gpu_augment``
    training transform: ``image`` is then uint8, see :class:`~ivpt.data.transforms.DeviceAugmentPlan`). With
    parts, as available: ``keypoints`` float (P, 2) and ``visible`` bool (P,); ``bbox`` float (4,) box edges;
    ``mask`` float (1, H, W) foreground in [0, 1]; ``part_mask`` int64 (H, W), part j = j, background = P, -1 = no
    label.
    A corrupt image gives ``None`` (logged and counted).

    Capabilities (class attributes, what the release annotates): ``has_keypoints``, ``has_bbox``,
    ``has_part_masks``, ``can_have_fg_masks`` (foreground masks exist for this format at all, shipped or from the
    part masks: without them the evaluator skips fg IoU before reading anything); ``has_fg_masks`` is per
    instance (some releases ship masks separately, so it depends on what is on disk: every image of the split must
    have one).
    """

    FORMAT: ClassVar[str] = ""
    LAYOUT: ClassVar[str] = ""
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "test", "all")
    ANNOTATION_FILES: ClassVar[tuple[str, ...]] = ()  # relative paths whose change invalidates the parse cache
    has_keypoints: ClassVar[bool] = False
    has_bbox: ClassVar[bool] = False
    has_part_masks: ClassVar[bool] = False
    can_have_fg_masks: ClassVar[bool] = False

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None,
                 indices: Sequence[int] | None = None, with_parts: bool = False, bbox_crop: bool = False) -> None:
        if split not in self.SPLITS:
            raise DatasetError(f"split={split!r} must be one of {', '.join(self.SPLITS)}")
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise MissingFileError(f"dataset folder {self.root} does not exist\ndata.format={self.FORMAT} expects "
                                   f"the layout:\n{self.LAYOUT.rstrip()}")
        if bbox_crop and not self.has_bbox:
            raise DatasetError(f"data.format={self.FORMAT} has no bounding boxes; data.bbox_crop needs them")
        if with_parts and transform is not None and not is_joint(transform):
            raise DatasetError("with_parts=True needs a joint transform (ivpt.data.transforms) so that keypoints, "
                               "boxes and masks follow the image")
        self.split, self.transform, self.with_parts, self.bbox_crop = split, transform, with_parts, bbox_crop
        self.records = self.load(self.root)
        rec = self.records
        rows = np.flatnonzero(np.ones(len(rec.paths), dtype=bool) if split == "all" else rec.splits == split)
        if indices is not None:
            order = np.asarray(indices, dtype=np.int64)
            if order.size and (order.min() < 0 or order.max() >= rows.size):
                raise DatasetError(f"indices must lie in [0, {rows.size}) for the {split} split of {self.root}")
            rows = rows[order]
        self._rows = rows
        self.labels: list[int] = rec.labels[rows].tolist()
        self.class_names, self.part_names = rec.class_names, rec.part_names
        self.num_classes = len(rec.class_names)
        report_missing([rec.paths[r] for r in rows if not rec.paths[r].is_file()], "image(s)")
        if with_parts and rec.part_masks is not None:
            report_missing([rec.part_masks[r] for r in rows if not rec.part_masks[r].is_file()], "part mask(s)")
        self.has_fg_masks = self._fg_masks_complete()
        self.has_masks = with_parts and self.has_fg_masks  # items carry "mask"
        self._counter = CORRUPT_IMAGES
        self._warned: set[Path] = set()
        self._counter.ensure_shared()

    # ---------------------------------------------------------------------------------------- reader interface

    @classmethod
    def read(cls, root: Path) -> Records:
        """Parse the annotation files under ``root``; raise :class:`MissingFileError` / :class:`DatasetError`
        naming the file (and line) to fix."""
        raise NotImplementedError

    @classmethod
    def load(cls, root: str | Path) -> Records:
        """:meth:`read`, cached while the files named in ``ANNOTATION_FILES`` are unchanged."""
        base = Path(root).expanduser().resolve()
        stamp = tuple((n, os.stat(base / n).st_mtime_ns if (base / n).exists() else None)
                      for n in cls.ANNOTATION_FILES)
        return _read_cached(cls, str(base), stamp)

    def foreground(self, path: Path) -> Image.Image | None:
        """The foreground mask stored at ``path`` as a PIL "L" image (255 = object); None if unreadable."""
        return load_image(path, "L", self._counter)

    # ------------------------------------------------------------------------------------------------ items

    def _fg_masks_complete(self) -> bool:
        rec = self.records
        if rec.fg_masks is None:
            return rec.part_masks is not None  # foreground = any part label
        missing = sum(not rec.fg_masks[r].is_file() for r in self._rows)
        if missing and missing < len(self._rows):
            logger.warning("%s: %d of %d images have no foreground mask; items carry no 'mask'",
                           self.root, missing, len(self._rows))
        return missing == 0 and len(self._rows) > 0

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        row = int(self._rows[index])
        rec = self.records
        image = load_image(rec.paths[row], "RGB", self._counter)
        if image is None:
            return None
        self._warn_geometry(row, image.size)
        sample = Sample(image=image)
        if rec.boxes is not None:
            sample.bbox = rec.boxes[row].copy()
        if self.with_parts and rec.keypoints is not None and rec.visible is not None:
            sample.keypoints, sample.visible = rec.keypoints[row].copy(), rec.visible[row].copy()
        if self.with_parts and rec.part_masks is not None:
            sample.part_mask = self.part_labels(rec.part_masks[row])
            if sample.part_mask is None:
                return None
        if self.has_masks:
            sample.mask = (self.foreground(rec.fg_masks[row]) if rec.fg_masks is not None
                           else sample.part_mask.point(lambda v: 255 if v < len(self.part_names) else 0))
            if sample.mask is None:
                return None
        item = apply_transform(sample, self.transform, bbox_crop=self.bbox_crop)
        out: dict[str, Any] = {"image": item.image, "label": self.labels[index], "index": index}
        if item.augment is not None:
            out["augment"] = item.augment
        if self.with_parts:
            if item.keypoints is not None:
                out.update(keypoints=item.keypoints, visible=item.visible)
            if item.bbox is not None:
                out["bbox"] = item.bbox
            if item.mask is not None:
                out["mask"] = item.mask
            if item.part_mask is not None:
                out["part_mask"] = item.part_mask
        return out

    def _warn_geometry(self, row: int, size: tuple[int, int]) -> None:
        """Warn once per file (per process) about an image smaller than 2x2 pixels or with its box or visible
        keypoints more than a pixel outside it: the annotation probably belongs to another image size."""
        path = self.records.paths[row]
        if path in self._warned:
            return
        width, height = size
        rec, problems = self.records, []
        if width < 2 or height < 2:
            problems.append(f"it is only {width}x{height} pixels")
        low, high = np.array([-1.5, -1.5]), np.array([width + 0.5, height + 0.5])  # image edges, 1 px slack
        if rec.boxes is not None:
            box = rec.boxes[row]
            if (box[:2] < low).any() or (box[2:] > high).any():
                problems.append(f"its bounding box {box.round(1).tolist()} leaves the image")
        if rec.keypoints is not None and rec.visible is not None:
            kp = rec.keypoints[row][rec.visible[row]]
            outside = int(((kp < low) | (kp > high)).any(axis=1).sum())
            if outside:
                problems.append(f"{outside} visible keypoint(s) lie outside it")
        if problems:
            self._warned.add(path)
            logger.warning("image %s (%dx%d): %s; check its annotation", path, width, height, "; ".join(problems))

    def original_parts(self, index: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The untransformed full-image annotation of items ``index``: ``keypoints`` (B, K, 2), ``visible``
        (B, K) and ``boxes`` (B, 4) (what the reference protocol places keypoints from)."""
        rec = self.records
        if rec.keypoints is None or rec.visible is None or rec.boxes is None:
            raise DatasetError(f"data.format={self.FORMAT} has no keypoints and boxes")
        rows = self._rows[np.asarray(index, dtype=np.int64)]
        return {"keypoints": rec.keypoints[rows], "visible": rec.visible[rows], "boxes": rec.boxes[rows]}

    def part_labels(self, path: Path) -> Image.Image | None:
        """The part label mask at ``path`` in the :class:`~ivpt.data.transforms.Sample` convention (part j = j,
        background = number of parts); None if unreadable."""
        return load_image(path, "L", self._counter)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
                f"classes={self.num_classes}, parts={len(self.part_names)}, with_parts={self.with_parts})")
