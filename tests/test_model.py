import json

import pytest
import timm
import torch

from ivpt.checkpoint import CheckpointError
from ivpt.config import ConfigError, load_config
from ivpt.losses import (
    bg_presence_loss,
    classification_loss,
    consistency_loss,
    entropy_loss,
    equivariance_loss,
    orthogonality_loss,
    presence_loss,
    random_affine,
    tv_loss,
    warp,
)
from ivpt.models import IVPT, create_model

from .conftest import TINY, tiny_cfg, tiny_model


@pytest.mark.parametrize("backbone", ["vit_small_patch14_reg4_dinov2", "vit_small_patch14_dinov2"])
def test_backbone_path_reproduces_timm(backbone):
    model = tiny_model(backbone=backbone)
    reference = timm.create_model(backbone, pretrained=False, num_classes=0, img_size=56, **TINY)
    reference.load_state_dict(model.backbone.state_dict())
    model.eval(), reference.eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = model(x, insert_prompts=False).tokens
        theirs = reference.forward_features(x)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    # and the prompts really change the path
    with torch.no_grad():
        assert not torch.allclose(model(x).tokens, theirs, atol=1e-4)


@pytest.mark.parametrize("n_pro", [[17, 14, 11, 8, 5], [3, 2]])
def test_output_shapes_and_normalisation(n_pro):
    model = tiny_model(n_pro=n_pro).eval()
    B, C, D, H = 2, 7, 32, 4
    m, N = len(n_pro) - 1, n_pro[-1] - 1
    out = model(torch.randn(B, 3, 56, 56))
    assert out.logits.shape == (B, C)
    assert out.part_logits.shape == (B, N, C)
    assert torch.allclose(out.part_logits.mean(1), out.logits)
    assert [tuple(s.shape) for s in out.maps] == [(B, n, H, H) for n in n_pro]
    assert [tuple(s.shape) for s in out.grouped_maps] == [(B, N + 1, H, H)] * m
    assert [tuple(q.shape) for q in out.assignments] == [(B, n - 1, N) for n in n_pro[:-1]]
    assert [tuple(c.shape) for c in out.region_counts] == [(B, n) for n in n_pro]
    assert out.modulated.shape == (B, D, N + 1)
    assert out.tokens.shape == (B, 5 + H * H, D)
    for s in out.maps + out.grouped_maps:
        assert torch.allclose(s.sum(1), torch.ones(B, H, H), atol=1e-5)
    for q in out.assignments:
        assert torch.allclose(q.sum(-1), torch.ones_like(q[..., 0]), atol=1e-5)
    for c in out.region_counts:
        assert (c.sum(1) == H * H).all()


def test_other_image_size_resizes_spatial_bias(model):
    model.eval()
    with torch.no_grad():
        model.stages[0].spatial_bias.normal_()
        out = model(torch.randn(1, 3, 84, 84))
    assert out.maps[0].shape == (1, 5, 6, 6)
    assert model.stages[0].spatial_bias.shape == (5, 4, 4)


def test_eval_deterministic_and_training_samples_gumbel(model):
    x = torch.randn(2, 3, 56, 56)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.assignments[0], b.assignments[0])
    model.train()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert not torch.allclose(c.assignments[0], d.assignments[0])
    # the maps themselves carry no noise
    assert torch.allclose(c.maps[0], a.maps[0], atol=1e-6)


def _nonzero_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def _names(model, *, stages, attrs):
    return {f"stages.{i}.{a}" for i in stages for a in attrs}


