"""A synthetic "part-world": stylised birds built from six parts, written in the CUB-200-2011 file layout.

Every image shows one creature made of ``head``, ``beak``, ``body``, ``wing``, ``tail`` and ``legs`` at a random
pose (mirror, rotation, scale, position) over a varied background (smooth gradients or noise textures, blurred
clutter blobs, sometimes a branch in front of the bird). A class is a combination of four part attributes:

* head colour (up to 6 hues), body colour (up to 4), wing pattern (solid / striped / dotted / checkered),
  tail shape (fan / forked / pointed / square).

With ``C`` classes each attribute uses ``min(K, max(2, C // 2))`` of its ``K`` values, balanced, so once ``C >= 4``
every value in use is shared by at least two classes: no single part identifies the class, telling classes apart
takes at least two parts. Nuisances (hue, saturation and
brightness jitter, wing base colour, beak and leg colour, part sizes, tail tilt, pose, background, occluders,
pixel noise) vary per image. Keypoints sit at one anchor per part that lies on the part; a keypoint is visible
when the pixel it rounds to shows that part in the final image, i.e. not covered by a part or branch drawn on top
and inside the frame. Output is a pure function of the arguments: each image draws from
``numpy.random.default_rng([seed, 0, index])``, so any number of workers writes the same bytes.

``difficulty="hard"`` keeps the classes, the bird and the annotation rules but widens the nuisances: rotation within
+-60 degrees (standard +-35), scale 0.28..0.62 x size pixels per object unit (standard 0.40..0.60: small birds
too), the bird anywhere it stays mostly in frame; two to four layers of natural-palette textures (fractal value
noise, bark-like grain); distractors in the head hues, body colours and wing patterns, so colour in the background
says nothing about the class; one to three thick branches in front in 60% of images and leaf clusters in 35%; an
illumination gradient and colour cast over the whole image, mild blur in half the images, Gaussian pixel noise.
``difficulty="medium"`` draws the same kinds of nuisance, milder (:data:`_NUISANCES`): rotation +-50, scale
0.34..0.62, at most two distractors, branches in 35% of images and leaves in 20%, a weaker cast, less blur and
noise. ``"standard"`` (the default) writes exactly the bytes it always has.

The drawing (parts, colours, pose, bird, backgrounds, scenery) lives in :mod:`ivpt.data.synth_draw`; this module
picks the classes, renders a sample and writes the dataset.
"""
from __future__ import annotations

import itertools
import math
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from .synth_draw import (  # noqa: F401 (the part ids are re-exported: callers import them from here)
    BEAK,
    BODY,
    BODY_COLOURS,
    HEAD,
    HEAD_HUES,
    LEGS,
    PART_NAMES,
    TAIL,
    TAIL_SHAPES,
    WING,
    WING_PATTERNS,
    _background,
    _Canvas,
    _draw_bird,
    _draw_branch,
    _draw_hard_occluders,
    _hard_background,
    _hard_finish,
    _Nuisances,
    _Pose,
)

__all__ = [
    "ATTRIBUTES",
    "DIFFICULTIES",
    "PART_NAMES",
    "Rendered",
    "class_attributes",
    "class_name",
    "make_partworld",
    "render_sample",
]

# (attribute name, its values) in the order of a class's attribute tuple.
ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("head", tuple(HEAD_HUES)),
    ("body", tuple(BODY_COLOURS)),
    ("wing", WING_PATTERNS),
    ("tail", TAIL_SHAPES),
)
DIFFICULTIES = ("standard", "medium", "hard")
# How far each textured world's nuisances go (:class:`ivpt.data.synth_draw._Nuisances`).
_NUISANCES = {
    "medium": _Nuisances(50, (0.34, 0.62), (0, 3), 0.35, (1, 3), 0.2, 0.05, 0.3, (2, 4)),
    "hard": _Nuisances(60, (0.28, 0.62), (3, 9), 0.6, (1, 4), 0.35, 0.12, 0.5, (2, 7)),
}
MAX_CLASSES = 300  # below the 384 combinations so that a balanced, duplicate-free assignment is easy to find


