"""CUB-200-2011 with labels, splits, boxes, part keypoints and masks (NABirds reuses this reader: ivpt.data.nabirds).

Layout under ``root`` (paths inside the text files are relative to ``root/images`` and must stay inside ``root``:
no ``..``, not absolute; see :func:`ivpt.data.common.index_path`)::

    images.txt               <image_id> <relative path>
    image_class_labels.txt   <image_id> <class_id>
    train_test_split.txt     <image_id> <1 = train, 0 = test>
    bounding_boxes.txt       <image_id> <x> <y> <width> <height>
    parts/parts.txt          <part_id> <name, may contain spaces>
    parts/part_locs.txt      <image_id> <part_id> <x> <y> <visible>
    classes.txt              <class_id> <name>                      (optional)
    segmentations/<relative path with .png>                         (optional, CUB only)

Image ids are kept as strings (NABirds uses UUIDs). Class ids are remapped to ``0 .. C-1`` in sorted order of the
original ids that images use. A missing (image, part) row in ``part_locs.txt`` means "not visible". Coordinates
follow :mod:`ivpt.data.transforms` (pixel centres; boxes as edges).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import AnnotatedDataset, Records, require_file
from .common import DatasetError, MissingFileError, index_path, read_utf8

__all__ = ["CubDataset", "CubMeta", "read_cub"]

Need = Callable[[Path], Path]



@dataclass(frozen=True)
class CubMeta:
    """Everything the text files say, one row per line of ``images.txt`` (N images, P parts).

    Attributes:
        root: dataset folder.
        image_ids: (N,) ids as written.
        paths: (N,) paths relative to ``root/images``.
        labels: (N,) int64 remapped labels in 0..C-1.
        is_train: (N,) bool.
        boxes: (N, 4) float64 x0, y0, x1, y1 box edges (pixel-centre coordinates, see transforms).
        keypoints: (N, P, 2) float64 (x, y); (0, 0) where not visible.
        visible: (N, P) bool.
        part_names: P names in part-id order.
        class_names: C names (classes.txt, else the image folder name of the class's first image).
        class_ids: C original class ids, sorted (label i is class_ids[i]).
    """

    root: Path
    image_ids: list[str]
    paths: list[str]
    labels: np.ndarray
    is_train: np.ndarray
    boxes: np.ndarray
    keypoints: np.ndarray
    visible: np.ndarray
    part_names: list[str]
    class_names: list[str]
    class_ids: list[int]

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)


LAYOUT = """\
CUB_200_2011/
├── images.txt, image_class_labels.txt, train_test_split.txt, bounding_boxes.txt, classes.txt
├── images/<class folder>/<name>.jpg
├── parts/parts.txt, parts/part_locs.txt
└── segmentations/<class folder>/<name>.png   (optional, separate download)
"""
_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt",
          "parts/parts.txt", "parts/part_locs.txt", "classes.txt")


def _rows(path: Path, min_fields: int, max_fields: int | None = None) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of the non-blank lines; the last field absorbs spaces when ``max_fields`` is set."""
    for lineno, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=max_fields - 1) if max_fields else line.split()
        if len(fields) < min_fields or (max_fields is None and len(fields) != min_fields):
            yield lineno, []
            continue
        yield lineno, [f.strip() for f in fields]


def _malformed(path: Path, lineno: int, expected: str) -> DatasetError:
    return DatasetError(f"{path}, line {lineno}: malformed line, expected '{expected}'")


