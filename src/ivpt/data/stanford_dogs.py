"""Stanford Dogs (Khosla et al., 2011) as its three archives unpack: images, PASCAL VOC boxes and split lists.

Layout under ``root``::

    Images/<wnid>-<breed>/<wnid>_<n>.jpg                 images.tar
    Annotation/<wnid>-<breed>/<wnid>_<n>                 annotation.tar: PASCAL VOC XML, no file extension
    train_list.mat, test_list.mat                        lists.tar (also accepted under lists/)
        file_list        cell array of "<wnid>-<breed>/<wnid>_<n>.jpg"
        annotation_list  cell array of "<wnid>-<breed>/<wnid>_<n>"
        labels           class numbers 1..120

Labels are the class numbers minus one; class names are the breed part of the folder name ("Chihuahua"). An
image's box is the union of the ``<bndbox>`` of its objects (1-based inclusive pixels, as PASCAL VOC). There are
no part annotations: accuracy only (``data.bbox_crop`` works).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from .base import AnnotatedDataset, Records, boxes_from_corners
from .common import DatasetError, index_path, report_missing
from .matfiles import mat_ints, mat_strings, read_mat

__all__ = ["StanfordDogsDataset", "read_voc_box"]

LAYOUT = """\
StanfordDogs/
├── Images/n02085620-Chihuahua/n02085620_10074.jpg ...
├── Annotation/n02085620-Chihuahua/n02085620_10074 ...   (PASCAL VOC XML)
└── train_list.mat, test_list.mat   (or lists/train_list.mat, lists/test_list.mat)
"""


def read_voc_box(path: Path) -> tuple[float, float, float, float]:
    """(xmin, ymin, xmax, ymax) of the union of the objects' boxes in a PASCAL VOC XML file."""
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        raise DatasetError(f"{path}, line {exc.position[0]}: invalid XML ({exc})") from None
    corners = []
    for i, box in enumerate(tree.getroot().iter("bndbox")):
        try:
            corners.append([float(box.findtext(k, "")) for k in ("xmin", "ymin", "xmax", "ymax")])
        except ValueError:
            raise DatasetError(f"{path}: <bndbox> {i + 1} needs numeric xmin, ymin, xmax, ymax") from None
    if not corners:
        raise DatasetError(f"{path}: no <object><bndbox> in this annotation")
    c = np.array(corners)
    return c[:, 0].min(), c[:, 1].min(), c[:, 2].max(), c[:, 3].max()


class StanfordDogsDataset(AnnotatedDataset):
    """One split of Stanford Dogs (arguments and items as :class:`~ivpt.data.base.AnnotatedDataset`)."""

    FORMAT = "stanford_dogs"
    LAYOUT = LAYOUT
    ANNOTATION_FILES = ("train_list.mat", "test_list.mat", "lists/train_list.mat", "lists/test_list.mat")
    has_bbox = True

    @classmethod
    def read(cls, root: Path) -> Records:
        files, notes, numbers, splits = [], [], [], []
        for split in ("train", "test"):
            path = root / f"{split}_list.mat"
            if not path.is_file() and (root / "lists" / path.name).is_file():
                path = root / "lists" / path.name
            mat = read_mat(path, ("file_list", "annotation_list", "labels"), cls.FORMAT, cls.LAYOUT)
            f = mat_strings(mat["file_list"], path, "file_list")
            a = mat_strings(mat["annotation_list"], path, "annotation_list")
            n = mat_ints(mat["labels"], path, "labels")
            if not len(f) == len(a) == n.size:
                raise DatasetError(f"{path}: file_list, annotation_list and labels differ in length "
                                   f"({len(f)}, {len(a)}, {n.size})")
            for what, folder, entries in (("file_list", "Images", f), ("annotation_list", "Annotation", a)):
                for k, entry in enumerate(entries, 1):
                    index_path(root, root / folder, entry, f"{path}, {what} entry {k}")
            files += f
            notes += a
            numbers += n.tolist()
            splits += [split] * len(f)
        class_ids = sorted(set(numbers))
        if class_ids[0] < 1:
            raise DatasetError(f"{root}: labels in the split lists must be class numbers from 1")
        breed = {}
        for name, number in zip(files, numbers):
            breed.setdefault(number, name.split("/")[0].split("-", 1)[-1])
        xml = [root / "Annotation" / a for a in notes]
        report_missing([p for p in xml if not p.is_file()], "box annotation(s)")
        x1, y1, x2, y2 = np.array([read_voc_box(p) for p in xml]).T
        remap = {c: i for i, c in enumerate(class_ids)}
        return Records(
            paths=[root / "Images" / f for f in files], labels=np.array([remap[n] for n in numbers], dtype=np.int64),
            splits=np.array(splits), class_names=[breed[c] for c in class_ids],
            boxes=boxes_from_corners(x1, y1, x2, y2),
        )