def test_gradient_flow_matches_spec():
    model = tiny_model(n_pro=[5, 4, 3]).train()
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 56, 56), torch.tensor([0, 3, 6])
    tokens = {"backbone.pos_embed", "backbone.cls_token", "backbone.reg_token"}
    prompted, final = [0, 1], [2]
    protos = _names(model, stages=prompted + final, attrs=["prototypes", "spatial_bias"])
    assigners = _names(model, stages=prompted, attrs=["assigner.weight", "assigner.bias"])
    projections = _names(model, stages=prompted, attrs=["prompt_proj.weight", "prompt_proj.bias"])
    final_protos = _names(model, stages=final, attrs=["prototypes", "spatial_bias"])
    head = {"modulation.weight", "modulation.bias", "classifier.weight"}

    out = model(x)
    assert _nonzero_grads(model, classification_loss(out.logits, y)) == projections | final_protos | head | tokens
    out = model(x)
    assert _nonzero_grads(model, consistency_loss(out.maps[-1], out.grouped_maps)) == (
        _names(model, stages=prompted, attrs=["prototypes", "spatial_bias"]) | assigners
    )
    out = model(x)
    assert _nonzero_grads(model, orthogonality_loss(out.modulated)) == (
        projections | final_protos | {"modulation.weight", "modulation.bias"} | tokens
    )
    for fn in (presence_loss, bg_presence_loss, tv_loss, entropy_loss):
        out = model(x)
        assert _nonzero_grads(model, sum(fn(s) for s in out.maps)) == protos, fn.__name__
    theta = random_affine(3, generator=torch.Generator().manual_seed(0))
    out, warped = model(x), model(warp(x, theta))
    loss = sum(equivariance_loss(a, b, theta) for a, b in zip(out.maps, warped.maps))
    assert _nonzero_grads(model, loss) == protos


def test_frozen_tokens_switch():
    model = tiny_model(train_tokens=False)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("backbone.") for n in names)
    out = model(torch.randn(2, 3, 56, 56))
    assert _nonzero_grads(model, classification_loss(out.logits, torch.tensor([1, 2])))


def test_validation_errors():
    with pytest.raises(ConfigError, match="at least 2 stages"):
        tiny_cfg(n_pro=[5])
    with pytest.raises(ConfigError, match="at least 2 prototypes"):
        tiny_cfg(n_pro=[5, 1])
    with pytest.raises(ConfigError, match="only 4 blocks"):
        IVPT(tiny_cfg(n_pro=[9, 8, 7, 6, 5, 4]))
    with pytest.raises(ConfigError, match="no field 'n_pros'"):
        load_config(None, ["model.n_pros=3,2"])
    with pytest.raises(ConfigError, match="unknown key"):
        from ivpt.config import Config

        Config.from_dict({"model": {"n_prox": [3, 2]}})


def test_config_round_trip_and_overrides(tmp_path):
    cfg = load_config("configs/cub_vitb14_reg4_paper.yaml",
                      ["model.n_pro=9,7,5", "optim.amp=fp16", "train.tensorboard=true"])
    assert cfg.model.n_pro == [9, 7, 5] and cfg.optim.amp == "fp16" and cfg.train.tensorboard is True
    from ivpt.config import Config

    again = Config.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["optim"]["head_lr_mult"] == 1e4


def test_paper_config_parameter_count_and_learning_rates():
    cfg = load_config("configs/cub_vitb14_reg4_paper.yaml")
    model = create_model(cfg.model, weights="random")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3_708_719
    groups = {g["name"]: g for g in model.param_groups(cfg.optim.base_lr, cfg.optim.head_lr_mult,
                                                        cfg.optim.concept_lr_mult)}
    lr = {name: g["lr"] for name, g in groups.items()}
    for name in ("classifier", "modulation", "prompt_proj", "assigners"):
        assert lr[name] == pytest.approx(1e-2)
    for name in ("prototypes", "spatial_bias", "tokens"):
        assert lr[name] == pytest.approx(2e-4)
    assert {name: g["rate"] for name, g in groups.items()} == {  # which groups the concept-rate ramp follows
        "classifier": "head", "modulation": "head", "prompt_proj": "head", "assigners": "head",
        "prototypes": "concept", "spatial_bias": "concept", "tokens": "concept"}
    count = {name: sum(p.numel() for p in g["params"]) for name, g in groups.items()}
    assert count == {
        "classifier": 153_600, "modulation": 7_680, "prompt_proj": 2_362_368, "assigners": 12_304,
        "prototypes": 42_240, "spatial_bias": 75_295, "tokens": 1_051_392 + 768 + 3_072,
    }


