"""Pieces shared by the dataset readers: the error type, image loading that survives corrupt files, and the
collate function that drops them while keeping a count for the run summary.

Corrupt images never turn into a wrong label: ``__getitem__`` logs a warning naming the file, counts it and
returns ``None``; :func:`collate_skip_corrupt` removes the ``None`` items from the batch (and returns ``None``
when nothing is left, which the training loop skips).
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

__all__ = [
    "CORRUPT_IMAGES",
    "CorruptImageCounter",
    "DatasetError",
    "MissingFileError",
    "collate_skip_corrupt",
    "corrupt_count",
    "corrupt_count_all",
    "index_path",
    "load_image",
    "read_utf8",
    "report_missing",
    "reset_corrupt_count",
]

logger = logging.getLogger("ivpt.data")

# How many missing files an error message lists before it only gives the count.
_LIST_AT_MOST = 5


class DatasetError(ValueError):
    """A dataset on disk that cannot be read as asked; the message names the file (and line) to fix."""


class MissingFileError(DatasetError, FileNotFoundError):
    """A file the dataset layout requires does not exist (also a ``FileNotFoundError``)."""


class CorruptImageCounter:
    """Number of distinct image files that failed to decode, shared by the training process and its DataLoader
    workers: a file read in every epoch (or by two passes of an evaluation) counts once.

    The files seen are marks in a small shared-memory bitmap indexed by a hash of the path (setting a mark is
    idempotent, so concurrent workers cannot double-count or lose one; two corrupt files would count once only if
    their hashes collided, about one chance in a million per pair). Datasets keep a reference to the counter, so it
    reaches workers started with ``fork`` (inherited mapping) as well as with ``spawn`` or ``forkserver`` (torch
    passes shared storage between processes). A plain ``pickle``/``deepcopy`` copies it.
    """

    SLOTS = 1 << 20

    def __init__(self) -> None:
        self._seen: torch.Tensor | None = None

    def _tensor(self) -> torch.Tensor:
        if self._seen is None:
            self._seen = torch.zeros(self.SLOTS, dtype=torch.uint8).share_memory_()
        return self._seen

    def ensure_shared(self) -> None:
        """Allocate the shared bitmap now, before DataLoader workers are forked from this process."""
        self._tensor()

    def add(self, path: str | Path) -> None:
        """Mark ``path`` as corrupt (again: no change)."""
        digest = hashlib.blake2b(str(path).encode("utf-8", "surrogateescape"), digest_size=8).digest()
        self._tensor()[int.from_bytes(digest, "little") % self.SLOTS] = 1

    def count(self) -> int:
        return int(self._tensor().sum())

    def reset(self) -> None:
        self._tensor().zero_()


CORRUPT_IMAGES = CorruptImageCounter()


def corrupt_count() -> int:
    """Distinct image files this process (and its loader workers) skipped as corrupt since the last reset."""
    return CORRUPT_IMAGES.count()


def corrupt_count_all() -> int:
    """:func:`corrupt_count` summed over the processes of the group (every rank must call it)."""
    from .. import runtime as R

    return int(R.all_reduce_sum(torch.tensor([corrupt_count()], device=R.group_device() or "cpu")).item())


def reset_corrupt_count() -> None:
    CORRUPT_IMAGES.reset()


# Integer modes PIL gives 16-bit files (PNG, TIFF, PGM); "I" is what older PIL gave a 16-bit PNG.
_WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _eight_bit(im: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit "L": value * 255 / 65535, rounded (PIL's own ``convert`` clips at 255,
    which reads almost every pixel as white). 16-bit RGB, RGBA and LA files PIL already reduces to 8 bits."""
    if im.mode not in _WIDE_GRAY:
        return im
    wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def load_image(path: Path, mode: str, counter: CorruptImageCounter = CORRUPT_IMAGES) -> Image.Image | None:
    """Decode ``path`` fully into ``mode`` ("RGB" or "L"); on failure log a warning, count it, return None.

    A 16-bit grayscale photo read as "RGB" is scaled to 8 bits first. "L" (label and foreground masks) keeps
    PIL's conversion, which leaves label values 0..255 as they are."""
    try:
        with Image.open(path) as im:
            if mode == "RGB":
                im.load()
                im = _eight_bit(im)
            return im.convert(mode)  # convert() forces the full decode, so truncated files fail here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        logger.warning("skipping corrupt image %s (%s: %s)", path, type(exc).__name__, exc)
        counter.add(path)
        return None


