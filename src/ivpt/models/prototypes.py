"""Concept stages: prototypes + spatial prior → soft part maps, argmax region pooling, and (for prompted stages)
the fine→coarse assignment and the prompt tokens built from it. docs/method.md §2, steps 3.2–3.9.

Shapes: B batch, D width, H×W patch grid, L = H·W, n prototypes (P = n-1 foreground + background last),
N coarse concepts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConceptStage", "region_pool", "renormalise", "present_concepts", "prototype_logits",
           "nearest_prototype_maps"]


def region_pool(maps: Tensor, feats: Tensor) -> tuple[Tensor, Tensor]:
    """Average features over each prototype's argmax region, weighted by the map.

    Args:
        maps: (B, n, L) soft assignment of every pixel to the n prototypes.
        feats: (B, L, D) features.
    Returns:
        pooled (B, n, D) — zero for a prototype that wins no pixel — and counts (B, n), pixels won.
    """
    winner = torch.zeros_like(maps).scatter_(1, maps.argmax(dim=1, keepdim=True), 1.0)  # (B, n, L) one-hot
    weights = maps * winner
    counts = winner.sum(dim=-1)
    total = weights.sum(dim=-1, keepdim=True)
    pooled = torch.bmm(weights, feats.to(weights.dtype)) / total.clamp_min(1e-12)
    # A prototype with no pixels has total == 0, so pooled is already exactly 0 there.
    return pooled, counts


def present_concepts(maps: Tensor) -> Tensor:
    """(B, n) bool: concept k claims at least one patch of the (B, n, h, w) ``maps`` (argmax over channels on the
    patch grid, as :func:`region_pool` assigns the regions)."""
    n = maps.shape[1]
    return F.one_hot(maps.argmax(dim=1), n).flatten(1, 2).amax(dim=1).bool()


def prototype_logits(feats: Tensor, prototypes: Tensor, grid: tuple[int, int]) -> Tensor:
    """-||f - π_k||² + ||f||² (B, n, H, W) of features (B, L, D) against prototypes (n, D), in float32.

    ||f||² is the same for every prototype, so it cancels in the softmax over k and is not computed. The factor 2
    scales the (n, D) prototypes, not the (B, L, D) features (exact either way: a power of two).
    """
    f = feats.float()
    protos = prototypes.float()
    logits = f @ (2.0 * protos).t() - (protos * protos).sum(-1)  # (B, L, n)
    return logits.transpose(1, 2).reshape(f.shape[0], -1, *grid)


def nearest_prototype_maps(features: Tensor, prototypes: Tensor) -> Tensor:
    """The maps a concept stage computes without its spatial bias: softmax over the K prototypes of −‖f − π_k‖²
    (docs/method.md §2, step 3.3). features (B, D, H, W), prototypes (K, D) → maps (B, K, H, W)."""
    grid = tuple(features.shape[-2:])
    return prototype_logits(features.flatten(2).transpose(1, 2), prototypes.to(features.device), grid).softmax(dim=1)


def renormalise(maps: Tensor, eps: float = 1e-6) -> Tensor:
    """Add ``eps`` and renormalise over channels (dim 1) so that no map value is exactly zero."""
    maps = maps + eps
    return maps / maps.sum(dim=1, keepdim=True)


class ConceptStage(nn.Module):
    """One depth's class-agnostic concept prototypes.

    Args:
        num_prototypes: n, including the background prototype (the last one).
        dim: feature width D.
        grid: (H, W) patch grid the spatial bias is stored at; other grids get a bilinear resize.
        num_coarse: N for a prompted stage (adds the fine→coarse assigner and the prompt projection); None for
            the final stage.
        init_std: standard deviation of the prototypes' normal initialisation.
    """

    def __init__(
        self,
        num_prototypes: int,
        dim: int,
        grid: tuple[int, int],
        *,
        num_coarse: int | None = None,
        init_std: float = 0.05,
    ) -> None:
        super().__init__()
        self.num_prototypes = num_prototypes
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim) * init_std)
        self.spatial_bias = nn.Parameter(torch.zeros(num_prototypes, *grid))
        self.assigner: nn.Linear | None = None
        self.prompt_proj: nn.Linear | None = None
        if num_coarse is not None:
            self.assigner = nn.Linear(dim, num_coarse)
            self.prompt_proj = nn.Linear(dim, dim)
            nn.init.trunc_normal_(self.prompt_proj.weight, std=0.02)
            nn.init.zeros_(self.prompt_proj.bias)

    @property
    def num_foreground(self) -> int:
        return self.num_prototypes - 1

    def bias_for(self, grid: tuple[int, int]) -> Tensor:
        """(n, H, W) spatial bias at ``grid`` (bilinear resize when it differs from the stored grid)."""
        bias = self.spatial_bias
        if tuple(bias.shape[-2:]) != tuple(grid):
            bias = F.interpolate(bias[None], size=grid, mode="bilinear", align_corners=False)[0]
        return bias

    def maps(self, feats: Tensor, grid: tuple[int, int]) -> Tensor:
        """Soft part maps S (B, n, H, W) from features (B, L, D): softmax_k(-||f - π_k||² + β_k)
        (:func:`prototype_logits`), evaluated in float32 even under autocast because squared distances lose too
        much in bf16."""
        with torch.autocast(device_type=feats.device.type, enabled=False):
            logits = prototype_logits(feats, self.prototypes, grid) + self.bias_for(grid).float()
            return logits.softmax(dim=1)

    def assign(self, regions: Tensor, counts: Tensor, *, tau: float, sample: bool) -> Tensor:
        """Fine→coarse assignment Q (B, P, N) of the P foreground regions (B, P, D).

        Gumbel-softmax when ``sample`` (training), plain softmax otherwise, in float32; rows of empty regions are
        uniform.
        """
        assert self.assigner is not None, "the final stage has no assigner"
        z = self.assigner(regions).float()  # rows of Q sum to one in float32 even when the Linear ran in bf16
        q = F.gumbel_softmax(z, tau=tau, hard=False, dim=-1) if sample else (z / tau).softmax(dim=-1)
        empty = (counts == 0).unsqueeze(-1)
        return torch.where(empty, torch.full_like(q, 1.0 / q.shape[-1]), q)

    def prompts(self, regions: Tensor, assignment: Tensor) -> Tensor:
        """Prompt tokens (B, N, D) from foreground regions (B, P, D) and a detached assignment (B, P, N)."""
        assert self.prompt_proj is not None, "the final stage has no prompt projection"
        weights = assignment.detach()
        # A coarse concept that no fine concept feeds (its column of Q underflowed to exact zeros, as a confident
        # assigner does) gets a zero feature instead of 0/0 = NaN, which would poison every token of the block.
        mass = weights.sum(dim=1).unsqueeze(-1).clamp_min(1e-12)
        coarse = torch.einsum("bkn,bkd->bnd", weights, regions) / mass
        # One LayerNorm over all N·D values of a sample jointly, without affine (the reference froze its affine
        # by accident; an affine-free norm is what it actually trained).
        coarse = F.layer_norm(coarse, coarse.shape[-2:])
        return self.prompt_proj(coarse.to(self.prompt_proj.weight.dtype))

    @staticmethod
    def grouped_map(maps: Tensor, assignment: Tensor) -> Tensor:
        """Fine maps (B, n, H, W) grouped into N coarse + background channels (B, N+1, H, W); no detach.

        Computed in float32 even under autocast (like :meth:`maps`), so every pixel still sums to one."""
        with torch.autocast(device_type=maps.device.type, enabled=False):
            fg = torch.einsum("bkhw,bkn->bnhw", maps[:, :-1].float(), assignment.float())
            return torch.cat([fg, maps[:, -1:].float()], dim=1)