def test_save_load_round_trip(tmp_path, model):
    model.eval()
    with torch.no_grad():
        for s in model.stages:
            s.spatial_bias.normal_()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    torch.manual_seed(123)  # the caller's RNG state must not matter: 'random' is timm's init under a fixed seed
    loaded = IVPT.from_pretrained(tmp_path / "ckpt")
    loaded.eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_other_backbone_weights_are_refused_unless_allowed(tmp_path, model):
    from safetensors.torch import save_file

    model.save_pretrained(tmp_path / "ckpt")
    other = tmp_path / "other.safetensors"
    save_file({k: v + 0.01 for k, v in model.backbone.state_dict().items()}, str(other))
    with pytest.raises(CheckpointError,
                       match=r"other backbone weights: .* from 'random' .*came from '.*other.safetensors'"):
        IVPT.from_pretrained(tmp_path / "ckpt", weights=str(other))
    with pytest.warns(UserWarning, match="mismatch was allowed"):
        loaded = IVPT.from_pretrained(tmp_path / "ckpt", weights=str(other), allow_backbone_mismatch=True)
    torch.testing.assert_close(loaded.stages[0].prototypes, model.stages[0].prototypes, rtol=0, atol=0)


def test_grouped_maps_stay_float32_under_autocast():
    model = tiny_model().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 56, 56))
    for grouped in out.grouped_maps:
        assert grouped.dtype == torch.float32
        torch.testing.assert_close(grouped.sum(1), torch.ones_like(grouped[:, 0]), rtol=0, atol=1e-6)


def test_wrong_shape_checkpoint_is_refused(tmp_path, model):
    model.save_pretrained(tmp_path / "ckpt")
    other = tiny_model(n_pro=[6, 4, 3])
    from ivpt.checkpoint import load_pretrained

    with pytest.raises(CheckpointError, match=r"stages.0.prototypes: checkpoint \(5, 32\) vs model \(6, 32\)"):
        load_pretrained(other, tmp_path / "ckpt")
    fewer = tiny_model(n_pro=[4, 3])
    with pytest.raises(CheckpointError, match="not in model: .*stages.2"):
        load_pretrained(fewer, tmp_path / "ckpt")


def test_maps_only_view_gives_the_same_gradients():
    """The equivariance view without backbone autograd must train exactly what the full two-view pass trains."""
    from ivpt.config import LossConfig
    from ivpt.engine.trainer import _split_output
    from ivpt.losses import ivpt_losses

    model = tiny_model(train_gumbel=False).train()
    x, y = torch.randn(2, 3, 56, 56), torch.tensor([1, 4])
    theta = random_affine(2, generator=torch.Generator().manual_seed(0))
    both = torch.cat([x, warp(x, theta)])
    grads = []
    for kwargs in ({}, {"maps_only_from": 2}):
        model.zero_grad(set_to_none=True)
        out, warped = _split_output(model(both, **kwargs), 2)
        total, _ = ivpt_losses(out, y, LossConfig(), warped_out=warped, theta=theta)
        total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("share, w_part, w_global", [(None, 1 / 3, 1 / 3), (0.5, 0.25, 0.5), (0.2, 0.4, 0.2)])
