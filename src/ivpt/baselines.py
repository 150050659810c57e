"""Baselines on the same frozen backbone, trainer, losses and metrics as IVPT (``model.kind`` other than ivpt).

Every model here returns an :class:`~ivpt.model.IVPTOutput`, so :func:`ivpt.engine.trainer._loss`,
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
  with spatial bias): one :class:`~ivpt.prototypes.ConceptStage` with ``n_pro[-1]`` prototypes at the output of
  the last block, no prompts, then region pooling, modulation and a shared part classifier as in IVPT's final
  stage. Its map losses (presence, background, TV, entropy, orthogonality, equivariance) apply; consistency does
  not (no grouped maps).

Learning rates (``param_groups``): classifiers and the modulation LayerNorm at the head rate; prompts, prototypes,
spatial biases and backbone tokens at the concept rate. VPT prompts live in the token-embedding space, like the
pos_embed / cls_token that the paper trains at the concept rate (2e-4 with Adam); the head rate (1e-2) would move a
prompt initialised at ±0.08 by its own scale in a few steps.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from .checkpoint import PretrainedMixin
from .config import ConfigError, ModelConfig
from .model import IVPT, IVPTOutput, _checked_groups, build_backbone
from .prototypes import ConceptStage, renormalise

__all__ = ["BASELINE_KINDS", "VPT", "LastLayerParts", "LinearProbe", "build_baseline"]

BASELINE_KINDS = ("linear", "vpt_shallow", "vpt_deep", "last_layer_parts")


class _FrozenViT(PretrainedMixin, nn.Module):
    """A frozen timm VisionTransformer plus whatever a subclass trains on top of it.

    Embedding, token parameters and the stage features are IVPT's own methods (they only read ``backbone``,
    ``patch_size``, ``num_prefix`` and ``cfg``), shared so that every kind sees bit-identical tokens.
    """

    embed = IVPT.embed
    token_parameters = IVPT.token_parameters
    stage_features = IVPT.stage_features

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg) if backbone is None else backbone
        for attr in ("patch_embed", "blocks", "norm", "_pos_embed"):
            if not hasattr(self.backbone, attr):
                raise ConfigError(f"model.backbone={cfg.backbone!r} is not a timm VisionTransformer (no {attr})")
        self.dim = self.backbone.embed_dim
        self.num_prefix = self.backbone.num_prefix_tokens
        self.patch_size = tuple(self.backbone.patch_embed.patch_size)

    @property
    def tokens_trainable(self) -> bool:
        """Whether pos_embed / cls_token / reg_token train (``model.train_tokens`` unless a subclass says no)."""
        return self.cfg.train_tokens

    def set_trainable(self) -> None:
        """Freeze the backbone except (per :attr:`tokens_trainable`) its embedding tokens."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for p in self.token_parameters():
            p.requires_grad_(self.tokens_trainable)

    def _frozen_ctx(self):
        """No autograd for the embedding when nothing in it trains: saves the activations of the frozen path."""
        return contextlib.nullcontext() if self.tokens_trainable else torch.no_grad()

    def _pooled(self, normed: Tensor) -> Tensor:
        """Image feature (B, D) from final-normed tokens (B, T, D): the cls token, else the mean patch token."""
        if getattr(self.backbone, "cls_token", None) is not None:
            return normed[:, 0]
        return normed[:, self.num_prefix :].mean(dim=1)

    def _new_classifier(self) -> nn.Linear:
        """Linear(D, C) with bias, trunc-normal(0.02) weights and zero bias."""
        head = nn.Linear(self.dim, self.cfg.num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    @staticmethod
    def _global_output(logits: Tensor, normed: Tensor) -> IVPTOutput:
        """Output of a model without parts: logits (B, C), final-normed tokens (B, T, D)."""
        return IVPTOutput(
            logits=logits,
            part_logits=logits[:, None],
            maps=[],
            grouped_maps=[],
            assignments=[],
            region_counts=[],
            modulated=None,  # type: ignore[arg-type]  # no part features: ivpt_losses skips orthogonality
            tokens=normed,
        )


class LinearProbe(_FrozenViT):
    """Linear classifier on the frozen backbone's final-normed cls token (or mean patch token without one).

    Trainable: ``classifier`` only; the backbone tokens stay frozen regardless of ``model.train_tokens``.
    """

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None) -> None:
        super().__init__(cfg, backbone)
        self.classifier = self._new_classifier()
        self.set_trainable()

    @property
    def tokens_trainable(self) -> bool:
        return False

    def param_groups(self, base_lr: float, head_mult: float, concept_mult: float) -> list[dict]:
        """One group, ``classifier``, at ``base_lr * head_mult``."""
        return _checked_groups(self, [("classifier", list(self.classifier.parameters()), base_lr * head_mult)])

    def forward(self, x: Tensor) -> IVPTOutput:
        """Images (B, 3, H, W) → logits (B, C); ``tokens`` = timm ``forward_features(x)`` (B, T, D)."""
        with torch.no_grad():  # nothing in the backbone trains
            tokens, _ = self.embed(x)
            normed = self.backbone.norm(self.backbone.blocks(tokens))
        return self._global_output(self.classifier(self._pooled(normed)), normed)


