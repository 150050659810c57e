"""The synthetic part-world: byte-exact determinism (any number of workers), class design, keypoints on the drawn
parts, visibility, a tree CubDataset reads, and the ``ivpt synth`` command."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ivpt.cli import main
from ivpt.data import CubDataset
from ivpt.data.synth import PART_NAMES, class_attributes, make_partworld, render_sample


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_with_any_workers(tmp_path):
    args = dict(classes=3, per_class=4, size=48, seed=5, test_fraction=0.25)
    one = _tree(make_partworld(tmp_path / "a", **args))
    assert one == _tree(make_partworld(tmp_path / "b", workers=2, **args))
    assert len([k for k in one if k.endswith(".jpg")]) == 12 and len([k for k in one if k.endswith(".png")]) == 12
    other = _tree(make_partworld(tmp_path / "c", **{**args, "seed": 6}))
    assert other.keys() == one.keys() and other["images.txt"] == one["images.txt"]
    assert other["parts/part_locs.txt"] != one["parts/part_locs.txt"]


def test_layout_balance_and_split(tmp_path):
    root = make_partworld(tmp_path / "pw", classes=4, per_class=5, size=32, seed=0, test_fraction=0.4)
    labels = [int(line.split()[1]) for line in (root / "image_class_labels.txt").read_text().splitlines()]
    assert Counter(labels) == {1: 5, 2: 5, 3: 5, 4: 5}
    split = [int(line.split()[1]) for line in (root / "train_test_split.txt").read_text().splitlines()]
    for c in range(4):
        assert sum(1 - s for s in split[5 * c: 5 * c + 5]) == 2  # round(0.4 * 5) test images per class
    assert (root / "parts/parts.txt").read_text().split() == [t for i, n in enumerate(PART_NAMES, 1)
                                                              for t in (str(i), n)]
    assert len((root / "parts/part_locs.txt").read_text().splitlines()) == 20 * len(PART_NAMES)
    with pytest.raises(FileExistsError):
        make_partworld(root, classes=2, per_class=1, size=32)
    make_partworld(root, classes=2, per_class=1, size=32, overwrite=True)
    assert len(list((root / "images").rglob("*.jpg"))) == 2


@pytest.mark.parametrize("classes", [8, 9, 10, 17, 40, 200])
def test_no_single_part_determines_the_class(classes):
    table = np.array(class_attributes(classes))
    assert len({tuple(r) for r in table}) == classes
    for column in table.T:
        assert np.bincount(column)[np.unique(column)].min() >= 2  # every used value is shared by >= 2 classes


def test_keypoints_lie_on_their_parts():
    seen_visible, out_of_frame, occluded = 0, 0, 0
    for i in range(150):
        s = render_sample([1, 0, i], i % 10, 96, classes=10)
        assert s.part_mask.shape == (96, 96) and s.part_mask.max() <= len(PART_NAMES)
        cols, rows = np.floor(s.keypoints + 0.5).astype(int).T
        for part, (c, r, vis) in enumerate(zip(cols, rows, s.visible), 1):
            inside = 0 <= c < 96 and 0 <= r < 96
            if vis:
                assert s.part_mask[r, c] == part
                seen_visible += 1
            elif not inside:
                out_of_frame += 1
            else:
                assert s.part_mask[r, c] != part
                occluded += 1
        ys, xs = np.nonzero(s.part_mask)
        assert s.bbox.tolist() == [xs.min() - 0.5, ys.min() - 0.5, xs.max() + 0.5, ys.max() + 0.5]
    assert seen_visible > 0.85 * 150 * len(PART_NAMES)
    assert out_of_frame > 0 and occluded > 0  # both ways of being invisible happen


def test_written_tree_reads_with_parts(tmp_path):
    root = make_partworld(tmp_path / "pw", classes=3, per_class=4, size=64, seed=2, test_fraction=0.5)
    data = CubDataset(root, "all", with_parts=True)
    assert len(data) == 12 and data.num_classes == 3 and data.part_names == list(PART_NAMES)
    assert data.labels == [0] * 4 + [1] * 4 + [2] * 4
    assert len(CubDataset(root, "train")) == len(CubDataset(root, "test")) == 6
    for i in range(len(data)):
        item = data[i]
        mask, kp = item["mask"][0], item["keypoints"]
        assert item["image"].shape == (3, 64, 64) and mask.shape == (64, 64)
        for (x, y), vis in zip(kp.tolist(), item["visible"].tolist()):
            if vis:
                assert mask[int(np.floor(y + 0.5)), int(np.floor(x + 0.5))] == 1  # on the object
            else:
                assert (x, y) == (0.0, 0.0)
        x0, y0, x1, y1 = item["bbox"].tolist()
        ys, xs = np.nonzero(mask.numpy() > 0.5)
        assert (x0, y0, x1, y1) == (xs.min() - 0.5, ys.min() - 0.5, xs.max() + 0.5, ys.max() + 0.5)


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "world"
    argv = ["synth", str(out), "--classes", "3", "--per-class", "2", "--size", "32", "--seed", "1",
            "--test-fraction", "0.5", "--no-progress"]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert "wrote 6 images" in summary and "images/s" in summary and str(out) in summary
    assert len(CubDataset(out, "test")) == 3
    assert main(argv) == 2 and "already holds a dataset" in capsys.readouterr().out
    assert main([*argv, "--overwrite"]) == 0
