"""Dataset readers, joint transforms and splits on tiny trees written in tmp_path: label remapping, exact keypoint
geometry under resize / crop / flip / affine, every error case, corrupt images, class folders, stratified splits."""
from __future__ import annotations

import logging
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import functional as TF

from ivpt.config import Config, DataConfig
from ivpt.data import (
    CubDataset,
    DatasetError,
    ImageFolderDataset,
    MissingFileError,
    build_datasets,
    build_eval_transform,
    build_train_transform,
    collate_skip_corrupt,
    corrupt_count,
    reset_corrupt_count,
    stratified_split,
)
from ivpt.data import transforms as T

MEAN, STD = DataConfig().mean, DataConfig().std

# Image geometry of the mini-CUB: 100 x 50, a white 2 x 2 block on pixels x 60..61, y 20..21 (centre 60.5, 20.5).
W, H = 100, 50
BLOCK = (60.5, 20.5)
# Three classes with original ids 12, 3, 7 (remapped in sorted order: 3 -> 0, 7 -> 1, 12 -> 2), two images each:
# the first of every class in train, the second in test.
CLASSES = {12: "012.Zebra_Finch", 3: "003.Albatross", 7: "007.Crow"}


def _image(value: int = 80) -> Image.Image:
    pixels = np.full((H, W, 3), value, dtype=np.uint8)
    pixels[20:22, 60:62] = 255
    return Image.fromarray(pixels)


def write_mini_cub(root, *, segmentations: bool = False):
    """A CUB-layout tree with 6 images of 100 x 50 and 3 parts (block centre, a point near the left edge, hidden)."""
    (root / "parts").mkdir(parents=True)
    images, labels, split, boxes, locs = [], [], [], [], []
    image_id = 0
    for class_id, name in CLASSES.items():
        (root / "images" / name).mkdir(parents=True)
        if segmentations:
            (root / "segmentations" / name).mkdir(parents=True)
        for k in range(2):
            image_id += 1
            rel = f"{name}/img_{k}.jpg"
            _image(40 * k + 60).save(root / "images" / rel, quality=95)
            if segmentations:
                seg = np.zeros((H, W), dtype=np.uint8)
                seg[10:40, 50:90] = 255
                Image.fromarray(seg).save((root / "segmentations" / rel).with_suffix(".png"))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {1 - k}")
            boxes.append(f"{image_id} 10.0 5.0 80.0 40.0")
            locs += [f"{image_id} 1 {BLOCK[0]} {BLOCK[1]} 1", f"{image_id} 2 4.0 10.0 1", f"{image_id} 3 0.0 0.0 0"]
    files = {
        "images.txt": images, "image_class_labels.txt": labels, "train_test_split.txt": split,
        "bounding_boxes.txt": boxes, "parts/part_locs.txt": locs,
        "parts/parts.txt": ["1 block", "2 left edge", "3 hidden part"],
        "classes.txt": [f"{cid} {name}" for cid, name in CLASSES.items()],
    }
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def cub(tmp_path):
    return write_mini_cub(tmp_path / "cub")


def _pixels(image: torch.Tensor) -> np.ndarray:
    """Undo normalisation: (H, W) grey values 0..255 of a (3, H, W) item image."""
    rgb = image * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    return (255 * rgb.mean(0)).numpy()


def _brightest(image: torch.Tensor) -> tuple[int, int]:
    row, col = np.unravel_index(np.argmax(_pixels(image)), image.shape[1:])
    return int(col), int(row)


# ------------------------------------------------------------------------------------------------ CUB reader


def test_labels_remapped_in_sorted_order_and_splits(cub):
    train, test = CubDataset(cub, "train"), CubDataset(cub, "test")
    assert len(train) == len(test) == 3 and len(CubDataset(cub, "all")) == 6
    assert train.num_classes == 3
    assert train.class_names == ["003.Albatross", "007.Crow", "012.Zebra_Finch"]
    assert train.labels == [2, 0, 1] == test.labels  # file order: original ids 12, 3, 7
    assert train.part_names == ["block", "left edge", "hidden part"]
    item = train[0]
    assert set(item) == {"image", "label", "index"}
    assert item["label"] == 2 and item["index"] == 0 and item["image"].shape == (3, H, W)
    sub = CubDataset(cub, "train", indices=[2, 0])
    assert sub.labels == [1, 2] and sub[0]["index"] == 0 and sub[0]["label"] == 1


