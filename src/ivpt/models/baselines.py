"""Baselines on the same frozen backbone, trainer, losses and metrics as IVPT (``model.kind`` other than ivpt).

Every model here returns an :class:`~ivpt.models.IVPTOutput`, so :func:`ivpt.engine.trainer.compute_loss`,
:func:`ivpt.losses.ivpt_losses` and the evaluator need no special case: a model without concept maps returns empty
``maps`` / ``grouped_maps`` / ``assignments`` / ``region_counts``, ``modulated=None`` and
``part_logits = logits[:, None]``, and ``ivpt_losses`` then computes only the terms that apply (classification).

- ``linear``: linear probe on the final-normed cls token of the frozen backbone (backbones without a cls token:
  the mean of the final-normed patch tokens). The probe is a probe: pos/cls/reg tokens stay frozen whatever
  ``model.train_tokens`` says, so its features are exactly timm's ``forward_features``.
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

Learning rates (``param_groups``): classifiers and the modulation LayerNorm at the head rate; prompts, prototypes,
spatial biases and backbone tokens at the concept rate. VPT prompts live in the token-embedding space, like the
pos_embed / cls_token that the paper trains at the concept rate (2e-4 with Adam); the head rate (1e-2) would move a
prompt initialised at ±0.08 by its own scale in a few steps.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .base import ConceptModel, FrozenViT, IVPTOutput, checked_groups
from .prototypes import renormalise

__all__ = ["LinearProbe", "VPT", "VPTShallow", "VPTDeep", "LastLayerParts"]


def _pooled(model: FrozenViT, normed: Tensor) -> Tensor:
    """Image feature (B, D) from final-normed tokens (B, T, D): the cls token, else the mean patch token."""
    if getattr(model.backbone, "cls_token", None) is not None:
        return normed[:, 0]
    return normed[:, model.num_prefix :].mean(dim=1)


def _new_classifier(model: FrozenViT) -> nn.Linear:
    """Linear(D, C) with bias, trunc-normal(0.02) weights and zero bias."""
    head = nn.Linear(model.dim, model.cfg.num_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


def _global_output(logits: Tensor, normed: Tensor) -> IVPTOutput:
    """Output of a model without parts: logits (B, C), final-normed tokens (B, T, D)."""
    return IVPTOutput(logits=logits, part_logits=logits[:, None], maps=[], grouped_maps=[], assignments=[],
                      region_counts=[], modulated=None, tokens=normed)


class LinearProbe(FrozenViT):
    """Linear classifier on the frozen backbone's final-normed cls token (or mean patch token without one).

    Trainable: ``classifier`` only; the backbone tokens stay frozen regardless of ``model.train_tokens``.
    """

    kind = "linear"

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None) -> None:
        super().__init__(cfg, backbone)
        self.classifier = _new_classifier(self)
        self.set_trainable()

    @property
    def tokens_trainable(self) -> bool:
        return False

    def param_groups(self, base_lr: float, head_mult: float, concept_mult: float) -> list[dict]:
        """One group, ``classifier``, at ``base_lr * head_mult``."""
        return checked_groups(self, [("classifier", list(self.classifier.parameters()), base_lr * head_mult)])

    def forward(self, x: Tensor) -> IVPTOutput:
        """Images (B, 3, H, W) → logits (B, C); ``tokens`` = timm ``forward_features(x)`` (B, T, D)."""
        with torch.no_grad():  # nothing in the backbone trains
            tokens, _ = self.embed(x)
            normed = self.backbone.norm(self.backbone.blocks(tokens))
        return _global_output(self.classifier(_pooled(self, normed)), normed)


class VPT(FrozenViT):
    """Visual Prompt Tuning: learned prompt tokens at the input (``deep=False``) or before every block (``deep``).

    Sequence layout inside the blocks: [prefix (cls + registers) | P prompts | patches]. Without an attention mask,
    a token's position in the sequence carries no meaning; the layout only fixes where prompts are cut out again.

    Args:
        cfg: the model config (``num_prompts`` = P prompts per prompted block, ``train_tokens``).
        backbone: a timm VisionTransformer without head; built from ``cfg`` when None.
    Subclasses :class:`VPTShallow` and :class:`VPTDeep` set ``deep``: one prompt set per block (VPT-deep)
    instead of one at the input (VPT-shallow).
    """

    deep: bool = False

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None) -> None:
        super().__init__(cfg, backbone)
        layers = len(self.backbone.blocks) if self.deep else 1
        # (layers, P, D); row i feeds block i.
        self.prompts = nn.Parameter(torch.empty(layers, cfg.num_prompts, self.dim))
        bound = math.sqrt(6.0 / (3 * self.patch_size[0] * self.patch_size[1] + self.dim))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.classifier = _new_classifier(self)
        self.set_trainable()

    def param_groups(self, base_lr: float, head_mult: float, concept_mult: float) -> list[dict]:
        """``classifier`` at the head rate; ``prompts`` and (per ``train_tokens``) ``tokens`` at the concept rate."""
        head_lr, concept_lr = base_lr * head_mult, base_lr * concept_mult
        groups = [
            ("classifier", list(self.classifier.parameters()), head_lr),
            ("prompts", [self.prompts], concept_lr),
            ("tokens", self.token_parameters() if self.tokens_trainable else [], concept_lr),
        ]
        return checked_groups(self, groups)

    def forward(self, x: Tensor, *, insert_prompts: bool = True) -> IVPTOutput:
        """Images (B, 3, H, W) → logits (B, C). ``insert_prompts=False`` runs the plain backbone.

        ``tokens`` of the output: final-normed (B, T, D), prompts excluded.
        """
        with self.frozen_context():
            tokens, _ = self.embed(x)
        R, P = self.num_prefix, self.cfg.num_prompts
        prompted = False  # whether ``tokens`` currently holds P prompt tokens at [R, R+P)
        for i, blk in enumerate(self.backbone.blocks):
            if insert_prompts and (i == 0 or self.deep):
                if prompted:  # deep: this block's prompts replace the previous block's prompt outputs
                    tokens = torch.cat([tokens[:, :R], tokens[:, R + P :]], dim=1)
                prompts = self.prompts[i].to(tokens.dtype).expand(tokens.shape[0], -1, -1)
                tokens = torch.cat([tokens[:, :R], prompts, tokens[:, R:]], dim=1)
                prompted = True
            tokens = blk(tokens)
        if prompted:
            tokens = torch.cat([tokens[:, :R], tokens[:, R + P :]], dim=1)
        normed = self.backbone.norm(tokens)
        return _global_output(self.classifier(_pooled(self, normed)), normed)


class VPTShallow(VPT):
    """VPT-shallow: ``model.num_prompts`` learned tokens at the input only."""

    kind = "vpt_shallow"
    deep = False


class VPTDeep(VPT):
    """VPT-deep: ``model.num_prompts`` learned tokens before every block, each block owning its own."""

    kind = "vpt_deep"
    deep = True


class LastLayerParts(ConceptModel):
    """Part discovery at the last layer only: ``n_pro[-1]`` prototypes + spatial bias on the last block's output,
    region pooling, modulation and a shared part classifier (IVPT's final stage without any prompted stage).

    Module names match IVPT's (``stages.0``, ``modulation``, ``classifier``), and so do the optimiser groups.
    """

    kind = "last_layer_parts"

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None) -> None:
        super().__init__(cfg, backbone)
        n = cfg.n_pro[-1]
        self.stages.append(self.new_stage(n))
        self.build_head(n)
        self.set_trainable()

    def forward(self, x: Tensor) -> IVPTOutput:
        """Images (B, 3, H, W) → logits (B, C), one map (B, n, H', W'), modulated parts (B, D, n)."""
        with self.frozen_context():
            tokens, grid = self.embed(x)
            tokens = self.backbone.blocks(tokens)
        final = renormalise(self.stages[0].maps(self.stage_features(tokens), grid))
        logits, part_logits, modulated, counts, normed = self.classify(tokens, final)
        return IVPTOutput(
            logits=logits,
            part_logits=part_logits,
            maps=[final],
            grouped_maps=[],
            assignments=[],
            region_counts=[counts],
            modulated=modulated,
            tokens=normed,
        )
