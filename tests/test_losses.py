"""Each loss on hand-made inputs whose value is known by construction."""
import math

import pytest
import torch
import torch.nn.functional as F

from ivpt.config import Config, ConfigError, LossConfig
from ivpt.engine.schedule import depends_on_total
from ivpt.losses import (
    bg_presence_loss,
    classification_loss,
    consistency_loss,
    entropy_loss,
    equivariance_loss,
    invert_affine,
    ivpt_losses,
    object_peak_loss,
    orthogonality_loss,
    parts_only_loss,
    presence_loss,
    random_affine,
    sample_by_gather,
    tv_loss,
    warp,
)

from .conftest import tiny_model


def _softmaps(b=2, n=4, h=8, w=8, seed=0):
    return torch.randn(b, n, h, w, generator=torch.Generator().manual_seed(seed)).softmax(1)


def test_classification_is_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(2)) / 2
    assert classification_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(expected, abs=1e-6)


def test_consistency_zero_for_identical_maps_and_kl_otherwise():
    t = _softmaps()
    assert consistency_loss(t, [t.clone(), t.clone()]).item() == pytest.approx(0.0, abs=1e-6)
    m = _softmaps(seed=1)
    kl = (t * (t.log() - m.log())).sum(1).mean()
    assert consistency_loss(t, [m]).item() == pytest.approx(kl.item(), rel=1e-4)
    assert consistency_loss(t, [t, m]).item() == pytest.approx(kl.item() / 2, rel=1e-4)


def test_orthogonality():
    eye = torch.eye(6)[:, :3].expand(2, 6, 3) * 5  # orthogonal columns of any length
    assert orthogonality_loss(eye).item() == pytest.approx(0.0, abs=1e-7)
    same = torch.ones(1, 4, 3)  # three identical columns: off-diagonal Gram = 1 → 6 ones over 9 entries
    assert orthogonality_loss(same).item() == pytest.approx(6 / 9, abs=1e-6)


def test_tv_and_entropy_known_values():
    const = torch.full((2, 3, 5, 5), 1 / 3)
    assert tv_loss(const).item() == 0.0
    assert entropy_loss(const).item() == pytest.approx(math.log(3), abs=1e-5)
    onehot = F.one_hot(torch.randint(0, 3, (2, 5, 5)), 3).permute(0, 3, 1, 2).float()
    assert entropy_loss(onehot).item() == pytest.approx(0.0, abs=1e-4)
    # a vertical edge: channel 0 is 1 on the left half, channel 1 on the right half
    edge = torch.zeros(1, 2, 4, 4)
    edge[0, 0, :, :2] = 1
    edge[0, 1, :, 2:] = 1
    # 4 rows × 1 jump × 2 channels = 8, divided by B·H·W = 16
    assert tv_loss(edge).item() == pytest.approx(0.5)


def test_presence_and_background_presence():
    maps = torch.zeros(2, 3, 6, 6)
    maps[:, 2] = 1.0  # all background
    maps[0, 0, 1:4, 1:4], maps[0, 2, 1:4, 1:4] = 1.0, 0.0  # concept 0 fills a 3×3 block in image 0
    # concept 0's 3×3 average peaks at 1, concept 1 never shows up: 1 - (1 + 0) / 2
    assert presence_loss(maps).item() == pytest.approx(0.5)
    # image 1: background everywhere → pooled 1 at a corner where the radial weight is 1 → -log 1 = 0.
    # image 0: the block (rows/cols 1-3) leaves the best corner window (rows/cols 3-5) with 8/9 background.
    assert bg_presence_loss(maps).item() == pytest.approx(-math.log(8 / 9) / 2, abs=1e-6)
    assert bg_presence_loss(maps[1:]).item() == pytest.approx(0.0, abs=1e-6)
    centre_only = torch.zeros(1, 2, 5, 5)
    centre_only[:, 0] = 1
    centre_only[0, 0, 2, 2], centre_only[0, 1, 2, 2] = 0, 1  # background only at the centre pixel
    # every 3×3 window of the 5×5 map holds the centre once → pooled 1/9 at the weight-1 corners → log 9
    assert bg_presence_loss(centre_only).item() == pytest.approx(math.log(9), abs=1e-5)


def test_equivariance_zero_for_identity_and_equivariant_maps():
    maps = _softmaps(n=3, h=16, w=16)
    identity = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]).expand(2, 2, 3)
    assert equivariance_loss(maps, maps, identity).item() == pytest.approx(0.0, abs=1e-6)
    # a 90° rotation is exact on the pixel grid: warping the maps themselves gives perfectly equivariant maps
    rot = torch.tensor([[[0.0, -1, 0], [1, 0, 0]]]).expand(2, 2, 3)
    assert equivariance_loss(maps, warp(maps, rot), rot).item() == pytest.approx(0.0, abs=1e-5)
    assert equivariance_loss(maps, maps, rot).item() > 0.01


