"""eval.protocol corrected vs reference, the reference-recipe switches (training warp, equivariance inverse warp)
and the exact preset end to end. Every expected number is worked out by hand in the comments."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ivpt.cli import main
from ivpt.config import Config, ConfigError, DataConfig, EvalConfig, LossConfig
from ivpt.data.synth import make_partworld
from ivpt.data.transforms import (
    CenterCrop,
    ColorJitter,
    RandomAffine,
    Sample,
    apply_affine,
    build_train_transform,
    mean_fill,
)
from ivpt.engine import train
from ivpt.eval import evaluate, format_table
from ivpt.losses import equivariance_loss, warp, warp_back
from ivpt.metrics import (
    bbox_centroid_features,
    consistency_score,
    discovery_input,
    keypoint_hits,
    part_frame_keypoints,
    soft_centroids,
    stability_score,
    to_bbox_frame,
)

from .conftest import TINY

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ------------------------------------------------------------------------------ consistency / stability

def _cub_box(x, y, w, h):
    """A CUB box ``x y w h`` as our box edges (x0, y0, x1, y1)."""
    return [x - 0.5, y - 0.5, x + w - 0.5, y + h - 0.5]


def test_part_frame_keypoints_reference_truncates_from_the_full_image_annotation():
    boxes = torch.tensor([_cub_box(10, 20, 100, 50), _cub_box(10, 20, 300, 50)], dtype=torch.float64)
    keypoints = torch.tensor([
        [[60.0, 45.0], [150.0, 45.0], [9.0, 30.7]],   # inside; right of the box; 1 px left of the box
        [[60.9, 45.0], [9.0, 30.0], [310.0, 70.0]],   # inside; 1 px left of a wide box; on its far corner
    ], dtype=torch.float64)
    visible = torch.ones(2, 3, dtype=torch.bool)
    crop_kp = torch.full((2, 3, 2), 7.0)
    kp, vis = part_frame_keypoints(crop_kp, visible, 56, keypoints=keypoints, visible=visible, boxes=boxes,
                                   frame=224, protocol="reference")
    # int(224·(int(x) − 10)/100), int(224·(int(y) − 20)/50):
    #   (60, 45) → (112, 112); (150, 45) → (int(313.6), 112) = (313, 112);
    #   (9, 30.7) → (int(-2.24), int(44.8)) = (-2, 44)
    # wide box, int(224·(int(x) − 10)/300):
    #   (60.9, 45) → int(37.33) = 37; (9, 30) → int(-0.747) = 0 (truncation toward zero); (310, 70) → (224, 224)
    assert kp.tolist() == [[[112, 112], [313, 112], [-2, 44]], [[37, 112], [0, 44], [224, 224]]]
    assert vis.all()  # every annotated-visible keypoint counts, inside the box or not


def test_part_frame_keypoints_corrected_floors_the_crop_keypoints():
    crop_kp = torch.tensor([[[28.3, 10.9], [0.0, 0.0]]])
    crop_vis = torch.tensor([[True, False]])  # the second is outside the box: invisible in the crop
    anyway = dict(keypoints=torch.zeros(1, 2, 2), visible=torch.ones(1, 2, dtype=torch.bool),
                  boxes=torch.tensor([_cub_box(0, 0, 9, 9)]))
    kp, vis = part_frame_keypoints(crop_kp, crop_vis, 56, **anyway, frame=224, protocol="corrected")
    assert kp[0, 0].tolist() == [113.0, 43.0]  # floor(28.3·4) = floor(113.2), floor(43.6)
    assert vis.tolist() == [[True, False]]
    with pytest.raises(ValueError, match="protocol"):
        part_frame_keypoints(crop_kp, crop_vis, 56, **anyway, protocol="paper")


def _peak(row: int, col: int, size: int = 224) -> torch.Tensor:
    maps = torch.zeros(1, 1, size, size)
    maps[0, 0, row, col] = 1.0
    return maps


def test_keypoint_outside_the_box_is_a_miss_only_under_reference():
    # One class, one prototype, one keypoint; two images, the prototype peaks at the frame's centre (112, 112).
    # Image 1: the keypoint is inside the box, at the centre. Image 2: it is visible but right of the box.
    boxes = torch.tensor([_cub_box(10, 20, 100, 50)] * 2, dtype=torch.float64)
    keypoints = torch.tensor([[[60.0, 45.0]], [[150.0, 45.0]]], dtype=torch.float64)
    visible = torch.ones(2, 1, dtype=torch.bool)
    crop_kp = torch.tensor([[[28.0, 28.0]], [[0.0, 0.0]]])  # model input 56 px: the box crop's centre
    crop_vis = torch.tensor([[True], [False]])  # the crop drops the outside keypoint
    maps = torch.cat([_peak(112, 112), _peak(112, 112)])
    labels = torch.zeros(2, dtype=torch.long)
    scores = {}
    for protocol in ("corrected", "reference"):
        kp, vis = part_frame_keypoints(crop_kp, crop_vis, 56, keypoints=keypoints, visible=visible, boxes=boxes,
                                       protocol=protocol)
        hits = keypoint_hits(maps, kp, vis)
        scores[protocol] = consistency_score(hits, vis, labels)
        assert stability_score(hits, hits, labels) == 100.0
    # corrected: 1 hit / 1 visible = 1.0 ≥ 0.8 → consistent; reference: 1 hit / 2 visible = 0.5 → not
    assert scores == {"corrected": 100.0, "reference": 0.0}


# --------------------------------------------------------------------------------------- keypoint regression

def test_box_clipped_by_the_crop_normalises_differently():
    # 56×56 crop spans [-0.5, 55.5]²; the box (edges) sticks out on the left by 10 px: x0 = -10.5, x1 = 39.5.
    bbox = torch.tensor([[-10.5, 5.5, 39.5, 45.5]])
    point = torch.tensor([[[14.5, 25.5]]])
    corrected = to_bbox_frame(point, bbox, (56, 56), protocol="corrected")
    reference = to_bbox_frame(point, bbox, (56, 56), protocol="reference")
    # both clip the origin to (-0.5, 5.5); corrected size 40 × 40 (clipped box), reference 50 × 40 (full box)
    assert corrected[0, 0].tolist() == pytest.approx([15 / 40, 0.5])
    assert reference[0, 0].tolist() == pytest.approx([15 / 50, 0.5])
    # cut on the far side: x1 = 70.5 → corrected clips it to 55.5 (size 50), reference keeps 65
    far = torch.tensor([[5.5, 5.5, 70.5, 45.5]])
    assert to_bbox_frame(point, far, (56, 56), protocol="corrected")[0, 0, 0].item() == pytest.approx(9 / 50)
    assert to_bbox_frame(point, far, (56, 56), protocol="reference")[0, 0, 0].item() == pytest.approx(9 / 65)


def test_centroid_stride_offset():
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, 1, 2] = 1.0  # all of concept 0 in row 1, column 2
    maps[0, 1] = 1.0 - maps[0, 0]  # background
    cor, _ = soft_centroids(maps, protocol="corrected")
    ref, _ = soft_centroids(maps, protocol="reference")
    assert cor[0, 0].tolist() == [2.5 / 4, 1.5 / 4]  # cell centre (j + 0.5)/w
    assert ref[0, 0].tolist() == [2 / 4, 1 / 4]  # cell corner j/w
    # In a 56-px image (stride 14) with the whole image as box [-0.5, 55.5]²: corrected (35, 21) px, reference
    # (28, 14) px, each + 0.5 over 56.
    box = torch.tensor([[-0.5, -0.5, 55.5, 55.5]])
    x_cor, active = bbox_centroid_features(maps, box, (56, 56), protocol="corrected")
    x_ref, _ = bbox_centroid_features(maps, box, (56, 56), protocol="reference")
    assert x_cor[0].tolist() == pytest.approx([35.5 / 56, 21.5 / 56])
    assert x_ref[0].tolist() == pytest.approx([28.5 / 56, 14.5 / 56])
    assert active.tolist() == [[True, True]]


def test_discovery_input_is_raw_under_reference():
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    images = torch.zeros(1, 3, 2, 2)  # the mean colour, normalised
    assert discovery_input(images, mean, std, "corrected") is images
    raw = discovery_input(images, mean, std, "reference")
    assert raw[0, :, 0, 0].tolist() == pytest.approx(mean)
    assert discovery_input(torch.ones(1, 3, 1, 1), mean, std, "reference").flatten().tolist() == pytest.approx(
        [m + s for m, s in zip(mean, std)])


# ------------------------------------------------------------------------------------------- training recipe

def test_equivariance_inverse_warp_bilinear_vs_nearest():
    # A one-hot column (column 2 of 8) and a warp by a quarter cell to the right: theta = [I | t] with
    # t = 2 · 0.25 / 8. Warping the same maps back by a quarter cell:
    #   bilinear: column 2 keeps 0.75, column 3 gets 0.25 → cos = 0.75 / sqrt(0.75² + 0.25²) = 0.948683;
    #   nearest (two nearest-neighbour resamplings): a quarter cell rounds to no move → cos = 1.
    fg = torch.zeros(1, 1, 4, 8)
    fg[..., 2] = 1.0
    maps = torch.cat([fg, 1 - fg], dim=1)
    theta = torch.tensor([[[1.0, 0.0, 2 * 0.25 / 8], [0.0, 1.0, 0.0]]])
    back = warp_back(fg, theta, interpolation="bilinear")
    assert back[0, 0, 0].tolist() == pytest.approx([0, 0, 0.75, 0.25, 0, 0, 0, 0], abs=1e-6)
    assert equivariance_loss(maps, maps, theta).item() == pytest.approx(1 - 0.75 / math.sqrt(0.625), abs=1e-6)
    assert equivariance_loss(maps, maps, theta, interpolation="nearest").item() == pytest.approx(0.0, abs=1e-6)


def test_nearest_inverse_warp_is_the_references_torchvision_procedure():
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    # torchvision's affine(angle, translate t px, scale s) on a W×W map samples input = A (output − t) about the
    # centre, A = R(angle)/s: in affine_grid's [-1, 1] units theta = [A | −A·2t/W].
    size, angle, t, s = 37, 23.0, (3, -2), 1.2
    c, n = math.cos(math.radians(angle)) / s, math.sin(math.radians(angle)) / s
    a = torch.tensor([[c, n], [-n, c]])
    theta = torch.cat([a, -a @ (2 * torch.tensor([[t[0]], [t[1]]], dtype=torch.float32) / size)], dim=1)[None]
    g = torch.Generator().manual_seed(3)
    x, maps = torch.rand(1, 3, size, size, generator=g), torch.rand(1, 3, size, size, generator=g)
    forward = TF.affine(x, angle=angle, translate=list(t), scale=s, shear=[0.0],
                        interpolation=InterpolationMode.BILINEAR)
    assert torch.allclose(warp(x, theta), forward, atol=1e-5)  # the same transform as torchvision's
    # The reference's inverse: translate back, then rotate/scale back, interpolation not passed (nearest).
    untranslated = TF.affine(maps, angle=0.0, translate=[-t[0], -t[1]], scale=1.0, shear=[0.0])
    reference = TF.affine(untranslated, angle=-angle, translate=[0, 0], scale=1 / s, shear=[0.0])
    assert torch.allclose(warp_back(maps, theta, interpolation="nearest"), reference, atol=1e-6)
    assert not torch.allclose(warp_back(maps, theta), reference, atol=1e-2)


def test_nearest_inverse_warp_undoes_a_whole_cell_rotation_exactly():
    # A 90° rotation maps cells onto cells: both back-warps recover the map exactly.
    g = torch.Generator().manual_seed(0)
    fg = torch.rand(1, 1, 6, 6, generator=g)
    theta = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]])
    warped = warp(fg, theta)
    for mode in ("bilinear", "nearest"):
        assert torch.allclose(warp_back(warped, theta, interpolation=mode), fg, atol=1e-5), mode


def test_training_warp_interpolation_and_fill():
    exact = DataConfig(affine_interpolation="nearest", affine_fill="zero", color_jitter=[0.0, 0.0, 0.0, 0.0])
    ops = build_train_transform(exact, 56).ops
    affine = next(op for op in ops if isinstance(op, RandomAffine))
    assert (affine.interpolation, affine.fill) == ("nearest", (0, 0, 0))
    assert not any(isinstance(op, ColorJitter) for op in ops)  # the reference's jitter is a no-op
    ours = next(op for op in build_train_transform(DataConfig(), 56).ops if isinstance(op, RandomAffine))
    assert (ours.interpolation, ours.fill) == ("bilinear", mean_fill(DataConfig().mean))
    # A black/white checkerboard scaled by 1.5 and shifted 10 px: nearest only copies source pixels (and the
    # fill), bilinear blends them; the exposed left columns carry the fill.
    board = (np.indices((20, 20)).sum(0) % 2 * 255).astype(np.uint8)
    img = Image.fromarray(np.stack([board] * 3, axis=-1))
    for interpolation, fill in (("nearest", (0, 0, 0)), ("bilinear", (124, 116, 104))):
        out = np.asarray(apply_affine(Sample(image=img), 0.0, (10.0, 0.0), 1.5, fill=fill,
                                      interpolation=interpolation).image)
        assert tuple(out[10, 0]) == fill
        colours = {int(v) for v in np.unique(out[..., 0])}
        assert (colours <= {0, 255, fill[0]}) == (interpolation == "nearest")


def test_center_crop_can_leave_the_box_unclipped():
    sample = Sample(image=Image.new("RGB", (100, 60)), bbox=np.array([1.5, 3.5, 97.5, 50.5]))
    # centre crop 60: left = round(40 / 2) = 20 → box x shifts by -20
    assert CenterCrop(60)(sample).bbox.tolist() == [-0.5, 3.5, 59.5, 50.5]
    assert CenterCrop(60, clip_box=False)(sample).bbox.tolist() == [-18.5, 3.5, 77.5, 50.5]


def test_new_fields_validate_with_actionable_messages():
    with pytest.raises(ConfigError, match="eval.protocol='paper'.*corrected.*reference"):
        EvalConfig(protocol="paper")
    with pytest.raises(ConfigError, match="data.affine_interpolation='bicubic'"):
        DataConfig(affine_interpolation="bicubic")
    with pytest.raises(ConfigError, match="data.affine_fill='white'"):
        DataConfig(affine_fill="white")
    with pytest.raises(ConfigError, match="loss.eq_inverse_interpolation='area'"):
        LossConfig(eq_inverse_interpolation="area")
    defaults = Config()
    assert (defaults.eval.protocol, defaults.data.affine_interpolation, defaults.data.affine_fill,
            defaults.loss.eq_inverse_interpolation) == ("corrected", "bilinear", "mean", "bilinear")


# ------------------------------------------------------------------------------------- the exact preset

def test_exact_presets_are_the_reference_recipe():
    for name in ("cub", "nabirds"):
        exact = Config.from_dict(yaml.safe_load((CONFIGS / f"{name}_vitb14_reg4_paper_exact.yaml").read_text()))
        paper = Config.from_dict(yaml.safe_load((CONFIGS / f"{name}_vitb14_reg4_paper.yaml").read_text()))
        assert exact.data.val_fraction == 0.0 and exact.optim.amp == "none"
        assert exact.data.color_jitter == [0.0] * 4
        assert (exact.data.affine_interpolation, exact.data.affine_fill) == ("nearest", "zero")
        assert exact.loss.eq_inverse_interpolation == "nearest" and exact.eval.protocol == "reference"
        assert exact.model == paper.model and exact.optim.epochs == paper.optim.epochs == 25
        assert (exact.optim.step_epochs, exact.optim.gamma, exact.optim.batch_size) == (4, 0.5, 16)
        assert paper.eval.protocol == "corrected" and paper.data.val_fraction > 0
    nabirds = Config.from_dict(yaml.safe_load((CONFIGS / "nabirds_vitb14_reg4_paper_exact.yaml").read_text()))
    assert nabirds.model.num_classes == 555


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pw_exact")
    make_partworld(root, classes=3, per_class=6, size=56, seed=2, test_fraction=0.34)
    return root


def test_exact_preset_trains_and_evaluates_end_to_end(world, tmp_path, capsys):
    data = yaml.safe_load((CONFIGS / "cub_vitb14_reg4_paper_exact.yaml").read_text())
    data["model"].update(backbone="vit_small_patch14_reg4_dinov2", img_size=56, num_classes=3, n_pro=[5, 4, 3],
                         weights="random", backbone_kwargs=dict(TINY))
    data["optim"].update(epochs=2, batch_size=4)
    data["data"].update(root=str(world), resize=64, num_workers=0)
    data["eval"]["batch_size"] = 8
    data["train"] = dict(seed=1, log_every=1)
    cfg = Config.from_dict(data)
    metrics = train(cfg, tmp_path / "run", progress=False)
    assert metrics["best_epoch"] == 2 and metrics["best_val_top1"] is None  # no validation: the last epoch
    code = main(["eval", str(tmp_path / "run" / "best"), "--out", str(tmp_path), "--weights", "random",
                 "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "consistency" in table and "reference" in table and "eval.protocol=reference" in table
    result = yaml.safe_load((tmp_path / "eval.json").read_text())
    assert result["eval_protocol"] == "reference" and result["protocol"]["protocol"] == "reference"
    for key in ("consistency", "stability", "nmi", "ari", "kpr"):
        assert math.isfinite(result[key]), key


def test_protocols_share_accuracy_and_label_the_table(world):
    from .conftest import tiny_model

    model = tiny_model(num_classes=3, n_pro=[5, 4, 3], seed=5)
    with torch.no_grad():
        for s in model.stages:
            s.spatial_bias.normal_(std=2.0)
    base = {"model": dict(backbone="vit_small_patch14_reg4_dinov2", img_size=56, num_classes=3, n_pro=[5, 4, 3],
                          weights="random", backbone_kwargs=dict(TINY)),
            "data": dict(root=str(world), num_workers=0)}
    results = {p: evaluate(model, Config.from_dict({**base, "eval": dict(protocol=p, batch_size=8)}), progress=False)
               for p in ("corrected", "reference")}
    assert results["corrected"]["top1"] == results["reference"]["top1"]
    assert results["corrected"]["eval_protocol"] == "corrected"
    lines = format_table(results["reference"]).splitlines()
    assert lines[0].split() == ["metric", "value", "protocol"]
    assert next(ln for ln in lines if ln.startswith("top-1 ")).split()[-1] == "-"
    assert next(ln for ln in lines if ln.startswith("consistency")).split()[-1] == "reference"


def test_reference_consistency_matches_the_authors_formula_on_text_annotations(world, tmp_path):
    # Narrow every box to its middle half, so some visible keypoints fall outside it; then recompute the
    # reference protocol from the annotation files with plain Python int(), as the authors' script reads them.
    import shutil

    from ivpt.data import CubDataset, build_eval_transform

    from .conftest import tiny_model

    root = tmp_path / "narrow"
    shutil.copytree(world, root)
    lines = (root / "bounding_boxes.txt").read_text().split("\n")
    narrowed = []
    for line in filter(None, lines):
        image_id, x, y, w, h = line.split()
        w_int = int(float(w))
        narrowed.append(f"{image_id} {float(x) + w_int // 4:.1f} {y} {float(w_int // 2):.1f} {h}")
    (root / "bounding_boxes.txt").write_text("\n".join(narrowed) + "\n")

    model = tiny_model(num_classes=3, n_pro=[5, 4, 3], seed=7)
    with torch.no_grad():
        for s in model.stages:
            s.spatial_bias.normal_(std=2.0)
            s.spatial_bias[0, 1:3, 1:3] += 30.0  # concept 0 owns the centre of the 4×4 grid: hits near the middle
    cfg = Config.from_dict({
        "model": dict(backbone="vit_small_patch14_reg4_dinov2", img_size=56, num_classes=3, n_pro=[5, 4, 3],
                      weights="random", backbone_kwargs=dict(TINY)),
        "data": dict(root=str(root), num_workers=0),
        "eval": dict(protocol="reference", batch_size=4),
    })
    result = evaluate(model, cfg, metrics=["consistency"], progress=False)

    def table(name):
        return [line.split() for line in (root / name).read_text().splitlines() if line.strip()]

    test_ids = [i for i, train in table("train_test_split.txt") if train == "0"]
    boxes = {i: (int(x.split(".")[0]), int(y.split(".")[0]), int(w.split(".")[0]), int(h.split(".")[0]))
             for i, x, y, w, h in table("bounding_boxes.txt")}
    parts = {}
    for i, part, x, y, vis in table("parts/part_locs.txt"):
        parts.setdefault(i, []).append((int(part) - 1, int(float(x)), int(float(y)), vis == "1"))
    crops = CubDataset(root, "test", transform=build_eval_transform(cfg.data, 56, square=True), with_parts=True,
                       bbox_crop=True)
    kp = torch.zeros(len(test_ids), 6, 2)
    vis = torch.zeros(len(test_ids), 6, dtype=torch.bool)
    outside = 0
    for n, i in enumerate(test_ids):
        bx, by, bw, bh = boxes[i]
        for part, x, y, visible in parts[i]:
            kp[n, part] = torch.tensor([int(224 * ((x - bx) / bw)), int(224 * ((y - by) / bh))])
            vis[n, part] = visible
            outside += visible and not (bx <= x < bx + bw and by <= y < by + bh)
    assert outside > 0  # the case this test is about
    model.eval()
    with torch.no_grad():
        stage_maps = [model(crops[n]["image"][None]).maps for n in range(len(crops))]
    labels = torch.tensor(crops.labels)
    for s, row in enumerate(result["per_stage"]):
        maps = torch.cat([m[s][:, :-1] for m in stage_maps])
        expected = consistency_score(keypoint_hits(maps, kp, vis), vis, labels)
        assert row["consistency"] == pytest.approx(expected), s
    assert any(0 < row["consistency"] < 100 for row in result["per_stage"])  # not a trivial all-or-nothing case


def test_reference_keypoint_regression_matches_the_authors_procedure(world):
    # Shorter side 72, centre crop 56: boxes are cut by the crop. The authors' procedure, written out with
    # scikit-learn: raw [0, 1] inputs, centroids at j·stride, landmarks and centroids normalised by the box's
    # clipped corner and its FULL width and height, one standardised no-intercept regression per landmark.
    from sklearn.linear_model import LinearRegression
    from sklearn.preprocessing import StandardScaler

    from ivpt.data import CubDataset, build_eval_transform

    from .conftest import tiny_model

    model = tiny_model(num_classes=3, n_pro=[5, 4, 3], seed=8)
    with torch.no_grad():
        for s in model.stages:
            s.spatial_bias.normal_(std=2.0)
    cfg = Config.from_dict({
        "model": dict(backbone="vit_small_patch14_reg4_dinov2", img_size=56, num_classes=3, n_pro=[5, 4, 3],
                      weights="random", backbone_kwargs=dict(TINY)),
        "data": dict(root=str(world), num_workers=0, resize=72),
        "eval": dict(protocol="reference", batch_size=4),
    })
    result = evaluate(model, cfg, metrics=["kpr"], progress=False)
    mean = torch.tensor(cfg.data.mean).view(3, 1, 1)
    std = torch.tensor(cfg.data.std).view(3, 1, 1)
    model.eval()

    def collect(split, stage):
        ds = CubDataset(world, split, transform=build_eval_transform(cfg.data, 56, clip_box=False), with_parts=True)
        xs, ys, vis, act, cut = [], [], [], [], 0
        for n in range(len(ds)):
            item = ds[n]
            with torch.no_grad():
                fg = model((item["image"] * std + mean)[None]).maps[stage][0, :-1].double()
            rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
            mass = fg.sum(dim=(1, 2))
            centre = torch.stack([(fg * cols).sum(dim=(1, 2)) / mass, (fg * rows).sum(dim=(1, 2)) / mass], 1) * 14
            box = item["bbox"].double()
            corner = box[:2].clamp(-0.5, 55.5)
            size = box[2:] - box[:2]
            cut += bool((box[:2] < -0.5).any() or (box[2:] > 55.5).any())
            xs.append(((centre - corner) / size).flatten().numpy())
            ys.append(((item["keypoints"].double() - corner) / size).numpy())
            vis.append(item["visible"].numpy())
            act.append((fg.amax(dim=(1, 2)) > 0.5).repeat_interleave(2).numpy())
        return np.stack(xs), np.stack(ys), np.stack(vis), np.stack(act), cut

    for stage, row in enumerate(result["per_stage"]):
        x_fit, y_fit, v_fit, a_fit, cut = collect("train", stage)
        x_te, y_te, v_te, a_te, _ = collect("test", stage)
        assert cut > 0  # the case this test is about
        total, count = 0.0, 0
        for p in range(y_fit.shape[1]):
            fit, te = v_fit[:, p], v_te[:, p]
            sx, sy = StandardScaler().fit(x_fit[fit]), StandardScaler().fit(y_fit[fit, p])
            reg = LinearRegression(fit_intercept=False).fit(np.where(a_fit[fit], sx.transform(x_fit[fit]), 0),
                                                             sy.transform(y_fit[fit, p]))
            pred = sy.inverse_transform(reg.predict(np.where(a_te[te], sx.transform(x_te[te]), 0)))
            total += np.linalg.norm(pred - y_te[te, p], axis=1).sum()
            count += int(te.sum())
        assert row["kpr"] == pytest.approx(100 * total / count, rel=1e-5), stage