def test_global_part_adds_the_cls_score_to_the_part_scores(share, w_part, w_global):
    """model.global_part: logits = w_part·Σ_k part_logits_k + w_global·W·LN(cls) with N = 2 parts — one more part when
    global_share is None, else (1 - s)/N and s — recomputed in float64; the explanation's concept evidence plus its
    global evidence gives the logits back, and the global evidence is w_global times the global score; off, the
    logits are the part mean."""
    from ivpt.explain.core import explain

    model = tiny_model(global_part=True, global_share=share).eval()
    assert model.logit_weights() == pytest.approx((w_part, w_global))
    with torch.no_grad():
        model.global_norm.weight.uniform_(0.5, 1.5)
        model.global_norm.bias.normal_()
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        out = model(x)
        cls = out.tokens[:, 0].double()  # tokens are already final-normed
        ln = model.global_norm
        g = torch.nn.functional.layer_norm(cls, (cls.shape[-1],), ln.weight.double(), ln.bias.double(), ln.eps)
        global_logits = g @ model.classifier.weight.double().t()
        expected = w_part * out.part_logits.double().sum(1) + w_global * global_logits
    assert torch.allclose(out.logits.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    assert "global_norm" in {g["name"] for g in model.param_groups(1e-3, 1.0, 1.0)}

    e = explain(model, x)
    total = e.evidence.sum(1) + e.global_evidence
    assert abs(total - e.logits).max() <= 1e-5 * abs(e.logits).max()
    scale = 1e-5 * global_logits.abs().max().item()
    assert abs(e.global_evidence - w_global * global_logits.numpy()).max() <= scale

    plain = tiny_model().eval()
    assert plain.global_norm is None and plain.logit_weights() == (0.5, 0.0)
    with torch.no_grad():
        out = plain(x)
    assert torch.allclose(out.logits, out.part_logits.mean(1))
    assert not any(load_config(p).model.global_part for p in ("configs/cub_vitb14_reg4_paper.yaml",
                                                              "configs/cub_vitb14_reg4_paper_exact.yaml"))


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1, 1.5])
def test_global_share_outside_the_open_interval_is_refused(share):
    with pytest.raises(ConfigError, match="global_share"):
        tiny_cfg(global_part=True, global_share=share)


def test_a_moving_global_share_weighs_the_logits_as_a_constant_share_of_its_value():
    """model.global_share_end: follow_progress(p) sets the share to s0 + (s1 - s0)·p (p clipped to [0, 1]); the
    logits and logit_weights are then those of a constant share of that value (same seed, same weights); the share
    is a buffer, so it travels with the saved state. Without global_share_end there is no buffer and nothing
    moves; without global_part the field is unread."""
    x = torch.randn(2, 3, 56, 56)
    moving = tiny_model(global_part=True, global_share=0.5, global_share_end=0.1).eval()
    for progress, share in [(0.0, 0.5), (0.5, 0.3), (0.75, 0.2), (1.0, 0.1), (1.5, 0.1), (-1.0, 0.5)]:
        moving.follow_progress(progress)
        assert float(moving.global_share) == pytest.approx(share, rel=1e-6)
        assert moving.logit_weights() == pytest.approx(((1 - share) / 2, share), rel=1e-6)
    moving.follow_progress(0.5)
    still = tiny_model(global_part=True, global_share=0.3).eval()
    with torch.no_grad():
        a, b = moving(x).logits, still(x).logits
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
    assert "global_share" in moving.state_dict() and "global_share" not in still.state_dict()
    still.follow_progress(0.9)
    assert still.logit_weights() == pytest.approx((0.35, 0.3))
    nothing = tiny_model(global_part=True, global_share=None, global_share_end=0.2)  # starts at 1/(N+1) = 1/3
    assert float(nothing.global_share) == pytest.approx(1 / 3, rel=1e-6)
    assert "global_share_end" in tiny_cfg(global_part=False, global_share_end=0.2).inactive_fields()
    with pytest.raises(ConfigError, match="global_share_end"):
        tiny_cfg(global_part=True, global_share_end=1.0)