class Rendered(NamedTuple):
    """One rendered sample.

    Attributes:
        image: PIL RGB ``size x size``.
        part_mask: (H, W) int64, 0 = background, ``1..P`` = part id (``PART_NAMES[id - 1]``) of the visible pixel.
        keypoints: (P, 2) float64 (x, y) part anchors in pixel-centre coordinates, rounded to 0.1 px; kept even
            when not visible (CUB files write those as 0 0).
        visible: (P,) bool.
        bbox: (4,) float64 x0, y0, x1, y1 edges of the tight box of the visible object pixels.
    """

    image: Image.Image
    part_mask: np.ndarray
    keypoints: np.ndarray
    visible: np.ndarray
    bbox: np.ndarray


# ---------------------------------------------------------------------------------------------------- classes


def class_attributes(classes: int) -> list[tuple[int, ...]]:
    """Attribute indices (head, body, wing, tail) of each class, deterministic in ``classes``.

    Each attribute uses ``min(K, max(2, classes // 2))`` values in a balanced way (counts differ by at most one), so
    every value in use is shared by at least two classes once ``classes >= 4``; all combinations are distinct.
    """
    if not 2 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes={classes} must lie in [2, {MAX_CLASSES}]")
    sizes = [min(len(values), max(2, classes // 2)) for _, values in ATTRIBUTES]
    rng = np.random.default_rng(classes)
    columns = [rng.permutation(np.arange(classes) % s) for s in sizes]
    table = np.stack(columns, axis=1)
    _remove_duplicates(table, rng)
    return [tuple(int(v) for v in row) for row in table]


def _remove_duplicates(table: np.ndarray, rng: np.random.Generator, max_moves: int = 500_000) -> None:
    """Swap one attribute between two classes until all rows differ; swaps keep every column's value counts."""
    counts: dict[tuple, int] = {}
    for row in map(tuple, table):
        counts[row] = counts.get(row, 0) + 1
    duplicated = [i for i, row in enumerate(map(tuple, table)) if counts[row] > 1]
    n, attrs = table.shape
    for _ in range(max_moves):
        duplicated = [i for i in duplicated if counts[tuple(table[i])] > 1]
        if not duplicated:
            return
        i, k, j = duplicated[rng.integers(len(duplicated))], int(rng.integers(n)), int(rng.integers(attrs))
        if table[i, j] == table[k, j]:
            continue
        old = [tuple(table[i]), tuple(table[k])]
        table[i, j], table[k, j] = table[k, j], table[i, j]
        new = [tuple(table[i]), tuple(table[k])]
        if sum(counts.get(r, 0) for r in new) > sum(counts[r] - 1 for r in old):  # would not reduce clashes
            table[i, j], table[k, j] = table[k, j], table[i, j]
            continue
        for r in old:
            counts[r] -= 1
        for r in new:
            counts[r] = counts.get(r, 0) + 1
        duplicated.append(k)
    raise RuntimeError(f"could not give {n} classes distinct attributes")  # not reached for n <= MAX_CLASSES


def class_name(attributes: Sequence[int]) -> str:
    """E.g. ``red_head_brown_body_striped_wing_fan_tail``."""
    return "_".join(f"{values[a]}_{name}" for (name, values), a in zip(ATTRIBUTES, attributes))


def render_sample(seed: int | Sequence[int] | np.random.Generator, class_id: int, size: int = 224, *,
                  classes: int = 10, difficulty: str = "standard") -> Rendered:
    """Render one creature of class ``class_id`` (out of ``classes``) on a ``size x size`` image.

    ``seed`` is an int, a sequence of ints (as ``make_partworld`` uses: ``[seed, 0, index]``) or a numpy Generator.
    ``difficulty`` is ``"standard"`` or ``"hard"`` (see the module docstring); the bird, its annotations and the
    visibility rule are the same in both.
    """
    if not 0 <= class_id < classes:
        raise ValueError(f"class_id={class_id} must lie in [0, {classes})")
    nuisances = _nuisances(difficulty)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    attributes = class_attributes(classes)[class_id]
    canvas = _Canvas(_background(rng, size) if nuisances is None else _hard_background(rng, size, nuisances))
    pose = _Pose(rng, size, nuisances)
    keypoints = np.round(_draw_bird(canvas, rng, attributes, pose), 1)
    if nuisances is not None:
        _draw_hard_occluders(canvas, rng, size, nuisances)
        pixels = _hard_finish(canvas.image, rng, nuisances)
    else:
        if rng.random() < 0.2:
            _draw_branch(canvas, rng, size)
        noise = rng.integers(-5, 6, size=(size, size, 3), dtype=np.int16)
        pixels = np.clip(np.asarray(canvas.image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    part_mask = np.asarray(canvas.mask, dtype=np.int64)
    return Rendered(Image.fromarray(pixels, "RGB"), part_mask, keypoints, _visibility(keypoints, part_mask),
                    _tight_box(part_mask))


def _nuisances(difficulty: str) -> _Nuisances | None:
    """The textured worlds' nuisance ranges, or None for ``standard``."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty={difficulty!r} must be one of {', '.join(DIFFICULTIES)}")
    return _NUISANCES.get(difficulty)


def _visibility(keypoints: np.ndarray, part_mask: np.ndarray) -> np.ndarray:
    height, width = part_mask.shape
    cols, rows = np.floor(keypoints + 0.5).astype(np.int64).T
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    ids = np.zeros(len(keypoints), dtype=np.int64)
    ids[inside] = part_mask[rows[inside], cols[inside]]
    return inside & (ids == np.arange(1, len(keypoints) + 1))


def _tight_box(part_mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(part_mask.any(1)), np.flatnonzero(part_mask.any(0))
    if rows.size == 0:  # nothing visible: the whole frame
        height, width = part_mask.shape
        return np.array([-0.5, -0.5, width - 0.5, height - 0.5])
    return np.array([cols[0] - 0.5, rows[0] - 0.5, cols[-1] + 0.5, rows[-1] + 0.5])


# ---------------------------------------------------------------------------------------------------- writing

_LAYOUT = ("images", "parts", "segmentations", "images.txt", "image_class_labels.txt", "train_test_split.txt",
           "bounding_boxes.txt", "classes.txt")


class _Job(NamedTuple):
    out: str
    seed: int
    classes: int
    per_class: int
    size: int
    folders: tuple[str, ...]
    difficulty: str = "standard"


def _write_range(job: _Job, start: int, stop: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Render and save images ``start .. stop-1``; return their (keypoints, visible, bbox)."""
    out, records = Path(job.out), []
    for index in range(start, stop):
        class_id = index // job.per_class
        sample = render_sample([job.seed, 0, index], class_id, job.size, classes=job.classes,
                               difficulty=job.difficulty)
        rel = _image_path(job.folders[class_id], index % job.per_class)
        sample.image.save(out / "images" / rel, quality=90)
        Image.fromarray(((sample.part_mask > 0) * 255).astype(np.uint8), "L").save(
            (out / "segmentations" / rel).with_suffix(".png"))
        records.append((sample.keypoints, sample.visible, sample.bbox))
    return records


def _image_path(folder: str, k: int) -> str:
    return f"{folder}/{folder.split('.', 1)[1]}_{k + 1:04d}.jpg"


def _prepare(out: Path, overwrite: bool, folders: Sequence[str]) -> None:
    present = [name for name in _LAYOUT if (out / name).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset ({', '.join(present)}); pass overwrite=True "
                              "(--overwrite) to replace it")
    for name in present:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for sub in ("images", "segmentations"):
        for folder in folders:
            (out / sub / folder).mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(parents=True, exist_ok=True)


def _chunks(n: int, pieces: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n, pieces + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def _render_all(job: _Job, total: int, workers: int, progress: bool) -> list[tuple]:
    from tqdm.auto import tqdm

    chunks = _chunks(total, max(1, min(total, workers * 8)))
    records: list[tuple] = []
    with tqdm(total=total, desc="synth", unit="img", disable=not progress, dynamic_ncols=True, leave=False) as bar:
        if workers <= 1:
            for start, stop in chunks:
                records += _write_range(job, start, stop)
                bar.update(stop - start)
        else:
            with ProcessPoolExecutor(workers) as pool:
                futures = [pool.submit(_write_range, job, start, stop) for start, stop in chunks]
                for (start, stop), future in zip(chunks, futures):
                    records += future.result()
                    bar.update(stop - start)
    return records


def _write_text(out: Path, job: _Job, records: list[tuple], test_fraction: float) -> None:
    per_class, n_test = job.per_class, math.floor(test_fraction * job.per_class + 0.5)
    is_test = np.zeros(job.classes * per_class, dtype=bool)
    for c in range(job.classes):
        is_test[c * per_class + np.random.default_rng([job.seed, 1, c]).permutation(per_class)[:n_test]] = True
    images, labels, split, boxes, locs = [], [], [], [], []
    for index, (keypoints, visible, bbox) in enumerate(records):
        image_id, class_id = index + 1, index // per_class
        images.append(f"{image_id} {_image_path(job.folders[class_id], index % per_class)}")
        labels.append(f"{image_id} {class_id + 1}")
        split.append(f"{image_id} {0 if is_test[index] else 1}")
        x, y = bbox[0] + 0.5, bbox[1] + 0.5
        boxes.append(f"{image_id} {x:.1f} {y:.1f} {bbox[2] - bbox[0]:.1f} {bbox[3] - bbox[1]:.1f}")
        for part, ((kx, ky), vis) in enumerate(zip(keypoints, visible), 1):
            locs.append(f"{image_id} {part} {kx if vis else 0:.1f} {ky if vis else 0:.1f} {int(vis)}")
    files = {
        "images.txt": images, "image_class_labels.txt": labels, "train_test_split.txt": split,
        "bounding_boxes.txt": boxes, "parts/part_locs.txt": locs,
        "classes.txt": [f"{c + 1} {folder}" for c, folder in enumerate(job.folders)],
        "parts/parts.txt": [f"{i} {name}" for i, name in enumerate(PART_NAMES, 1)],
    }
    for name, lines in files.items():
        (out / name).write_text("\n".join(lines) + "\n")


def make_partworld(out: str | Path, *, classes: int = 10, per_class: int = 40, size: int = 224, seed: int = 0,
                   test_fraction: float = 0.5, workers: int = 1, progress: bool = False,
                   overwrite: bool = False, difficulty: str = "standard") -> Path:
    """Write a part-world of ``classes x per_class`` images of ``size x size`` pixels to ``out`` in the full
    CUB-200-2011 layout (images, labels 1..C, split, boxes, classes, parts, part locations, segmentations).

    ``test_fraction`` of each class (round half up) goes to the test split, chosen by ``seed``. ``difficulty``
    (``"standard"`` or ``"hard"``) picks the nuisances; classes, split and file layout do not depend on it. The bytes
    written depend only on the arguments, not on ``workers``. Raises ``FileExistsError`` when ``out`` already holds
    a dataset, unless ``overwrite``.
    """
    if per_class < 1 or size < 16:
        raise ValueError(f"per_class={per_class} must be >= 1 and size={size} >= 16")
    if not 0 <= test_fraction <= 1:
        raise ValueError(f"test_fraction={test_fraction} must lie in [0, 1]")
    _nuisances(difficulty)  # an unknown difficulty fails before anything is written
    out = Path(out)
    folders = tuple(f"{c + 1:03d}.{class_name(a)}" for c, a in enumerate(class_attributes(classes)))
    _prepare(out, overwrite, folders)
    job = _Job(str(out), seed, classes, per_class, size, folders, difficulty)
    records = _render_all(job, classes * per_class, max(1, min(workers, os.cpu_count() or 1)), progress)
    _write_text(out, job, records, test_fraction)
    return out