def test_eval_transform_resize_center_crop_exact(cub):
    # shorter side 50 -> 25 halves the image to 50 x 25; the centre crop starts at x = round(12.5) = 12.
    cfg = DataConfig(resize=25)
    item = CubDataset(cub, "train", build_eval_transform(cfg, 25), with_parts=True)[0]
    assert item["image"].shape == (3, 25, 25)
    # Block centre: x' = (60.5 + 0.5) / 2 - 0.5 - 12 = 18, y' = (20.5 + 0.5) / 2 - 0.5 = 10. The 2 x 2 block
    # becomes exactly pixel (18, 10).
    assert item["keypoints"][0].tolist() == [18.0, 10.0] and _brightest(item["image"]) == (18, 10)
    # (4, 10) -> x' = 4.5 / 2 - 0.5 - 12 = -10.25: left the frame, so invisible and reported as (0, 0).
    assert item["visible"].tolist() == [True, False, False]
    assert item["keypoints"][1:].abs().sum() == 0
    # Box x y w h = 10 5 80 40 has edges (9.5, 4.5, 89.5, 44.5) -> (4.5, 2, 44.5, 22) -> crop -> clipped to frame.
    assert item["bbox"].tolist() == [-0.5, 2.0, 24.5, 22.0]
    assert item["keypoints"].dtype == torch.float32 and item["visible"].dtype == torch.bool


def test_flip_maps_x_to_w_minus_1_minus_x(cub):
    flip = T.JointCompose([T.ResizeShorter(25), T.CenterCrop(25), T.RandomHorizontalFlip(p=1.0),
                           T.ToTensorNormalize(MEAN, STD)])
    item = CubDataset(cub, "train", flip, with_parts=True)[0]
    assert item["keypoints"][0].tolist() == [24 - 18.0, 10.0] and _brightest(item["image"]) == (6, 10)
    assert item["bbox"].tolist() == [-0.5, 2.0, 24.5, 22.0]  # symmetric after clipping


def test_flip_matches_torchvision_pixels():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (7, 9, 3), dtype=np.uint8))
    sample = T.hflip(T.Sample(image=image, keypoints=np.array([[2.0, 3.0]]), visible=np.array([True])))
    assert np.array_equal(np.asarray(sample.image), np.asarray(TF.hflip(image)))
    assert sample.keypoints.tolist() == [[6.0, 3.0]]


def test_affine_matches_torchvision_and_keypoints_follow_pixels():
    pixels = np.zeros((64, 80, 3), dtype=np.uint8)
    pixels[30:34, 50:54] = 255  # blob centred on (51.5, 31.5)
    image = Image.fromarray(pixels)
    angle, translate, scale = 30.0, (-5.0, 3.0), 1.2
    sample = T.Sample(image=image, keypoints=np.array([[51.5, 31.5], [1.0, 1.0]]), visible=np.array([True, True]))
    out = T.apply_affine(sample, angle, translate, scale)
    reference = TF.affine(image, angle=angle, translate=list(translate), scale=scale, shear=[0.0, 0.0],
                          interpolation=TF.InterpolationMode.BILINEAR)
    assert np.abs(np.asarray(out.image, dtype=int) - np.asarray(reference, dtype=int)).max() <= 1
    weights = np.asarray(out.image, dtype=float).mean(2)
    ys, xs = np.mgrid[: weights.shape[0], : weights.shape[1]]
    centroid = np.array([(weights * xs).sum(), (weights * ys).sum()]) / weights.sum()
    assert np.abs(centroid - out.keypoints[0]).max() < 0.1
    assert out.visible.tolist() == [True, False]  # the corner point rotates out of the frame


def test_translation_out_of_frame_makes_invisible():
    image = Image.new("RGB", (40, 40))
    sample = T.Sample(image=image, keypoints=np.array([[35.0, 20.0], [10.0, 20.0]]), visible=np.array([True, True]))
    out = T.apply_affine(sample, 0.0, (10.0, 0.0), 1.0)
    assert out.keypoints.tolist() == [[45.0, 20.0], [20.0, 20.0]] and out.visible.tolist() == [False, True]


