"""Class-per-folder datasets for classification-only data.

``root/train/<class>/*.jpg`` and ``root/test/<class>/*.jpg`` when both ``train`` and ``test`` exist; otherwise
``root/<class>/*.jpg`` is the training split and there is no test split. Class names are the sorted folder names
of the training split; labels are their positions. The test split must not introduce new classes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .common import CORRUPT_IMAGES, DatasetError, MissingFileError, load_image
from .transforms import Sample, apply_transform

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _split_dirs(root: Path) -> dict[str, Path]:
    if (root / "train").is_dir() and (root / "test").is_dir():
        return {"train": root / "train", "test": root / "test"}
    return {"train": root}


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class ImageFolderDataset:
    """One split of a class-per-folder dataset.

    Args:
        root: dataset folder.
        split: "train" or "test" (the latter only when ``root/train`` and ``root/test`` both exist).
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
        dirs = _split_dirs(self.root)
        if split not in ("train", "test"):
            raise DatasetError(f"split={split!r} must be 'train' or 'test'")
        if split not in dirs:
            raise DatasetError(
                f"{self.root} has no test split: class-per-folder data needs {self.root / 'train'} and "
                f"{self.root / 'test'} for one; without them the folder is the training split only"
            )
        self.split, self.transform = split, transform
        self.class_names = [p.name for p in _class_dirs(dirs["train"])]
        if not self.class_names:
            raise DatasetError(f"{dirs['train']} holds no class folders (expected <class>/<image> files)")
        label_of = {name: i for i, name in enumerate(self.class_names)}
        paths, labels = [], []
        for folder in _class_dirs(dirs[split]):
            if folder.name not in label_of:
                raise DatasetError(f"class folder {folder} has no counterpart in {dirs['train']}")
            found = _images_in(folder)
            paths += found
            labels += [label_of[folder.name]] * len(found)
        if not paths:
            raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {dirs[split]}")
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
