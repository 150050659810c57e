"""Prompt-CAM (``model.kind=prompt_cam``) on the tiny random ViT of conftest: the trait maps on constructed cases
with known answers, the class score against a float64 re-computation of the whole network written out here, the
trainable set, saving and loading, and ``ivpt train`` / ``ivpt eval`` end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from timm.models.vision_transformer import Block
from torch.nn import functional as F

from ivpt.cli import main
from ivpt.config import Config
from ivpt.data.synth import make_partworld
from ivpt.engine.trainer import compute_loss
from ivpt.models import PromptCAM, create_model
from ivpt.models.prompt_cam import prompt_attention, trait_part_maps

from .conftest import TINY, tiny_cfg

B, C, D, H, R, K, DEPTH = 2, 7, 32, 4, 5, 2, 4  # batch, classes, width, grid side, prefix, heads, blocks


def build(seed: int = 0, **overrides) -> PromptCAM:
    torch.manual_seed(seed)
    return create_model(tiny_cfg(kind="prompt_cam", **overrides))


def perturbed(seed: int = 0, **overrides) -> PromptCAM:
    """A model whose trained parameters are away from their initialisation (a zero-like scorer hides mistakes)."""
    model = build(seed, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------------ constructed cases
def test_trait_part_maps_of_a_constructed_attention():
    """Two heads over four patches: each head's map over its peak, background 1 − the larger, per-patch sums 1."""
    attention = torch.tensor([[[0.4, 0.1, 0.1, 0.0], [0.1, 0.3, 0.0, 0.0]]])  # (B=1, K=2, L=4)
    maps = trait_part_maps(attention, (2, 2))
    assert maps.shape == (1, 3, 2, 2)
    flat = maps.flatten(2)[0]  # (K+1, L)
    # peaks: head 0 [1, .25, .25, 0], head 1 [1/3, 1, 0, 0]; background [0, 0, .75, 1]
    expected = torch.tensor([[3 / 4, 1 / 5, 1 / 4, 0.0], [1 / 4, 4 / 5, 0.0, 0.0], [0.0, 0.0, 3 / 4, 1.0]])
    torch.testing.assert_close(flat, expected)
    assert flat.argmax(0).tolist() == [0, 1, 2, 2]


def test_prompt_attention_of_a_constructed_block():
    """Two heads of width 2, identity query/key maps: class prompt 0 (3·e0) matches itself and patch 0 in head 0 and
    sees only zeros in head 1 (uniform attention); class prompt 1 (3·e2) matches itself and patch 2 in head 1."""
    block = Block(4, num_heads=2, qkv_bias=False)
    block.norm1 = torch.nn.Identity()
    with torch.no_grad():
        block.attn.qkv.weight.copy_(torch.cat([torch.eye(4)] * 3))
    e = 3.0 * torch.eye(4)
    tokens = torch.stack([e[0], e[2], torch.zeros(4), e[0], e[1], e[2], e[3]])[None]  # 2 prompts, cls, 4 patches
    attention = prompt_attention(block, tokens, torch.tensor([[0, 1]]), slice(3, None))
    assert attention.shape == (1, 2, 2, 4)  # (B, Q, K, L)
    s = math.exp(9.0 / math.sqrt(2.0))  # exp(q·k · scale) of a matching pair
    match = [s / (2 * s + 5), 1 / (2 * s + 5)]  # a matching key, any other key (two matches among 7 keys)
    uniform = 1 / 7
    expected = torch.tensor([[[match[0], match[1], match[1], match[1]], [uniform] * 4],
                             [[uniform] * 4, [match[1], match[1], match[0], match[1]]]]).double()
    torch.testing.assert_close(attention[0].double(), expected)


