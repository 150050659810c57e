"""IVPT: Interpretable Visual Prompt Tuning on any timm VisionTransformer (docs/method.md §2).

Read top to bottom: the backbone is embedded as timm does it; blocks before the first prompted stage run
unchanged; before each prompted block, a :class:`~ivpt.models.prototypes.ConceptStage` carves the (detached) tokens
into concept regions, pools them into N coarse prompt tokens and appends them; the prompts are dropped again after
the block. At the end, the final stage's maps pool the last tokens into N+1 part features that a shared linear
classifier scores; logits are the mean over the N foreground parts (the paper). With ``model.deep_prompts`` (not the
paper, the recipe) every block also gets its own VPT-deep prompts, dropped after it; with ``model.global_part`` (not
the paper, the recipe) the classifier also scores the global token, which takes ``model.global_share`` of the logits.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..config import ConfigError, IVPTConfig
from .base import ConceptModel, ModelOutput
from .prototypes import ConceptStage, region_pool, renormalise
from .registry import register_model

__all__ = ["IVPT"]


@register_model("ivpt", config=IVPTConfig)
class IVPT(ConceptModel):
    """Interpretable visual prompt tuning around a frozen timm VisionTransformer.

    Args:
        cfg: the model section of the config.
        backbone: a timm VisionTransformer without head; built from ``cfg`` when None.
    """

    maps_only_view = True
    cfg: IVPTConfig

    def __init__(self, cfg: IVPTConfig, backbone: nn.Module | None = None) -> None:
        super().__init__(cfg, backbone)
        depth = len(self.backbone.blocks)
        m = cfg.num_stages
        if m > depth:
            raise ConfigError(
                f"model.n_pro={cfg.n_pro} asks for {m} prompted stages but {cfg.backbone} has only {depth} blocks; "
                f"use at most {depth + 1} entries"
            )
        self.first_prompted = depth - m
        N = cfg.num_coarse
        self.stages.extend([self.new_stage(n, num_coarse=N if i < m else None) for i, n in enumerate(cfg.n_pro)])
        self.build_head(N + 1)
        if cfg.deep_prompts:
            self.prompts = self.new_prompts(depth)  # row i feeds block i, as in VPT-deep
        self.set_trainable()

    def describe_stages(self) -> dict:
        """The concept stages for ``ivpt info``: prototypes per stage, which block each feeds, prompt tokens."""
        cfg, m = self.cfg, self.cfg.num_stages
        return {
            "num_coarse": cfg.num_coarse,
            "free_prompts_per_block": cfg.num_prompts if self.prompts is not None else 0,
            "stages": [
                {
                    "stage": i,
                    "n_pro": n,
                    "foreground": n - 1,
                    "feeds": (f"input of block {self.first_prompted + i}" if i < m
                              else "classifier (output of last block)"),
                    "prompt_tokens": cfg.num_coarse if i < m else 0,
                }
                for i, n in enumerate(cfg.n_pro)
            ],
        }

    # ------------------------------------------------------------------------------------------------- forward
    def trunk(self, x: Tensor, *, insert_prompts: bool = True):
        """Backbone with prompts: (final tokens (B, T, D), grid, per-stage detached features (B, L, D) ×(m+1),
        soft maps S_i ×(m+1), grouped maps ×m, assignments ×m, region counts ×m)."""
        bb, m = self.backbone, self.cfg.num_stages
        sample = self.cfg.train_gumbel if self.training else self.cfg.eval_gumbel
        # Nothing before the first prompted block trains when the tokens are frozen and it has no free prompts:
        # no autograd there.
        free = self.prompts if insert_prompts else None
        with self.frozen_context():
            tokens, grid = self.embed(x)
        with self.frozen_context() if free is None else contextlib.nullcontext():
            for i, blk in enumerate(bb.blocks[: self.first_prompted]):
                tokens = blk(tokens) if free is None else self.prompted_block(blk, tokens, free[i])
        T = tokens.shape[1]

        feats, maps, grouped, assignments, counts = [], [], [], [], []
        for j, (stage, blk) in enumerate(zip(self.stages[:m], bb.blocks[self.first_prompted :])):
            f = self.stage_features(tokens)
            s = stage.maps(f, grid)
            regions, c = region_pool(s.detach().flatten(2), f)
            q = stage.assign(regions[:, :-1], c[:, :-1], tau=self.cfg.gumbel_tau, sample=sample)
            feats.append(f)
            maps.append(s)
            counts.append(c)
            assignments.append(q)
            grouped.append(ConceptStage.grouped_map(s, q))
            if insert_prompts:
                prompts = stage.prompts(regions[:, :-1], q).to(tokens.dtype)
                joined = torch.cat([tokens, prompts], dim=1)  # [prefix | patches | concept prompts]
                out = blk(joined) if free is None else self.prompted_block(blk, joined, free[self.first_prompted + j])
                tokens = out[:, :T]
            else:
                tokens = blk(tokens)
        feats.append(self.stage_features(tokens))
        maps.append(self.stages[m].maps(feats[-1], grid))
        return tokens, grid, feats, maps, grouped, assignments, counts

    def concept_features(self, x: Tensor) -> list[Tensor]:
        """The detached features (B, L, D) each of the m+1 stages reads, in order."""
        return self.trunk(x)[2]

    def forward(self, x: Tensor, *, insert_prompts: bool = True, maps_only_from: int | None = None) -> ModelOutput:
        """Run IVPT on normalised images (B, 3, H, W). ``insert_prompts=False`` runs the plain backbone.

        ``maps_only_from=k``: images k.. only need their concept maps (the equivariance view). Their backbone pass
        runs without autograd — the maps see detached features, so their gradients to prototypes and biases are
        unchanged — and every other field covers the first k images only.
        """
        if maps_only_from is not None and maps_only_from < x.shape[0]:
            out = self.forward(x[:maps_only_from], insert_prompts=insert_prompts)
            with torch.no_grad():
                _, grid, feats, *_ = self.trunk(x[maps_only_from:], insert_prompts=insert_prompts)
            extra = [renormalise(stage.maps(f, grid)) for stage, f in zip(self.stages, feats)]
            out.maps = [torch.cat([a, b]) for a, b in zip(out.maps, extra)]
            return out
        tokens, _, _, maps, grouped, assignments, counts = self.trunk(x, insert_prompts=insert_prompts)
        maps = [renormalise(s) for s in maps]
        logits, part_logits, modulated, c, normed = self.classify(tokens, maps[-1])
        return ModelOutput(
            logits=logits,
            part_logits=part_logits,
            maps=maps,
            grouped_maps=grouped,
            assignments=assignments,
            region_counts=counts + [c],
            modulated=modulated,
            tokens=normed,
        )
