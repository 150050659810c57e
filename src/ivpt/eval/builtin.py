"""The metrics ivpt ships, each one registration in :mod:`ivpt.eval.registry` (imported with :mod:`ivpt.eval`).

Their order here is the order of every table: the ``ivpt eval`` table, eval.json's rows, the report's cards;
compare.md orders its columns by :attr:`~ivpt.eval.registry.Score.compare` (the paper's Table 1 first).
"""
from __future__ import annotations

from ..metrics import SumState
from ..metrics.decision import DecisionMeter
from .protocols import Discovery, KeypointFit, PartHits
from .registry import EvalContext, Metric, Score, register_metric
from .runner import AccuracyConsumer, Forward

__all__ = ["DecisionConsumer", "decision", "discovery", "part_hits", "accuracy"]


# -------------------------------------------------------------------------------------------- consumer factories

def accuracy(ctx: EvalContext) -> AccuracyConsumer:
    return AccuracyConsumer(ctx.cfg.model.num_classes)


def decision(ctx: EvalContext) -> DecisionConsumer:
    return DecisionConsumer(*ctx.model.logit_weights())


def part_hits(ctx: EvalContext) -> PartHits:
    """Consistency and stability share one forward of clean + noisy box crops."""
    return PartHits(ctx.stages, ctx.cfg, ctx.dataset, noisy="stability" in ctx.active)


def discovery(ctx: EvalContext) -> Discovery:
    """NMI/ARI, KPR and foreground IoU share one :class:`Discovery`; KPR first fits its regressors on the training
    split (a pass of its own)."""
    regressors = {}
    if "kpr" in ctx.active:
        train_set = ctx.open("train", ctx.transform, with_parts=True)
        fit = KeypointFit(ctx.stages, len(train_set.part_names), ctx.cfg)
        ctx.run(train_set, [fit], "kpr fit (train)")
        regressors = fit.regressors()
    dataset = ctx.dataset
    by_keypoints = "nmi_ari" in ctx.active and dataset.has_keypoints
    return Discovery(ctx.stages, ctx.cfg, num_parts=len(dataset.part_names), by_keypoints=by_keypoints,
                     by_part_masks="nmi_ari" in ctx.active and not by_keypoints, regressors=regressors,
                     fg_iou="fg_iou" in ctx.active)


class DecisionConsumer:
    """How much of a part-head model's decisions its parts make (:mod:`ivpt.metrics.decision`), from the same
    forward as accuracy (``logits``, ``part_logits``) and the head's weights ``w_part``, ``w_global``
    (``model.logit_weights()``)."""

    def __init__(self, w_part: float, w_global: float) -> None:
        self.w_part, self.w_global = w_part, w_global
        self.meter = DecisionMeter()

    def update(self, batch: dict, forward: Forward) -> None:
        out = forward(batch["image"])
        self.meter.update(out.logits.float().cpu(), out.part_logits.float().cpu(), batch["label"],
                          w_part=self.w_part, w_global=self.w_global)

    def meters(self) -> list[SumState]:
        return [self.meter]

    def scores(self, stage: int | None) -> dict[str, float]:
        return self.meter.compute()

    def scored_meters(self, stage: int | None) -> list[SumState]:
        return [self.meter]


# ------------------------------------------------------------------------------------------- support reasons

def _keypoints(model_class: type, reader: type) -> str | None:
    return None if reader.has_keypoints else f"{reader.FORMAT} has no part keypoints"


def _keypoints_or_part_masks(model_class: type, reader: type) -> str | None:
    if reader.has_keypoints or reader.has_part_masks:
        return None
    return f"{reader.FORMAT} has no part keypoints or part masks"


def _fg_masks(model_class: type, reader: type) -> str | None:
    return None if reader.can_have_fg_masks else f"{reader.FORMAT} has no foreground masks or part masks"


def _fg_masks_on_disk(ctx: EvalContext) -> str | None:
    if ctx.dataset.has_fg_masks:
        return None
    return f"{ctx.cfg.data.format} at {ctx.cfg.data.root} has no foreground mask for every {ctx.split} image"


def _part_head(model_class: type, reader: type) -> str | None:
    if getattr(model_class, "has_part_head", False):
        return None
    return f"model.kind={model_class.kind} has no part-pooled head"


# ------------------------------------------------------------------------------------------------- the table

register_metric(Metric(
    "acc", consumer=accuracy, description="classification accuracy (docs/method.md §4)", scores=(
        Score("top1", "top-1", "%", "↑", "share of images whose highest logit is their label", compare=3),
        Score("top5", "top-5", "%", "↑", "share of images whose label is among the five highest logits",
              compare=None),
        Score("balanced_top1", "balanced top-1", "%", "↑", "top-1 averaged over the classes that occur",
              compare=None))))

register_metric(Metric(
    "consistency", consumer=part_hits, on="crop", per_stage=True, supports=_keypoints,
    description="Huang et al.'s consistency on box crops", scores=(
        Score("consistency", "consistency", "%", "↑",
              "share of (class, concept) pairs whose peak box holds one part's keypoint in at least eval.threshold "
              "of the class's images", compare=1),)))

register_metric(Metric(
    "stability", consumer=part_hits, on="crop", per_stage=True, supports=_keypoints,
    description="Huang et al.'s stability on box crops with the protocol's noise", scores=(
        Score("stability", "stability", "%", "↑",
              "share of concepts whose keypoint hits stay the same when the crop gets the protocol's noise",
              compare=2),)))

register_metric(Metric(
    "nmi_ari", consumer=discovery, per_stage=True, supports=_keypoints_or_part_masks,
    description="agreement of argmax concepts with ground-truth parts (at keypoints, else part-mask pixels)",
    scores=(
        Score("nmi", "NMI", "×100", "↑", "normalised mutual information of ground-truth parts and argmax concepts",
              compare=4),
        Score("ari", "ARI", "×100", "↑", "adjusted Rand index of ground-truth parts and argmax concepts",
              compare=5),
        Score("part_purity", "part purity", "%", "↑",
              "how much of each concept's area lies in one ground-truth part (part masks)", compare=None),
        Score("part_coverage", "part coverage", "%", "↑",
              "how much of each part's area one concept claims (part masks)", compare=None))))

register_metric(Metric(
    "kpr", consumer=discovery, per_stage=True, supports=_keypoints,
    description="keypoint regression from concept centroids, fitted on the training split", scores=(
        Score("kpr", "keypoint error", "% of box", "↓",
              "mean L2 error of keypoints regressed from concept centroids, in box units x 100", column="KPR",
              compare=6, source="kp_error"),)))

register_metric(Metric(
    "fg_iou", consumer=discovery, per_stage=True, supports=_fg_masks, available=_fg_masks_on_disk,
    description="foreground segmentation by the non-background concepts", scores=(
        Score("fg_iou", "foreground IoU", "%", "↑",
              "IoU of the non-background concepts' area with the foreground mask", compare=None),)))

register_metric(Metric(
    "decision", consumer=decision, supports=_part_head,
    description="how much of the decision the parts make (part-pooled heads; model.global_part adds a global "
                "term)", scores=(
        Score("parts_only_top1", "parts-only top-1", "%", "↑",
              "top-1 of the part logits alone, the global evidence removed", compare=7),
        Score("parts_agree", "parts agree", "%", "↑",
              "share of images whose parts-only prediction is the full prediction", compare=8),
        Score("part_share", "part share", "fraction", "↑",
              "mean share of the winning logit margin that the parts supply, in [0, 1]", column="part share (0–1)",
              compare=9, digits=2))))
