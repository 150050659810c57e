"""Baselines (linear probe, VPT-shallow/deep, last-layer parts) on the tiny random ViT of conftest."""
import dataclasses

import pytest
import timm
import torch

from ivpt.config import Config, ConfigError, LossConfig, model_fields
from ivpt.engine.trainer import compute_loss
from ivpt.losses import ivpt_losses
from ivpt.models import IVPT, VPT, LastLayerParts, LinearProbe, VPTDeepProto, create_model, model_class

from .conftest import TINY, tiny_cfg, tiny_model

KINDS = ["linear", "vpt_shallow", "vpt_deep", "last_layer_parts", "vpt_deep_proto"]
B, C, D, H, R = 2, 7, 32, 4, 5  # batch, classes, width, grid side, prefix tokens (cls + 4 registers)
TOKENS = {"backbone.pos_embed", "backbone.cls_token", "backbone.reg_token"}


def build(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_model(tiny_cfg(**{"kind": kind, "num_prompts": 3, **overrides}))


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", KINDS)
def test_builds_and_output_shapes(kind):
    model = build(kind).eval()
    with torch.no_grad():
        out = model(torch.randn(B, 3, 56, 56))
    assert out.logits.shape == (B, C)
    assert out.tokens.shape == (B, R + H * H, D)  # prompts excluded
    if kind in ("last_layer_parts", "vpt_deep_proto"):
        n = 3  # n_pro[-1] of tiny_cfg
        assert isinstance(model, LastLayerParts if kind == "last_layer_parts" else VPTDeepProto)
        assert out.part_logits.shape == (B, n - 1, C)
        assert torch.allclose(out.part_logits.mean(1), out.logits)
        assert [tuple(s.shape) for s in out.maps] == [(B, n, H, H)]
        assert torch.allclose(out.maps[0].sum(1), torch.ones(B, H, H), atol=1e-5)
        assert [tuple(c.shape) for c in out.region_counts] == [(B, n)]
        assert out.modulated.shape == (B, D, n)
        assert out.grouped_maps == [] and out.assignments == []
    else:
        assert torch.equal(out.part_logits, out.logits[:, None])
        assert out.grouped_maps == out.assignments == out.region_counts == []
        assert out.modulated is None
        if kind == "linear":
            assert out.maps == []
        else:  # VPT: one attention part map in eval mode (P = 3 prompts + background), none in training
            assert [tuple(m.shape) for m in out.maps] == [(B, 4, H, H)]
            assert torch.allclose(out.maps[0].sum(1), torch.ones(B, H, H), atol=1e-6)
            assert model.train()(torch.randn(B, 3, 56, 56)).maps == []


def test_attention_part_maps_on_a_constructed_block():
    """One head, identity q/k projections: query i (5·e_i) attends to itself and to patch i (5·e_i) alike and to
    nothing else, so patch i belongs to prompt i and the two other patches to the background."""
    import math

    from timm.models.vision_transformer import Block

    from ivpt.models.baselines import attention_part_maps

    dim = 8
    block = Block(dim, num_heads=1, qkv_bias=False)
    block.norm1 = torch.nn.Identity()
    with torch.no_grad():
        block.attn.qkv.weight.copy_(torch.cat([torch.eye(dim)] * 3))
    e = torch.eye(dim) * 5.0
    tokens = torch.stack([torch.zeros(dim), e[0], e[1], e[0], e[1], e[2], e[3]])[None]  # prefix, 2 prompts, 4 patches
    maps = attention_part_maps(block, tokens, slice(1, 3), slice(3, None), (2, 2))
    assert maps.shape == (1, 3, 2, 2)
    flat = maps.flatten(2)[0]  # (channels, patches)
    assert flat.argmax(0).tolist() == [0, 1, 2, 2]
    r = math.exp(-25.0 / math.sqrt(dim))  # attention to an orthogonal patch relative to the matching one
    # patch 0: prompt 0 scores 1, prompt 1 scores r, background 1 - 1 = 0; patch 2: r, r and 1 - r.
    torch.testing.assert_close(flat[:, 0].double(), torch.tensor([1, r, 0.0], dtype=torch.float64) / (1 + r))
    torch.testing.assert_close(flat[:, 2].double(), torch.tensor([r, r, 1 - r], dtype=torch.float64) / (1 + r))


@pytest.mark.parametrize("train_tokens", [True, False])
def test_exact_trainable_sets(train_tokens):
    tokens = TOKENS if train_tokens else set()
    expected = {
        "linear": {"classifier.weight", "classifier.bias"},  # a probe: tokens frozen whatever the switch says
        "vpt_shallow": {"prompts", "classifier.weight", "classifier.bias"} | tokens,
        "vpt_deep": {"prompts", "classifier.weight", "classifier.bias"} | tokens,
        "last_layer_parts": {"stages.0.prototypes", "stages.0.spatial_bias", "modulation.weight",
                             "modulation.bias", "classifier.weight"} | tokens,
        "vpt_deep_proto": {"prompts", "stages.0.prototypes", "stages.0.spatial_bias", "modulation.weight",
                           "modulation.bias", "classifier.weight"} | tokens,
    }
    for kind, names in expected.items():
        model = build(kind, train_tokens=train_tokens)
        assert trainable(model) == names, kind
        groups = model.param_groups(1e-6, 1e4, 200.0)
        in_groups = {id(p) for g in groups for p in g["params"]}
        assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}, kind
        lr = {g["name"]: g["lr"] for g in groups}
        assert lr["classifier"] == pytest.approx(1e-2)
        for name in ("prompts", "tokens", "prototypes", "spatial_bias"):
            if name in lr:
                assert lr[name] == pytest.approx(2e-4), (kind, name)
    assert build("vpt_shallow").prompts.shape == (1, 3, D)
    assert build("vpt_deep").prompts.shape == (4, 3, D)  # one prompt set per block