def test_prompt_attention_is_the_blocks_own_attention():
    """On the tiny ViT's last block: the attention timm computes (unfused path, read at its attention dropout)."""
    model = perturbed().eval()
    x = torch.randn(B, 3, 56, 56)
    with torch.no_grad():
        last_input, _, _ = model.trunk(x)
    block = model.backbone.blocks[-1]
    seen = []
    block.attn.fused_attn = False
    handle = block.attn.attn_drop.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        with torch.no_grad():
            block(last_input)
    finally:
        handle.remove()
    rows = torch.tensor([[3, 0], [6, 6]])
    ours = prompt_attention(block, last_input, rows, slice(C + R, None))  # (B, Q, K, L)
    theirs = seen[0][:, :, :, C + R :]  # (B, K, T', L)
    for b in range(B):
        torch.testing.assert_close(ours[b], theirs[b][:, rows[b]].transpose(0, 1), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- the model against float64
def _layer_norm(x, norm):
    return F.layer_norm(x, x.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)


def _linear(x, layer):
    return F.linear(x, layer.weight.double(), None if layer.bias is None else layer.bias.double())


def _block64(block, x):
    """One pre-norm timm ViT block (LayerScale, exact GELU) written out in float64."""
    a = block.attn
    qkv = _linear(_layer_norm(x, block.norm1), a.qkv).unflatten(-1, (3, a.num_heads, a.head_dim))
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, K, T, hd)
    weights = ((q @ k.transpose(-2, -1)) * a.head_dim ** -0.5).softmax(dim=-1)
    x = x + block.ls1.gamma.double() * _linear((weights @ v).transpose(1, 2).flatten(2), a.proj)
    hidden = F.gelu(_linear(_layer_norm(x, block.norm2), block.mlp.fc1))
    return x + block.ls2.gamma.double() * _linear(hidden, block.mlp.fc2), weights


def _prompt_cam64(model, x, *, deep: bool = True):
    """Logits (B, C) and the last block's attention (B, K, T', T') of Prompt-CAM in float64 from the raw weights:
    patches + position embedding, then [cls | registers | patches] (DINOv2-reg: no position for the prefix), the C
    class prompts before every block (``deep=False``: before the first only, their outputs carried on), the final
    norm, and the shared scorer on each class prompt."""
    bb = model.backbone
    pe = bb.patch_embed.proj
    patches = F.conv2d(x.double(), pe.weight.double(), pe.bias.double(), stride=pe.stride).flatten(2).transpose(1, 2)
    prefix = torch.cat([bb.cls_token, bb.reg_token], dim=1).double().expand(x.shape[0], -1, -1)
    tokens = torch.cat([prefix, patches + bb.pos_embed.double()], dim=1)
    prompts = model.prompts.double()
    for i, block in enumerate(bb.blocks):
        if deep or i == 0:
            tokens = torch.cat([prompts[i].expand(x.shape[0], -1, -1), tokens], dim=1)
        out, weights = _block64(block, tokens)
        tokens = out[:, C:] if deep else out
    z = _layer_norm(out[:, :C], bb.norm)
    return _linear(z, model.classifier).squeeze(-1), weights


