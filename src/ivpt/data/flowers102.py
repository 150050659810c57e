"""Oxford Flowers-102 (Nilsback & Zisserman, 2008) as its downloads unpack, with foreground masks where shipped.

Layout under ``root`` (``flowers-102/``)::

    jpg/image_00001.jpg .. image_08189.jpg      102flowers.tgz
    imagelabels.mat                             labels: 1 x N, class 1..102 of image i
    setid.mat                                   trnid, valid, tstid: 1-based image numbers of each split
    segmim/segmim_00001.jpg ..                  102segmentations.tgz (optional)

Splits: "train" is the official training AND validation lists (trnid + valid, 20 images per class): model
selection uses ``data.val_fraction`` of it, as for every dataset here; "test" is tstid. Class names are the label
numbers ("1" .. "102"; the release ships no names). A segmentation image paints the background pure blue; a pixel
is background when its blue value exceeds 100 x (red + green) — the rule of PDiscoFormer's reader, without its
median filter — and foreground otherwise. Boxes and keypoints do not exist: accuracy and foreground IoU only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .base import AnnotatedDataset, Records
from .common import DatasetError, load_image
from .matfiles import mat_ints, read_mat

__all__ = ["Flowers102Dataset", "flower_foreground"]

LAYOUT = """\
flowers-102/
├── jpg/image_00001.jpg ... image_08189.jpg
├── imagelabels.mat          (labels)
├── setid.mat                (trnid, valid, tstid)
└── segmim/segmim_00001.jpg  (optional, 102segmentations.tgz)
"""


def flower_foreground(segmentation: Image.Image) -> Image.Image:
    """"L" mask (255 = flower) of a Flowers-102 segmentation image: background is the blue paint, i.e. pixels
    whose blue exceeds 100 x (red + green)."""
    rgb = np.asarray(segmentation.convert("RGB"), dtype=np.int64)
    background = rgb[..., 2] > 100 * (rgb[..., 0] + rgb[..., 1])
    return Image.fromarray(np.where(background, 0, 255).astype(np.uint8), mode="L")


class Flowers102Dataset(AnnotatedDataset):
    """One split of Oxford Flowers-102 (arguments and items as :class:`~ivpt.data.base.AnnotatedDataset`)."""

    FORMAT = "flowers102"
    LAYOUT = LAYOUT
    ANNOTATION_FILES = ("imagelabels.mat", "setid.mat")
    can_have_fg_masks = True

    @classmethod
    def read(cls, root: Path) -> Records:
        labels_path, setid_path = root / "imagelabels.mat", root / "setid.mat"
        labels = mat_ints(read_mat(labels_path, ("labels",), cls.FORMAT, cls.LAYOUT)["labels"], labels_path,
                          "labels")
        if labels.size == 0 or labels.min() < 1:
            raise DatasetError(f"{labels_path}: labels must be class numbers from 1")
        sets = read_mat(setid_path, ("trnid", "valid", "tstid"), cls.FORMAT, cls.LAYOUT)
        splits = np.full(labels.size, "", dtype=object)
        for name, split in (("trnid", "train"), ("valid", "train"), ("tstid", "test")):
            ids = mat_ints(sets[name], setid_path, name)
            bad = ids[(ids < 1) | (ids > labels.size)]
            if bad.size:
                raise DatasetError(f"{setid_path}: {name} holds image number {bad[0]}, outside 1..{labels.size} "
                                   "(the images of imagelabels.mat)")
            taken = ids[splits[ids - 1] != ""]
            if taken.size and split == "test":
                raise DatasetError(f"{setid_path}: image number {taken[0]} is in tstid and in trnid/valid")
            splits[ids - 1] = split
        class_ids = sorted(set(labels.tolist()))
        remap = {c: i for i, c in enumerate(class_ids)}
        numbers = range(1, labels.size + 1)
        return Records(
            paths=[root / "jpg" / f"image_{n:05d}.jpg" for n in numbers],
            labels=np.array([remap[c] for c in labels.tolist()], dtype=np.int64),
            splits=splits.astype(str), class_names=[str(c) for c in class_ids],
            fg_masks=[root / "segmim" / f"segmim_{n:05d}.jpg" for n in numbers],
        )

    def foreground(self, path: Path) -> Image.Image | None:
        segmentation = load_image(path, "RGB", self._counter)
        return None if segmentation is None else flower_foreground(segmentation)
