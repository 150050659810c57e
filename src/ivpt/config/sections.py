"""The config sections other than the model: loss weights, optimiser, data, run control and evaluation.

A field that only the model kinds with concept maps read (the map loss terms, concept revival) says so
(``maps_only``): :func:`ivpt.config.config_changes` ignores a change in it for a run of another kind.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..formats import DATASET_FORMATS
from .fields import ConfigError, check_limits, check_low_high, limited, maps_only

__all__ = ["LossConfig", "OptimConfig", "DataConfig", "TrainConfig", "EvalConfig", "LOSS_TERMS", "PAPER_LOSS_TERMS",
           "AMP_MODES", "SCHEDULES", "SELECTIONS", "INTERPOLATIONS", "AFFINE_FILLS", "EVAL_PROTOCOLS", "IMAGENET_MEAN",
           "IMAGENET_STD"]

AMP_MODES = ("none", "bf16", "fp16")  # fp32, bfloat16 or float16 autocast
SELECTIONS = ("latest_within_se", "best_top1")  # train.selection: how best/ is chosen (ivpt.engine.selection)
SCHEDULES = ("step", "cosine", "constant")  # ivpt.engine.schedule.lr_factor defines each
# The normalisation of [0, 1] pixels the DINOv2 / ImageNet backbones were trained with (per channel R, G, B): the
# default of data.mean / data.std, and what a checkpoint saved without its own (before they were kept in
# best/config.json) was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
INTERPOLATIONS = ("bilinear", "nearest")
AFFINE_FILLS = ("mean", "zero")
EVAL_PROTOCOLS = ("corrected", "reference")

PAPER_LOSS_TERMS = (
    "classification",
    "consistency",
    "orthogonality",
    "equivariance",
    "presence",
    "bg_presence",
    "tv",
    "entropy",
)
# The paper's terms, then ours (weight 0 in the paper configs; none is any parameter's only gradient path).
LOSS_TERMS = PAPER_LOSS_TERMS + ("object_peak", "parts_only")


@dataclass
class LossConfig:
    """Weights of the loss terms (the paper's eight, all 1 there, and ``object_peak`` and ``parts_only``, 0 there)
    and the equivariance transform's ranges."""

    classification: float = limited(1.0, ">= 0", what="a weight")
    consistency: float = limited(1.0, ">= 0", what="a weight", maps_only=True)
    orthogonality: float = limited(1.0, ">= 0", what="a weight", maps_only=True)
    equivariance: float = limited(1.0, ">= 0", what="a weight", maps_only=True)
    presence: float = limited(1.0, ">= 0", what="a weight", maps_only=True)
    bg_presence: float = limited(1.0, ">= 0", what="a weight", maps_only=True)
    tv: float = limited(1.0, ">= 0", what="a weight", maps_only=True)
    entropy: float = limited(1.0, ">= 0", what="a weight", maps_only=True)
    # NOT the paper when > 0: in every image, each foreground concept that wins no pixel is pulled, through its own
    # logit against the background's, to where the background map is low, so that its peak falls on the object (the
    # consistency protocol scores every concept's peak in every image; ivpt.losses.object_peak_loss).
    object_peak: float = limited(0.0, ">= 0", what="a weight", note="0: off, as the paper", maps_only=True)
    # NOT the paper when > 0: the cross-entropy of the parts-only logits (the mean of the N part logits, the head
    # without its global part) is added, so the parts must classify by themselves and not only beside the global
    # token (ivpt.losses.parts_only_loss; without model.global_part those logits are the head's own).
    parts_only: float = limited(0.0, ">= 0", what="a weight", note="0: off, as the paper", maps_only=True)
    # The parts-only weight rises linearly from 0 to loss.parts_only over this fraction of the run's optimiser steps:
    # while the classifier is still random, classification through the parts alone can empty the stages
    # (benchmarks/recipe.md, "A smaller global share").
    parts_only_warmup: float = limited(0.0, "[0, 1]", what="a fraction of the total optimiser steps",
                                       note="0: the full weight from the first step", maps_only=True)
    label_smoothing: float = limited(0.0, "[0, 1)")
    # NOT the paper when > 0: the TV term is multiplied by sqrt(grid H·W) / tv_reference_grid, so a shape costs the
    # same at any image size as on that grid (37: the paper's 518 px / patch 14, where the factor is exactly 1).
    # 0 (the paper configs): the plain per-pixel mean, which weighs the same shapes ~4.6x more at 112 px.
    # 37 by default, the recipe for new datasets (benchmarks/recipe.md).
    tv_reference_grid: float = limited(37.0, ">= 0", note="0: unscaled, as the paper; 37: the paper's 518 px / "
                                                         "patch 14 grid", maps_only=True)
    eq_rotation_deg: float = limited(90.0, "[0, 180]", note="degrees: rotations are drawn from +-this",
                                     maps_only=True)
    eq_translate: float = limited(0.11, "[0, 1]", note="a fraction of the image side", maps_only=True)
    eq_scale: list[float] = limited(lambda: [0.8, 1.4], "> 0", length=2, items="low, high", maps_only=True)
    # NOT the paper when > 0: the entropy weight rises linearly from 0 to loss.entropy over this fraction of the run's
    # optimiser steps, as the rate does over optim.warmup (the term empties the stages within the first hundred steps,
    # before the concepts have formed: benchmarks/recipe.md, "What kills the concepts").
    entropy_warmup: float = limited(0.0, "[0, 1]", what="a fraction of the total optimiser steps",
                                    note="0: the full weight from the first step, as the paper", maps_only=True)
    # How the equivariance loss warps the second view's maps back: bilinear (ours) or nearest (the reference's
    # inverse warp, two nearest-neighbour resamplings: docs/deviations.md).
    eq_inverse_interpolation: str = maps_only("bilinear")

    def __post_init__(self) -> None:
        check_limits(self)
        self.eq_scale = [float(s) for s in self.eq_scale]
        check_low_high("loss.eq_scale", self.eq_scale, "0.8,1.4")
        if self.eq_inverse_interpolation not in INTERPOLATIONS:
            raise ConfigError(f"loss.eq_inverse_interpolation={self.eq_inverse_interpolation!r} must be 'bilinear' "
                              "(ours) or 'nearest' (the reference's inverse warp)")

    def weights(self, progress: float = 1.0) -> dict[str, float]:
        """Each term's weight at ``progress`` = (optimiser step + 1) / total steps of the run (1: the full weights,
        also those of evaluation); the entropy and parts-only weights depend on it, through ``entropy_warmup`` and
        ``parts_only_warmup``."""
        weights = {name: float(getattr(self, name)) for name in LOSS_TERMS}
        for name, warmup in (("entropy", self.entropy_warmup), ("parts_only", self.parts_only_warmup)):
            if warmup > 0:
                weights[name] *= min(1.0, progress / warmup)
        return weights


@dataclass
class OptimConfig:
    """Adam with per-group learning rates = base_lr x multiplier, a learning-rate schedule, gradient clipping.

    The schedule is a function of the optimiser step (:func:`ivpt.engine.schedule.lr_factor`), applied after
    every step. ``schedule``: ``step`` multiplies the rate by ``gamma`` every ``step_epochs`` epochs (the paper:
    4 and 0.5, no warm-up); ``cosine`` decays it from the peak to 0 over the steps after the warm-up;
    ``constant`` keeps the peak. ``warmup`` is a FRACTION of the run's total optimiser steps
    (``epochs x steps per epoch``, or ``train.max_steps`` when smaller) over which the rate rises linearly to
    its peak; 0 disables it. The defaults (constant after a 5 % warm-up, the recipe's) keep every step after the
    warm-up at the peak, but for the concept groups' rise to their peak (``concept_lr_start``, ``concept_lr_ramp``);
    the paper configs set ``schedule: step``, ``warmup: 0`` and no concept ramp.
    """

    base_lr: float = limited(1e-6, "> 0")
    head_lr_mult: float = limited(1e4, "> 0")  # classifier, modulation, prompt projections, assigners
    # Prototypes, spatial biases, pos_embed / cls_token / reg_token, free prompts. The recipe: 400, reached half-way
    # from 200 (the paper's) through concept_lr_start / concept_lr_ramp below.
    concept_lr_mult: float = limited(400.0, "> 0")
    betas: list[float] = limited(lambda: [0.9, 0.999], "[0, 1)", length=2, items="Adam's beta1, beta2")
    weight_decay: float = limited(0.0, ">= 0")
    grad_clip: float = limited(2.0, "finite", note="the global L2 norm; <= 0 disables clipping")
    epochs: int = limited(25, ">= 1")
    # At least this many optimiser steps: epochs are raised until epochs x steps per epoch reaches it, so a small
    # dataset is not over after a few hundred steps (0: exactly optim.epochs, as the paper configs).
    min_steps: int = limited(1000, ">= 0", note="0: exactly optim.epochs epochs")
    # Images per optimiser step over all processes (split over them under torchrun).
    batch_size: int = limited(16, ">= 1")
    grad_accum: int = limited(1, ">= 1")
    # step | cosine | constant. The recipe: constant after the warm-up (benchmarks/recipe.md, "A constant rate").
    schedule: str = "constant"
    # A fraction of the total optimiser steps; 0: no warm-up.
    warmup: float = limited(0.05, "[0, 1)", what="a fraction of the total optimiser steps",
                            note="e.g. 0.05 for a warm-up over the first 5 % of training; 0: none")
    # The concept-rate groups (concept_lr_mult) start at concept_lr_start of their peak and reach it linearly after
    # concept_lr_ramp of the total optimiser steps, on top of the schedule (not the paper; benchmarks/recipe.md,
    # "A concept rate that rises"). 1 / 0: the concept groups follow the schedule alone, as the paper's. The
    # defaults are the recipe's: half the peak at the start, the peak half-way.
    concept_lr_start: float = limited(0.5, "(0, 1]", what="a fraction of the concept groups' peak rate",
                                      note="1: start at the peak")
    concept_lr_ramp: float = limited(0.5, "[0, 1]", what="a fraction of the total optimiser steps",
                                     note="e.g. 0.5: the concept rate reaches its peak half-way; 0: no ramp")
    # An exponential moving average of the trained parameters (not the paper, ivpt.engine.ema): validation, best/ and
    # the test pass read the average, updated after every step with this decay. 0: off, the last iterate is used.
    # The recipe: 0.99 (benchmarks/recipe.md, "A moving average of the parameters"); the paper configs: 0.
    ema_decay: float = limited(0.99, "[0, 1)", what="the per-step decay of the parameter average",
                               note="e.g. 0.99: an average over about the last 100 steps; 0: off")
    step_epochs: int = limited(4, ">= 1")  # schedule=step only
    gamma: float = limited(0.5, "(0, 1]")  # schedule=step only
    amp: str = "none"  # none | bf16 | fp16
    # Dead-concept revival (not the paper, ivpt.engine.revive): at the end of every epoch within this fraction of the
    # run's optimiser steps, a foreground prototype that won < 1 % of the epoch's pixels becomes a split of the
    # largest region. 0: off.
    revive_until: float = limited(0.0, "[0, 1]", what="a fraction of the total optimiser steps",
                                  note="e.g. 0.8: revive dead concepts during the first 80 % of training; 0: off",
                                  maps_only=True)

    def __post_init__(self) -> None:
        check_limits(self)
        if self.amp not in AMP_MODES:
            raise ConfigError(f"optim.amp={self.amp!r} must be one of {', '.join(AMP_MODES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r} must be one of {', '.join(SCHEDULES)} (step: the "
                             "paper's decay every optim.step_epochs epochs; cosine: follows training progress)")
        if (self.concept_lr_start < 1) != (self.concept_lr_ramp > 0):
            raise ConfigError(f"optim.concept_lr_start={self.concept_lr_start} and optim.concept_lr_ramp="
                              f"{self.concept_lr_ramp} go together: a start below 1 needs a ramp above 0 (the "
                              "fraction of the steps over which the concept rate rises to its peak), and the other "
                              "way round; 1 and 0 turn the ramp off")
        self.betas = [float(b) for b in self.betas]


@dataclass
class DataConfig:
    """Dataset location, format and the augmentations of the paper setting."""

    root: str = ""
    format: str = "cub"  # one of ivpt.formats.DATASET_FORMATS: cub, nabirds, partimagenet, flowers102, ...
    val_fraction: float = limited(0.1, "[0, 1)")
    # Which training images the validation split takes (ivpt.data.stratified_split). -1: drawn with train.seed, so
    # each seed trains on its own images; a fixed value gives every seed the same split, and seeds then differ only
    # in initialisation, data order and augmentation.
    val_seed: int = limited(-1, "[-1, 2147483647]", note="-1: train.seed")
    num_workers: int = limited(2, ">= 0", note="0: load in the training process")
    # Shorter side before cropping; 0 means the model's img_size.
    resize: int = limited(0, ">= 0", note="0: model.img_size")
    hflip: float = limited(0.5, "[0, 1]", what="a probability")
    affine_degrees: float = limited(90.0, "[0, 180]", note="degrees: rotations are drawn from +-this")
    affine_translate: float = limited(0.2, "[0, 1]", note="a fraction of the image side")
    affine_scale: list[float] = limited(lambda: [0.8, 1.2], "> 0", length=2, items="low, high")
    affine_interpolation: str = "bilinear"  # bilinear | nearest (the reference: torchvision's default, nearest)
    affine_fill: str = "mean"  # area the affine warp exposes: mean (normalises to ~0) | zero (black, the reference)
    color_jitter: list[float] = limited(lambda: [0.2, 0.2, 0.2, 0.05], (">= 0", ">= 0", ">= 0", "[0, 0.5]"),
                                        note="brightness, contrast, saturation, hue",
                                        items="brightness, contrast, saturation, hue")
    # Normalisation of the [0, 1] pixel values, per channel (R, G, B).
    # Kept with the model in best/config.json ("data"), so a checkpoint is read as it was trained.
    mean: list[float] = limited(lambda: list(IMAGENET_MEAN), "[0, 1]", length=3, items="R, G, B")
    std: list[float] = limited(lambda: list(IMAGENET_STD), "> 0", length=3, items="R, G, B")
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
        check_low_high("data.affine_scale", list(self.affine_scale), "0.8,1.2")
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
    seed: int = limited(0, "[0, 2147483647]")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = limited(10, ">= 1")  # optimiser steps between log.csv rows
    ckpt_every_steps: int = limited(0, ">= 0", note="0: only at the end of each epoch")
    tensorboard: bool = False
    # torch.use_deterministic_algorithms(True) for the run (strict: an op without a deterministic kernel raises), so
    # that a resumed run is bit-identical to an uninterrupted one on CUDA too; off by default (slower kernels).
    deterministic: bool = False
    # Stop after this many optimiser steps (0: no limit); for smoke runs.
    max_steps: int = limited(0, ">= 0", note="0: no limit")
    # Optimiser steps between host reads of the on-device finite flags and log sums (one device→host sync each).
    # 16: on a GPU a per-step read stalls the host until the step has finished, so the next step's kernels are
    # queued late; every 16 steps that cost is spread thin (< 1 % of a step), while a non-finite loss is still
    # caught within 16 steps and named with its exact step and loss term (each step's flags are kept). Nothing is
    # saved from an unchecked step: the flags are always read before last.pt or best/ are written (end of epoch,
    # train.ckpt_every_steps), so a checkpoint never holds the state after a non-finite step. 1 checks before
    # every optimiser step (the step that turned non-finite is then never applied). fp16 (GradScaler) reads its
    # overflow flag every step regardless.
    sync_every: int = limited(16, ">= 1", note="optimiser steps between finite checks; 1 = every step")
    # torch.compile the model's forward (DDP-wrapped under torchrun). Optional; if compilation fails, one warning
    # line and the run continues eagerly. Compiled kernels round differently, so a compiled run is not bit-equal
    # to an eager one.
    compile: bool = False
    # Which epoch best/ holds among those whose concepts are alive on the validation split (ivpt.engine.selection):
    # latest_within_se, the latest epoch whose validation top-1 is within one standard error of the best so far
    # (a split of a few dozen images cannot tell them apart; later concepts have trained longer), or best_top1.
    selection: str = "latest_within_se"
    # NOT the paper: train this many starts of the run for ``start_epochs`` epochs each, then only the start whose
    # parts decide the most on the validation split (ivpt.engine.starts) to the end. Start k is the plain run of seed
    # ``seed * starts + k`` (its split too), so 1 is the plain run of ``seed``.
    starts: int = limited(1, "[1, 64]", note="1: one plain run")
    start_epochs: int = limited(4, ">= 1", note="epochs each start trains before the choice (with train.starts > 1)")

    def start_seed(self, start: int) -> int:
        """The seed of start ``start`` (0-based) of ``starts``: ``seed * starts + start``."""
        return self.seed * self.starts + start

    def __post_init__(self) -> None:
        check_limits(self)
        if self.selection not in SELECTIONS:
            raise ConfigError(f"train.selection={self.selection!r} is unknown; choose one of {', '.join(SELECTIONS)}")
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"train.device={self.device!r} must be one of auto, cpu, cuda, cuda:N (N: a GPU index), "
                              "mps")


@dataclass
class EvalConfig:
    """Constants of the interpretability protocols (docs/method.md §4).

    ``protocol`` picks how consistency/stability, NMI/ARI, keypoint regression and foreground IoU are measured:
    ``corrected`` (ours, the default) or ``reference`` (exactly as the authors' evaluation code, bugs included);
    docs/deviations.md lists every difference. Accuracy is the same under both.
    """

    protocol: str = "corrected"
    stage: str = "auto"  # auto = the stage with n_pro[-3] prototypes; 'final' or an index
    part_frame: int = limited(224, ">= 2", note="pixels per side of the frame part boxes are scored in")
    half_size: int = limited(36, ">= 1", note="pixels from a part box's centre to its side")
    threshold: float = limited(0.8, "(0, 1]")
    noise_std: float = limited(0.2, ">= 0")
    noise_clip: float = limited(0.25, ">= 0")
    active_threshold: float = limited(0.5, "[0, 1)", note="a map's maximum above it counts the concept present")
    # Images per forward pass over all processes, like optim.batch_size.
    batch_size: int = limited(32, ">= 1")
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