def test_class_scores_and_trait_maps_equal_a_float64_recomputation():
    model = perturbed(1).eval()
    x = torch.randn(B, 3, 56, 56)
    with torch.no_grad():
        out = model(x)
        logits64, weights = _prompt_cam64(model, x)
        shallow64, _ = _prompt_cam64(model, x, deep=False)
    assert out.logits.dtype == torch.float32 and out.logits.shape == (B, C)
    # float32 through 4 blocks: relative error ~1e-6; the tolerance leaves two orders of magnitude
    torch.testing.assert_close(out.logits.double(), logits64, rtol=1e-4, atol=1e-5)
    # the recomputation tells the variants apart: carrying the first prompts on (shallow) is another model
    assert (shallow64 - logits64).abs().max() > 1e-2
    predicted = logits64.argmax(dim=-1)
    assert torch.equal(out.logits.argmax(dim=-1), predicted)
    attention = weights[torch.arange(B), :, predicted, C + R :]  # (B, K, L): the predicted prompt over patches
    torch.testing.assert_close(out.maps[0].double(), trait_part_maps(attention, (H, H)), rtol=1e-4, atol=1e-6)
    logits, classes, traits = model.trait_maps(x, [5])
    assert torch.equal(logits, out.logits) and classes.tolist() == [[int(p), 5] for p in predicted]
    torch.testing.assert_close(traits[:, 0].double(), attention.unflatten(-1, (H, H)), rtol=1e-4, atol=1e-7)
    chosen = weights[:, :, 5, C + R :].unflatten(-1, (H, H))
    torch.testing.assert_close(traits[:, 1].double(), chosen, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------- the model's API
def test_outputs_parameters_and_groups():
    model = build()
    assert model.prompts.shape == (DEPTH, C, D)  # every block owns one prompt per class
    bound = (6.0 / (3 * 14 * 14 + D)) ** 0.5  # VPT's uniform initialisation
    assert bound * 0.8 < model.prompts.abs().max() <= bound
    assert (model.classifier.in_features, model.classifier.out_features) == (D, 1)
    own = {"prompts", "classifier.weight", "classifier.bias"}
    tokens = {"backbone.pos_embed", "backbone.cls_token", "backbone.reg_token"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == own | tokens  # model.train_tokens: true
    frozen = build(train_tokens=False)  # the authors' trainable set
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == own
    assert {g["name"] for g in frozen.param_groups(1e-6, 1e4, 200.0)} == {"classifier", "prompts"}
    lr = {g["name"]: g["lr"] for g in model.param_groups(1e-6, 1e4, 200.0)}
    assert lr == pytest.approx({"classifier": 1e-2, "prompts": 2e-4, "tokens": 2e-4})
    assert model.map_stages() == [(0, K + 1)]

    x = torch.randn(B, 3, 56, 56)
    out = model.train()(x)
    assert out.logits.shape == (B, C) and torch.equal(out.part_logits, out.logits[:, None])
    assert out.tokens.shape == (B, R + H * H, D)  # prompts excluded
    assert out.maps == out.grouped_maps == out.assignments == out.region_counts == [] and out.modulated is None
    with torch.no_grad():
        maps = model.eval()(x).maps
    assert [tuple(m.shape) for m in maps] == [(B, K + 1, H, H)]
    torch.testing.assert_close(maps[0].sum(dim=1), torch.ones(B, H, H))


def test_training_reaches_every_prompt_and_the_scorer():
    cfg = Config(model=tiny_cfg(kind="prompt_cam"))
    torch.manual_seed(0)
    model = create_model(cfg.model).train()
    x, y = torch.randn(B, 3, 56, 56), torch.tensor([0, 6])
    total, terms = compute_loss(model, x, y, cfg, torch.Generator().manual_seed(0))
    assert set(terms) == {"classification"}
    torch.testing.assert_close(total, F.cross_entropy(model(x).logits, y))
    total.backward()
    assert (model.prompts.grad.flatten(2).abs().sum(-1) > 0).all()  # every block's prompt of every class learns
    assert model.classifier.weight.grad.abs().sum() > 0 and model.classifier.bias.grad.abs() > 0
    assert all(p.grad is None for p in model.backbone.parameters() if not p.requires_grad)


def test_save_load_gives_bit_identical_outputs(tmp_path):
    model = perturbed(2).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert set(load_file(str(tmp_path / "ckpt" / "model.safetensors"))) == {
        "prompts", "classifier.weight", "classifier.bias", "backbone.pos_embed", "backbone.cls_token",
        "backbone.reg_token"}  # the trained parameters only (model.train_tokens: true)
    torch.manual_seed(123)  # the caller's RNG does not matter
    loaded = PromptCAM.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.cfg == model.cfg and type(loaded.cfg).__name__ == "PromptCAMConfig"
    x = torch.randn(B, 3, 56, 56)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.maps[0], b.maps[0])
    assert not torch.equal(build(2).eval()(x).logits, a.logits)  # the trained parameters were what got loaded


# -------------------------------------------------------------------------------------------- end to end
def test_train_and_eval_end_to_end(tmp_path, capsys):
    root = make_partworld(tmp_path / "world", classes=3, per_class=6, size=56, seed=0, test_fraction=0.34)
    config = {
        "model": dict(kind="prompt_cam", backbone="vit_small_patch14_reg4_dinov2", img_size=42, num_classes=3,
                      weights="random", backbone_kwargs=dict(TINY)),
        "optim": dict(epochs=3, min_steps=0, batch_size=4, amp="none", base_lr=1e-4),
        "data": dict(root=str(root), format="cub", num_workers=0, val_fraction=0.0),
        "train": dict(seed=0, log_every=1),
        "eval": dict(batch_size=4),
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(run), "--no-progress"]) == 0
    steps = json.loads((run / "metrics.json").read_text())["steps"]
    assert steps >= 3
    trained = PromptCAM.from_pretrained(run / "best")
    fresh = create_model(trained.cfg)
    assert not torch.equal(trained.prompts, fresh.prompts)
    assert not torch.equal(trained.classifier.weight, fresh.classifier.weight)

    capsys.readouterr()
    assert main(["eval", str(run / "best"), "--no-progress"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert set(result["skipped"]) == {"decision"}  # no part-pooled head; every part-map metric is scored
    for key in ("top1", "consistency", "stability", "nmi", "ari", "kpr"):
        assert math.isfinite(result[key]), key
    assert result["stage"]["n_pro"] == K + 1  # the trait maps of the 2 heads and the background
