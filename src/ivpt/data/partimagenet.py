"""PartImageNet (He et al., ECCV 2022), the ``PartImageNet_Seg`` release, with part segmentation masks.

Layout under ``root`` (``PartImageNet/`` as ``PartImageNet_Seg.zip`` unpacks)::

    images/<split>/<wnid>_<n>.JPEG                   split = train, val, test (val optional here)
    annotations/<split>/<split>.json                 COCO: images, annotations (bbox, area, iscrowd), categories
    annotations/<split>/<wnid>_<n>.png               part label per pixel: category id 0..39, 40 = background

Classification uses the ImageNet object class (the WordNet id that starts each file name), as PDiscoFormer does:
158 classes over the whole release, numbered in sorted wnid order over every split present. The 40 part
categories (``name`` of the COCO categories, e.g. "Quadruped Head", ordered by id) are the part labels; their
union is the foreground. An image's box is the union of its part boxes. Images without any annotation of
positive area are left out (as PDiscoFormer's reader does). Interpretability comes from the masks: NMI/ARI,
part purity/coverage over pixels, and foreground IoU; there are no keypoints.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .base import AnnotatedDataset, Records, require_file
from .common import DatasetError, index_path, read_utf8
from .transforms import IGNORE

__all__ = ["PartImageNetDataset"]

LAYOUT = """\
PartImageNet/
├── images/train/<wnid>_<n>.JPEG, images/val/..., images/test/...
└── annotations/
    ├── train/train.json          (COCO: images, annotations, categories)
    ├── train/<wnid>_<n>.png      (part labels: 0..39, 40 = background)
    ├── val/val.json, val/*.png   (optional)
    └── test/test.json, test/*.png
"""

_SPLITS = ("train", "val", "test")


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: a COCO annotation file needs a list '{key}'")
    return data


def _entry(path: Path, what: str, i: int, entry: dict, keys: tuple[str, ...]) -> list:
    try:
        return [entry[k] for k in keys]
    except (KeyError, TypeError):
        raise DatasetError(f"{path}: {what}[{i}] needs the keys {', '.join(keys)}") from None


class PartImageNetDataset(AnnotatedDataset):
    """One split of PartImageNet_Seg (arguments and items as :class:`~ivpt.data.base.AnnotatedDataset`).

    Attributes:
        wnids: WordNet id of each label. ``supercategories``: super-category of each part label.
    """

    FORMAT = "partimagenet"
    LAYOUT = LAYOUT
    SPLITS = ("train", "val", "test", "all")
    ANNOTATION_FILES = tuple(f"annotations/{s}/{s}.json" for s in _SPLITS)
    has_bbox = True
    has_part_masks = True
    can_have_fg_masks = True

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None,
                 indices: Sequence[int] | None = None, with_parts: bool = False, bbox_crop: bool = False) -> None:
        super().__init__(root, split, transform, indices, with_parts=with_parts, bbox_crop=bbox_crop)
        self.wnids: list[str] = list(self.class_names)
        self.supercategories: list[str] = self.records.extra["supercategories"]

    @classmethod
    def read(cls, root: Path) -> Records:
        files, split_of, boxes, part_names, supercats = [], [], [], None, None
        for split in _SPLITS:
            path = root / "annotations" / split / f"{split}.json"
            if split == "val" and not path.is_file():
                continue
            data = _load_json(require_file(path, cls.FORMAT, cls.LAYOUT))
            cats = sorted((_entry(path, "categories", i, c, ("id", "name", "supercategory"))
                           for i, c in enumerate(data["categories"])), key=lambda c: c[0])
            if [c[0] for c in cats] != list(range(len(cats))) or not cats:
                raise DatasetError(f"{path}: category ids must be 0 .. K-1 (they index the part masks)")
            if part_names is None:
                part_names, supercats = [c[1] for c in cats], [c[2] for c in cats]
            elif part_names != [c[1] for c in cats]:
                raise DatasetError(f"{path}: its categories differ from those of the other splits")
            box_of: dict = {}
            for i, ann in enumerate(data["annotations"]):
                image_id, bbox = _entry(path, "annotations", i, ann, ("image_id", "bbox"))
                if float(ann.get("area", 1)) <= 0 or ann.get("iscrowd", 0) == 1:
                    continue
                if not isinstance(bbox, list) or len(bbox) != 4:
                    raise DatasetError(f"{path}: annotations[{i}].bbox must be [x, y, width, height]")
                x, y, w, h = (float(v) for v in bbox)
                edges = np.array([x - 0.5, y - 0.5, x + w - 0.5, y + h - 0.5])
                old = box_of.get(image_id)
                box_of[image_id] = edges if old is None else np.concatenate([np.minimum(old[:2], edges[:2]),
                                                                             np.maximum(old[2:], edges[2:])])
            for i, image in enumerate(data["images"]):
                image_id, name = _entry(path, "images", i, image, ("id", "file_name"))
                if image_id not in box_of:
                    continue
                name = str(name).replace("\\", "/")
                index_path(root, root / "images" / split, name, f"{path}, images[{i}].file_name")
                files.append(name)
                split_of.append(split)
                boxes.append(box_of[image_id])
        if not files:
            raise DatasetError(f"{root / 'annotations'}: no annotated images in the split files")
        wnids = [Path(f).name.split("_")[0] for f in files]
        class_names = sorted(set(wnids))
        label_of = {w: i for i, w in enumerate(class_names)}
        return Records(
            paths=[root / "images" / s / f for s, f in zip(split_of, files)],
            labels=np.array([label_of[w] for w in wnids], dtype=np.int64), splits=np.array(split_of),
            class_names=class_names, boxes=np.stack(boxes), part_names=list(part_names or []),
            part_masks=[(root / "annotations" / s / Path(f).name).with_suffix(".png") for s, f in zip(split_of, files)],
            extra={"supercategories": list(supercats or [])},
        )

    def part_labels(self, path: Path) -> Image.Image | None:
        """The PNG mask as part labels: 0..P-1 parts, P (= 40, the file's own background value) background;
        any other value becomes IGNORE."""
        mask = super().part_labels(path)
        if mask is None:
            return None
        parts = len(self.part_names)
        return mask.point(lambda v: v if v <= parts else IGNORE)