def _number(path: Path, lineno: int, expected: str, text: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise _malformed(path, lineno, expected) from None


def _read_images(root: Path, need: Need) -> tuple[list[str], list[str], dict[str, int]]:
    path = need(root / "images.txt")
    ids, paths, row_of = [], [], {}
    for lineno, fields in _rows(path, 2, 2):
        if not fields:
            raise _malformed(path, lineno, "<image_id> <path>")
        image_id, rel = fields
        index_path(root, root / "images", rel, f"{path}, line {lineno}")  # must stay inside root
        if image_id in row_of:
            raise DatasetError(f"{path}, line {lineno}: image id {image_id} appears twice")
        row_of[image_id] = len(ids)
        ids.append(image_id)
        paths.append(rel)
    if not ids:
        raise DatasetError(f"{path} lists no images")
    return ids, paths, row_of


def _per_image(root: Path, name: str, row_of: dict[str, int], fields: int, expected: str,
               parse: Callable[[str], Any], need: Need,
               check: Callable[[list[Any]], str | None] | None = None) -> list[Any]:
    """Read a file with exactly one line per image id of images.txt: values parsed with ``parse``. ``check``
    returns what is wrong with a line's values (the error then names the file and line), or None."""
    path = need(root / name)
    values: list[Any] = [None] * len(row_of)
    for lineno, row in _rows(path, fields):
        if not row:
            raise _malformed(path, lineno, expected)
        row_index = row_of.get(row[0])
        if row_index is None:
            raise DatasetError(f"{path}, line {lineno}: image id {row[0]} is not in images.txt")
        if values[row_index] is not None:
            raise DatasetError(f"{path}, line {lineno}: image id {row[0]} appears twice")
        values[row_index] = [_number(path, lineno, expected, v, parse) for v in row[1:]]
        problem = check(values[row_index]) if check else None
        if problem:
            raise DatasetError(f"{path}, line {lineno}: {problem}")
    missing = [image_id for image_id, v in zip(row_of, values) if v is None]
    if missing:
        raise DatasetError(
            f"{path} has no line for {len(missing)} image id(s) of images.txt, e.g. {', '.join(missing[:5])}"
        )
    return values


def _read_parts(root: Path, need: Need) -> tuple[list[int], list[str]]:
    path = need(root / "parts" / "parts.txt")
    ids, names = [], []
    for lineno, row in _rows(path, 2, 2):
        if not row:
            raise _malformed(path, lineno, "<part_id> <name>")
        part_id = _number(path, lineno, "<part_id> <name>", row[0], int)
        if part_id in ids:
            raise DatasetError(f"{path}, line {lineno}: part id {part_id} appears twice")
        ids.append(part_id)
        names.append(row[1])
    order = np.argsort(ids)
    return [ids[i] for i in order], [names[i] for i in order]


def _read_part_locs(root: Path, row_of: dict[str, int], part_ids: list[int],
                    need: Need) -> tuple[np.ndarray, np.ndarray]:
    path = need(root / "parts" / "part_locs.txt")
    expected = "<image_id> <part_id> <x> <y> <visible>"
    column = {pid: j for j, pid in enumerate(part_ids)}
    keypoints = np.zeros((len(row_of), len(part_ids), 2))
    visible = np.zeros((len(row_of), len(part_ids)), dtype=bool)
    for lineno, row in _rows(path, 5):
        if not row:
            raise _malformed(path, lineno, expected)
        row_index = row_of.get(row[0])
        if row_index is None:
            raise DatasetError(f"{path}, line {lineno}: image id {row[0]} is not in images.txt")
        part = column.get(_number(path, lineno, expected, row[1], int))
        if part is None:
            raise DatasetError(f"{path}, line {lineno}: part id {row[1]} is not in parts/parts.txt")
        x, y = (_number(path, lineno, expected, v, float) for v in row[2:4])
        vis = _number(path, lineno, expected, row[4], lambda s: int(float(s)))
        if vis:
            keypoints[row_index, part] = (x, y)
            visible[row_index, part] = True
    return keypoints, visible


def read_classes(path: Path) -> dict[int, str]:
    """``classes.txt`` (``<class_id> <name>`` lines) as {class id: name}; {} when the file is absent."""
    names: dict[int, str] = {}
    if path.is_file():
        for lineno, row in _rows(path, 2, 2):
            if not row:
                raise _malformed(path, lineno, "<class_id> <name>")
            names[_number(path, lineno, "<class_id> <name>", row[0], int)] = row[1]
    return names


def _class_check(root: Path, names: dict[int, str]) -> Callable[[list[Any]], str | None] | None:
    """Check of an image_class_labels.txt line against the ids of classes.txt (None without classes.txt)."""
    if not names:
        return None
    low, high = min(names), max(names)

    def check(values: list[Any]) -> str | None:
        if values[0] in names:
            return None
        return (f"class id {values[0]} is not in {root / 'classes.txt'} (ids {low}..{high}); fix the id or add "
                "the class to classes.txt")

    return check


def _box_check(values: list[Any]) -> str | None:
    """What is wrong with a ``<x> <y> <width> <height>`` box, or None."""
    if not all(np.isfinite(values)):
        return f"bounding box {values} is not finite; give four numbers x y width height"
    if values[2] <= 0 or values[3] <= 0:
        return f"bounding box {values} has width {values[2]:g} and height {values[3]:g}; both must be > 0"
    return None


def _read_class_names(names: dict[int, str], class_ids: list[int], paths: list[str],
                      labels: np.ndarray) -> list[str]:
    first_path = {}
    for rel, label in zip(paths, labels.tolist()):
        first_path.setdefault(label, rel)
    return [names.get(cid) or Path(first_path[i]).parent.name or str(cid) for i, cid in enumerate(class_ids)]


@functools.lru_cache(maxsize=4)
def _read_cub_cached(root: str, stamp: tuple, fmt: str, layout: str) -> CubMeta:
    base = Path(root)

    def need(path: Path) -> Path:
        return require_file(path, fmt, layout)

    ids, paths, row_of = _read_images(base, need)
    names = read_classes(base / "classes.txt")
    original = [v[0] for v in _per_image(base, "image_class_labels.txt", row_of, 2, "<image_id> <class_id>", int,
                                         need, _class_check(base, names))]
    class_ids = sorted(set(original))
    remap = {cid: i for i, cid in enumerate(class_ids)}
    labels = np.array([remap[c] for c in original], dtype=np.int64)
    is_train = np.array([v[0] for v in _per_image(base, "train_test_split.txt", row_of, 2,
                                                  "<image_id> <is_train>", int, need)], dtype=bool)
    xywh = np.array(_per_image(base, "bounding_boxes.txt", row_of, 5, "<image_id> <x> <y> <width> <height>", float,
                               need, _box_check))
    boxes = np.concatenate([xywh[:, :2] - 0.5, xywh[:, :2] + xywh[:, 2:] - 0.5], axis=1)
    part_ids, part_names = _read_parts(base, need)
    keypoints, visible = _read_part_locs(base, row_of, part_ids, need)
    return CubMeta(
        root=base, image_ids=ids, paths=paths, labels=labels, is_train=is_train, boxes=boxes, keypoints=keypoints,
        visible=visible, part_names=part_names, class_names=_read_class_names(names, class_ids, paths, labels),
        class_ids=class_ids,
    )


def read_cub(root: str | Path, *, fmt: str = "cub", layout: str = LAYOUT) -> CubMeta:
    """Parse and validate the text files of a CUB-layout dataset (cached while the files are unchanged).

    ``fmt`` and ``layout`` only shape the error for a missing file (NABirds shares the layout).

    Raises:
        MissingFileError: a required file is absent (the message gives its full path and the expected layout).
        DatasetError: a malformed line or an id that does not line up (the message gives file and line).
    """
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise MissingFileError(f"dataset folder {base} does not exist")
    stamp = tuple((n, os.stat(base / n).st_mtime_ns if (base / n).exists() else None) for n in _FILES)
    return _read_cub_cached(str(base), stamp, fmt, layout)


class CubDataset(AnnotatedDataset):
    """One split of a CUB-layout dataset (see the module docstring; items and arguments as
    :class:`~ivpt.data.base.AnnotatedDataset`). ``meta`` holds the parsed text files; ``mask`` items come from
    ``segmentations/`` when every image of the split has one."""

    FORMAT = "cub"
    LAYOUT = LAYOUT
    ANNOTATION_FILES = _FILES
    has_keypoints = True
    has_bbox = True
    can_have_fg_masks = True

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None,
                 indices: Sequence[int] | None = None, with_parts: bool = False, bbox_crop: bool = False) -> None:
        super().__init__(root, split, transform, indices, with_parts=with_parts, bbox_crop=bbox_crop)
        self.meta: CubMeta = self.records.extra["meta"]

    @classmethod
    def read(cls, root: Path) -> Records:
        meta = read_cub(root, fmt=cls.FORMAT, layout=cls.LAYOUT)
        images, segmentations = root / "images", root / "segmentations"
        return Records(
            paths=[images / p for p in meta.paths], labels=meta.labels,
            splits=np.where(meta.is_train, "train", "test"), class_names=meta.class_names, boxes=meta.boxes,
            keypoints=meta.keypoints, visible=meta.visible, part_names=meta.part_names,
            fg_masks=([(segmentations / p).with_suffix(".png") for p in meta.paths] if segmentations.is_dir()
                      else None),
            extra={"meta": meta},
        )
