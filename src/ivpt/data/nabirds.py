"""NABirds (Van Horn et al., CVPR 2015) as its download unpacks: the CUB-style text files plus a class hierarchy.

Layout under ``root`` (``nabirds/``)::

    images.txt               <image uuid> <class folder>/<image uuid without dashes>.jpg
    image_class_labels.txt   <image uuid> <class id>          (555 leaf classes, sparse ids up to 1010)
    classes.txt              <class id> <name, with spaces>   (every node of the taxonomy)
    hierarchy.txt            <child class id> <parent class id>
    train_test_split.txt     <image uuid> <1 = train, 0 = test>
    bounding_boxes.txt       <image uuid> <x> <y> <width> <height>
    parts/parts.txt          <part id, from 0> <name>         (11 parts)
    parts/part_locs.txt      <image uuid> <part id> <x> <y> <visible>
    images/<class folder>/<file>.jpg

Labels are the leaf classes that images use, in sorted order of their original ids (``class_ids`` keeps them;
``class_names`` come from ``classes.txt``). ``parents`` maps every class id to its parent; :meth:`lineage` names a
label's ancestors. Boxes, keypoints and visibility read exactly as for CUB (:mod:`ivpt.data.cub`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from .base import Records, require_file
from .common import DatasetError
from .cub import _FILES, CubDataset, _malformed, _number, _rows, read_classes

__all__ = ["NABirdsDataset", "read_hierarchy"]

LAYOUT = """\
nabirds/
├── images.txt, image_class_labels.txt, classes.txt, hierarchy.txt
├── train_test_split.txt, bounding_boxes.txt, sizes.txt
├── images/<class folder, e.g. 0817>/<uuid>.jpg
└── parts/parts.txt, parts/part_locs.txt
"""


def read_hierarchy(path: Path) -> dict[int, int]:
    """``hierarchy.txt`` as {child class id: parent class id}; a class listed twice is an error."""
    expected = "<child_class_id> <parent_class_id>"
    parents: dict[int, int] = {}
    for lineno, row in _rows(path, 2):
        if not row:
            raise _malformed(path, lineno, expected)
        child, parent = (_number(path, lineno, expected, v, int) for v in row)
        if child in parents:
            raise DatasetError(f"{path}, line {lineno}: class id {child} has a second parent")
        parents[child] = parent
    return parents


class NABirdsDataset(CubDataset):
    """One split of NABirds (arguments and items as :class:`~ivpt.data.cub.CubDataset`).

    Attributes:
        class_ids: original NABirds class id of each label.
        parents: {class id: parent class id} over the whole taxonomy (``hierarchy.txt``).
        taxonomy_names: {class id: name} of every node (``classes.txt``).
    """

    FORMAT = "nabirds"
    LAYOUT = LAYOUT
    ANNOTATION_FILES = (*_FILES, "hierarchy.txt")

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None,
                 indices: Sequence[int] | None = None, with_parts: bool = False, bbox_crop: bool = False) -> None:
        super().__init__(root, split, transform, indices, with_parts=with_parts, bbox_crop=bbox_crop)
        self.class_ids: list[int] = list(self.meta.class_ids)
        self.parents: dict[int, int] = self.records.extra["parents"]
        self.taxonomy_names: dict[int, str] = self.records.extra["taxonomy_names"]

    @classmethod
    def read(cls, root: Path) -> Records:
        classes = require_file(root / "classes.txt", cls.FORMAT, cls.LAYOUT)
        parents = read_hierarchy(require_file(root / "hierarchy.txt", cls.FORMAT, cls.LAYOUT))
        records = super().read(root)
        names = read_classes(classes)
        unnamed = [cid for cid in records.extra["meta"].class_ids if cid not in names]
        if unnamed:
            raise DatasetError(f"{classes} has no name for class id(s) {', '.join(map(str, unnamed[:5]))} used in "
                               "image_class_labels.txt")
        records.extra.update(parents=parents, taxonomy_names=names)
        return records

    def lineage(self, label: int) -> list[str]:
        """Names from the root of the taxonomy down to ``label``'s class (e.g. Birds > ... > species)."""
        chain, cid, seen = [], self.class_ids[label], set()
        while cid is not None and cid not in seen:
            seen.add(cid)
            chain.append(self.taxonomy_names.get(cid, str(cid)))
            cid = self.parents.get(cid)
        return chain[::-1]
