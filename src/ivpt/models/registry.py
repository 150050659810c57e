"""The one table of model kinds: ``model.kind`` → model class (and its config class), filled by
:func:`register_model`, and :func:`create_model`.

Adding a kind is one file plus one registration line. The file defines the model (a subclass of
:class:`~ivpt.models.base.FrozenViT`: ``__init__(cfg, backbone)`` builds the trainable parameters and calls
``set_trainable()``; ``groups()`` names them for the optimiser; ``forward(x)`` returns a
:class:`~ivpt.models.base.ModelOutput`) and, if the kind reads fields beyond :class:`ivpt.config.ModelConfig`, its
config class (a dataclass subclass of it). The registration is the decorator on the model class::

    from ivpt.config import ModelConfig
    from ivpt.models import FrozenViT, ModelOutput, register_model

    @register_model("mean_patch_probe", config=ModelConfig)
    class MeanPatchProbe(FrozenViT):
        ...

From then on ``model.kind=mean_patch_probe`` is a valid config value (YAML, CLI overrides, ``ivpt compare --kinds``),
``ivpt train`` / ``ivpt eval`` build it, its checkpoints load, and which config changes matter to its runs follows
from its config class (:func:`ivpt.config.config_changes`); a model with concept maps (``has_concept_maps``) also
reads the map loss terms. The built-in kinds register themselves the same way in :mod:`.ivpt` and :mod:`.baselines`
(IVPT first: the order of :data:`MODELS` is the order ``ivpt compare`` runs and tabulates them). A kind defined
outside ivpt must be imported before a config names it; :func:`unregister_model` removes it again.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

from ..config import Config, ConfigError, ModelConfig, OptimConfig, register_kind, unregister_kind
from .backbone import build_backbone
from .base import CONCEPT_RATE, FrozenViT

__all__ = ["MODELS", "register_model", "unregister_model", "model_class", "create_model", "load_model", "describe"]

M = TypeVar("M", bound=type[FrozenViT])

# model.kind -> model class, in registration order; ivpt.config.MODEL_KINDS holds the same kinds' config classes.
MODELS: dict[str, type[FrozenViT]] = {}


def register_model(kind: str, *, config: type[ModelConfig] = ModelConfig) -> Callable[[M], M]:
    """Class decorator: make the :class:`FrozenViT` subclass the model of ``model.kind=kind``, configured by
    ``config`` (``ModelConfig`` or a dataclass subclass of it holding every further field the model reads). Sets
    the class's ``kind`` and ``config_class``. A kind already registered to another class is a ValueError."""

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, FrozenViT)):
            raise TypeError(f"@register_model({kind!r}) decorates a subclass of ivpt.models.FrozenViT, not {cls!r}")
        if kind in MODELS and MODELS[kind] is not cls:
            raise ValueError(f"model.kind={kind!r} is already registered ({MODELS[kind].__qualname__})")
        register_kind(kind, config, concept_maps=cls.has_concept_maps)
        cls.kind, cls.config_class = kind, config
        MODELS[kind] = cls
        return cls

    return decorate


def unregister_model(kind: str) -> type[FrozenViT]:
    """Remove a registered kind (e.g. one a test added) from both tables; returns its model class."""
    unregister_kind(kind)
    return MODELS.pop(kind)


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
        **model.describe_stages(),
    }
    summary["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary["total_params"] = sum(p.numel() for p in model.parameters())
    summary["param_groups"] = [_group_summary(g, o) for g in groups]
    return summary


def _group_summary(group: dict, optim: OptimConfig) -> dict:
    """One optimiser group for :func:`describe`: its name, role (``head`` / ``concept``), peak rate, parameter
    count, and for a concept group under the concept ramp the rate it starts from and the share of the run it
    rises over (:func:`ivpt.engine.schedule.concept_factor`). Rates to 12 significant digits."""
    out = {"name": group["name"], "rate": group["rate"], "lr": float(f"{group['lr']:.12g}")}
    if group["rate"] == CONCEPT_RATE and optim.concept_lr_ramp > 0:
        out["lr_start"] = float(f"{group['lr'] * optim.concept_lr_start:.12g}")
        out["ramp"] = optim.concept_lr_ramp
    out["params"] = sum(p.numel() for p in group["params"])
    return out
