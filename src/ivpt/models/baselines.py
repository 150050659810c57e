"""Baselines on the same frozen backbone, trainer, losses and metrics as IVPT (``model.kind`` other than ivpt).

Every model here returns a :class:`~ivpt.models.ModelOutput`, so :func:`ivpt.engine.trainer.compute_loss`,
:func:`ivpt.losses.ivpt_losses` and the evaluator need no special case: a model without concept maps returns empty
``maps`` / ``grouped_maps`` / ``assignments`` / ``region_counts``, ``modulated=None`` and
``part_logits = logits[:, None]``, and ``ivpt_losses`` then computes only the terms that apply (classification).

- ``linear``: linear probe on the final-normed cls token of the frozen backbone (backbones without a cls token:
  the mean of the final-normed patch tokens). The probe is a probe: its config (:class:`~ivpt.config.ModelConfig`)
  has no ``train_tokens``, pos/cls/reg tokens stay frozen, so its features are exactly timm's ``forward_features``.
- ``vpt_shallow`` / ``vpt_deep``: Visual Prompt Tuning (Jia et al., ECCV 2022). ``model.num_prompts`` learned
  tokens are inserted after the prefix tokens (cls + registers) at the input (shallow), or before every block
  with each block owning its own prompts (deep: the previous block's prompt outputs are dropped and replaced).
  Classifier on the final-normed cls token. Prompts use VPT's initialisation, uniform(±sqrt(6 / (3·p_h·p_w + D)))
  — Xavier-uniform for a patch-embedding-like map from 3·p_h·p_w pixels to D. pos/cls/reg tokens train per
  ``model.train_tokens``, the same switch as IVPT, so "the paper's trainable set" compares like with like.
- ``last_layer_parts``: single-stage part discovery (the "prototypes at the last layer" ablation of the paper,
  with spatial bias): one :class:`~ivpt.models.prototypes.ConceptStage` with ``n_pro[-1]`` prototypes at the output of
  the last block, no prompts, then region pooling, modulation and a shared part classifier as in IVPT's final
  stage. Its map losses (presence, background, TV, entropy, orthogonality, equivariance) apply; consistency does
  not (no grouped maps).
- ``vpt_deep_proto``: the paper's "VPT-Deep with prototypes": VPT-deep's prompts, then the ``last_layer_parts``
  head on the last block's output, trained with the same part-discovery losses and classifying from part features.

Part maps for the interpretability protocols: concept models (``last_layer_parts``, ``vpt_deep_proto``) use their
concept map; VPT-shallow/deep, in eval mode only, the last block's attention from their prompt tokens to the
patches (heads averaged, each prompt's map divided by its maximum, background = 1 − the largest, normalised per
patch; :func:`attention_part_maps`), their one map stage (index 0). The linear probe has no part maps: it is
scored on accuracy only.

Learning rates (``param_groups``): classifiers and the modulation LayerNorm at the head rate; prompts, prototypes,
spatial biases and backbone tokens at the concept rate. VPT prompts live in the token-embedding space, like the
pos_embed / cls_token that the paper trains at the concept rate (2e-4 with Adam); the head rate (1e-2) would move a
prompt initialised at ±0.08 by its own scale in a few steps.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import ConceptConfig, ModelConfig, VPTConceptConfig, VPTConfig
from .base import ConceptModel, FrozenViT, ModelOutput
from .registry import register_model

__all__ = ["LinearProbe", "VPT", "VPTShallow", "VPTDeep", "LastLayerParts", "VPTDeepProto", "prompted_trunk",
           "attention_part_maps"]


def _new_classifier(model: FrozenViT) -> nn.Linear:
    """Linear(D, C) with bias, trunc-normal(0.02) weights and zero bias."""
    head = nn.Linear(model.dim, model.cfg.num_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


def _global_output(logits: Tensor, normed: Tensor) -> ModelOutput:
    """Output of a model without parts: logits (B, C), final-normed tokens (B, T, D)."""
    return ModelOutput(logits=logits, part_logits=logits[:, None], maps=[], grouped_maps=[], assignments=[],
                      region_counts=[], modulated=None, tokens=normed)


def prompted_trunk(model: FrozenViT, x: Tensor, *, deep: bool, insert_prompts: bool = True,
                   ) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """The backbone with ``model.prompts`` (L or 1, P, D) inserted after the prefix tokens before block 0 (and, when
    ``deep``, replacing the previous block's prompt outputs before every block).

    Returns (last block's output without prompts (B, T, D), the last block's input (B, T+P, D) — with prompts when
    inserted —, patch grid)."""
    with model.frozen_context():
        tokens, grid = model.embed(x)
    R, P = model.num_prefix, model.cfg.num_prompts
    prompted = False  # whether ``tokens`` currently holds P prompt tokens at [R, R+P)
    last_input = tokens
    for i, blk in enumerate(model.backbone.blocks):
        if insert_prompts and (i == 0 or deep):
            if prompted:  # deep: this block's prompts replace the previous block's prompt outputs
                tokens = torch.cat([tokens[:, :R], tokens[:, R + P :]], dim=1)
            prompts = model.prompts[i].to(tokens.dtype).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([tokens[:, :R], prompts, tokens[:, R:]], dim=1)
            prompted = True
        last_input = tokens
        tokens = blk(tokens)
    if prompted:
        tokens = torch.cat([tokens[:, :R], tokens[:, R + P :]], dim=1)
    return tokens, last_input, grid


def attention_part_maps(block: nn.Module, tokens: Tensor, queries: slice, patches: slice,
                        grid: tuple[int, int]) -> Tensor:
    """Part maps (B, Q+1, H, W) from the attention of the ``queries`` tokens to the ``patches`` tokens in the timm
    ``block`` whose input is ``tokens`` (B, T, D).

    Per query q: its softmax attention over all keys, averaged over heads, restricted to the patches and divided
    by its maximum, s_q ∈ [0, 1] (1 at the patch it attends to most). The background channel is 1 − max_q s_q, so
    a patch that no query singles out is background. The Q+1 channels are normalised to sum to one per patch.
    """
    attn = block.attn
    x = block.norm1(tokens)
    B, T, _ = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, T, hd)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q[:, :, queries].float() * attn.scale) @ k.float().transpose(-2, -1)  # (B, heads, Q, T)
    a = logits.softmax(dim=-1).mean(dim=1)[..., patches]  # (B, Q, L)
    s = a / a.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    maps = torch.cat([s, 1.0 - s.amax(dim=1, keepdim=True)], dim=1)
    maps = maps / maps.sum(dim=1, keepdim=True)
    return maps.reshape(B, -1, *grid)


@register_model("linear", config=ModelConfig)
class LinearProbe(FrozenViT):
    """Linear classifier on the frozen backbone's final-normed cls token (or mean patch token without one).

    Trainable: ``classifier`` only; its config has no ``train_tokens``, the backbone tokens stay frozen.
    """

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None) -> None:
        super().__init__(cfg, backbone)
        self.classifier = _new_classifier(self)
        self.set_trainable()

    def groups(self, head_lr: float, concept_lr: float) -> list[tuple[str, list[nn.Parameter], float]]:
        """One group, ``classifier``, at the head rate."""
        return [("classifier", list(self.classifier.parameters()), head_lr)]

    def forward(self, x: Tensor) -> ModelOutput:
        """Images (B, 3, H, W) → logits (B, C); ``tokens`` = timm ``forward_features(x)`` (B, T, D)."""
        with torch.no_grad():  # nothing in the backbone trains
            tokens, _ = self.embed(x)
            normed = self.backbone.norm(self.backbone.blocks(tokens))
        return _global_output(self.classifier(self.global_token(normed)), normed)


class VPT(FrozenViT):
    """Visual Prompt Tuning: learned prompt tokens at the input (VPT-shallow) or before every block (VPT-deep).

    Sequence layout inside the blocks: [prefix (cls + registers) | P prompts | patches]. Without an attention mask,
    a token's position in the sequence carries no meaning; the layout only fixes where prompts are cut out again.
    Subclasses :class:`VPTShallow` and :class:`VPTDeep` set ``deep``.

    Part maps (eval mode only, so training is plain VPT): the last block's attention from each of the P prompt
    tokens to the patches, heads averaged (:func:`attention_part_maps`), plus a background channel; its one map
    stage has index 0.

    Args:
        cfg: the model config (``num_prompts`` = P prompts per prompted block, ``train_tokens``).
        backbone: a timm VisionTransformer without head; built from ``cfg`` when None.
    """

    deep: ClassVar[bool] = False
    has_part_maps = True
    cfg: VPTConfig

    def __init__(self, cfg: VPTConfig, backbone: nn.Module | None = None) -> None:
        super().__init__(cfg, backbone)
        self.prompts = self.new_prompts(len(self.backbone.blocks) if self.deep else 1)
        self.classifier = _new_classifier(self)
        self.set_trainable()

    def groups(self, head_lr: float, concept_lr: float) -> list[tuple[str, list[nn.Parameter], float]]:
        """``classifier`` at the head rate; ``prompts`` and (per ``train_tokens``) ``tokens`` at the concept rate."""
        return [
            ("classifier", list(self.classifier.parameters()), head_lr),
            ("prompts", [self.prompts], concept_lr),
            ("tokens", self.token_parameters() if self.tokens_trainable else [], concept_lr),
        ]

    def map_stages(self) -> list[tuple[int, int]]:
        return [(0, self.cfg.num_prompts + 1)]

    def forward(self, x: Tensor, *, insert_prompts: bool = True) -> ModelOutput:
        """Images (B, 3, H, W) → logits (B, C). ``insert_prompts=False`` runs the plain backbone.

        ``tokens`` of the output: final-normed (B, T, D), prompts excluded. In eval mode with prompts, ``maps`` holds
        one (B, P+1, H', W') attention part map.
        """
        tokens, last_input, grid = prompted_trunk(self, x, deep=self.deep, insert_prompts=insert_prompts)
        normed = self.backbone.norm(tokens)
        out = _global_output(self.classifier(self.global_token(normed)), normed)
        if insert_prompts and not self.training:
            R, P = self.num_prefix, self.cfg.num_prompts
            with torch.no_grad():
                out.maps = [attention_part_maps(self.backbone.blocks[-1], last_input, slice(R, R + P),
                                                slice(R + P, None), grid)]
        return out


@register_model("vpt_shallow", config=VPTConfig)
class VPTShallow(VPT):
    """VPT-shallow: ``model.num_prompts`` learned tokens at the input only."""

    deep = False


@register_model("vpt_deep", config=VPTConfig)
class VPTDeep(VPT):
    """VPT-deep: ``model.num_prompts`` learned tokens before every block, each block owning its own."""

    deep = True


@register_model("last_layer_parts", config=ConceptConfig)
class LastLayerParts(ConceptModel):
    """Part discovery at the last layer only: ``n_pro[-1]`` prototypes + spatial bias on the last block's output,
    region pooling, modulation and a shared part classifier (IVPT's final stage without any prompted stage).

    Module names match IVPT's (``stages.0``, ``modulation``, ``classifier``), and so do the optimiser groups.
    """

    def __init__(self, cfg: ConceptConfig, backbone: nn.Module | None = None) -> None:
        super().__init__(cfg, backbone)
        n = cfg.n_pro[-1]
        self.stages.append(self.new_stage(n))
        self.build_head(n)
        self.set_trainable()

    def trunk(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The last block's output (B, T, D) and the patch grid."""
        with self.frozen_context():
            tokens, grid = self.embed(x)
            return self.backbone.blocks(tokens), grid

    def concept_features(self, x: Tensor) -> list[Tensor]:
        return [self.stage_features(self.trunk(x)[0])]

    def forward(self, x: Tensor) -> ModelOutput:
        """Images (B, 3, H, W) → logits (B, C), one map (B, n, H', W'), modulated parts (B, D, n)."""
        return self.single_stage_output(*self.trunk(x))


@register_model("vpt_deep_proto", config=VPTConceptConfig)
class VPTDeepProto(ConceptModel):
    """VPT-deep with prototypes (the paper's baseline): VPT-deep's prompts in every block, then a class-agnostic
    part-prototype head on the last block's output — ``n_pro[-1]`` prototypes + spatial bias, region pooling,
    modulation and a shared part classifier, trained with the part-discovery losses (consistency does not apply:
    there are no grouped maps). Classification comes from the part features, as in IVPT's final stage.
    """

    cfg: VPTConceptConfig

    def __init__(self, cfg: VPTConceptConfig, backbone: nn.Module | None = None) -> None:
        super().__init__(cfg, backbone)
        self.prompts = self.new_prompts(len(self.backbone.blocks))
        n = cfg.n_pro[-1]
        self.stages.append(self.new_stage(n))
        self.build_head(n)
        self.set_trainable()

    def concept_features(self, x: Tensor) -> list[Tensor]:
        return [self.stage_features(prompted_trunk(self, x, deep=True)[0])]

    def forward(self, x: Tensor) -> ModelOutput:
        """Images (B, 3, H, W) → logits (B, C), one map (B, n, H', W'), modulated parts (B, D, n)."""
        tokens, _, grid = prompted_trunk(self, x, deep=True, insert_prompts=True)
        return self.single_stage_output(tokens, grid)
