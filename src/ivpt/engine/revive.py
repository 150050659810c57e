"""Dead-concept revival (``optim.revive_until``, not the paper): a foreground prototype that won no more than a
sliver of an epoch's pixels gets a second life as a split of the largest region.

Why: the maps are a softmax over ``-||f - π_k||² + β_k`` of final-normed features, whose squared distances differ by
tens, so the maps are nearly one-hot (pixel entropy ≈ 0.05 of its maximum at 112 px). A prototype that loses all its
pixels then has probabilities of order e^-30 everywhere and receives no gradient from any loss — the presence term
included — so it never comes back: the stage has collapsed. k-means and vector-quantised codebooks meet the same
dead units and cure them the same way: move the dead unit next to the busiest one, so that the two share its pixels
and the losses pull them apart.

At the end of an epoch, for every stage with concept maps and each dead foreground prototype k (fewer than
``ALIVE_SHARE`` of the epoch's pixels), in order of k: the donor d is the prototype, background included, with the
most pixels (counting a donor already split once as having lost half of them to its copy). Then
``π_k ← π_d + ε`` with ε ~ N(0, σ²) (σ = ``model.prototype_init_std``), ``β_k ← β_d``, and the optimiser's moment
estimates of row k are copied from row d, so the copy starts in step with its donor instead of with a fresh,
oversized Adam step. The noise comes from a generator seeded by (train.seed, epoch): the same on every rank, and
the same again when a run resumes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .health import ALIVE_SHARE

__all__ = ["dead_prototypes", "revive_dead_concepts"]


def dead_prototypes(wins: Sequence[float]) -> list[int]:
    """Indices of the foreground prototypes (all but the last, the background) of one stage that won fewer than
    :data:`ALIVE_SHARE` of the pixels counted in ``wins`` (pixels won per prototype)."""
    total = float(sum(wins))
    if total <= 0:
        return []
    return [k for k, w in enumerate(wins[:-1]) if w < ALIVE_SHARE * total]


def _copy_row(param: nn.Parameter, optimizer: torch.optim.Optimizer | None, dst: int, src: int) -> None:
    """Row ``dst`` of ``param``'s optimiser moments (Adam's exp_avg / exp_avg_sq, where present) from row ``src``."""
    if optimizer is None:
        return
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value[dst] = value[src]


@torch.no_grad()
def revive_dead_concepts(stages: Sequence[nn.Module], wins: Sequence[Sequence[float]],
                         optimizer: torch.optim.Optimizer | None, *, noise_std: float,
                         generator: torch.Generator) -> list[tuple[int, int, int]]:
    """Revive the dead foreground prototypes of each stage (``stages[i]`` a
    :class:`~ivpt.models.prototypes.ConceptStage` whose maps gave the pixel counts ``wins[i]``) as described in the
    module docstring, in place.

    Returns (stage, revived prototype, donor) for every revival, in the order they were made.
    """
    revived = []
    for i, (stage, w) in enumerate(zip(stages, wins)):
        if len(w) != stage.num_prototypes:
            raise ValueError(f"stage {i}: {len(w)} pixel counts for {stage.num_prototypes} prototypes")
        share = [float(v) for v in w]
        for k in dead_prototypes(w):
            donor = max(range(len(share)), key=lambda j: (share[j], -j))
            if donor == k or share[donor] <= 0:
                continue
            noise = torch.randn(stage.prototypes.shape[1], generator=generator) * noise_std
            stage.prototypes[k] = stage.prototypes[donor] + noise.to(stage.prototypes)
            stage.spatial_bias[k] = stage.spatial_bias[donor]
            for param in (stage.prototypes, stage.spatial_bias):
                _copy_row(param, optimizer, k, donor)
            share[donor] /= 2
            share[k] = share[donor]
            revived.append((i, k, donor))
    return revived
