"""Metrics on hand-built inputs whose value is known by construction, and against scikit-learn."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LinearRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.preprocessing import StandardScaler

from ivpt.metrics import (
    AccuracyMeter,
    ContingencyMeter,
    FgIoUMeter,
    KeypointErrorMeter,
    KeypointFitMeter,
    PartMeter,
    add_protocol_noise,
    centroid_features,
    concepts_at_keypoints,
    consistency_score,
    fg_iou,
    fit_keypoint_regressor,
    keypoint_hits,
    keypoint_patches,
    keypoint_prototypes,
    keypoint_regression_error,
    nmi_ari,
    nmi_ari_from_contingency,
    soft_centroids,
    stability_score,
    topk_correct,
)
from ivpt.models.prototypes import nearest_prototype_maps

# ----------------------------------------------------------------------------------------------- NMI / ARI


def _sk(a, b):
    return normalized_mutual_info_score(a, b), adjusted_rand_score(a, b)


@pytest.mark.parametrize("n,r,s,seed", [(2, 2, 2, 0), (7, 3, 5, 1), (50, 4, 9, 2), (1000, 15, 17, 3),
                                        (300, 2, 40, 4)])
def test_nmi_ari_match_sklearn_on_random_labelings(n, r, s, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, r, n), rng.integers(0, s, n)
    assert nmi_ari(a, b) == pytest.approx(_sk(a, b), abs=1e-12)
    # Correlated labelings (high NMI) as well.
    b2 = np.where(rng.random(n) < 0.7, a * 3 + 1, b)
    assert nmi_ari(a, b2) == pytest.approx(_sk(a, b2), abs=1e-12)


def test_nmi_ari_special_cases_follow_sklearn():
    cases = [
        ([0, 0, 0], [5, 5, 5]),  # one cluster on both sides
        ([0, 0, 0, 0], [0, 1, 2, 3]),  # one class split completely
        ([0, 1, 2, 3], [7, 7, 7, 7]),
        ([3], [9]),
        ([0, 0, 1, 1], [1, 1, 0, 0]),  # a permutation is a perfect match
        ([0, 0, 1, 1], [0, 1, 0, 1]),  # ARI -0.5
        ([0, 1, 1, 2, 2, 2], [10, 10, 4, 4, 4, 99]),  # values present in one labeling only
    ]
    for a, b in cases:
        assert nmi_ari(np.array(a), np.array(b)) == pytest.approx(_sk(a, b), abs=1e-12), (a, b)


def test_contingency_ignores_empty_rows_and_columns():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 4, 200), rng.integers(0, 6, 200)
    table = np.zeros((7, 9), dtype=np.int64)  # rows 4-6 and columns 6-8 never occur
    np.add.at(table, (a, b), 1)
    assert nmi_ari_from_contingency(table) == pytest.approx(_sk(a, b), abs=1e-12)
    assert nmi_ari_from_contingency(torch.from_numpy(table)) == pytest.approx(_sk(a, b), abs=1e-12)
    assert nmi_ari_from_contingency(np.zeros((3, 4))) == (1.0, 1.0)  # no samples: sklearn's convention


def test_contingency_meter_streams_keypoint_concepts():
    rng = np.random.default_rng(6)
    b_total, p, k = 40, 15, 6
    concepts = torch.from_numpy(rng.integers(0, k, (b_total, p)))
    concepts[torch.from_numpy(rng.random((b_total, p)) < 0.3)] = -1  # invisible
    meter = ContingencyMeter(p, k)
    for chunk in concepts.split(16):
        meter.update(chunk)
    padded = torch.cat([concepts[:3], concepts[:3]])
    meter.update(padded, valid=torch.tensor([False, False, False, True, True, True]))  # 3 real repeats
    all_c = torch.cat([concepts, concepts[:3]])
    vis = all_c >= 0
    truth = torch.arange(p).expand_as(all_c)[vis].numpy()
    nmi, ari = _sk(truth, all_c[vis].numpy())
    out = meter.compute()
    assert out["nmi"] == pytest.approx(100 * nmi, abs=1e-9)
    assert out["ari"] == pytest.approx(100 * ari, abs=1e-9)


# ------------------------------------------------------------------------------------------------ accuracy


def test_topk_correct_small():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]])
    hits = topk_correct(logits, torch.tensor([1, 2]), ks=(1, 2, 5))
    assert hits[1].tolist() == [True, False]
    assert hits[2].tolist() == [True, True]
    assert hits[5].tolist() == [True, True]  # k > C: every label is within the top C


def test_accuracy_meter_equals_brute_force_count_with_valid_mask():
    g = torch.Generator().manual_seed(0)
    n, c = 103, 9
    logits = torch.randn(n, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    valid = torch.rand(n, generator=g) > 0.2
    meter = AccuracyMeter(c)
    for lg, lb, vd in zip(logits.split(16), labels.split(16), valid.split(16)):
        meter.update(lg, lb, valid=vd)
    rank = (logits > logits.gather(1, labels[:, None])).sum(1)  # how many logits beat the label
    top1, top5 = 0, 0
    per_class = {}
    for i in range(n):
        if not valid[i]:
            continue
        top1 += int(rank[i] == 0)
        top5 += int(rank[i] < 5)
        hit, tot = per_class.get(int(labels[i]), (0, 0))
        per_class[int(labels[i])] = (hit + int(rank[i] == 0), tot + 1)
    m = int(valid.sum())
    out = meter.compute()
    assert out["top1"] == pytest.approx(100 * top1 / m)
    assert out["top5"] == pytest.approx(100 * top5 / m)
    assert out["balanced_top1"] == pytest.approx(100 * np.mean([h / t for h, t in per_class.values()]))


def test_accuracy_meter_merge_and_all_reduce():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(40, 5, generator=g), torch.randint(0, 5, (40,), generator=g)
    whole, a, b = AccuracyMeter(5), AccuracyMeter(5), AccuracyMeter(5)
    whole.update(logits, labels)
    a.update(logits[:13], labels[:13])
    b.update(logits[13:], labels[13:])
    assert a.merge(b).compute() == whole.compute()
    assert torch.equal(a.total, whole.total)
    # A stand-in for a 2-process all_reduce whose other rank holds the same counts: state doubles.
    whole.all_reduce(lambda t: t.mul_(2))
    assert int(whole.total.sum()) == 80 and whole.compute() == a.compute()
    whole.all_reduce()  # no process group: a no-op
    assert int(whole.total.sum()) == 80
    state = whole.state_dict()
    whole.reset()
    assert int(whole.total.sum()) == 0
    whole.load_state_dict(state)
    assert int(whole.total.sum()) == 80
    empty = AccuracyMeter(3)
    assert empty.compute() == {} and empty.no_data()["top1"] == "no image was classified"


# --------------------------------------------------------------------------------- consistency / stability

FRAME = 224


def _peak_maps(peaks):
    """Frame-resolution maps (B, K, 224, 224) with a single maximum at peaks (B, K, 2) given as (x, y)."""
    b, k = peaks.shape[:2]
    maps = torch.zeros(b, k, FRAME, FRAME)
    for i in range(b):
        for j in range(k):
            x, y = peaks[i, j].tolist()
            maps[i, j, y, x] = 1.0
    return maps


def test_keypoint_hits_box_and_clipping_at_frame_edge():
    maps = _peak_maps(torch.tensor([[[220, 5]]]))  # peak at column 220, row 5
    kps = torch.tensor([[[224, 5], [184, 41], [183, 5], [220, 42], [230, 5], [220, -3], [220, 0], [220, 5]]],
                       dtype=torch.float32)
    visible = torch.tensor([[True] * 7 + [False]])
    hits = keypoint_hits(maps, kps, visible, frame=FRAME, half_size=36)
    # inclusive corner (184, 41) and frame edge 224 are in; 230 and -3 would be inside the unclipped box but
    # lie beyond the frame; an invisible keypoint never hits.
    assert hits[0, 0].tolist() == [True, True, False, False, False, False, True, False]


def test_keypoint_hits_upsamples_low_resolution_maps():
    maps = torch.zeros(1, 1, 14, 14)
    # The cell's centre in the 224 frame is (x, y) = (16·10 + 7.5, 16·3 + 7.5): the bicubic peak is one of
    # the four pixels around it, columns 167-168, so x = 167 + 36 is inside the box and 168 + 37 outside.
    maps[0, 0, 3, 10] = 1.0
    kps = torch.tensor([[[167.0 + 36, 55.5], [168.0 + 37, 55.5]]])
    hits = keypoint_hits(maps, kps, torch.ones(1, 2, dtype=torch.bool))
    assert hits[0, 0].tolist() == [True, False]


def _hits_from_lists(per_image):
    """per_image: list over images of list over prototypes of the keypoint ids hit → (N, K, P) bool."""
    n, k = len(per_image), len(per_image[0])
    hits = torch.zeros(n, k, 5, dtype=torch.bool)
    for i, protos in enumerate(per_image):
        for j, kp_ids in enumerate(protos):
            for kp in kp_ids:
                hits[i, j, kp] = True
    return hits


def test_consistency_all_and_none():
    # Every prototype k hits keypoint k in every image of both classes → 100.
    hits = _hits_from_lists([[[0], [1], [2]]] * 6)
    visible = torch.ones(6, 5, dtype=torch.bool)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert consistency_score(hits, visible, labels) == pytest.approx(100.0)
    # Each prototype hits a different keypoint in each of the 5 images of the class → best ratio 1/5 → 0.
    scattered = _hits_from_lists([[[i], [(i + 1) % 5], [(i + 2) % 5]] for i in range(5)])
    assert consistency_score(scattered, torch.ones(5, 5, dtype=torch.bool), torch.zeros(5, dtype=torch.long)) == 0


def test_consistency_mixed_with_visibility_denominator():
    # Class 0, 5 images: proto 0 hits kp 0 in 4/5 (= threshold: consistent), proto 1 hits kp 1 in 3/5 (not),
    # proto 2 hits nothing. Class 1, 5 images: proto 0 hits kp 2 everywhere (consistent); proto 1 hits kp 3
    # in the only 2 images where kp 3 is visible (2/2: consistent); proto 2 hits nothing → 3 of 6 units.
    c0 = [[[0], [1], []], [[0], [1], []], [[0], [1], []], [[0], [], []], [[], [], []]]
    c1 = [[[2], [3], []], [[2], [3], []], [[2], [], []], [[2], [], []], [[2], [], []]]
    hits = _hits_from_lists(c0 + c1)
    visible = torch.ones(10, 5, dtype=torch.bool)
    visible[7:, 3] = False
    visible[5:, 0] = False  # never visible in class 1: skipped, not a zero ratio that counts
    labels = torch.tensor([0] * 5 + [1] * 5)
    assert consistency_score(hits, visible, labels) == pytest.approx(50.0)
    assert consistency_score(hits, visible, labels, threshold=0.81) == pytest.approx(100 * 2 / 6)

    meter = PartMeter(num_classes=4, num_prototypes=3, num_keypoints=5)  # classes 2, 3 absent: not units
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    for idx in order.split(3):
        meter.update(hits[idx], visible[idx], labels[idx])
    assert meter.compute()["consistency"] == pytest.approx(50.0)
    assert "stability" not in meter.compute()  # no noisy hits given: absent, with its reason
    assert meter.no_data() == {"stability": "no noisy pass was evaluated"}
    assert meter.per_prototype()["consistency"] == pytest.approx([100.0, 50.0, 0.0])


def test_stability_known_units():
    # 2 classes × 4 images, 2 prototypes. Unit (class 0, proto 0) changes in 1 of 4 images → 75;
    # (class 1, proto 1) changes in 2 of 4 → 50; the others never change → mean (75 + 100 + 100 + 50) / 4.
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(8, 2, 5, generator=g) > 0.5
    noisy = clean.clone()
    noisy[1, 0, 3] = ~noisy[1, 0, 3]
    noisy[1, 0, 4] = ~noisy[1, 0, 4]  # two flips in the same image still count once
    noisy[4, 1, 0] = ~noisy[4, 1, 0]
    noisy[6, 1, 2] = ~noisy[6, 1, 2]
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert stability_score(clean, noisy, labels) == pytest.approx((75 + 100 + 100 + 50) / 4)

    meter = PartMeter(2, 2, 5)
    visible = torch.ones(8, 5, dtype=torch.bool)
    meter.update(clean[:5], visible[:5], labels[:5], hits_noisy=noisy[:5])
    # The last batch padded with two duplicates of image 0 that must not count.
    pad = torch.tensor([5, 6, 7, 0, 0])
    meter.update(clean[pad], visible[pad], labels[pad], hits_noisy=noisy[pad],
                 valid=torch.tensor([True, True, True, False, False]))
    assert meter.compute()["stability"] == pytest.approx(81.25)
    assert meter.per_prototype()["stability"] == pytest.approx([87.5, 75.0])


def test_part_meter_end_to_end_from_maps_and_merge():
    # 2 classes × 3 images, 2 prototypes, 3 keypoints. Prototype 0 always peaks on keypoint 0; prototype 1
    # peaks far from every keypoint. Under "noise" prototype 1's peak moves onto keypoint 1 in image 2.
    kps = torch.tensor([[40.0, 40.0], [180.0, 60.0], [100.0, 200.0]]).expand(6, 3, 2).clone()
    visible = torch.ones(6, 3, dtype=torch.bool)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    peaks = torch.tensor([[[40, 40], [200, 200]]]).repeat(6, 1, 1)
    noisy_peaks = peaks.clone()
    noisy_peaks[2, 1] = torch.tensor([180, 60])
    hits = keypoint_hits(_peak_maps(peaks), kps, visible)
    hits_noisy = keypoint_hits(_peak_maps(noisy_peaks), kps, visible)
    a, b = PartMeter(2, 2, 3), PartMeter(2, 2, 3)
    a.update(hits[:4], visible[:4], labels[:4], hits_noisy=hits_noisy[:4])
    b.update(hits[4:], visible[4:], labels[4:], hits_noisy=hits_noisy[4:])
    out = a.merge(b).compute()
    assert out["consistency"] == pytest.approx(50.0)  # prototype 0 in both classes, prototype 1 in none
    assert out["stability"] == pytest.approx((100 + 100 * 2 / 3 + 100 + 100) / 4)


def test_protocol_noise_is_clipped_and_reproducible():
    x = torch.zeros(4, 3, 16, 16)
    n1 = add_protocol_noise(x, generator=torch.Generator().manual_seed(0))
    n2 = add_protocol_noise(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(n1, n2)
    assert n1.abs().max() <= 0.25 and n1.std() > 0.1 and abs(float(n1.mean())) < 0.02
    assert (n1.abs() == 0.25).any()  # N(0, 0.2²) exceeds 0.25 often enough to be clipped


@pytest.mark.parametrize("std,clip", [(0.2, 0.25), (0.05, 0.25), (1.0, 0.5)])
def test_protocol_noise_has_the_clipped_normal_spread(std, clip):
    # The standard deviation of N(0, std²) clipped to ±clip, in float64: E[X² ; |X| < c] + c² P(|X| >= c).
    from scipy.stats import norm

    a = clip / std
    inside = std ** 2 * ((2 * norm.cdf(a) - 1) - 2 * a * norm.pdf(a))
    expected = math.sqrt(inside + clip ** 2 * 2 * norm.sf(a))
    n = add_protocol_noise(torch.zeros(1_000_000), std=std, clip=clip, generator=torch.Generator().manual_seed(1))
    # 1e6 samples: the sample std's relative standard error is below 0.1 %.
    assert float(n.double().std()) == pytest.approx(expected, rel=5e-3)


# ----------------------------------------------------------------------------------- concepts at keypoints


def test_concepts_at_keypoints_hand_made():
    maps = torch.zeros(1, 3, 4, 4)
    maps[0, 0, :, :2] = 1.0  # concept 0 on the left half
    maps[0, 1, :, 2:] = 1.0  # concept 1 on the right half
    maps[0, 2, 3, :] = 5.0  # background dominates the bottom row
    kps = torch.tensor([[[1.0, 1.0], [6.9, 0.2], [3.0, 7.5], [0.0, 0.0]]])
    visible = torch.tensor([[True, True, True, False]])
    assert concepts_at_keypoints(maps, kps, visible, (8, 8)).tolist() == [[0, 1, 2, -1]]


def test_concepts_at_keypoints_equal_reading_the_upsampled_map():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 6, 7, 9, generator=g).softmax(1)
    h, w = 50, 61
    kps = torch.rand(3, 20, 2, generator=g) * torch.tensor([w, h])
    kps[:, :5] = kps[:, :5].floor()  # integer keypoints too
    kps[0, 0] = torch.tensor([w - 0.01, h - 0.01])  # last pixel
    visible = torch.ones(3, 20, dtype=torch.bool)
    up = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
    xi, yi = kps[..., 0].long(), kps[..., 1].long()
    expected = torch.stack([up[b, :, yi[b], xi[b]].argmax(0) for b in range(3)])
    assert torch.equal(concepts_at_keypoints(maps, kps, visible, (h, w)), expected)


# ------------------------------------------------------------------------------------ keypoint regression


def test_soft_centroid_of_a_blob_is_its_centre():
    maps = torch.zeros(2, 3, 10, 10)
    maps[:, 0, 1:4, 5:8] = 1.0  # 3×3 blob centred on row 2, column 6
    maps[:, 1] = 0.1  # weak and uniform: inactive, centroid in the middle
    maps[:, 2] = 1.0 - maps[:, 0] - maps[:, 1]
    centroids, active = soft_centroids(maps, active_threshold=0.5)
    assert centroids.shape == (2, 2, 2) and active.tolist() == [[True, False]] * 2
    assert centroids[0, 0].tolist() == pytest.approx([0.65, 0.25])
    assert centroids[0, 1].tolist() == pytest.approx([0.5, 0.5])
    x, x_active = centroid_features(centroids, active)
    assert x.shape == (2, 4) and x[0].tolist() == pytest.approx([0.65, 0.25, 0.5, 0.5])
    assert x_active[0].tolist() == [True, True, False, False]


def _linear_problem(n, f=6, p=4, seed=0):
    """X (n, f) in [0, 1], landmarks an affine function of X (the same one for every seed), visibility."""
    relation = np.random.default_rng(1234)
    a, c = relation.normal(size=(p, f, 2)), relation.normal(size=(p, 2))
    rng = np.random.default_rng(seed)
    x = rng.random((n, f))
    y = np.einsum("nf,pfk->npk", x, a) + c  # affine: recovered exactly in standardised coordinates
    return x, y, rng.random((n, p)) < 0.8


def test_keypoint_regression_recovers_a_linear_relation_and_measures_an_offset():
    reg = fit_keypoint_regressor(*_linear_problem(300))
    x_t, y_t, v_t = _linear_problem(100, seed=1)
    assert keypoint_regression_error(reg, x_t, y_t, v_t) == pytest.approx(0.0, abs=1e-8)
    # Shifting every test landmark by (0.03, 0.04) bbox units gives an error of exactly 0.05 × 100 = 5.
    assert keypoint_regression_error(reg, x_t, y_t + np.array([0.03, 0.04]), v_t) == pytest.approx(5.0, abs=1e-8)


def test_keypoint_regression_matches_the_sklearn_protocol_and_the_streaming_fit():
    rng = np.random.default_rng(3)
    n, f, p = 400, 8, 5
    x = rng.random((n, f))
    x[:, 3] = 0.42  # a constant feature
    active = rng.random((n, f)) < 0.85
    active[:, 6:8] = False  # a concept never active
    y = rng.random((n, p, 2))
    vis = rng.random((n, p)) < 0.7
    xt, yt, vt, at = rng.random((90, f)), rng.random((90, p, 2)), rng.random((90, p)) < 0.7, rng.random((90, f)) < 0.85

    # The reference protocol, written with scikit-learn.
    errors = []
    for j in range(p):
        sx, sy = StandardScaler().fit(x[vis[:, j]]), StandardScaler().fit(y[vis[:, j], j])
        xs = np.where(active[vis[:, j]], sx.transform(x[vis[:, j]]), 0)
        lr = LinearRegression(fit_intercept=False).fit(xs, sy.transform(y[vis[:, j], j]))
        pred = sy.inverse_transform(lr.predict(np.where(at[vt[:, j]], sx.transform(xt[vt[:, j]]), 0)))
        errors.append(np.linalg.norm(pred - yt[vt[:, j], j], axis=1))
    expected = 100 * np.concatenate(errors).mean()

    reg = fit_keypoint_regressor(x, y, vis, active_train=active)
    assert keypoint_regression_error(reg, xt, yt, vt, active_test=at) == pytest.approx(expected, rel=1e-9)

    fit_meter = KeypointFitMeter(f, p)
    for rows in np.array_split(np.arange(n), 7):
        fit_meter.update(torch.from_numpy(x[rows]), torch.from_numpy(y[rows]), torch.from_numpy(vis[rows]),
                         active=torch.from_numpy(active[rows]))
    streamed = fit_meter.fit()
    assert np.allclose(streamed.weight, reg.weight, atol=1e-7)
    err_meter = KeypointErrorMeter()
    for rows in np.array_split(np.arange(90), 4):
        err_meter.update(streamed, xt[rows], yt[rows], vt[rows], active=at[rows])
    assert err_meter.compute()["kp_error"] == pytest.approx(expected, rel=1e-7)


def test_landmark_never_visible_in_training_is_excluded():
    x, y, vis = _linear_problem(50)
    vis[:, 2] = False
    reg = fit_keypoint_regressor(x, y, vis)
    assert reg.fitted.tolist() == [True, True, False, True]
    only_missing = np.zeros_like(vis)
    only_missing[:, 2] = True
    assert math.isnan(keypoint_regression_error(reg, x, y, only_missing))


# ------------------------------------------------------------------------------------------------ FG IoU


def test_fg_iou_hand_made():
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, :, :2] = 1.0  # predicted foreground: left two columns (8 px)
    maps[0, 1, :, 2:] = 1.0
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, :2, :] = 1.0  # true foreground: top two rows (8 px)
    inter, union = fg_iou(maps, mask)
    assert inter.tolist() == [4] and union.tolist() == [12]
    meter = FgIoUMeter()
    meter.update(torch.cat([maps, maps]), torch.cat([mask, torch.ones_like(mask)]),
                 valid=torch.tensor([True, False]))
    out = meter.compute()
    assert out["fg_iou"] == pytest.approx(100 / 3) and out["bg_iou"] == pytest.approx(100 / 3)
    # Bilinear upsampling of a 2×2 map to the 4×4 mask keeps the left/right split.
    small = F.avg_pool2d(maps, 2)
    assert fg_iou(small, mask)[0].tolist() == [4]


# ------------------------------------------------------------------------------- keypoint prototypes


def test_keypoint_prototypes_are_the_mean_features_under_the_visible_keypoints():
    g = torch.Generator().manual_seed(0)
    b, d, side, size = 3, 5, 4, 56  # 14-px patches
    feats = torch.randn(b, d, side, side, generator=g)
    # (x, y) pixels: keypoint 0 in patch (row 1, col 2) of every image, keypoint 1 at (3, 0) but hidden in image 2,
    # and one on the far edge (x = y = 56) that must clip into the last patch
    kp = torch.tensor([[[30.0, 15.0], [5.0, 50.0]], [[41.9, 27.9], [13.9, 42.0]], [[28.0, 14.0], [56.0, 56.0]]])
    vis = torch.tensor([[True, True], [True, True], [True, False]])
    background = torch.zeros(b, side, side, dtype=torch.bool)
    background[:, 0, 0] = True
    background[1, 3, 3] = True
    protos = keypoint_prototypes(feats, kp, vis, background, image_size=size)
    assert keypoint_patches(kp, vis, (side, side), image_size=size).tolist() == [[6, 12], [6, 12], [6, 0]]
    f = feats.double()
    expected = torch.stack([
        (f[0, :, 1, 2] + f[1, :, 1, 2] + f[2, :, 1, 2]) / 3,
        (f[0, :, 3, 0] + f[1, :, 3, 0]) / 2,
        (f[0, :, 0, 0] + f[1, :, 0, 0] + f[2, :, 0, 0] + f[1, :, 3, 3]) / 4,
    ]).float()
    assert protos.dtype == torch.float32 and protos.shape == (3, d)
    torch.testing.assert_close(protos, expected, rtol=1e-6, atol=1e-7)
    # the hidden keypoint may sit anywhere, NaN included, and change nothing; the edge keypoint lands in the last patch
    kp2 = kp.clone()
    kp2[2, 1] = torch.tensor([float("nan"), -1e9])
    torch.testing.assert_close(keypoint_prototypes(feats, kp2, vis, background, image_size=size), protos)
    vis3 = vis.clone()
    vis3[2, 1] = True
    edge = keypoint_prototypes(feats, kp, vis3, background, image_size=size)[1]
    torch.testing.assert_close(edge, ((f[0, :, 3, 0] + f[1, :, 3, 0] + f[2, :, 3, 3]) / 3).float(),
                               rtol=1e-6, atol=1e-7)


def test_keypoint_prototypes_refuse_what_gives_no_prototype():
    feats = torch.zeros(2, 3, 4, 4)
    kp = torch.full((2, 2, 2), 10.0)
    background = torch.ones(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"keypoint\(s\) \[1\] are visible in none"):
        keypoint_prototypes(feats, kp, torch.tensor([[True, False], [True, False]]), background, image_size=56)
    with pytest.raises(ValueError, match="no background patch"):
        keypoint_prototypes(feats, kp, torch.ones(2, 2, dtype=torch.bool), torch.zeros_like(background),
                            image_size=56)
    with pytest.raises(ValueError, match="do not match"):
        keypoint_prototypes(feats, kp[:1], torch.ones(1, 2, dtype=torch.bool), background, image_size=56)


def test_nearest_prototype_maps_are_the_softmax_of_minus_squared_distances():
    g = torch.Generator().manual_seed(1)
    feats, protos = torch.randn(2, 6, 3, 3, generator=g), torch.randn(4, 6, generator=g)
    maps = nearest_prototype_maps(feats, protos)
    dist = ((feats.double().permute(0, 2, 3, 1)[..., None, :] - protos.double()) ** 2).sum(-1)  # (B, H, W, K)
    reference = (-dist).softmax(-1).permute(0, 3, 1, 2)
    # logits of size ~|f|·|p| ≈ 10 in float32: absolute error ~1e-6 in each logit, so in each probability
    torch.testing.assert_close(maps.double(), reference, rtol=0, atol=2e-5)


def test_prototypes_of_keypoint_features_are_consistent_by_construction():
    """Features that are e_j under keypoint j and 0 elsewhere: each keypoint prototype's map peaks on its keypoint
    in every image, so every (class, prototype) unit is consistent."""
    b, parts, side, size = 6, 3, 8, 112
    g = torch.Generator().manual_seed(2)
    cells = torch.randint(0, side, (b, parts, 2), generator=g)  # (col, row) of each keypoint's patch
    kp = (cells.float() + 0.5) * (size / side)  # patch centres, input pixels
    feats = torch.zeros(b, parts, side, side)
    for i in range(b):
        for j in range(parts):
            feats[i, j, cells[i, j, 1], cells[i, j, 0]] = 1.0
    feats[:, 0] += 1e-3 * torch.rand(b, side, side, generator=g)  # no exact ties off the keypoints
    vis = torch.ones(b, parts, dtype=torch.bool)
    occupied = feats.sum(1) > 0.5
    protos = keypoint_prototypes(feats, kp, vis, ~occupied, image_size=size)
    torch.testing.assert_close(protos[:parts], torch.eye(parts), rtol=0, atol=2e-3)
    maps = nearest_prototype_maps(feats, protos)
    hits = keypoint_hits(maps[:, :-1], kp * 224 / size, vis, frame=224, half_size=36)
    assert bool(hits[:, torch.arange(parts), torch.arange(parts)].all())
    assert consistency_score(hits, vis, torch.tensor([0, 0, 0, 1, 1, 1])) == 100.0
