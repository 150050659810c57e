"""Fault injection in the dataset readers: index entries that leave the dataset folder, 16-bit images, the
class-per-folder layout without a test split, and metrics a format cannot give. Each test breaks one thing in a tiny
tree written in the release's own layout (the writers of tests/test_datasets.py and the part-world of
tests/test_faults.py) and asserts the one-line error (file, line or entry, and the fix) or the corrected result."""
from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy.io import loadmat, savemat

from ivpt.cli import main
from ivpt.data import DatasetError, ImageFolderDataset, dataset_class

from .conftest import TINY
from .test_datasets import (_cells, _photo, _structs, write_cars, write_dogs, write_nabirds,
                            write_partimagenet)
from .test_faults import _copy, _one_line_error, _replace_line, _write_config, world  # noqa: F401 (fixture)


# ------------------------------------------------------------------ 1. index entries that leave data.root

def _outside(tmp_path: Path, name: str = "outside.jpg") -> Path:
    """A readable image next to (outside) the dataset folder: what an escaping entry would silently read."""
    path = tmp_path / name
    _photo(7).save(path, format="JPEG")
    return path


def _assert_named(message: str, index: Path, where: str, entry: str) -> None:
    assert "\n" not in message.rstrip("\n"), message
    assert str(index) in message and where in message and repr(entry) in message, message
    assert "inside the dataset folder" in message, message


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_cub_images_txt_entry_outside_root_is_a_one_line_error_in_train(world, tmp_path, capsys, kind):
    data = _copy(world, tmp_path / "pw")
    outside = _outside(tmp_path)
    entry = "../../outside.jpg" if kind == "dotdot" else str(outside)
    index = data / "images.txt"
    image_id = index.read_text().splitlines()[2].split()[0]
    _replace_line(index, 3, f"{image_id} {entry}")
    cfg = _write_config(tmp_path / "cfg.yaml", data)
    err = _one_line_error(capsys, main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"),
                                        "--no-progress"]))
    _assert_named(err, index, "line 3", entry)
    assert not (tmp_path / "r" / "last.pt").exists()


def test_cub_escape_is_refused_for_every_split(world, tmp_path):
    """Opening any split (what `ivpt eval --data`, `ivpt report` and `ivpt explain` do) parses the whole index, so
    an escaping line is refused even when it belongs to another split."""
    data = _copy(world, tmp_path / "pw")
    _outside(tmp_path)
    index = data / "images.txt"
    image_id = index.read_text().splitlines()[0].split()[0]
    _replace_line(index, 1, f"{image_id} ../../outside.jpg")
    with pytest.raises(DatasetError) as info:
        dataset_class("cub")(data, "all")
    _assert_named(str(info.value), index, "line 1", "../../outside.jpg")


def _nabirds(root: Path, entry: str) -> tuple[Path, str]:
    index = root / "images.txt"
    image_id = index.read_text().splitlines()[1].split()[0]
    _replace_line(index, 2, f"{image_id} {entry}")
    return index, "line 2"


def _partimagenet(root: Path, entry: str) -> tuple[Path, str]:
    index = root / "annotations" / "train" / "train.json"
    data = json.loads(index.read_text())
    data["images"][1]["file_name"] = entry
    index.write_text(json.dumps(data))
    return index, "images[1].file_name"


def _dogs_files(root: Path, entry: str) -> tuple[Path, str]:
    index = root / "train_list.mat"
    mat = loadmat(str(index))
    files = [str(np.asarray(c).reshape(-1)[0]) for c in mat["file_list"].reshape(-1)]
    files[1] = entry
    savemat(index, {"file_list": _cells(files), "annotation_list": mat["annotation_list"], "labels": mat["labels"]})
    return index, "file_list entry 2"


