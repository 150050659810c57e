"""What a bench run measures: its options, the groups of models it times together and the speed targets
(see :mod:`ivpt.bench`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import AMP_MODES

KINDS = ("ivpt", "linear", "vpt_shallow", "vpt_deep", "last_layer_parts")
BACKBONE = "backbone"  # label of the plain timm forward_features reference
# The paper recipe on CUB-200-2011 that the projection times: 25 epochs over the 5,994 training images, then the
# 5,794 test images.
CUB_TRAIN_IMAGES, CUB_TEST_IMAGES, PAPER_EPOCHS = 5994, 5794, 25


def targets(device_type: str, amp: str) -> dict[str, dict[str, float]]:
    """The speed targets that apply on ``device_type`` at precision ``amp``: {name: {"max" or "min":
    value}}. Ratios hold for any backbone; the two absolute ones are stated for ViT-S/14 at 224 px (training
    images/s, loader included) and for the paper config, ViT-B/14-reg4 at 518 px (full recipe seconds)."""
    if device_type == "cuda":
        return {"ivpt_forward_vs_backbone": {"max": 1.03 if amp == "none" else 1.05},
                "ivpt_train_step_vs_backbone_forward": {"max": 3.0},
                "train_images_per_s": {"min": 1500.0},
                "full_recipe_s": {"max": 600.0}}
    return {"ivpt_forward_vs_backbone": {"max": 1.10}, "ivpt_train_step_vs_vpt_deep": {"max": 1.5}}


@dataclass
class BenchOptions:
    """Everything a bench run depends on (the CLI fills it from its arguments)."""

    out: Path
    quick: bool = False
    backbone: str = "vit_small_patch14_dinov2"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    batch: int = 8
    img_size: int = 224
    n_pro: list[int] = field(default_factory=lambda: [17, 14, 11, 8, 5])
    num_classes: int = 200
    num_prompts: int = 10
    train_tokens: bool = True  # the paper's trainable set: pos_embed / cls_token / reg_token train
    sizes: list[int] = field(default_factory=lambda: [224, 336, 448, 518])
    stage_counts: list[int] = field(default_factory=lambda: [2, 3, 4, 5])  # len(n_pro) of the stage groups
    repeats: int | None = None  # None: 3 with --quick, else 7
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads; None keeps torch's default (one per physical core)
    memory: bool = True
    variants: bool = False  # also ivpt with one view and with frozen tokens (where the train time goes)
    profile: bool = False  # torch.profiler tables of one ivpt and one vpt_deep train step, ivpt's by phase
    compile: bool = False  # torch.compile every forward (train.compile's path); main group: backbone, ivpt, vpt_deep
    amp: str = "none"  # autocast of every forward and train step: none | bf16 | fp16
    loader: bool = True  # measure the training DataLoader's images/s (CPU and gpu_augment paths)
    workers: int | None = None  # loader workers; None: min(16, CPUs)
    loader_images: int | None = None  # synthetic images; None: 64 with --quick, else 512
    loader_image_size: int = 500  # px of the (square) synthetic JPEGs, about CUB's 500 x 375

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp={self.amp!r} must be one of {', '.join(AMP_MODES)}")

    @property
    def n_repeats(self) -> int:
        return self.repeats if self.repeats is not None else (3 if self.quick else 7)

    @property
    def n_workers(self) -> int:
        return self.workers if self.workers is not None else min(16, os.cpu_count() or 1)

    @property
    def n_loader_images(self) -> int:
        return self.loader_images if self.loader_images is not None else (64 if self.quick else 512)


@dataclass
class Entry:
    """One model in a group: ``kind`` is a model kind or ``backbone``; overrides adjust its model/loss config."""

    label: str
    kind: str
    model: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)

    @property
    def trains(self) -> bool:
        return self.kind != BACKBONE


@dataclass
class Group:
    """Models measured together, interleaved, at one image size and one ``n_pro``."""

    name: str
    img_size: int
    n_pro: list[int]
    entries: list[Entry]


def plan(opts: BenchOptions) -> list[Group]:
    """The groups a run measures: ``main`` always (with ``compile``, only the backbone, ivpt and vpt_deep, to bound
    the compilation time); image-size and stage growth unless ``quick``."""
    main = [Entry(BACKBONE, BACKBONE)] + [Entry(k, k) for k in (("ivpt", "vpt_deep") if opts.compile else KINDS)]
    if opts.variants:
        main += [
            Entry("ivpt[1 view]", "ivpt", loss={"equivariance": 0.0}),
            Entry("ivpt[tokens frozen]", "ivpt", model={"train_tokens": False}),
            Entry("vpt_deep[tokens frozen]", "vpt_deep", model={"train_tokens": False}),
        ]
    groups = [Group("main", opts.img_size, list(opts.n_pro), main)]
    if opts.quick:
        return groups
    refs = [Entry(BACKBONE, BACKBONE), Entry("ivpt", "ivpt"), Entry("vpt_deep", "vpt_deep")]
    groups += [Group(f"img_size={s}", s, list(opts.n_pro), refs) for s in opts.sizes]
    for count in opts.stage_counts:
        if not 2 <= count <= len(opts.n_pro):
            continue
        groups.append(Group(f"stages={count - 1}", opts.img_size, list(opts.n_pro[-count:]), refs))
    return groups
