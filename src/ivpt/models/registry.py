"""One table of model kinds: ``model.kind`` → class, and :func:`create_model`."""
from __future__ import annotations

import torch

from ..config import MODEL_KINDS, Config, ConfigError, ModelConfig
from .backbone import build_backbone
from .base import FrozenViT
from .baselines import LastLayerParts, LinearProbe, VPTDeep, VPTDeepProto, VPTShallow
from .ivpt import IVPT

__all__ = ["MODELS", "model_class", "create_model", "load_model", "describe"]

MODELS: dict[str, type[FrozenViT]] = {cls.kind: cls for cls in (IVPT, LinearProbe, VPTShallow, VPTDeep,
                                                                 LastLayerParts, VPTDeepProto)}
# The config validates model.kind against MODEL_KINDS (a torch-free list); both must name the same kinds.
assert set(MODELS) == set(MODEL_KINDS), (sorted(MODELS), sorted(MODEL_KINDS))


def model_class(kind: str) -> type[FrozenViT]:
    if kind not in MODELS:
        raise ConfigError(f"model.kind={kind!r} is unknown; choose one of {', '.join(MODELS)}")
    return MODELS[kind]


def create_model(cfg: ModelConfig, *, weights: str | None = None, seed: int = 0) -> FrozenViT:
    """Build the model ``cfg.kind`` names with backbone weights from ``weights`` (default ``cfg.weights``).

    The new (trainable) parameters are initialised from ``seed`` alone, under a forked RNG: whatever resolving the
    backbone weights drew from the global generator (a hub attempt, a conversion) cannot change them, and the
    caller's RNG stream is left untouched."""
    cls = model_class(cfg.kind)
    backbone = build_backbone(cfg, weights=weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg, backbone)


def load_model(checkpoint, cfg: ModelConfig, meta: dict, *, weights: str | None = None,
               allow_backbone_mismatch: bool = False) -> FrozenViT:
    """The model ``cfg`` describes with the trained parameters of the pretrained folder ``checkpoint`` (whose
    config.json content is ``meta``): backbone weights other than those it was trained on are refused unless
    ``allow_backbone_mismatch``."""
    from ..checkpoint import load_pretrained

    model = create_model(cfg, weights=weights)
    load_pretrained(model, checkpoint, meta=meta, allow_backbone_mismatch=allow_backbone_mismatch)
    return model


def describe(model: FrozenViT, cfg: Config) -> dict:
    """JSON-ready summary of a built model under ``cfg`` (a full :class:`ivpt.config.Config`)."""
    o = cfg.optim
    groups = model.param_groups(o.base_lr, o.head_lr_mult, o.concept_lr_mult)
    summary = {
        "kind": cfg.model.kind,
        "backbone": cfg.model.backbone,
        "img_size": cfg.model.img_size,
        "depth": len(model.backbone.blocks),
        "embed_dim": model.backbone.embed_dim,
        "num_prefix_tokens": model.backbone.num_prefix_tokens,
        "num_classes": cfg.model.num_classes,
    }
    if isinstance(model, IVPT):
        m = cfg.model.num_stages
        summary["num_coarse"] = cfg.model.num_coarse
        summary["free_prompts_per_block"] = cfg.model.num_prompts if model.prompts is not None else 0
        summary["stages"] = [
            {
                "stage": i,
                "n_pro": n,
                "foreground": n - 1,
                "feeds": f"input of block {model.first_prompted + i}" if i < m else "classifier (output of last block)",
                "prompt_tokens": cfg.model.num_coarse if i < m else 0,
            }
            for i, n in enumerate(cfg.model.n_pro)
        ]
    summary["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary["total_params"] = sum(p.numel() for p in model.parameters())
    summary["param_groups"] = [
        {"name": g["name"], "lr": g["lr"], "params": sum(p.numel() for p in g["params"])} for g in groups
    ]
    return summary
