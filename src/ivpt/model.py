"""IVPT: Interpretable Visual Prompt Tuning on any timm VisionTransformer (SPEC section 2).

Read top to bottom: the backbone is embedded as timm does it; blocks before the first prompted stage run
unchanged; before each prompted block, a :class:`~ivpt.prototypes.ConceptStage` carves the (detached) tokens into
concept regions, pools them into N coarse prompt tokens and appends them; the prompts are dropped again after the
block. At the end, the final stage's maps pool the last tokens into N+1 part features that a shared linear
classifier scores; logits are the mean over the N foreground parts.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import PretrainedMixin
from .config import ConfigError, ModelConfig, check_img_size
from .prototypes import ConceptStage, region_pool, renormalise

__all__ = ["IVPT", "IVPTOutput", "build_backbone", "create_model"]


@dataclass
class IVPTOutput:
    """Everything one forward pass produces. m = prompted stages, N = coarse concepts, n_i = n_pro[i].

    logits: (B, C) part-averaged class scores.
    part_logits: (B, N, C) score of each foreground part.
    maps: m+1 tensors (B, n_i, H, W): the recomputed maps S̃_i (sum to 1 over channels; background last). The
        last one is the final (coarse) stage.
    grouped_maps: m tensors (B, N+1, H, W): fine maps grouped through the assignments, M_i.
    assignments: m tensors (B, n_i-1, N): fine→coarse assignment Q_i of every foreground concept.
    region_counts: m+1 tensors (B, n_i): pixels won by each concept (argmax).
    modulated: (B, D, N+1) modulated part features (foreground parts, then background).
    tokens: (B, T, D) final-normed output tokens of the last block (prefix tokens first, prompts excluded).
    """

    logits: Tensor
    part_logits: Tensor
    maps: list[Tensor]
    grouped_maps: list[Tensor]
    assignments: list[Tensor]
    region_counts: list[Tensor]
    modulated: Tensor
    tokens: Tensor


def build_backbone(cfg: ModelConfig, *, weights: str | None = None) -> nn.Module:
    """A timm VisionTransformer named ``cfg.backbone`` at ``cfg.img_size``, without head, weights resolved by
    :func:`ivpt.weights.resolve_backbone_state` from ``weights`` (default ``cfg.weights``)."""
    import timm

    kwargs = dict(num_classes=0, img_size=cfg.img_size, dynamic_img_size=True)
    kwargs.update(cfg.backbone_kwargs)
    try:
        backbone = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise ConfigError(f"model.backbone={cfg.backbone!r}: {exc}") from exc
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if patch is not None:  # not a ViT: refused with its own message by the model
        check_img_size(cfg, patch)
    from .weights import load_backbone_weights, resolve_backbone

    state, resolved = resolve_backbone(cfg.backbone, cfg.weights if weights is None else weights)
    if state is None:  # "random": timm's initialisation under a fixed seed, the same in every process and run
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            backbone.init_weights()
    else:
        load_backbone_weights(backbone, state)
    backbone.weights_source = resolved  # what the source resolved to ("auto" never stays "auto")
    return backbone


class IVPT(PretrainedMixin, nn.Module):
    """Interpretable visual prompt tuning around a frozen timm VisionTransformer.

    Args:
        cfg: the model section of the config.
        backbone: a timm VisionTransformer without head; built from ``cfg`` when None.
    """

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg) if backbone is None else backbone
        bb = self.backbone
        for attr in ("patch_embed", "blocks", "norm", "_pos_embed"):
            if not hasattr(bb, attr):
                raise ConfigError(f"model.backbone={cfg.backbone!r} is not a timm VisionTransformer (no {attr})")
        depth = len(bb.blocks)
        m = cfg.num_stages
        if m > depth:
            raise ConfigError(
                f"model.n_pro={cfg.n_pro} asks for {m} prompted stages but {cfg.backbone} has only {depth} blocks; "
                f"use at most {depth + 1} entries"
            )
        self.dim = bb.embed_dim
        self.num_prefix = bb.num_prefix_tokens
        self.first_prompted = depth - m
        self.patch_size = tuple(bb.patch_embed.patch_size)
        grid = (cfg.img_size // self.patch_size[0], cfg.img_size // self.patch_size[1])
        N = cfg.num_coarse
        self.stages = nn.ModuleList(
            [
                ConceptStage(n, self.dim, grid, num_coarse=N if i < m else None, init_std=cfg.prototype_init_std)
                for i, n in enumerate(cfg.n_pro)
            ]
        )
        self.modulation = nn.LayerNorm([self.dim, N + 1])
        self.classifier = nn.Linear(self.dim, cfg.num_classes, bias=False)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)
        self.set_trainable()

    # ----------------------------------------------------------------------------------------------- parameters
    def token_parameters(self) -> list[nn.Parameter]:
        """pos_embed, cls_token and reg_token of the backbone (those it has)."""
        bb = self.backbone
        return [p for p in (getattr(bb, n, None) for n in ("pos_embed", "cls_token", "reg_token")) if p is not None]

    def set_trainable(self) -> None:
        """Freeze the backbone except (per ``cfg.train_tokens``) its embedding tokens; everything else trains."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for p in self.token_parameters():
            p.requires_grad_(self.cfg.train_tokens)

    def param_groups(self, base_lr: float, head_mult: float, concept_mult: float) -> list[dict]:
        """Optimiser groups built from explicit module membership; every trainable parameter lands in exactly one.

        Returns dicts with ``name``, ``params`` and ``lr``.
        """
        prompted = [s for s in self.stages if s.assigner is not None]
        head_lr, concept_lr = base_lr * head_mult, base_lr * concept_mult
        groups = [
            ("classifier", list(self.classifier.parameters()), head_lr),
            ("modulation", list(self.modulation.parameters()), head_lr),
            ("prompt_proj", [p for s in prompted for p in s.prompt_proj.parameters()], head_lr),
            ("assigners", [p for s in prompted for p in s.assigner.parameters()], head_lr),
            ("prototypes", [s.prototypes for s in self.stages], concept_lr),
            ("spatial_bias", [s.spatial_bias for s in self.stages], concept_lr),
            ("tokens", self.token_parameters() if self.cfg.train_tokens else [], concept_lr),
        ]
        return _checked_groups(self, groups)

    # ------------------------------------------------------------------------------------------------- forward
    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images (B, 3, H·p, W·p) → tokens (B, T, D) exactly as timm's forward_features begins, and the grid."""
        bb = self.backbone
        grid = (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
        tokens = bb.patch_embed(x)
        tokens = bb._pos_embed(tokens)
        tokens = bb.patch_drop(tokens)
        tokens = bb.norm_pre(tokens)
        return tokens, grid

    def stage_features(self, tokens: Tensor) -> Tensor:
        """Detached, final-normed patch tokens (B, L, D) that the concept stages look at."""
        return self.backbone.norm(tokens.detach())[:, self.num_prefix :]

    def trunk(self, x: Tensor, *, insert_prompts: bool = True):
        """Backbone with prompts: (final tokens (B, T, D), grid, per-stage detached features (B, L, D) ×(m+1),
        soft maps S_i ×(m+1), grouped maps ×m, assignments ×m, region counts ×m)."""
        bb, m = self.backbone, self.cfg.num_stages
        sample = self.cfg.train_gumbel if self.training else self.cfg.eval_gumbel
        # Nothing before the first prompted block is trainable when the tokens are frozen: no autograd there.
        prefix_ctx = torch.no_grad() if not self.cfg.train_tokens else contextlib.nullcontext()
        with prefix_ctx:
            tokens, grid = self.embed(x)
            for blk in bb.blocks[: self.first_prompted]:
                tokens = blk(tokens)
        T = tokens.shape[1]

        feats, maps, grouped, assignments, counts = [], [], [], [], []
        for stage, blk in zip(self.stages[:m], bb.blocks[self.first_prompted :]):
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
                tokens = blk(torch.cat([tokens, prompts], dim=1))[:, :T]
            else:
                tokens = blk(tokens)
        feats.append(self.stage_features(tokens))
        maps.append(self.stages[m].maps(feats[-1], grid))
        return tokens, grid, feats, maps, grouped, assignments, counts

    def classify(self, tokens: Tensor, final_map: Tensor):
        """Part-pooled classification from the last tokens (B, T, D) and the final map (B, N+1, H, W), both NOT
        detached: (logits (B, C), part_logits (B, N, C), modulated (B, D, N+1), counts (B, N+1), normed tokens)."""
        normed = self.backbone.norm(tokens)
        parts, counts = region_pool(final_map.flatten(2), normed[:, self.num_prefix :])  # (B, N+1, D)
        modulated = self.modulation(parts.transpose(1, 2).to(self.modulation.weight.dtype))  # (B, D, N+1)
        part_logits = self.classifier(modulated[:, :, :-1].transpose(1, 2))  # (B, N, C)
        return part_logits.mean(dim=1), part_logits, modulated, counts, normed

    def forward(self, x: Tensor, *, insert_prompts: bool = True, maps_only_from: int | None = None) -> IVPTOutput:
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
        return IVPTOutput(
            logits=logits,
            part_logits=part_logits,
            maps=maps,
            grouped_maps=grouped,
            assignments=assignments,
            region_counts=counts + [c],
            modulated=modulated,
            tokens=normed,
        )


def _checked_groups(model: nn.Module, groups: list[tuple[str, list[nn.Parameter], float]]) -> list[dict]:
    """Turn (name, params, lr) into optimiser groups, refusing a trainable parameter in no group or in two."""
    seen: dict[int, str] = {}
    out = []
    for name, params, lr in groups:
        params = [p for p in params if p.requires_grad]
        for p in params:
            if id(p) in seen:
                raise RuntimeError(f"parameter in two optimiser groups: {seen[id(p)]} and {name}")
            seen[id(p)] = name
        if params:
            out.append({"name": name, "params": params, "lr": lr})
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise RuntimeError(f"trainable parameters in no optimiser group: {missing}")
    return out


def create_model(cfg: ModelConfig, *, weights: str | None = None, seed: int = 0) -> nn.Module:
    """Build the model ``cfg.kind`` names (IVPT or a baseline) with backbone weights from ``weights``.

    The new (trainable) parameters are initialised from ``seed`` alone, under a forked RNG: whatever resolving the
    backbone weights drew from the global generator (a hub attempt, a conversion) cannot change them, and the
    caller's RNG stream is left untouched."""
    backbone = build_backbone(cfg, weights=weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.kind == "ivpt":
            return IVPT(cfg, backbone)
        from .baselines import build_baseline

        return build_baseline(cfg, backbone)