def test_vpt_prompt_init_is_vpt_uniform():
    bound = (6.0 / (3 * 14 * 14 + D)) ** 0.5
    p = build("vpt_deep").prompts
    assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound


def test_prompt_free_paths_reproduce_timm_forward_features():
    linear, shallow, deep = build("linear").eval(), build("vpt_shallow").eval(), build("vpt_deep").eval()
    reference = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=56,
                                  **TINY).eval()
    reference.load_state_dict(linear.backbone.state_dict())
    for m in (shallow, deep):
        m.backbone.load_state_dict(linear.backbone.state_dict())
    x = torch.randn(B, 3, 56, 56)
    with torch.no_grad():
        theirs = reference.forward_features(x)
        assert torch.equal(linear(x).tokens, theirs)
        assert torch.equal(shallow(x, insert_prompts=False).tokens, theirs)
        assert torch.equal(deep(x, insert_prompts=False).tokens, theirs)
        # the linear probe scores exactly the cls token of those features
        assert torch.allclose(linear(x).logits, linear.classifier(theirs[:, 0]), atol=1e-6)
        # and the prompts really change the path
        assert not torch.allclose(shallow(x).tokens, theirs, atol=1e-4)
        assert not torch.allclose(deep(x).tokens, theirs, atol=1e-4)


def test_vpt_deep_drops_previous_prompt_outputs():
    """Deep VPT by hand: each block sees [prefix | its own prompts | patches]; prompt outputs are discarded."""
    model = build("vpt_deep").eval()
    x = torch.randn(B, 3, 56, 56)
    with torch.no_grad():
        tokens, _ = model.embed(x)
        for i, blk in enumerate(model.backbone.blocks):
            p = model.prompts[i].expand(B, -1, -1)
            out = blk(torch.cat([tokens[:, :R], p, tokens[:, R:]], dim=1))
            tokens = torch.cat([out[:, :R], out[:, R + 3 :]], dim=1)
        assert torch.allclose(model(x).tokens, model.backbone.norm(tokens), atol=1e-6)


def test_mean_patch_token_without_cls_token():
    cfg = tiny_cfg(kind="linear", backbone="vit_small_patch14_dinov2",
                   backbone_kwargs=dict(TINY, class_token=False, global_pool="avg"))
    model = create_model(cfg).eval()
    assert model.num_prefix == 0
    x = torch.randn(B, 3, 56, 56)
    with torch.no_grad():
        out = model(x)
        assert torch.allclose(out.logits, model.classifier(out.tokens.mean(1)), atol=1e-6)


def test_last_layer_parts_equals_ivpt_final_stage_without_prompts():
    """Guard against drift from IVPT's head: same weights → bit-identical maps, parts and logits."""
    ivpt = tiny_model(n_pro=[5, 4, 3]).eval()
    parts = build("last_layer_parts", n_pro=[5, 4, 3]).eval()
    parts.backbone.load_state_dict(ivpt.backbone.state_dict())
    parts.stages[0].load_state_dict(ivpt.stages[-1].state_dict())
    parts.modulation.load_state_dict(ivpt.modulation.state_dict())
    parts.classifier.load_state_dict(ivpt.classifier.state_dict())
    with torch.no_grad():
        for p in (parts.stages[0].spatial_bias, parts.modulation.weight):
            p.normal_()
        ivpt.stages[-1].spatial_bias.copy_(parts.stages[0].spatial_bias)
        ivpt.modulation.weight.copy_(parts.modulation.weight)
        x = torch.randn(B, 3, 56, 56)
        a, b = ivpt(x, insert_prompts=False), parts(x)
    assert torch.equal(a.maps[-1], b.maps[0])
    assert torch.equal(a.modulated, b.modulated)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.region_counts[-1], b.region_counts[0])