def _dogs_annotations(root: Path, entry: str) -> tuple[Path, str]:
    index = root / "train_list.mat"
    mat = loadmat(str(index))
    notes = [str(np.asarray(c).reshape(-1)[0]) for c in mat["annotation_list"].reshape(-1)]
    # the escaping annotation exists (a copy of the real one), so today it is silently read
    target = (root / "Annotation" / notes[1]).read_text()
    notes[1] = entry
    outside = (root / "Annotation" / entry) if not Path(entry).is_absolute() else Path(entry)
    outside.parent.mkdir(parents=True, exist_ok=True)
    outside.write_text(target)
    savemat(index, {"file_list": mat["file_list"], "annotation_list": _cells(notes), "labels": mat["labels"]})
    return index, "annotation_list entry 2"


def _cars(root: Path, entry: str) -> tuple[Path, str]:
    index = root / "devkit" / "cars_train_annos.mat"
    annotations = loadmat(str(index))["annotations"].reshape(-1)
    rows = [{f: np.asarray(a[f]).reshape(-1)[0] for f in annotations.dtype.names} for a in annotations]
    rows = [{k: (str(v) if k == "fname" else int(v)) for k, v in row.items()} for row in rows]
    rows[1]["fname"] = entry
    savemat(index, {"annotations": _structs(rows)})
    return index, "annotations(2).fname"


ESCAPES = {
    "nabirds": (write_nabirds, _nabirds, "../../outside.jpg"),
    "partimagenet": (write_partimagenet, _partimagenet, "../../../outside.jpg"),
    "stanford_dogs/file_list": (write_dogs, _dogs_files, "../../outside.jpg"),
    "stanford_dogs/annotation_list": (write_dogs, _dogs_annotations, "../../outside_note"),
    "stanford_cars": (write_cars, _cars, "../../outside.jpg"),
}


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_index_entry_outside_root_names_file_and_entry(tmp_path, case, kind):
    write, corrupt, relative = ESCAPES[case]
    root = write(tmp_path / "data" / "ds")
    outside = _outside(tmp_path / "data")  # where "../../outside.jpg" of every reader lands
    entry = relative if kind == "dotdot" else str(outside if "note" not in relative else tmp_path / "abs_note")
    index, where = corrupt(root, entry)
    with pytest.raises(DatasetError) as info:
        dataset_class(case.split("/")[0])(root, "train")
    _assert_named(str(info.value), index, where, entry)


def test_symlinks_inside_the_root_are_followed(world, tmp_path):
    """The check is on the text of the index: a folder of the layout may be a link (e.g. images/ on another
    disk), which the dataset's owner put there."""
    data = _copy(world, tmp_path / "pw")
    shutil.move(data / "images", tmp_path / "elsewhere")
    (data / "images").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    dataset = dataset_class("cub")(data, "all")
    assert len(dataset) == 18 and dataset[0] is not None


# ------------------------------------------------------------------ 2. 16-bit and other image modes