def test_resize_keypoint_formula_exact():
    sample = T.Sample(image=Image.new("RGB", (10, 4)), keypoints=np.array([[0.0, 0.0], [9.0, 3.0]]),
                      visible=np.array([True, True]), bbox=np.array([-0.5, -0.5, 9.5, 3.5]))
    out = T.ResizeShorter(8)(sample)
    assert out.size == (20, 8)
    assert out.keypoints.tolist() == [[0.5, 0.5], [18.5, 6.5]]  # (x + 0.5) * 2 - 0.5
    assert out.bbox.tolist() == [-0.5, -0.5, 19.5, 7.5]  # the whole frame stays the whole frame


def test_bbox_crop_and_segmentation_mask(tmp_path):
    root = write_mini_cub(tmp_path / "cub", segmentations=True)
    item = CubDataset(root, "train", with_parts=True, bbox_crop=True)[0]
    assert item["image"].shape == (3, 40, 80)  # exactly the w x h box pixels
    assert item["keypoints"][0].tolist() == [BLOCK[0] - 10, BLOCK[1] - 5]
    assert item["bbox"].tolist() == [-0.5, -0.5, 79.5, 39.5]
    assert item["mask"].shape == (1, 40, 80)
    assert item["mask"][0, 5:35, 40:80].min() == 1 and item["mask"][0, :5].max() == 0  # seg rows 10..39 -> 5..34
    full = CubDataset(root, "test", build_eval_transform(DataConfig(), 25), with_parts=True)
    batch = collate_skip_corrupt([full[0], full[1]])
    assert batch["mask"].shape == (2, 1, 25, 25) and batch["keypoints"].shape == (2, 3, 2)


def test_train_transform_shapes_and_determinism(cub):
    tf = build_train_transform(DataConfig(resize=40), 32)
    data = CubDataset(cub, "train", tf, with_parts=True)
    torch.manual_seed(0)
    a = data[1]
    torch.manual_seed(0)
    b = data[1]
    assert a["image"].shape == (3, 32, 32) and torch.equal(a["image"], b["image"])
    assert torch.equal(a["keypoints"], b["keypoints"])
    assert all(isinstance(op, T.JointOp) for op in tf.ops)
    names = [type(op).__name__ for op in tf.ops]
    assert names == ["ResizeShorter", "RandomHorizontalFlip", "RandomAffine", "RandomCrop", "ColorJitter",
                     "ToTensorNormalize"]


def test_image_only_transform_accepted_without_parts(cub):
    item = CubDataset(cub, "train", lambda im: TF.to_tensor(im.resize((8, 8))))[0]
    assert item["image"].shape == (3, 8, 8)
    with pytest.raises(DatasetError, match="joint transform"):
        CubDataset(cub, "train", lambda im: im, with_parts=True)


# ------------------------------------------------------------------------------------------------ errors


def test_missing_file_named_by_full_path(cub):
    (cub / "bounding_boxes.txt").unlink()
    with pytest.raises(MissingFileError, match=re.escape(str(cub / "bounding_boxes.txt"))) as info:
        CubDataset(cub, "train")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DatasetError)


@pytest.mark.parametrize("name, line, text, message", [
    ("image_class_labels.txt", 2, "99 3", r"image_class_labels.txt, line 2: image id 99 is not in images.txt"),
    ("bounding_boxes.txt", 3, "3 1.0 2.0 3.0", r"bounding_boxes.txt, line 3: malformed line"),
    ("train_test_split.txt", 1, "1 yes", r"train_test_split.txt, line 1: malformed line"),
    ("parts/part_locs.txt", 4, "2 9 1.0 1.0 1", r"part_locs.txt, line 4: part id 9 is not in parts/parts.txt"),
    ("images.txt", 5, "1 003.Albatross/img_0.jpg", r"images.txt, line 5: image id 1 appears twice"),
])
def test_bad_lines_name_file_and_line(cub, name, line, text, message):
    path = cub / name
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        CubDataset(cub, "train")


