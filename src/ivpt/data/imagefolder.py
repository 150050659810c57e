"""Class-per-folder datasets for classification-only data.

``root/train/<class>/*.jpg`` and ``root/test/<class>/*.jpg`` when both ``train`` and ``test`` exist; otherwise
``root/<class>/*.jpg`` holds every image and a fixed share of each class (:data:`HELD_OUT_FRACTION`, drawn by
:func:`~ivpt.data.split.stratified_split` with seed :data:`HELD_OUT_SEED`, whatever the run's seed) is held out as
the test split, the rest is the training split. Class names are the sorted folder names of the training folder;
labels are their positions. The test split must not introduce new classes. A root whose only folders are split
names (``train/`` without ``test/``, ...) is an error rather than classes called "train".
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .common import CORRUPT_IMAGES, DatasetError, MissingFileError, load_image
from .split import stratified_split
from .transforms import Sample, apply_transform

__all__ = ["HELD_OUT_FRACTION", "HELD_OUT_SEED", "IMAGE_EXTENSIONS", "ImageFolderDataset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
HELD_OUT_FRACTION = 0.2  # of each class, the test split of a root/<class>/* tree
HELD_OUT_SEED = 0  # fixed: every run on the tree is tested on the same images
_SPLIT_NAMES = {"train", "test", "val", "valid", "validation"}


def _split_dirs(root: Path) -> dict[str, Path]:
    """{"train": folder, "test": folder} of the split layout, or {"all": root} for class folders directly."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return {"train": root / "train", "test": root / "test"}
    names = {p.name for p in _class_dirs(root)}
    if names and names <= _SPLIT_NAMES:
        have = ", ".join(f"{n}/" for n in sorted(names))
        missing = "test/" if "train" in names else "train/"
        raise DatasetError(f"{root} has {have} but no {missing}: data.format=imagefolder takes "
                           f"{root / 'train'}/<class>/* and {root / 'test'}/<class>/*, or the class folders "
                           f"directly under {root} (then {HELD_OUT_FRACTION:.0%} of each class is held out for test)")
    return {"all": root}


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class ImageFolderDataset:
    """One split of a class-per-folder dataset.

    Args:
        root: dataset folder.
        split: "train" or "test" (``root/train`` and ``root/test``, or the held-out share of ``root/<class>``).
        transform: joint transform (see :mod:`ivpt.data.transforms`) or an image-only callable; None: to tensor
            and ImageNet normalisation.
        indices: positions within the split to keep; item ``i`` is split item ``indices[i]``.

    Items: ``image`` float (3, H, W) normalised, ``label`` int, ``index`` int; ``None`` for a corrupt image.
    Class folders carry no annotations: ``with_parts`` and ``bbox_crop`` are errors.
    """

    FORMAT = "imagefolder"
    has_keypoints = False
    has_bbox = False
    has_part_masks = False
    can_have_fg_masks = False
    has_fg_masks = False
    part_names: list[str] = []

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None,
                 indices: Sequence[int] | None = None, with_parts: bool = False, bbox_crop: bool = False) -> None:
        if with_parts or bbox_crop:
            raise DatasetError("data.format=imagefolder has no part annotations or boxes; use a dataset format "
                               "with annotations (cub, nabirds, partimagenet, ...) for interpretability metrics "
                               "and data.bbox_crop")
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise MissingFileError(f"dataset folder {self.root} does not exist")
        if split not in ("train", "test"):
            raise DatasetError(f"split={split!r} must be 'train' or 'test'")
        dirs = _split_dirs(self.root)
        self.split, self.transform = split, transform
        classes = dirs.get("train", dirs.get("all"))
        self.class_names = [p.name for p in _class_dirs(classes)]
        if not self.class_names:
            raise DatasetError(f"{classes} holds no class folders (expected <class>/<image> files)")
        label_of = {name: i for i, name in enumerate(self.class_names)}
        paths, labels = [], []
        for folder in _class_dirs(dirs.get(split, classes)):
            if folder.name not in label_of:
                raise DatasetError(f"class folder {folder} has no counterpart in {classes}")
            found = _images_in(folder)
            paths += found
            labels += [label_of[folder.name]] * len(found)
        if not paths:
            raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {dirs.get(split, classes)}")
        if "all" in dirs:  # root/<class>/*: hold out a fixed share of each class as the test split
            train_idx, test_idx = stratified_split(labels, HELD_OUT_FRACTION, HELD_OUT_SEED)
            keep = (train_idx if split == "train" else test_idx).tolist()
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        if indices is not None:
            order = np.asarray(indices, dtype=np.int64)
            if order.size and (order.min() < 0 or order.max() >= len(paths)):
                raise DatasetError(f"indices must lie in [0, {len(paths)}) for the {split} split of {self.root}")
            paths, labels = [paths[i] for i in order], [labels[i] for i in order]
        self.paths: list[Path] = paths
        self.labels: list[int] = labels
        self.num_classes = len(self.class_names)
        self._counter = CORRUPT_IMAGES
        self._counter.ensure_shared()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image = load_image(self.paths[index], "RGB", self._counter)
        if image is None:
            return None
        item = apply_transform(Sample(image=image), self.transform)
        out = {"image": item.image, "label": self.labels[index], "index": index}
        if item.augment is not None:  # a data.gpu_augment training transform (uint8 image)
            out["augment"] = item.augment
        return out

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
                f"classes={self.num_classes})")
