"""The synthetic part-world: byte-exact determinism (any number of workers), class design, keypoints on the drawn
parts, visibility, a tree CubDataset reads, and the ``ivpt synth`` command."""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from ivpt.cli import main
from ivpt.data import CubDataset
from ivpt.data.synth import HEAD, PART_NAMES, TAIL, class_attributes, make_partworld, render_sample

# sha256 of a tiny standard world (and of 20 rendered samples' arrays) written by main before the "hard" difficulty
# existed: standard worlds must keep their exact bytes (the demo and other tests rely on them). Both depend on the
# numpy and Pillow builds (here numpy 2.4.6, Pillow 13.0.0); the tree hash also on Pillow's JPEG encoder.
STANDARD_TREE_SHA256 = "5a4297178b623437dda7caa727860728c69b28ce74eed38e14eb873a9d6aa39e"
STANDARD_RENDER_SHA256 = "772ffc020763c40b7994176827d51f711abf495e0dc78427aec987b22247208b"


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tree_sha256(root):
    digest = hashlib.sha256()
    for name, data in _tree(root).items():
        digest.update(name.encode() + b"\0" + data)
    return digest.hexdigest()


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


@pytest.mark.parametrize("difficulty, n, size, visible_share", [("standard", 150, 96, 0.85), ("medium", 80, 64, 0.6),
                                                                 ("hard", 80, 64, 0.6)])
def test_keypoints_lie_on_their_parts(difficulty, n, size, visible_share):
    """A visible keypoint lies on its own part inside the frame; an invisible one is out of frame or covered; the
    box fits the mask; the bird is never entirely hidden."""
    seen_visible, out_of_frame, occluded = 0, 0, 0
    for i in range(n):
        s = render_sample([1, 0, i], i % 10, size, classes=10, difficulty=difficulty)
        assert s.part_mask.shape == (size, size) and s.part_mask.max() <= len(PART_NAMES)
        ys, xs = np.nonzero(s.part_mask)
        assert ys.size > 0
        assert s.bbox.tolist() == [xs.min() - 0.5, ys.min() - 0.5, xs.max() + 0.5, ys.max() + 0.5]
        cols, rows = np.floor(s.keypoints + 0.5).astype(int).T
        for part, (c, r, vis) in enumerate(zip(cols, rows, s.visible), 1):
            inside = 0 <= c < size and 0 <= r < size
            if vis:
                assert inside and s.part_mask[r, c] == part
                seen_visible += 1
            elif not inside:
                out_of_frame += 1
            else:
                assert s.part_mask[r, c] != part
                occluded += 1
    assert seen_visible > visible_share * n * len(PART_NAMES)
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
    assert main(argv) == 2 and "already holds a dataset" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


# ---------------------------------------------------------------------------------------------------- difficulty


def test_standard_worlds_keep_their_bytes(tmp_path):
    root = make_partworld(tmp_path / "w", classes=3, per_class=3, size=40, seed=7, test_fraction=0.5)
    assert _tree_sha256(root) == STANDARD_TREE_SHA256
    explicit = make_partworld(tmp_path / "x", classes=3, per_class=3, size=40, seed=7, test_fraction=0.5,
                              difficulty="standard")
    assert _tree_sha256(explicit) == STANDARD_TREE_SHA256
    digest = hashlib.sha256()
    for i in range(20):
        s = render_sample([11, 0, i], i % 10, 64, classes=10)
        for array in (np.asarray(s.image), s.part_mask, s.keypoints, s.visible, s.bbox):
            digest.update(np.ascontiguousarray(array).tobytes())
    assert digest.hexdigest() == STANDARD_RENDER_SHA256


def test_hard_is_deterministic_and_differs_from_standard(tmp_path):
    args = dict(classes=3, per_class=3, size=40, seed=7, test_fraction=0.5)
    hard = _tree(make_partworld(tmp_path / "a", difficulty="hard", **args))
    assert hard == _tree(make_partworld(tmp_path / "b", difficulty="hard", workers=2, **args))
    standard = _tree(make_partworld(tmp_path / "c", **args))
    assert hard.keys() == standard.keys() and hard["images.txt"] == standard["images.txt"]
    assert hard["train_test_split.txt"] == standard["train_test_split.txt"]
    assert all(hard[k] != standard[k] for k in hard if k.endswith(".jpg"))
    one = render_sample([2, 0, 5], 1, 48, classes=4, difficulty="hard")
    two = render_sample([2, 0, 5], 1, 48, classes=4, difficulty="hard")
    assert np.array_equal(np.asarray(one.image), np.asarray(two.image))
    assert np.array_equal(one.part_mask, two.part_mask) and np.array_equal(one.keypoints, two.keypoints)
    with pytest.raises(ValueError, match="difficulty"):
        render_sample(0, 0, 32, classes=2, difficulty="extreme")
    with pytest.raises(ValueError, match="difficulty"):
        make_partworld(tmp_path / "d", classes=2, per_class=1, size=32, difficulty="easy")
    assert not (tmp_path / "d").exists()


def _nuisance_stats(difficulty, n=40, size=48):
    """Spread of the bird's in-plane angle (tail-to-head direction, mirror folded away), spread of its area, and
    the mean pixel std and neighbour difference of the background."""
    angles, areas, spread, grain = [], [], [], []
    for i in range(n):
        s = render_sample([4, 0, i], i % 10, size, classes=10, difficulty=difficulty)
        dx, dy = s.keypoints[HEAD - 1] - s.keypoints[TAIL - 1]
        angles.append(np.degrees(np.arctan2(dy, abs(dx))))
        bird = s.part_mask > 0
        areas.append(bird.mean())
        pixels = np.asarray(s.image, dtype=np.float64)
        spread.append(pixels[~bird].std(0).mean())
        both = ~bird[:, 1:] & ~bird[:, :-1]
        grain.append(np.abs(np.diff(pixels.mean(2), axis=1))[both].mean())
    return np.std(angles), np.std(areas) / np.mean(areas), np.mean(spread), np.mean(grain)


def test_hard_has_wider_nuisances():
    angle_std, area_cv, background_std, background_grain = _nuisance_stats("standard")
    hard_angle_std, hard_area_cv, hard_background_std, hard_grain = _nuisance_stats("hard")
    assert hard_angle_std > 1.3 * angle_std  # +-60 degrees against +-35
    assert hard_area_cv > 1.4 * area_cv  # scale 0.28..0.62 against 0.40..0.60
    assert hard_background_std > 1.15 * background_std  # layered textures and distractors
    assert hard_grain > 1.5 * background_grain  # textured, not smooth


def test_medium_lies_between_standard_and_hard():
    """Rotation +-50 and scale 0.34..0.62 sit between standard's and hard's ranges, so do the measured spreads."""
    standard, medium, hard = (_nuisance_stats(d) for d in ("standard", "medium", "hard"))
    assert standard[0] < medium[0] < hard[0]  # angle spread
    assert standard[1] < medium[1] < hard[1]  # area spread
    assert medium[3] > 1.5 * standard[3]  # textured background


def test_cli_synth_difficulty(tmp_path, capsys):
    out = tmp_path / "hard"
    assert main(["synth", str(out), "--classes", "2", "--per-class", "2", "--size", "32", "--difficulty", "hard",
                 "--no-progress"]) == 0
    assert "wrote 4 images (2 classes x 2, 32px, hard)" in capsys.readouterr().out
    assert len(CubDataset(out, "all", with_parts=True)) == 4
    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path / "x"), "--difficulty", "extreme"])
