"""Readers of the fine-grained benchmarks on tiny trees written here in each release's own layout (real file names,
real annotation syntax: text files, COCO json + PNG masks, MATLAB .mat, PASCAL VOC XML), the part-mask metrics
against scikit-learn, and `ivpt train` + `ivpt eval` end to end on every fixture."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy.io import savemat
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from ivpt.config import ConfigError, DataConfig
from ivpt.data import DatasetError, MissingFileError, dataset_class
from ivpt.data.flowers102 import flower_foreground
from ivpt.formats import DATASET_FORMATS
from ivpt.metrics import PartMaskMeter, mask_contingency, purity_coverage_from_contingency

from .conftest import TINY

W, H = 64, 48


def _photo(seed: int, size: tuple[int, int] = (W, H)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _cells(strings: list[str]) -> np.ndarray:
    """A MATLAB N x 1 cell array of strings, as savemat writes an object array."""
    cells = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cells[i, 0] = s
    return cells


def _structs(rows: list[dict]) -> np.ndarray:
    """A MATLAB 1 x N struct array with the keys of ``rows`` as fields."""
    fields = list(rows[0])
    out = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        out[0, i] = tuple(np.array([[row[f]]]) if not isinstance(row[f], str) else np.array([row[f]])
                          for f in fields)
    return out


# ------------------------------------------------------------------------------------------------ NABirds

NAB_CLASSES = {0: "Birds", 22: "Perching Birds", 500: "Ducks, Geese, and Swans",
               295: "Oldsquaw/Long-tailed Duck (Adult male)", 817: "Mallard (Female/Eclipse male)",
               1010: "Common Raven"}
NAB_PARENTS = {22: 0, 500: 0, 295: 500, 817: 500, 1010: 22}
NAB_LEAVES = (817, 295, 1010)  # sparse ids, not in sorted order: labels 295 -> 0, 817 -> 1, 1010 -> 2
NAB_PARTS = ["bill", "crown", "nape"]


def write_nabirds(root):
    """nabirds/: 3 leaf classes x 2 images (first of each class train), UUID ids, 0-based part ids."""
    (root / "parts").mkdir(parents=True)
    files = {k: [] for k in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt",
                             "sizes.txt", "parts/part_locs.txt")}
    n = 0
    for cid in NAB_LEAVES:
        folder = root / "images" / f"{cid:04d}"
        folder.mkdir(parents=True)
        for k in range(2):
            n += 1
            uuid = f"{n:08x}-21dc-4d0c-bfe1-4cae3c85c8{n:02d}"
            rel = f"{cid:04d}/{uuid.replace('-', '')}.jpg"
            _photo(n).save(root / "images" / rel)
            files["images.txt"].append(f"{uuid} {rel}")
            files["image_class_labels.txt"].append(f"{uuid} {cid}")
            files["train_test_split.txt"].append(f"{uuid} {1 - k}")
            files["bounding_boxes.txt"].append(f"{uuid} 4 6 40 30")
            files["sizes.txt"].append(f"{uuid} {W} {H}")
            files["parts/part_locs.txt"] += [f"{uuid} 0 10 12 1", f"{uuid} 1 20 8 1", f"{uuid} 2 0 0 0"]
    files["classes.txt"] = [f"{c} {name}" for c, name in NAB_CLASSES.items()]
    files["hierarchy.txt"] = [f"{c} {p}" for c, p in NAB_PARENTS.items()]
    files["parts/parts.txt"] = [f"{i} {name}" for i, name in enumerate(NAB_PARTS)]
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def test_nabirds_ids_hierarchy_parts(tmp_path):
    root = write_nabirds(tmp_path / "nabirds")
    cls = dataset_class("nabirds")
    train = cls(root, "train", with_parts=True)
    assert train.class_ids == [295, 817, 1010]
    assert train.class_names == ["Oldsquaw/Long-tailed Duck (Adult male)", "Mallard (Female/Eclipse male)",
                                 "Common Raven"]
    assert train.labels == [1, 0, 2]  # images.txt order: 817, 295, 1010
    assert train.lineage(0) == ["Birds", "Ducks, Geese, and Swans", "Oldsquaw/Long-tailed Duck (Adult male)"]
    assert train.lineage(2) == ["Birds", "Perching Birds", "Common Raven"]
    assert train.part_names == NAB_PARTS and train.has_keypoints and not train.has_fg_masks
    item = train[0]
    assert item["visible"].tolist() == [True, True, False]
    assert item["keypoints"][0].tolist() == [10.0, 12.0]
    assert item["bbox"].tolist() == [3.5, 5.5, 43.5, 35.5]
    assert len(cls(root, "test")) == 3


def test_nabirds_hierarchy_errors(tmp_path):
    root = write_nabirds(tmp_path / "nabirds")
    (root / "hierarchy.txt").write_text("295 500\n295 22\n")
    with pytest.raises(DatasetError, match=r"hierarchy.txt, line 2: class id 295 has a second parent"):
        dataset_class("nabirds")(root, "train")
    (root / "hierarchy.txt").unlink()
    with pytest.raises(MissingFileError, match=r"hierarchy.txt[\s\S]*nabirds/\n"):
        dataset_class("nabirds")(root, "train")


# ------------------------------------------------------------------------------------------------ PartImageNet

PIN_PARTS = {"Quadruped": ["Head", "Body", "Foot", "Tail"], "Biped": ["Head", "Body", "Hand", "Foot", "Tail"],
             "Fish": ["Head", "Body", "Fin", "Tail"], "Bird": ["Head", "Body", "Wing", "Foot", "Tail"],
             "Snake": ["Head", "Body"], "Reptile": ["Head", "Body", "Foot", "Tail"],
             "Car": ["Body", "Tier", "Side Mirror"], "Bicycle": ["Head", "Body", "Seat", "Tier"],
             "Boat": ["Body", "Sail"], "Aeroplane": ["Head", "Body", "Wing", "Engine", "Tail"],
             "Bottle": ["Body", "Mouth"]}
CATEGORIES = [{"id": i, "name": f"{sup} {part}", "supercategory": sup}
              for i, (sup, part) in enumerate((s, p) for s, parts in PIN_PARTS.items() for p in parts)]
FISH_HEAD, FISH_BODY = 9, 10  # ids of "Fish Head", "Fish Body"
WNIDS = ("n01440764", "n01443537")  # tench, goldfish: both Fish


def _pin_mask(k: int) -> np.ndarray:
    """Part labels of image k: background 40, a head block and a body block that move with k."""
    mask = np.full((H, W), 40, dtype=np.uint8)
    mask[10:30, 8 + k:20 + k] = FISH_HEAD
    mask[10:30, 20 + k:50] = FISH_BODY
    return mask


def write_partimagenet(root, per_split: dict[str, int] | None = None):
    """PartImageNet/ (the _Seg release): per split, ``n`` images per wnid, COCO json and PNG masks; one extra
    train image without annotations (the reader leaves it out)."""
    per_split = per_split or {"train": 2, "val": 1, "test": 1}
    ann_id = 0
    for split, n in per_split.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        images, anns = [], []
        for w, wnid in enumerate(WNIDS):
            for k in range(n):
                name = f"{wnid}_{1000 + 10 * k + w}"
                image_id = len(images) + 1
                _photo(image_id + 100 * w).save(root / "images" / split / f"{name}.JPEG", format="JPEG")
                mask = _pin_mask(k)
                Image.fromarray(mask).save(root / "annotations" / split / f"{name}.png")
                images.append({"id": image_id, "file_name": f"{name}.JPEG", "width": W, "height": H})
                for cat in (FISH_HEAD, FISH_BODY):
                    ys, xs = np.nonzero(mask == cat)
                    x, y = int(xs.min()), int(ys.min())
                    bw, bh = int(xs.max()) - x + 1, int(ys.max()) - y + 1
                    ann_id += 1
                    anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                                 "area": int((mask == cat).sum()), "bbox": [x, y, bw, bh],
                                 "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
        if split == "train":
            images.append({"id": len(images) + 1, "file_name": f"{WNIDS[0]}_9999.JPEG", "width": W, "height": H})
            _photo(999).save(root / "images" / split / f"{WNIDS[0]}_9999.JPEG", format="JPEG")
        (root / "annotations" / split / f"{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return root


def test_partimagenet_labels_boxes_part_masks(tmp_path):
    root = write_partimagenet(tmp_path / "PartImageNet")
    cls = dataset_class("partimagenet")
    train = cls(root, "train", with_parts=True)
    assert len(train) == 4 and len(cls(root, "val")) == 2 and len(cls(root, "test")) == 2
    assert train.class_names == list(WNIDS) and train.labels == [0, 0, 1, 1]
    assert len(train.part_names) == 40 and train.part_names[FISH_HEAD] == "Fish Head"
    assert train.has_part_masks and train.has_fg_masks and not train.has_keypoints
    item = train[1]  # k = 1
    expected = _pin_mask(1).astype(np.int64)
    assert torch.equal(item["part_mask"], torch.from_numpy(expected))
    assert torch.equal(item["mask"][0], torch.from_numpy((expected < 40).astype(np.float32)))
    assert item["bbox"].tolist() == [8.5, 9.5, 49.5, 29.5]  # union of the head and body boxes, as edges
    assert "keypoints" not in item


def test_part_mask_follows_geometry_with_nearest_labels(tmp_path):
    from ivpt.data import build_eval_transform

    root = write_partimagenet(tmp_path / "PartImageNet")
    tf = build_eval_transform(DataConfig(), 24)  # shorter side 48 -> 24, centre crop 24 of 32
    item = dataset_class("partimagenet")(root, "train", tf, with_parts=True)[0]
    labels = set(item["part_mask"].unique().tolist())
    assert labels <= {FISH_HEAD, FISH_BODY, 40}  # nearest neighbour: no blended label values
    full = _pin_mask(0)[::2, ::2][:, 4:28]  # nearest resize by 2, then the centre crop's 4-column offset
    assert torch.equal(item["part_mask"], torch.from_numpy(full.astype(np.int64)))


def test_partimagenet_bad_json_and_missing_mask(tmp_path):
    root = write_partimagenet(tmp_path / "PartImageNet")
    (root / "annotations/train" / f"{WNIDS[1]}_1001.png").unlink()
    with pytest.raises(DatasetError, match=r"1 part mask\(s\).*\n.*n01443537_1001.png"):
        dataset_class("partimagenet")(root, "train", with_parts=True)
    (root / "annotations/test/test.json").write_text('{"images": [\n  1,\n  }')
    with pytest.raises(DatasetError, match=r"test.json, line 3: invalid JSON"):
        dataset_class("partimagenet")(root, "test")


# ------------------------------------------------------------------------------------------------ Flowers-102


def _segmim(k: int) -> Image.Image:
    seg = np.zeros((H, W, 3), dtype=np.uint8)
    seg[...] = (0, 0, 254)  # the release's blue background
    seg[8:40, 10 + k:50] = (200, 60, 90)
    return Image.fromarray(seg)


def write_flowers(root, *, segmentations: bool = True):
    """flowers-102/: 9 images of classes 1, 2, 3 (repeating); trnid 1-3, valid 4-6, tstid 7-9."""
    (root / "jpg").mkdir(parents=True)
    if segmentations:
        (root / "segmim").mkdir()
    for n in range(1, 10):
        _photo(n).save(root / "jpg" / f"image_{n:05d}.jpg")
        if segmentations:
            _segmim(n).save(root / "segmim" / f"segmim_{n:05d}.jpg", quality=100)
    savemat(root / "imagelabels.mat", {"labels": np.array([[1, 2, 3, 1, 2, 3, 1, 2, 3]], dtype=np.float64)})
    savemat(root / "setid.mat", {"trnid": np.array([[1, 2, 3]], dtype=np.float64),
                                 "valid": np.array([[4, 5, 6]], dtype=np.float64),
                                 "tstid": np.array([[7, 8, 9]], dtype=np.float64)})
    return root


def test_flowers_splits_labels_and_foreground(tmp_path):
    root = write_flowers(tmp_path / "flowers-102")
    cls = dataset_class("flowers102")
    train, test = cls(root, "train", with_parts=True), cls(root, "test")
    assert len(train) == 6 and len(test) == 3  # trnid + valid for training
    assert train.labels == [0, 1, 2, 0, 1, 2] and train.class_names == ["1", "2", "3"]
    assert train.has_fg_masks and not (train.has_bbox or train.has_keypoints or train.has_part_masks)
    mask = train[0]["mask"][0]  # image 1: flower at rows 8..39, columns 11..49
    assert mask[20, 30] == 1 and mask[2, 2] == 0 and mask[20, 5] == 0
    # JPEG's chroma blur tints the blue next to the flower, which the rule counts as flower: a halo of <= 3 px
    assert 32 * 39 <= int(mask.sum()) <= (32 + 6) * (39 + 6)
    exact = np.asarray(flower_foreground(_segmim(0))) > 0
    assert exact.sum() == 32 * 40 and exact[8:40, 10:50].all()
    assert not cls(write_flowers(tmp_path / "bare", segmentations=False), "test").has_fg_masks


def test_flowers_bad_setid(tmp_path):
    root = write_flowers(tmp_path / "flowers-102")
    savemat(root / "setid.mat", {"trnid": np.array([[1, 2, 30]]), "valid": np.array([[4]]),
                                 "tstid": np.array([[7]])})
    with pytest.raises(DatasetError, match=r"setid.mat: trnid holds image number 30, outside 1..9"):
        dataset_class("flowers102")(root, "train")
    savemat(root / "setid.mat", {"trnid": np.array([[1]])})
    with pytest.raises(DatasetError, match=r"setid.mat has no variable valid, tstid \(it holds trnid\)"):
        dataset_class("flowers102")(root, "train")


# ------------------------------------------------------------------------------------------------ Stanford Dogs

BREEDS = ("n02085620-Chihuahua", "n02085782-Japanese_spaniel")


def _voc(folder: str, name: str, boxes: list[tuple[int, int, int, int]]) -> str:
    objects = "".join(
        f"<object><name>{folder.split('-', 1)[1]}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
        "</bndbox></object>" for x1, y1, x2, y2 in boxes)
    return (f"<annotation><folder>{folder.split('-')[0][1:]}</folder><filename>{name}</filename>"
            "<source><database>ImageNet database</database></source>"
            f"<size><width>{W}</width><height>{H}</height><depth>3</depth></size><segment>0</segment>"
            f"{objects}</annotation>")


def write_dogs(root, *, lists_folder: bool = False):
    """StanfordDogs/: 2 breeds x 2 images (first train); the second Chihuahua has two dogs (boxes unioned)."""
    rows = {"train": [], "test": []}
    for b, folder in enumerate(BREEDS):
        (root / "Images" / folder).mkdir(parents=True)
        (root / "Annotation" / folder).mkdir(parents=True)
        for k in range(2):
            name = f"{folder.split('-')[0]}_{1000 + k}"
            _photo(10 * b + k).save(root / "Images" / folder / f"{name}.jpg")
            boxes = [(5, 4, 40, 30)] + ([(30, 20, 60, 45)] if (b, k) == (0, 1) else [])
            (root / "Annotation" / folder / name).write_text(_voc(folder, name, boxes))
            rows["train" if k == 0 else "test"].append((f"{folder}/{name}.jpg", f"{folder}/{name}", b + 1))
    lists = root / "lists" if lists_folder else root
    lists.mkdir(exist_ok=True)
    for split, entries in rows.items():
        savemat(lists / f"{split}_list.mat", {
            "file_list": _cells([e[0] for e in entries]), "annotation_list": _cells([e[1] for e in entries]),
            "labels": np.array([[e[2]] for e in entries], dtype=np.float64)})
    return root


@pytest.mark.parametrize("lists_folder", [False, True])
def test_stanford_dogs_lists_and_boxes(tmp_path, lists_folder):
    root = write_dogs(tmp_path / "dogs", lists_folder=lists_folder)
    cls = dataset_class("stanford_dogs")
    train, test = cls(root, "train", with_parts=True), cls(root, "test", with_parts=True)
    assert train.class_names == ["Chihuahua", "Japanese_spaniel"] and train.labels == [0, 1] and test.labels == [0, 1]
    assert train[0]["bbox"].tolist() == [3.5, 2.5, 39.5, 29.5]  # VOC 1-based inclusive -> edges
    assert test[0]["bbox"].tolist() == [3.5, 2.5, 59.5, 44.5]  # union of the two dogs
    crop = cls(root, "train", bbox_crop=True)[0]["image"]
    assert tuple(crop.shape) == (3, 27, 36)


def test_stanford_dogs_bad_xml(tmp_path):
    root = write_dogs(tmp_path / "dogs")
    (root / "Annotation" / BREEDS[1] / "n02085782_1001").write_text("<annotation>\n<object>\n</annotation>")
    with pytest.raises(DatasetError, match=r"n02085782_1001, line 3: invalid XML"):
        dataset_class("stanford_dogs")(root, "train")


# ------------------------------------------------------------------------------------------------ Stanford Cars

CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]


def write_cars(root):
    """stanford_cars/: 3 classes x 2 images (one train, one test) with devkit .mat files."""
    for folder in ("cars_train", "cars_test", "devkit"):
        (root / folder).mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": _cells(CAR_NAMES).T})
    for split, path in (("train", root / "devkit" / "cars_train_annos.mat"),
                        ("test", root / "cars_test_annos_withlabels.mat")):
        rows = []
        for c in (3, 1, 2):
            fname = f"{len(rows) + 1:05d}.jpg"
            _photo(c + (10 if split == "test" else 0)).save(root / f"cars_{split}" / fname)
            rows.append({"bbox_x1": 2 * c, "bbox_y1": c, "bbox_x2": 40 + c, "bbox_y2": 30 + c, "class": c,
                         "fname": fname})
        savemat(path, {"annotations": _structs(rows)})
    return root


def test_stanford_cars_devkit(tmp_path):
    root = write_cars(tmp_path / "stanford_cars")
    cls = dataset_class("stanford_cars")
    train = cls(root, "train", with_parts=True)
    assert train.class_names == CAR_NAMES and train.labels == [2, 0, 1] and len(cls(root, "test")) == 3
    assert train[0]["bbox"].tolist() == [4.5, 1.5, 42.5, 32.5]  # class 3: x1=6, y1=3, x2=43, y2=33
    assert not (train.has_keypoints or train.has_part_masks or train.has_fg_masks)


def test_stanford_cars_class_out_of_range(tmp_path):
    root = write_cars(tmp_path / "stanford_cars")
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": _cells(CAR_NAMES[:2]).T})
    with pytest.raises(DatasetError, match=r"cars_train_annos.mat: class 3 is outside 1..2"):
        dataset_class("stanford_cars")(root, "train")


# ------------------------------------------------------------------------------------------------ all formats

WRITERS = {"nabirds": write_nabirds, "partimagenet": write_partimagenet, "flowers102": write_flowers,
           "stanford_dogs": write_dogs, "stanford_cars": write_cars}
FIRST_FILE = {"cub": "images.txt", "nabirds": "classes.txt", "partimagenet": "annotations/train/train.json",
              "flowers102": "imagelabels.mat", "stanford_dogs": "train_list.mat",
              "stanford_cars": "devkit/cars_meta.mat"}


@pytest.mark.parametrize("fmt", sorted(FIRST_FILE))
def test_wrong_folder_names_missing_file_and_layout(tmp_path, fmt):
    (tmp_path / "empty").mkdir()
    cls = dataset_class(fmt)
    with pytest.raises(MissingFileError) as info:
        cls(tmp_path / "empty", "train")
    message = str(info.value)
    assert str(tmp_path / "empty" / FIRST_FILE[fmt]) in message
    assert f"data.format={fmt} expects" in message and cls.LAYOUT.splitlines()[0] in message


def test_format_names_are_one_table():
    assert set(WRITERS) | {"cub", "imagefolder"} == set(DATASET_FORMATS)
    for fmt in DATASET_FORMATS:
        assert dataset_class(fmt).FORMAT == fmt
        assert DataConfig(format=fmt).format == fmt
    with pytest.raises(ConfigError, match="choose one of cub, nabirds, partimagenet"):
        DataConfig(format="cars")


# ------------------------------------------------------------------------------------------------ mask metrics


def test_part_mask_meter_matches_sklearn_and_sums_over_shards():
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 5, 6, 8, generator=gen).softmax(1)
    labels = torch.randint(0, 4, (4, 12, 16), generator=gen)
    labels[0, :2] = -1  # unlabelled pixels are skipped
    whole = PartMaskMeter(4, 5)
    whole.update(maps, labels)
    shards = [PartMaskMeter(4, 5), PartMaskMeter(4, 5)]
    shards[0].update(maps[:3], labels[:3])
    shards[1].update(maps[3:], labels[3:])
    assert torch.equal(shards[0].merge(shards[1]).table, whole.table)
    pred = torch.nn.functional.interpolate(maps, size=(12, 16), mode="bilinear", align_corners=False).argmax(1)
    keep = labels >= 0
    truth, guess = labels[keep].numpy(), pred[keep].numpy()
    scores = whole.compute()
    assert scores["nmi"] == pytest.approx(100 * normalized_mutual_info_score(truth, guess), abs=1e-9)
    assert scores["ari"] == pytest.approx(100 * adjusted_rand_score(truth, guess), abs=1e-9)
    table = contingency_matrix(truth, guess)
    assert scores["part_purity"] == pytest.approx(100 * table.max(0).sum() / table.sum())
    assert scores["part_coverage"] == pytest.approx(100 * table.max(1).sum() / table.sum())


def test_purity_and_coverage_on_a_known_split():
    # 2 labels x 3 concepts: label 0 is split between concepts 0 and 1; concept 2 holds label 1 only.
    maps = torch.zeros(1, 3, 1, 4)
    maps[0, 0, 0, 0] = maps[0, 1, 0, 1] = maps[0, 2, 0, 2] = maps[0, 2, 0, 3] = 1.0
    labels = torch.tensor([[[0, 0, 1, 1]]])
    table = mask_contingency(maps, labels, 2)
    assert table.tolist() == [[1, 1, 0], [0, 0, 2]]
    assert purity_coverage_from_contingency(table) == (1.0, 0.75)


# ------------------------------------------------------------------------------------------------ end to end

CLASSES = {"nabirds": 3, "partimagenet": 2, "flowers102": 3, "stanford_dogs": 2, "stanford_cars": 3}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_train_and_eval_end_to_end(tmp_path, fmt, capsys):
    from ivpt.cli import main

    root = WRITERS[fmt](tmp_path / "data")
    config = {
        "model": dict(backbone="vit_small_patch14_reg4_dinov2", img_size=42, num_classes=CLASSES[fmt], n_pro=[4, 3],
                      weights="random", backbone_kwargs=dict(TINY)),
        "optim": dict(epochs=1, min_steps=0, batch_size=2, amp="none"),
        "data": dict(root=str(root), format=fmt, num_workers=0, val_fraction=0.0),
        "train": dict(seed=0, log_every=1, max_steps=1),
        "eval": dict(batch_size=4, stage="final"),
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    assert main(["eval", str(tmp_path / "run" / "best"), "--no-progress", "eval.batch_size=4"]) == 0
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    printed = capsys.readouterr().out
    assert 0 <= result["top1"] <= 100 and result["data"]["format"] == fmt
    skipped = result.get("skipped", {})
    if fmt == "nabirds":  # keypoints: every keypoint metric; no segmentations in the release
        assert {"consistency", "stability", "nmi", "ari", "kpr"} <= set(result)
        assert result["nmi_ari_from"] == "keypoints" and set(skipped) == {"fg_iou"}
    elif fmt == "partimagenet":  # interpretability from the part masks
        assert {"nmi", "ari", "part_purity", "part_coverage", "fg_iou"} <= set(result)
        assert result["nmi_ari_from"] == "part masks"
        assert skipped == {m: "partimagenet has no part keypoints" for m in ("consistency", "kpr", "stability")}
        assert 0 <= result["part_purity"] <= 100 and 0 <= result["fg_iou"] <= 100
        assert "  part_purity  part_coverage" in printed  # per-stage columns stay apart
    elif fmt == "flowers102":  # foreground masks only
        assert "fg_iou" in result and "nmi" not in result
        assert set(skipped) == {"consistency", "stability", "kpr", "nmi_ari"}
    else:  # accuracy only, and it says so
        assert skipped["consistency"] == f"{fmt} has no part keypoints"
        assert skipped["nmi_ari"] == f"{fmt} has no part keypoints or part masks"
        assert re.search(r"has no foreground mask", skipped["fg_iou"])
        assert not {"consistency", "nmi", "fg_iou"} & set(result)
    for metric in skipped:
        assert f"skipped {metric}: " in printed


@pytest.mark.parametrize("fmt, classes", [("nabirds", 555), ("partimagenet", 158), ("flowers102", 102),
                                          ("stanford_dogs", 120), ("stanford_cars", 196)])
def test_bundled_configs_per_dataset(fmt, classes):
    from ivpt.config import load_config

    for name, backbone, size, n_pro in (
            (f"{fmt}_cpu", "vit_small_patch14_dinov2.lvd142m", 224, [9, 7, 5]),  # the recipe for new datasets
            (f"{fmt}_vitb14_reg4_paper", "vit_base_patch14_reg4_dinov2.lvd142m", 518, [17, 14, 11, 8, 5])):
        cfg = load_config(f"configs/{name}.yaml")
        assert (cfg.data.format, cfg.model.num_classes) == (fmt, classes), name
        assert (cfg.model.backbone, cfg.model.img_size, cfg.model.n_pro) == (backbone, size, n_pro)


def test_unsupported_metrics_name_their_reason():
    from ivpt.config import Config
    from ivpt.eval import ALL_METRICS, unsupported_metrics

    def cfg(fmt, kind="ivpt"):
        return Config.from_dict({"model": {"kind": kind}, "data": {"format": fmt}})

    assert unsupported_metrics(cfg("cub"), ALL_METRICS) == {}
    assert unsupported_metrics(cfg("partimagenet"), ALL_METRICS) == {
        m: "partimagenet has no part keypoints" for m in ("consistency", "stability", "kpr")}
    assert set(unsupported_metrics(cfg("stanford_cars"), ALL_METRICS)) == {"consistency", "stability", "kpr",
                                                                           "nmi_ari", "fg_iou"}
    assert unsupported_metrics(cfg("cub", "linear"), ["acc", "nmi_ari"]) == {
        "nmi_ari": "model.kind=linear has no part maps"}