def test_random_affine_ranges_and_inverse():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        theta = random_affine(3, generator=g)
        a = theta[0, :, :2]
        scale = 1 / torch.linalg.det(a).sqrt()
        assert 0.8 - 1e-5 <= scale <= 1.4 + 1e-5
        assert theta[0, :, 2].abs().max() <= 0.22 + 1e-6
        composed = invert_affine(theta)[:, :, :2] @ a
        assert torch.allclose(composed, torch.eye(2).expand(3, 2, 2), atol=1e-5)


def test_combiner_weights_and_terms():
    model = tiny_model().train()
    x, y = torch.randn(2, 3, 56, 56), torch.tensor([1, 2])
    theta = random_affine(2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out, warped = model(x), model(warp(x, theta))
    total, terms = ivpt_losses(out, y, LossConfig(), warped_out=warped, theta=theta)
    assert set(terms) == {"classification", "consistency", "orthogonality", "equivariance", "presence",
                          "bg_presence", "tv", "entropy"}
    assert total.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-5)
    weighted, terms2 = ivpt_losses(out, y, LossConfig(tv=2.0, entropy=0.0), warped_out=warped, theta=theta)
    assert "entropy" not in terms2
    expected = total - terms["entropy"] + terms["tv"]
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)


def test_object_peak_is_the_background_probability_where_each_absent_concept_lies():
    """Known answers: concepts that win pixels cost 0 wherever their maps lie; an absent concept costs the
    background probability where its map lies, averaged over all images × foreground concepts; random maps match a
    float64 recomputation; through the logits, the gradient reaches the absent concepts' logits and the background's
    only, with opposite signs."""
    maps = torch.zeros(1, 4, 2, 2)
    maps[0, 3] = torch.tensor([[0.9, 0.6], [0.0, 0.0]])  # background: wins the top row
    maps[0, 0] = torch.tensor([[0.1, 0.0], [1.0, 0.0]])  # wins (1, 0): costs 0 although part of it lies on (0, 0)
    maps[0, 1] = torch.tensor([[0.0, 0.0], [0.0, 0.7]])  # wins (1, 1)
    maps[0, 2] = torch.tensor([[0.0, 0.4], [0.0, 0.3]])  # wins nothing: q = (0.4, 0.3) / 0.7 over bg (0.6, 0)
    assert object_peak_loss(maps).item() == pytest.approx((0.4 / 0.7 * 0.6) / 3, rel=1e-6)
    logits = torch.randn(3, 6, 5, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 4
    logits[0, :2] -= 30  # concepts 0 and 1 absent from image 0
    logits[1, 3] -= 12
    soft = logits.softmax(1)
    absent = torch.stack([(soft.argmax(1) == k).flatten(1).sum(1) == 0 for k in range(5)], dim=1)  # (3, 5)
    assert 0 < int(absent.sum()) < absent.numel()
    q = soft[:, :-1] / soft[:, :-1].sum(dim=(2, 3), keepdim=True)
    expected = ((q * soft[:, -1:]).sum(dim=(2, 3)) * absent).sum() / absent.numel()
    assert object_peak_loss(soft.float()).item() == pytest.approx(expected.item(), rel=1e-6)  # float32, 35 terms
    # Through the logits: only the absent concepts' own logits and the background's move, against each other.
    z = logits.float().requires_grad_(True)
    object_peak_loss(z.softmax(1)).backward()
    moved = z.grad.flatten(2).abs().amax(2)  # (3, 6)
    scale = float(moved.max())
    assert scale > 0
    for b in range(3):
        for k in range(5):
            assert (moved[b, k] > 1e-3 * scale) == bool(absent[b, k]), (b, k)  # rounding only elsewhere
        assert (moved[b, -1] > 1e-3 * scale) == bool(absent[b].any())
    assert torch.allclose(z.grad[:, :-1].sum(1), -z.grad[:, -1], atol=1e-4 * scale)  # a_k up where a_bg goes down
    # Through the model's floored maps (renormalise: + 1e-6): the isolation holds while the absent concept's
    # probability is well above the floor, and fails near it (the docstring's caveat).
    from ivpt.models.prototypes import renormalise

    for shift, isolated in ((-2.0, True), (-16.0, False)):
        a = torch.zeros(1, 4, 3, 3)
        a[0, 0] = 4.0  # concept 0 wins every pixel of the bottom rows
        a[0, 0, 0] = -4.0
        a[0, 3, 0] = 4.0  # the background wins the top row
        a[0, 1] = a[0, 2] = shift  # concepts 1 and 2 are absent
        a.requires_grad_(True)
        object_peak_loss(renormalise(a.softmax(1))).backward()
        reach = a.grad.flatten(2).abs().amax(2)[0]  # (4,)
        assert (reach[0] < 1e-2 * reach[1]) == isolated, (shift, reach)


def _object_peak_value(out, labels):
    return torch.stack([object_peak_loss(m) for m in out.maps]).mean()  # averaged over the stages


def _parts_only_value(out, labels):
    return parts_only_loss(out.part_logits, labels)


@pytest.mark.parametrize("term, value_of, global_part", [("object_peak", _object_peak_value, False),
                                                         ("parts_only", _parts_only_value, False),
                                                         ("parts_only", _parts_only_value, True)])
def test_an_optional_term_is_off_unless_weighted_and_adds_its_weight(term, value_of, global_part):
    model = tiny_model(global_part=global_part, global_share=0.25).train()
    x, y = torch.randn(2, 3, 56, 56), torch.tensor([1, 2])
    torch.manual_seed(0)
    out = model(x)
    base, terms = ivpt_losses(out, y, LossConfig())
    assert term not in terms  # weight 0 (the paper, the default): not computed
    weighted, terms2 = ivpt_losses(out, y, LossConfig(**{term: 0.5}))
    value = value_of(out, y)
    assert terms2[term].item() == pytest.approx(value.item(), rel=1e-6)
    assert weighted.item() == pytest.approx((base + 0.5 * value).item(), rel=1e-5)
    with pytest.raises(ConfigError, match=f"loss.{term}"):
        LossConfig(**{term: -1.0})


def test_parts_only_is_the_cross_entropy_of_the_mean_part_logits_in_float64():
    g = torch.Generator().manual_seed(3)
    part_logits, labels = torch.randn(4, 3, 5, generator=g) * 3, torch.tensor([0, 4, 2, 2])
    mean = part_logits.double().mean(dim=1)  # (4, 5)
    expected = (mean.logsumexp(dim=1) - mean[torch.arange(4), labels]).mean()
    assert parts_only_loss(part_logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    smooth = (mean.logsumexp(dim=1, keepdim=True) - mean)  # -log p, (4, 5)
    expected_smooth = (0.9 * smooth[torch.arange(4), labels] + 0.1 * smooth.mean(dim=1)).mean()
    assert parts_only_loss(part_logits, labels, label_smoothing=0.1).item() == pytest.approx(expected_smooth.item(),
                                                                                             rel=1e-6)


@pytest.mark.parametrize("global_part", [False, True])
def test_without_the_global_part_the_parts_only_term_repeats_the_classification(global_part):
    model = tiny_model(global_part=global_part, global_share=0.25).train()
    x, y = torch.randn(2, 3, 56, 56), torch.tensor([1, 2])
    torch.manual_seed(0)
    _, terms = ivpt_losses(model(x), y, LossConfig(parts_only=0.5))
    # the head without its global part scores the parts' mean: the term is then the classification term itself
    assert (terms["parts_only"].item() == pytest.approx(terms["classification"].item(), rel=1e-5)) != global_part


def test_the_parts_only_warmup_follows_the_total_only_when_the_term_is_on():
    run = Config.from_dict({"optim": {"schedule": "constant", "warmup": 0.0, "concept_lr_ramp": 0.0,
                                      "concept_lr_start": 1.0}, "loss": {"parts_only": 0.5}})
    assert depends_on_total(run) == []
    assert depends_on_total(run.with_overrides(["loss.parts_only_warmup=0.25"])) == ["loss.parts_only_warmup=0.25"]
    assert depends_on_total(run.with_overrides(["loss.parts_only_warmup=0.25", "loss.parts_only=0"])) == []  # off


@pytest.mark.parametrize("term", ["entropy", "parts_only"])
def test_a_warmup_ramps_only_its_own_weight(term):
    cfg = LossConfig(**{term: 0.5, f"{term}_warmup": 0.25, "tv": 2.0})
    # progress p = (step + 1) / total: the weight is 0.5 * min(1, p / 0.25)
    assert [cfg.weights(p)[term] for p in (0.05, 0.125, 0.25, 0.6, 1.0)] == pytest.approx(
        [0.1, 0.25, 0.5, 0.5, 0.5])
    for p in (0.05, 0.5, 1.0):
        assert {k: v for k, v in cfg.weights(p).items() if k != term} == {
            k: v for k, v in LossConfig(**{term: 0.5, "tv": 2.0}).weights().items() if k != term}
    assert LossConfig(**{term: 0.5}).weights(0.01)[term] == 0.5  # 0: the full weight from the first step
    model = tiny_model().train()
    x, y = torch.randn(2, 3, 56, 56), torch.tensor([1, 2])
    torch.manual_seed(0)
    out = model(x)
    warm = LossConfig(**{term: 1.0, f"{term}_warmup": 0.5})
    full, terms = ivpt_losses(out, y, warm)
    early, _ = ivpt_losses(out, y, warm, progress=0.1)  # the weight is 0.2
    assert early.item() == pytest.approx((full - 0.8 * terms[term]).item(), rel=1e-5)
    with pytest.raises(ConfigError, match=f"{term}_warmup"):
        LossConfig(**{f"{term}_warmup": 1.5})


@pytest.mark.parametrize("side", [8, 16, 37])
def test_tv_reference_grid_makes_one_shape_cost_the_same_at_any_grid(side):
    """A left/right split of a side×side grid: each of the 2 channels changes by 1 once per row, so the plain mean
    is 2·side / side² = 2/side; scaled to a 37 grid it is 2/37 at every side, and exactly the plain value at 37."""
    maps = torch.zeros(1, 2, side, side)
    maps[:, 0, :, : side // 2] = 1
    maps[:, 1, :, side // 2 :] = 1
    assert tv_loss(maps).item() == pytest.approx(2 / side, rel=1e-6)
    assert tv_loss(maps, reference_grid=37).item() == pytest.approx(2 / 37, rel=1e-6)


def test_tv_reference_grid_is_checked():
    from ivpt.config import ConfigError, LossConfig

    with pytest.raises(ConfigError, match=r"loss.tv_reference_grid=-1.0 must be >= 0"):
        LossConfig(tv_reference_grid=-1.0)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_sample_by_gather_is_grid_sample_with_its_gradient(mode):
    # float64, a rotation/scale/shift that sends taps across every border, plus points exactly on pixel centres,
    # on half pixels (nearest's ties, rounded to even) and outside the source.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([[0.9, -0.3, 0.2], [0.35, 1.1, -0.4]], dtype=torch.float64).expand(2, 2, 3)
    grid = F.affine_grid(theta, [2, 3, 7, 6], align_corners=False)
    centres = (torch.arange(9, dtype=torch.float64) * 2 + 1) / 9 - 1  # pixel centres of the width-9 source
    special = torch.stack([torch.cat([centres, centres[:4] + 1 / 9, torch.tensor([-1.5, 1.2, -1.0])]),
                           torch.linspace(-1.1, 1.1, 16, dtype=torch.float64)], dim=-1)
    grid = torch.cat([grid.flatten(1, 2), special.expand(2, -1, -1)], dim=1).unsqueeze(1)  # (2, 1, 58, 2)
    expected = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    got = sample_by_gather(x, grid, mode=mode)
    upstream = torch.randn_like(expected)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, x, upstream)[0], torch.autograd.grad(expected, x, upstream)[0],
                               rtol=1e-12, atol=1e-12)


def test_warp_samples_by_gather_under_deterministic_algorithms(monkeypatch):
    maps = torch.rand(2, 4, 8, 8, requires_grad=True)
    theta = torch.tensor([[1.0, 0.2, 0.1], [-0.2, 1.0, 0.0]]).expand(2, 2, 3)
    reference = warp(maps, theta)
    was = torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr(F, "grid_sample", lambda *a, **k: pytest.fail("grid_sample used under deterministic mode"))
    torch.use_deterministic_algorithms(True)
    try:
        torch.testing.assert_close(warp(maps, theta), reference, rtol=1e-5, atol=1e-6)
    finally:
        torch.use_deterministic_algorithms(was)


def test_only_a_paper_term_at_zero_lets_ddp_expect_unused_parameters():
    """DDP's find_unused_parameters: off for IVPT with the paper's terms on, whatever loss.object_peak is (every
    trained parameter then gets a gradient, checked on one step), on when a paper term is at 0."""
    from ivpt.config import Config
    from ivpt.engine.step import may_leave_parameters_unused

    model = tiny_model().train()
    x, y = torch.randn(2, 3, 56, 56), torch.tensor([1, 2])
    theta = random_affine(2, generator=torch.Generator().manual_seed(0))
    for peak in (0.0, 1.0):
        cfg = Config.from_dict({"loss": {"object_peak": peak}})
        assert not may_leave_parameters_unused(model, cfg)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        total, _ = ivpt_losses(model(x), y, cfg.loss, warped_out=model(warp(x, theta)), theta=theta)
        total.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert may_leave_parameters_unused(model, Config.from_dict({"loss": {"consistency": 0.0}}))