def _png16(path: Path, pixels: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG (grayscale 0, RGB 2, gray+alpha 4, RGBA 6) written byte by byte, as scanners save them."""
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


GRADIENT = (np.arange(16 * 64).reshape(16, 64) * 64).astype(np.uint16)  # 0 .. 65472
EIGHT = np.round(GRADIENT / 257).astype(np.uint8)


def _save(path: Path, mode: str) -> np.ndarray:
    """Write an image of ``mode`` at ``path`` and return the (H, W, 3) uint8 pixels it should read as."""
    rgb8 = np.stack([EIGHT, 255 - EIGHT, EIGHT // 2], -1)
    if mode == "I;16":
        Image.fromarray(GRADIENT).save(path)
        return np.repeat(EIGHT[..., None], 3, -1)
    if mode == "I;16 (bytes)":
        _png16(path, GRADIENT, 0)
        return np.repeat(EIGHT[..., None], 3, -1)
    if mode == "I":  # 32-bit integer TIFF holding 16-bit values
        Image.fromarray(GRADIENT.astype(np.int32)).save(path.with_suffix(".tif"))
        path.with_suffix(".tif").rename(path)
        return np.repeat(EIGHT[..., None], 3, -1)
    if mode == "RGB16":
        _png16(path, np.stack([GRADIENT, 65535 - GRADIENT, GRADIENT // 2], -1), 2)
        return np.stack([GRADIENT >> 8, (65535 - GRADIENT) >> 8, (GRADIENT // 2) >> 8], -1).astype(np.uint8)
    if mode == "LA16":
        _png16(path, np.stack([GRADIENT, np.full_like(GRADIENT, 65535)], -1), 4)
        return np.repeat((GRADIENT >> 8).astype(np.uint8)[..., None], 3, -1)
    image = Image.fromarray(rgb8)
    if mode == "P":
        image = image.quantize(64)
    elif mode in ("RGBA", "LA", "CMYK"):
        image = image.convert(mode)
    image.save(path, format="TIFF" if mode == "CMYK" else "PNG")
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("mode", ["I;16", "I;16 (bytes)", "I", "RGB16", "LA16", "RGBA", "LA", "P", "CMYK"])
def test_image_modes_read_as_their_8_bit_colours(tmp_path, mode):
    for split in ("train", "test"):
        (tmp_path / "d" / split / "a").mkdir(parents=True)
        expected = _save(tmp_path / "d" / split / "a" / "x.png", mode)
    raw = ImageFolderDataset(tmp_path / "d", "test", transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    got = raw[0]["image"].numpy().astype(np.int64)
    assert got.shape == (16, 64, 3)
    assert np.abs(got - expected).max() <= 1, (mode, got[0, :6].tolist(), expected[0, :6].tolist())


# ------------------------------------------------------------------ 3./4. class-per-folder data end to end

def _folder_tree(root: Path, per_class: int = 5, classes: tuple[str, ...] = ("bus", "car", "train")) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            _photo(10 * c + k).save(root / name / f"{k}.jpg")
    return root


def _folder_config(tmp_path: Path, root: Path, classes: int = 3) -> Path:
    config = {
        "model": dict(backbone="vit_small_patch14_reg4_dinov2", img_size=42, num_classes=classes, n_pro=[4, 3],
                      weights="random", backbone_kwargs=dict(TINY)),
        "optim": dict(epochs=1, min_steps=0, batch_size=4, amp="none"),
        "data": dict(root=str(root), format="imagefolder", num_workers=0, val_fraction=0.0),
        "train": dict(seed=0, log_every=1, max_steps=1),
        "eval": dict(batch_size=8),
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_class_folders_without_test_split_hold_out_a_fixed_test_split(tmp_path):
    root = _folder_tree(tmp_path / "d")
    train, test = ImageFolderDataset(root, "train"), ImageFolderDataset(root, "test")
    assert train.class_names == test.class_names == ["bus", "car", "train"]  # "train" is a class here
    assert len(train) + len(test) == 15 and sorted(test.labels) == [0, 1, 2]  # one of 5 per class held out
    assert not set(train.paths) & set(test.paths)
    again = ImageFolderDataset(root, "test")
    assert again.paths == test.paths  # deterministic: the same images whatever the run's seed


def test_only_a_train_folder_is_named(tmp_path):
    _folder_tree(tmp_path / "d" / "train")
    with pytest.raises(DatasetError, match=r"has train/ but no test/") as info:
        ImageFolderDataset(tmp_path / "d", "train")
    assert "\n" not in str(info.value)


def test_class_folders_train_and_eval_with_skipped_metrics(tmp_path, capsys):
    root = _folder_tree(tmp_path / "d")
    cfg = _folder_config(tmp_path, root)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["eval", str(tmp_path / "run" / "best"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert 0 <= result["top1"] <= 100 and result["data"]["images"] == 3  # the held-out split, scored
    skipped = result["skipped"]
    assert set(skipped) == {"consistency", "stability", "nmi_ari", "kpr", "fg_iou"}
    assert skipped["fg_iou"] == "imagefolder has no foreground masks or part masks"
    assert "skipped fg_iou: " in capsys.readouterr().out


def test_class_folders_with_splits_eval_default_metrics(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        _folder_tree(tmp_path / "d" / split, per_class=n, classes=("a", "b"))
    cfg = _folder_config(tmp_path, tmp_path / "d", classes=2)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["eval", str(tmp_path / "run" / "best"), "--no-progress", "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["data"]["images"] == 4 and "fg_iou" in result["skipped"] and "fg_iou" not in result