def test_checkpoints_from_before_global_part_load_with_the_parts_only_head(tmp_path, model):
    """config.json without model.global_part (written by an earlier ivpt) means the paper's head, whatever the
    default is now: the weights load strictly and the logits are unchanged."""
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    meta = json.loads(path.read_text())
    del meta["model"]["global_part"]
    path.write_text(json.dumps(meta))
    loaded = IVPT.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.global_norm is None
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_deep_prompts_give_every_block_its_own_vpt_deep_prompts(tmp_path):
    """model.deep_prompts: every block's input is [prefix | its own free prompts | ...] as in VPT-deep, with the
    concept prompts after the patches in the concept blocks; the tokens reaching the first concept stage are VPT-deep's
    after as many blocks, with the same prompts (VPT-deep's own code path); every block's prompts train at the concept
    rate and get gradients from the classification loss, survive save/load; ``insert_prompts=False`` is still the
    plain backbone."""
    import copy

    from ivpt.models.baselines import VPTDeep, prompted_trunk

    model = tiny_model(deep_prompts=True, num_prompts=3).eval()  # 4 blocks, n_pro [5, 4, 3]: 2 below the stages
    R, P, N, L = model.num_prefix, 3, model.cfg.num_coarse, 16
    assert model.first_prompted == 2 and model.prompts.shape == (4, P, 32)
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
             for blk in model.backbone.blocks]
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        _, _, feats, *_ = model.trunk(x)
    for h in hooks:
        h.remove()
    assert [t.shape[1] for t in seen] == [R + P + L] * 2 + [R + P + L + N] * 2
    for i, t in enumerate(seen):
        assert torch.equal(t[:, R : R + P], model.prompts[i].expand(2, -1, -1)), i
    with torch.no_grad():
        vpt = VPTDeep(tiny_cfg(kind="vpt_deep", num_prompts=3), copy.deepcopy(model.backbone)).eval()
        vpt.backbone.blocks = vpt.backbone.blocks[: model.first_prompted]
        vpt.prompts[: model.first_prompted].copy_(model.prompts[: model.first_prompted])
        reference, _, _ = prompted_trunk(vpt, x, deep=True)
        expected = model.backbone.norm(reference)[:, model.num_prefix :]
    assert torch.allclose(feats[0], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    with torch.no_grad():  # without prompts: far from it, and the plain path is unchanged
        _, _, plain, *_ = model.trunk(x, insert_prompts=False)
    assert not torch.allclose(plain[0], expected, atol=1e-3)

    groups = {g["name"]: g for g in model.param_groups(1e-3, 10.0, 0.5)}
    assert groups["prompts"]["params"] == [model.prompts] and groups["prompts"]["lr"] == 5e-4
    model.train()
    model.zero_grad()
    out = model(x)
    classification_loss(out.logits, torch.tensor([1, 2])).backward()
    assert (model.prompts.grad.abs().sum(dim=(1, 2)) > 0).all()  # every block's prompts, the concept blocks' too

    model.eval().save_pretrained(tmp_path / "ckpt")
    loaded = IVPT.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(loaded.prompts, model.prompts)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert tiny_model().prompts is None
    assert not any(load_config(p).model.deep_prompts for p in ("configs/cub_vitb14_reg4_paper.yaml",
                                                               "configs/cub_vitb14_reg4_paper_exact.yaml"))


@pytest.mark.parametrize("kind", ["ivpt", "last_layer_parts", "vpt_deep_proto"])
def test_centre_prototypes_shifts_each_stage_by_the_mean_feature_it_reads(kind):
    """model.prototype_init=feature_mean: stage i's prototypes move by the mean (float64 recomputation) of the
    features stage i reads once stages < i are centred; the batch split does not matter; the mode is kept."""
    import copy

    torch.manual_seed(0)
    model = create_model(tiny_cfg(kind=kind, num_prompts=3))
    before = [s.prototypes.detach().clone() for s in model.stages]
    reference = copy.deepcopy(model).eval()
    x = torch.randn(5, 3, 56, 56)
    model.train()
    model.centre_prototypes(x, batch_size=2)
    assert model.training
    with torch.no_grad():
        for i, stage in enumerate(reference.stages):
            mean = reference.concept_features(x)[i].double().mean(dim=(0, 1))
            stage.prototypes.add_(mean.float())
            shift = (model.stages[i].prototypes - before[i]).double()
            assert torch.allclose(shift, mean.expand_as(shift), rtol=1e-5, atol=1e-6 * mean.abs().max().item())
            assert torch.allclose(model.stages[i].prototypes, stage.prototypes, rtol=1e-6, atol=1e-6)
    assert len(model.stages) == (3 if kind == "ivpt" else 1)


@pytest.mark.parametrize("kind", ["ivpt", "last_layer_parts"])
def test_cluster_prototypes_start_every_stage_at_its_kmeans_partition(kind):
    """model.prototype_init=kmeans: stage i's prototypes are scikit-learn's k-means centres (k = n, the same seed)
    of the features stage i reads once stages < i are set; the background slot holds the cluster with the largest
    share of its patches on the grid's outer ring, the foreground the others by size; so each pixel's argmax at the
    start is its k-means cluster, relabelled. The mode is kept."""
    import copy

    from sklearn.cluster import KMeans

    from ivpt.models.base import _outer_ring

    torch.manual_seed(0)
    model = create_model(tiny_cfg(kind=kind, num_prompts=3))
    reference = copy.deepcopy(model).eval()
    x = torch.randn(6, 3, 56, 56)
    model.train()
    model.cluster_prototypes(x, seed=3, batch_size=4)
    assert model.training
    model.eval()
    ring = _outer_ring(model.grid).flatten()
    with torch.no_grad():
        for i, stage in enumerate(reference.stages):
            feats = reference.concept_features(x)[i]
            n_img, n_pix, dim = feats.shape
            n = stage.num_prototypes
            km = KMeans(n_clusters=n, n_init=4, random_state=3).fit(feats.reshape(-1, dim).numpy())
            labels = torch.from_numpy(km.labels_).long().view(n_img, n_pix)
            size = torch.bincount(labels.flatten(), minlength=n)
            share = torch.bincount(labels[:, ring].flatten(), minlength=n) / size.clamp_min(1)
            got = model.stages[i].prototypes.double()
            centres = torch.from_numpy(km.cluster_centers_).double()
            slot = torch.cdist(centres, got).argmin(dim=1)  # which prototype each centre became
            assert sorted(slot.tolist()) == list(range(n))
            assert torch.allclose(got[slot], centres, rtol=1e-5, atol=1e-5 * centres.abs().max().item())
            assert slot[share.argmax()] == n - 1  # the ring-heavy cluster is the background
            fg = [k for k in range(n) if slot[k] != n - 1]
            assert [size[k] for k in sorted(fg, key=lambda k: slot[k])] == sorted((size[k] for k in fg), reverse=True)
            maps = model.stages[i].maps(model.concept_features(x)[i], model.grid)  # (B, n, H, W)
            assert torch.equal(maps.flatten(2).argmax(dim=1), slot[labels])
            stage.prototypes.copy_(model.stages[i].prototypes)


def test_cluster_prototypes_spread_scales_the_centres_about_their_mean():
    """model.prototype_init_spread=s: stage i's prototypes are m + s·(c_k − m) for scikit-learn's k-means centres c_k
    of the features stage i reads (once stages < i are set; m their mean), one centre per slot, and the start's maps
    are softer than the centres' own."""
    from sklearn.cluster import KMeans

    from ivpt.models.prototypes import prototype_logits

    torch.manual_seed(0)
    model = create_model(tiny_cfg(kind="ivpt", num_prompts=3))
    x = torch.randn(6, 3, 56, 56)
    model.cluster_prototypes(x, seed=3, batch_size=4, spread=0.25)
    model.eval()
    with torch.no_grad():
        for stage, feats in zip(model.stages, model.concept_features(x), strict=True):
            n, dim = stage.num_prototypes, feats.shape[-1]
            centres = torch.from_numpy(KMeans(n_clusters=n, n_init=4, random_state=3)
                                       .fit(feats.reshape(-1, dim).numpy()).cluster_centers_).double()
            mean = centres.mean(dim=0, keepdim=True)
            want = mean + 0.25 * (centres - mean)
            got = stage.prototypes.double()
            slot = torch.cdist(want, got).argmin(dim=1)
            assert sorted(slot.tolist()) == list(range(n))
            assert torch.allclose(got[slot], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
            soft = stage.maps(feats, model.grid).amax(dim=1).mean()  # the spatial biases start at 0
            hard = prototype_logits(feats, centres.float(), model.grid).softmax(dim=1).amax(dim=1).mean()
            assert soft < hard


def test_centred_prototypes_undo_a_feature_component_shared_by_every_pixel():
    """Constructed case: features = a large vector shared by every pixel + small per-pixel parts. With prototypes
    drawn around the origin, the prototype most aligned with the shared vector wins every pixel; centred, every
    prototype wins some, and the maps are exactly those of the centred parts under the original prototypes."""
    from ivpt.models.prototypes import ConceptStage

    torch.manual_seed(0)
    stage = ConceptStage(5, 64, (6, 6), init_std=0.05)
    eps = stage.prototypes.detach().clone()
    shared = torch.randn(64) * 5
    parts = torch.randn(2, 36, 64)
    feats = shared + parts
    counts = stage.maps(feats, (6, 6)).flatten(2).argmax(1).flatten().bincount(minlength=5)
    assert counts.max() == 72  # one prototype takes all 2 x 36 pixels
    with torch.no_grad():
        stage.prototypes.add_(feats.mean(dim=(0, 1)))
        centred = stage.maps(feats, (6, 6))
        counts = centred.flatten(2).argmax(1).flatten().bincount(minlength=5)
        assert counts.min() > 0
        stage.prototypes.copy_(eps)
        expected = stage.maps(parts - parts.mean(dim=(0, 1)), (6, 6))
    # the centred logits cancel terms of size |f|·|π| in float32: allow a few ulps of that
    centre = feats.mean(dim=(0, 1))
    tol = 16 * torch.finfo(torch.float32).eps * feats.norm(dim=-1).max() * (eps + centre).norm(dim=-1).max()
    assert torch.allclose(centred, expected, atol=tol.item()), (centred - expected).abs().max()


def test_a_coarse_concept_that_no_fine_concept_feeds_gets_a_zero_feature_not_nan():
    """Q with exactly-zero columns (a confident assigner underflows the others: it stopped a run on hard16 at step
    727 with NaN tokens): that coarse concept's pooled feature is zero before the joint LayerNorm, recomputed in
    float64; a whole model with such an assigner stays finite, in training (Gumbel) and eval mode."""
    import torch.nn.functional as F

    from ivpt.models.prototypes import ConceptStage

    torch.manual_seed(0)
    stage = ConceptStage(5, 8, (2, 2), num_coarse=3)
    regions = torch.randn(2, 4, 8)
    q = torch.zeros(2, 4, 3)
    q[..., 0] = 1.0  # every fine concept to coarse concept 0: columns 1 and 2 are exactly zero
    with torch.no_grad():
        out = stage.prompts(regions, q)
    coarse = torch.zeros(2, 3, 8, dtype=torch.float64)
    coarse[:, 0] = regions.double().mean(dim=1)
    normed = F.layer_norm(coarse, coarse.shape[-2:])
    W, b = stage.prompt_proj.weight.double(), stage.prompt_proj.bias.double()
    expected = normed @ W.t() + b
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())

    model = tiny_model()
    with torch.no_grad():
        for s in model.stages[: model.cfg.num_stages]:
            s.assigner.bias.copy_(torch.tensor([1e4] + [0.0] * (s.assigner.bias.numel() - 1)))
    x = torch.randn(2, 3, 56, 56)
    for training in (True, False):
        model.train(training)
        o = model(x)
        assert torch.isfinite(o.logits).all() and all(torch.isfinite(m).all() for m in o.maps), training
