"""The frozen backbone: a timm VisionTransformer without head, its weights resolved by :mod:`ivpt.weights`."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError, ModelConfig, check_img_size

__all__ = ["build_backbone"]


def build_backbone(cfg: ModelConfig, *, weights: str | None = None) -> nn.Module:
    """A timm VisionTransformer named ``cfg.backbone`` at ``cfg.img_size``, without head, weights resolved by
    :func:`ivpt.weights.resolve_backbone` from ``weights`` (default ``cfg.weights``).

    ``backbone.weights_source`` records what the source resolved to (``auto`` never stays ``auto``).
    """
    import timm

    from ..weights import load_backbone_weights, resolve_backbone

    kwargs = dict(num_classes=0, img_size=cfg.img_size, dynamic_img_size=True)
    kwargs.update(cfg.backbone_kwargs)
    try:
        backbone = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise ConfigError(f"model.backbone={cfg.backbone!r}: {exc}") from exc
    except (TypeError, ValueError, AssertionError, ZeroDivisionError) as exc:  # timm refusing model.backbone_kwargs
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"model.backbone={cfg.backbone!r} cannot be built with model.backbone_kwargs="
                          f"{cfg.backbone_kwargs}: {first}") from exc
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if patch is not None:  # not a ViT: refused with its own message by the model
        check_img_size(cfg, patch)
    state, resolved = resolve_backbone(cfg.backbone, cfg.weights if weights is None else weights)
    if state is None:  # "random": timm's initialisation under a fixed seed, the same in every process and run
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            backbone.init_weights()
    else:
        load_backbone_weights(backbone, state)
    backbone.weights_source = resolved
    return backbone