def test_image_without_label_line_is_reported(cub):
    path = cub / "image_class_labels.txt"
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt has no line for 1 image id\(s\).*e.g. 6"):
        CubDataset(cub, "train")


def test_missing_images_are_all_reported(cub):
    gone = [cub / "images/003.Albatross/img_0.jpg", cub / "images/007.Crow/img_0.jpg"]
    for path in gone:
        path.unlink()
    with pytest.raises(DatasetError, match="2 image") as info:
        CubDataset(cub, "train")
    assert all(str(p) in str(info.value) for p in gone)
    assert len(CubDataset(cub, "test")) == 3  # the test split is complete


def test_corrupt_image_gives_none_counts_and_collate_drops_it(cub, caplog):
    bad = cub / "images/012.Zebra_Finch/img_0.jpg"  # train item 0
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    data = CubDataset(cub, "train", build_eval_transform(DataConfig(), 16))
    reset_corrupt_count()
    with caplog.at_level(logging.WARNING, logger="ivpt.data"):
        assert data[0] is None
    assert corrupt_count() == 1 and str(bad) in caplog.text
    batch = collate_skip_corrupt([data[i] for i in range(3)])
    assert batch["label"].tolist() == [0, 1] and batch["index"].tolist() == [1, 2]
    assert collate_skip_corrupt([None, None]) is None
    assert corrupt_count() == 1  # the same file read twice counts once
    reset_corrupt_count()
    assert corrupt_count() == 0


def test_corrupt_count_reaches_main_process_from_workers(cub):
    for name in ("012.Zebra_Finch/img_0.jpg", "007.Crow/img_0.jpg"):
        (cub / "images" / name).write_bytes(b"not a jpeg")
    data = CubDataset(cub, "train", build_eval_transform(DataConfig(), 16))
    reset_corrupt_count()
    loader = DataLoader(data, batch_size=1, num_workers=2, collate_fn=collate_skip_corrupt)
    batches = [b for b in loader if b is not None]
    assert [b["label"].item() for b in batches] == [0]
    assert corrupt_count() == 2
    reset_corrupt_count()


def test_bad_split_and_indices(cub):
    with pytest.raises(DatasetError, match="split"):
        CubDataset(cub, "val")
    with pytest.raises(DatasetError, match="indices"):
        CubDataset(cub, "train", indices=[3])


# ------------------------------------------------------------------------------------------------ image folders


def _folder(root, classes, n=2):
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(n):
            _image(50 + 10 * k).save(root / c / f"{k}.png")


def test_imagefolder_with_and_without_splits(tmp_path):
    _folder(tmp_path / "a" / "train", ["cat", "ant", "bee"], n=3)
    _folder(tmp_path / "a" / "test", ["bee", "ant"], n=1)
    train, test = ImageFolderDataset(tmp_path / "a", "train"), ImageFolderDataset(tmp_path / "a", "test")
    assert train.class_names == ["ant", "bee", "cat"] and train.num_classes == 3
    assert train.labels == [0, 0, 0, 1, 1, 1, 2, 2, 2] and test.labels == [0, 1]
    item = ImageFolderDataset(tmp_path / "a", "train", build_eval_transform(DataConfig(), 24), indices=[4])[0]
    assert item["image"].shape == (3, 24, 24) and item["label"] == 1 and item["index"] == 0

    _folder(tmp_path / "b", ["x", "y"])
    # class folders directly under the root: a fixed share of each class is the test split
    b_train, b_test = ImageFolderDataset(tmp_path / "b"), ImageFolderDataset(tmp_path / "b", "test")
    assert b_train.labels == [0, 1] and b_test.labels == [0, 1] and not set(b_train.paths) & set(b_test.paths)

    _folder(tmp_path / "a" / "test", ["dog"], n=1)
    with pytest.raises(DatasetError, match="dog"):
        ImageFolderDataset(tmp_path / "a", "test")


# ------------------------------------------------------------------------------------------------ splits