def loader_generator() -> torch.Generator:
    """A fixed generator for a DataLoader. Without one, a DataLoader draws its workers' base seed from the global RNG,
    which would shift the Gumbel-noise stream depending on when loaders are created (and break exact resume);
    training items are seeded by ``SeededDataset`` and evaluation draws nothing, so its value does not matter."""
    return torch.Generator().manual_seed(0)


def collate_skip_corrupt(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """``default_collate`` after dropping ``None`` items (corrupt images, counted when they were read).

    Returns ``None`` when every item of the batch was corrupt. Keys that only some items carry are dropped so a
    batch mixing datasets still collates. uint8 images of different sizes (``data.gpu_augment``: decoded, not yet
    cropped) are zero-padded at the bottom and right to the largest; their sizes travel in ``augment["frame"]``.
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    keys = [k for k in kept[0] if all(k in item for item in kept[1:])]
    out = default_collate([{k: item[k] for k in keys if k != "image"} for item in kept])
    if "image" in keys:
        out["image"] = _stack_images([item["image"] for item in kept])
    return {k: out[k] for k in keys}


def _stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """(B, C, H, W) from (C, H, W) images; uint8 ones of different sizes are zero-padded to the largest."""
    if images[0].dtype != torch.uint8 or len({tuple(im.shape) for im in images}) == 1:
        return default_collate(images)
    height, width = max(im.shape[-2] for im in images), max(im.shape[-1] for im in images)
    canvas = torch.zeros(len(images), images[0].shape[0], height, width, dtype=torch.uint8)
    for slot, im in zip(canvas, images):
        slot[:, : im.shape[-2], : im.shape[-1]] = im
    return canvas


def read_utf8(path: Path) -> str:
    """The text of annotation file ``path``; a byte that is not UTF-8 is a :class:`DatasetError` naming the file,
    line and column."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DatasetError(f"{path}, line {lineno}, column {column}: byte {data[exc.start]:#04x} is not UTF-8; "
                           "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


_PARENT = re.compile(r"(^|[/\\])\.\.($|[/\\])")


def index_path(root: Path, folder: Path, entry: str, where: str) -> Path:
    """``folder / entry`` for the path ``entry`` that an index file names (``where``: the file and its line or
    entry, e.g. "images.txt, line 3"), refused with a one-line :class:`DatasetError` unless it stays inside the
    dataset folder ``root``.

    The check is on the text of the entry, the only thing an index file controls: it must be a relative path
    without a ``..`` component (no release's index has one), so it can only go down from ``folder``. Symbolic
    links inside ``root`` (e.g. ``images/`` on another disk, or a tree built of links) are followed like any
    folder: the dataset's owner put them there."""
    text = str(entry)
    problem = None
    if not text.strip():
        problem = "is empty"
    elif "\0" in text:
        problem = "holds a NUL byte"
    elif PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive:
        problem = "is absolute"
    elif _PARENT.search(text):
        problem = "climbs out with '..'"
    if problem:
        raise DatasetError(f"{where}: the path {text!r} {problem} and could leave the dataset folder {root}; every "
                           f"path an index names must stay inside the dataset folder: write it relative to "
                           f"{folder}, without '..'")
    return folder / text


def report_missing(paths: Sequence[Path], what: str) -> None:
    """Raise one :class:`DatasetError` listing how many of ``what`` are missing and the first few paths."""
    if not paths:
        return
    shown = "\n  ".join(str(p) for p in paths[:_LIST_AT_MOST])
    more = f"\n  ... and {len(paths) - _LIST_AT_MOST} more" if len(paths) > _LIST_AT_MOST else ""
    raise DatasetError(f"{len(paths)} {what} listed by the dataset are missing on disk:\n  {shown}{more}")
