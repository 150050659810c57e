"""How much of a part-head model's decisions its parts make (models with a part-pooled head: IVPT,
``last_layer_parts``, ``vpt_deep_proto``).

The head scores ``logits = w_part · Σ_k part_logits_k + w_global · global_logits`` (``ConceptModel.logit_weights``;
``w_global = 0`` without ``model.global_part``). The part evidence is ``P = w_part · Σ_k part_logits_k``, the global
evidence ``G = logits - P``. Three scores, over the scored images:

* ``parts_only_top1`` (percent): top-1 of the parts-only logits ``Σ_k part_logits_k / N`` — the head with the global
  evidence removed and the part weights renormalised to sum to one (argmax is the same as that of ``P``);
* ``parts_agree`` (percent): share of images whose parts-only prediction equals the full prediction;
* ``part_share`` (fraction in [0, 1]): mean over images of the share of the winning margin that the parts supply,
  ``clip((P[c1] - P[c2]) / (logits[c1] - logits[c2]), 0, 1)`` with c1 the predicted class and c2 the runner-up.
  An image whose two best logits tie has no margin to share and is left out of this mean (and counted in
  ``margin_ties``).

Without a global part ``P`` is the logits themselves, so the scores are 100 / 100 / 1.0 by definition.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .state import SumState

__all__ = ["part_evidence", "margin_share", "DecisionMeter"]


def part_evidence(logits: Tensor, part_logits: Tensor, w_part: float, w_global: float) -> Tensor:
    """The parts' share of ``logits`` (B, C): ``w_part · Σ_k part_logits_k`` (B, N, C), or the logits themselves when
    the head has no global term (``w_global == 0``)."""
    if w_global == 0:
        return logits
    return w_part * part_logits.sum(dim=1).to(logits.dtype)


def margin_share(logits: Tensor, evidence: Tensor) -> tuple[Tensor, Tensor]:
    """Per image (B,): the share of the margin of the top logit over the runner-up that ``evidence`` (B, C) supplies,
    clipped to [0, 1], and a bool mask of the images with a margin (no tie between the two best logits)."""
    top2 = logits.double().topk(2, dim=1).indices  # (B, 2)
    full = logits.double().gather(1, top2)
    part = evidence.double().gather(1, top2)
    margin = full[:, 0] - full[:, 1]
    has_margin = margin > 0
    share = ((part[:, 0] - part[:, 1]) / torch.where(has_margin, margin, torch.ones_like(margin))).clamp(0.0, 1.0)
    return torch.where(has_margin, share, torch.zeros_like(share)), has_margin


class DecisionMeter(SumState):
    """Counts for ``parts_only_top1``, ``parts_agree`` and ``part_share``.

    State (summed under DDP): ``counts`` int64 (4,) = images, parts-only top-1 hits, agreements, images with a margin;
    ``share_sum`` float64 (1,) = the sum of the per-image margin shares.
    """

    def __init__(self, *, device: torch.device | str = "cpu") -> None:
        super().__init__(device=device)
        self._add_state("counts", (4,))
        self._add_state("share_sum", (1,), torch.float64)

    def update(self, logits: Tensor, part_logits: Tensor, labels: Tensor, *, w_part: float, w_global: float,
               valid: Tensor | None = None) -> None:
        """Add a batch: logits (B, C), part_logits (B, N, C), labels (B,), the head's weights, valid (B,) or None."""
        if logits.ndim != 2 or part_logits.shape[0] != logits.shape[0] or part_logits.shape[-1] != logits.shape[1]:
            raise ValueError(f"logits {tuple(logits.shape)} and part_logits {tuple(part_logits.shape)} do not match "
                             "(B, C) / (B, N, C)")
        if logits.shape[1] < 2:
            raise ValueError("decision scores need at least two classes")
        keep = self._rows(logits.shape[0], valid, logits.device)
        logits, part_logits, labels = logits[keep], part_logits[keep], labels.to(logits.device)[keep]
        evidence = part_evidence(logits, part_logits, w_part, w_global)
        parts_pred = evidence.argmax(dim=1) if w_global == 0 else part_logits.sum(dim=1).argmax(dim=1)
        share, has_margin = margin_share(logits, evidence)
        counts = torch.stack([
            torch.tensor(labels.numel(), device=logits.device),
            (parts_pred == labels).sum(),
            (parts_pred == logits.argmax(dim=1)).sum(),
            has_margin.sum(),
        ])
        self.counts.add_(counts.to(self.device, torch.int64))
        self.share_sum.add_(share.sum().reshape(1).to(self.device))

    def no_data(self) -> dict[str, str]:
        if int(self.counts[0]) == 0:
            return {k: "no image was classified" for k in ("parts_only_top1", "parts_agree", "part_share")}
        if int(self.counts[3]) == 0:
            return {"part_share": "the two best logits tie on every image"}
        return {}

    def compute(self) -> dict[str, float]:
        """{"parts_only_top1", "parts_agree"} in percent and "part_share" in [0, 1]; those without data are absent."""
        n, hits, agree, with_margin = (int(v) for v in self.counts)
        if n == 0:
            return {}
        out = {"parts_only_top1": 100.0 * hits / n, "parts_agree": 100.0 * agree / n}
        if with_margin:
            out["part_share"] = float(self.share_sum[0]) / with_margin
        return out