class VPT(_FrozenViT):
    """Visual Prompt Tuning: learned prompt tokens at the input (``deep=False``) or before every block (``deep``).

    Sequence layout inside the blocks: [prefix (cls + registers) | P prompts | patches]. Without an attention mask,
    a token's position in the sequence carries no meaning; the layout only fixes where prompts are cut out again.

    Args:
        cfg: the model config (``num_prompts`` = P prompts per prompted block, ``train_tokens``).
        backbone: a timm VisionTransformer without head; built from ``cfg`` when None.
        deep: one prompt set per block (VPT-deep) instead of one at the input (VPT-shallow).
    """

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None, *, deep: bool) -> None:
        super().__init__(cfg, backbone)
        self.deep = deep
        layers = len(self.backbone.blocks) if deep else 1
        # (layers, P, D); row i feeds block i.
        self.prompts = nn.Parameter(torch.empty(layers, cfg.num_prompts, self.dim))
        bound = math.sqrt(6.0 / (3 * self.patch_size[0] * self.patch_size[1] + self.dim))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.classifier = self._new_classifier()
        self.set_trainable()

    def param_groups(self, base_lr: float, head_mult: float, concept_mult: float) -> list[dict]:
        """``classifier`` at the head rate; ``prompts`` and (per ``train_tokens``) ``tokens`` at the concept rate."""
        head_lr, concept_lr = base_lr * head_mult, base_lr * concept_mult
        groups = [
            ("classifier", list(self.classifier.parameters()), head_lr),
            ("prompts", [self.prompts], concept_lr),
            ("tokens", self.token_parameters() if self.tokens_trainable else [], concept_lr),
        ]
        return _checked_groups(self, groups)

    def forward(self, x: Tensor, *, insert_prompts: bool = True) -> IVPTOutput:
        """Images (B, 3, H, W) → logits (B, C). ``insert_prompts=False`` runs the plain backbone.

        ``tokens`` of the output: final-normed (B, T, D), prompts excluded.
        """
        with self._frozen_ctx():
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
        return self._global_output(self.classifier(self._pooled(normed)), normed)


class LastLayerParts(_FrozenViT):
    """Part discovery at the last layer only: ``n_pro[-1]`` prototypes + spatial bias on the last block's output,
    region pooling, modulation and a shared part classifier (IVPT's final stage without any prompted stage).

    Module names match IVPT's (``stages.0``, ``modulation``, ``classifier``), so IVPT's optimiser grouping applies.
    """

    param_groups = IVPT.param_groups  # stages without assigners simply give empty prompt/assigner groups
    classify = IVPT.classify  # the same head, so the ablation differs from IVPT only in the prompted stages

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None) -> None:
        super().__init__(cfg, backbone)
        grid = (cfg.img_size // self.patch_size[0], cfg.img_size // self.patch_size[1])
        n = cfg.n_pro[-1]
        self.stages = nn.ModuleList([ConceptStage(n, self.dim, grid, init_std=cfg.prototype_init_std)])
        self.modulation = nn.LayerNorm([self.dim, n])
        self.classifier = nn.Linear(self.dim, cfg.num_classes, bias=False)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)
        self.set_trainable()

    def forward(self, x: Tensor) -> IVPTOutput:
        """Images (B, 3, H, W) → logits (B, C), one map (B, n, H', W'), modulated parts (B, D, n)."""
        with self._frozen_ctx():
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


def build_baseline(cfg: ModelConfig, backbone: nn.Module | None = None) -> nn.Module:
    """The baseline ``cfg.kind`` names, around ``backbone`` (built from ``cfg`` when None)."""
    if cfg.kind == "linear":
        return LinearProbe(cfg, backbone)
    if cfg.kind in ("vpt_shallow", "vpt_deep"):
        return VPT(cfg, backbone, deep=cfg.kind == "vpt_deep")
    if cfg.kind == "last_layer_parts":
        return LastLayerParts(cfg, backbone)
    raise ConfigError(f"model.kind={cfg.kind!r} is not a baseline; baselines are {', '.join(BASELINE_KINDS)}")