@pytest.mark.parametrize("kind", ["vpt_shallow", "vpt_deep"])
def test_gradient_reaches_prompts_and_tokens(kind):
    model = build(kind).train()
    out = model(torch.randn(B, 3, 56, 56))
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([1, 2])).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {"prompts", "classifier.weight", "classifier.bias"} | TOKENS
    if kind == "vpt_deep":
        assert (model.prompts.grad.flatten(1).abs().sum(1) > 0).all()  # every block's prompts learn


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, kind):
    model = build(kind).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ckpt")
    torch.manual_seed(123)  # the caller's RNG does not matter: 'random' is timm's init under a fixed seed
    loaded = type(model).from_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    loaded.eval()
    x = torch.randn(B, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


@pytest.mark.parametrize("kind", KINDS)
def test_ivpt_losses_terms(kind):
    model = build(kind).train()
    x, y = torch.randn(B, 3, 56, 56), torch.tensor([0, 6])
    total, terms = ivpt_losses(model(x), y, LossConfig())
    if kind in ("last_layer_parts", "vpt_deep_proto"):
        assert set(terms) == {"classification", "orthogonality", "presence", "bg_presence", "tv", "entropy"}
    else:
        assert set(terms) == {"classification"}
    assert torch.isfinite(total)
    total.backward()


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_loss_path(kind):
    """The trainer's own forward (two views for last_layer_parts) + losses + backward work for every kind."""
    cfg = Config(model=tiny_cfg(kind=kind, num_prompts=3))
    torch.manual_seed(0)
    model = create_model(cfg.model).train()
    x, y = torch.randn(B, 3, 56, 56), torch.tensor([0, 6])
    total, terms = compute_loss(model, x, y, cfg, torch.Generator().manual_seed(0))
    assert ("equivariance" in terms) == (kind in ("last_layer_parts", "vpt_deep_proto"))
    total.backward()
    groups = model.param_groups(cfg.optim.base_lr, cfg.optim.head_lr_mult, cfg.optim.concept_lr_mult)
    optimizer = torch.optim.Adam(groups)
    before = [p.detach().clone() for g in groups for p in g["params"]]
    optimizer.step()
    after = [p for g in groups for p in g["params"]]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_registry_builds_each_kind():
    assert isinstance(build("linear"), LinearProbe)
    assert isinstance(build("vpt_deep"), VPT) and build("vpt_deep").deep
    assert not build("vpt_shallow").deep
    assert not isinstance(build("last_layer_parts"), IVPT) and isinstance(build("last_layer_parts"), LastLayerParts)
    with pytest.raises(ConfigError, match="unknown"):
        model_class("vpt_medium")


_OTHER_VALUE = {"deep_prompts": True, "gumbel_tau": 2.0, "train_gumbel": False, "eval_gumbel": True,
                "global_part": True, "global_share": 0.5, "global_share_end": 0.1, "prototype_init_std": 0.3,
                "prototype_init": "feature_mean", "num_prompts": 5, "train_tokens": False, "n_pro": [6, 4, 3],
                "prototype_init_spread": 0.5}


@pytest.mark.parametrize("kind", ["ivpt", *KINDS])
def test_fields_a_kind_does_not_read_build_the_same_model(kind):
    """Every model field a kind does not read — one its config class does not hold (accepted and ignored: the
    config is the same) or one its values make unread (global_share without global_part, IVPT's num_prompts without
    deep_prompts) — changes nothing it builds or computes: the same parameters (values and trainability) and, in
    training and eval mode, the same outputs."""
    cfg = tiny_cfg(kind=kind)
    unread = set(model_fields()) - cfg.reads()
    assert unread <= set(_OTHER_VALUE)
    assert (kind == "ivpt") == ("deep_prompts" not in unread)
    assert "global_share" in unread and ("num_prompts" in unread) == (kind in ("ivpt", "linear", "last_layer_parts"))
    held = {f.name for f in dataclasses.fields(cfg)}
    x = torch.randn(B, 3, 56, 56)
    for name in sorted(unread):
        a, b = build(kind), build(kind, **{name: _OTHER_VALUE[name]})
        if name in held:
            assert getattr(a.cfg, name) != getattr(b.cfg, name)
        else:
            assert a.cfg == b.cfg and not hasattr(b.cfg, name), name
        assert a.state_dict().keys() == b.state_dict().keys(), name
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items()), name
        assert trainable(a) == trainable(b), name
        for train_mode in (True, False):
            a.train(train_mode), b.train(train_mode)
            with torch.no_grad():
                torch.manual_seed(1)
                out_a = a(x)
                torch.manual_seed(1)
                out_b = b(x)
            assert torch.equal(out_a.logits, out_b.logits), name
            assert all(torch.equal(p, q) for p, q in zip(out_a.maps, out_b.maps)), name