def test_stratified_split_properties():
    labels = np.repeat(np.arange(5), [1, 2, 5, 10, 21])
    train, val = stratified_split(labels, 0.2, seed=3)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(labels.size))
    # per class: n=1 -> 0 (keep the only image), n=2 -> 1 (at least one), 5 -> 1, 10 -> 2, 21 -> round(4.2) = 4
    assert np.bincount(labels[val], minlength=5).tolist() == [0, 1, 1, 2, 4]
    again, other = stratified_split(labels, 0.2, seed=3), stratified_split(labels, 0.2, seed=4)
    assert np.array_equal(again[1], val) and not np.array_equal(other[1], val)
    assert stratified_split(labels, 0.0, seed=0)[1].size == 0
    assert np.bincount(labels[stratified_split(labels, 0.9, 0)[1]], minlength=5).tolist() == [0, 1, 4, 9, 19]


# ------------------------------------------------------------------------------------------------ build_datasets


def _config(root, **data):
    return Config.from_dict({"model": {"img_size": 28}, "data": {"root": str(root), **data}, "train": {"seed": 1}})


def test_build_datasets_cub(tmp_path):
    from ivpt.data.synth import make_partworld

    root = make_partworld(tmp_path / "pw", classes=3, per_class=6, size=40, seed=0, test_fraction=0.5)
    bundle = build_datasets(_config(root, val_fraction=0.34), with_parts=True)
    assert bundle.num_classes == 3 and len(bundle.test) == 9
    assert len(bundle.train) == 6 and len(bundle.val) == 3  # one of the three training images of each class
    assert sorted(bundle.val.labels) == [0, 1, 2]
    train_rows, val_rows = set(bundle.train._rows.tolist()), set(bundle.val._rows.tolist())
    assert not train_rows & val_rows and len(train_rows | val_rows) == 9
    for data in (bundle.train, bundle.val, bundle.test):
        item = data[0]
        assert item["image"].shape == (3, 28, 28) and item["keypoints"].shape == (6, 2) and "mask" in item
    assert build_datasets(_config(root, val_fraction=0.0)).val is None
    plain = build_datasets(_config(root, augment=False, val_fraction=0.0))
    assert torch.equal(plain.train[0]["image"], plain.train[0]["image"])


def test_validation_split_follows_train_seed_unless_val_seed_fixes_it(tmp_path):
    """-1 (the default): the split is stratified_split(labels, fraction, train.seed), so seeds train on different
    images; data.val_seed=k: stratified_split(labels, fraction, k) whatever train.seed is."""
    from ivpt.data.synth import make_partworld

    root = make_partworld(tmp_path / "pw", classes=4, per_class=10, size=32, seed=0, test_fraction=0.5)

    def val_rows(seed, **data):
        cfg = Config.from_dict({"model": {"img_size": 28}, "train": {"seed": seed},
                                "data": {"root": str(root), "val_fraction": 0.4, **data}})
        return sorted(build_datasets(cfg).val._rows.tolist())

    every = build_datasets(_config(root, val_fraction=0.0)).train  # positions of the split → the reader's rows
    expected = {s: sorted(every._rows[stratified_split(every.labels, 0.4, s)[1]].tolist()) for s in (0, 1, 7)}
    assert expected[0] != expected[1] and expected[7] not in (expected[0], expected[1])  # each seed draws its own
    assert val_rows(0) == expected[0] and val_rows(1) == expected[1]
    assert val_rows(0, val_seed=7) == val_rows(1, val_seed=7) == expected[7]


def test_build_datasets_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"set data\.root="):
        build_datasets(Config())
    _folder(tmp_path / "g" / "train", ["x", "y"])  # the split layout without its test folder
    with pytest.raises(DatasetError, match="has train/ but no test/"):
        build_datasets(_config(tmp_path / "g", format="imagefolder"))
    _folder(tmp_path / "f", ["x", "y"])
    with pytest.raises(DatasetError, match="part annotations"):
        build_datasets(_config(tmp_path / "f", format="imagefolder"), with_parts=True)


def test_center_crop_offsets_follow_torchvision():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 45, 3), dtype=np.uint8))
    out = T.CenterCrop(20)(T.Sample(image=image))
    assert np.array_equal(np.asarray(out.image), np.asarray(TF.center_crop(image, [20, 20])))
    assert math.isclose(T.affine_matrix((45, 30), 0.0, (0.0, 0.0), 1.0)[0, 0], 1.0)
