"""The loss terms of IVPT (docs/method.md §3; the paper's eight, the `object_peak` and `parts_only` options) and their
weighted sum.

Map losses take one stage's recomputed map S̃ (B, n, H, W) — foreground channels first, background last — and
:func:`ivpt_losses` averages them over the m+1 stages. The presence, background-presence, total-variation,
entropy and equivariance terms follow the part-discovery losses of PDiscoFormer (Aniraj et al., MIT licence).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import LOSS_TERMS, LossConfig
from .models.prototypes import present_concepts
from .runtime import to_device

__all__ = [
    "classification_loss",
    "consistency_loss",
    "orthogonality_loss",
    "equivariance_loss",
    "presence_loss",
    "bg_presence_loss",
    "tv_loss",
    "entropy_loss",
    "object_peak_loss",
    "parts_only_loss",
    "random_affine",
    "warp",
    "warp_back",
    "ivpt_losses",
]


def classification_loss(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of part-averaged logits (B, C) against labels (B,)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def parts_only_loss(part_logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of the parts-only logits — the mean over the N parts of part_logits (B, N, C), the head without
    its global part (:mod:`ivpt.metrics.decision`) — against labels (B,). Not the paper."""
    return F.cross_entropy(part_logits.float().mean(dim=1), labels, label_smoothing=label_smoothing)


def consistency_loss(final_map: Tensor, grouped_maps: list[Tensor], *, eps: float = 1e-10) -> Tensor:
    """KL from the detached final map (B, N+1, H, W) to each grouped map M_i (B, N+1, H, W), averaged over
    pixels, images and the m prompted stages: mean_{b,l} Σ_c (T_c+ε) log((T_c+ε)/(M_c+ε))."""
    target = final_map.detach().float() + eps
    terms = []
    for grouped in grouped_maps:
        if grouped.shape[-2:] != target.shape[-2:] or grouped.shape[1] != target.shape[1]:
            raise ValueError(f"grouped map {tuple(grouped.shape)} does not match final map {tuple(target.shape)}")
        kl = (target * (target.log() - (grouped.float() + eps).log())).sum(dim=1)
        terms.append(kl.mean())
    return torch.stack(terms).mean()


def orthogonality_loss(modulated: Tensor) -> Tensor:
    """mean (G - I)² of the Gram matrix of the L2-normalised part columns of ``modulated`` (B, D, N+1)."""
    cols = F.normalize(modulated.float(), dim=1)
    gram = cols.transpose(1, 2) @ cols  # (B, N+1, N+1)
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return ((gram - eye) ** 2).mean()


def _pool3(maps: Tensor) -> Tensor:
    # 3×3 average without padding: border pixels would otherwise be diluted by zeros.
    return F.avg_pool2d(maps, kernel_size=3, stride=1)


def presence_loss(maps: Tensor) -> Tensor:
    """1 - mean_k max_{b,h,w} AvgPool3×3(S̃[b,k]) over the foreground channels of ``maps`` (B, n, H, W)."""
    pooled = _pool3(maps[:, :-1].float())
    return 1.0 - pooled.amax(dim=(0, 2, 3)).mean()


def bg_presence_loss(maps: Tensor) -> Tensor:
    """-mean_b log max_{h,w} (AvgPool3×3(background) · radial weight), weight 0 at the centre and 1 at corners."""
    pooled = _pool3(maps[:, -1:].float())[:, 0]  # (B, h, w)
    h, w = pooled.shape[-2:]
    v = torch.linspace(-1, 1, h, device=maps.device)
    u = torch.linspace(-1, 1, w, device=maps.device)
    radial = v[:, None] ** 2 + u[None, :] ** 2
    radial = radial / radial.max()
    peak = (pooled * radial).amax(dim=(1, 2))
    return -peak.clamp_min(1e-12).log().mean()


def tv_loss(maps: Tensor, *, reference_grid: float = 0.0) -> Tensor:
    """(Σ|Δ_h S̃| + Σ|Δ_w S̃|) summed over channels and divided by B·H·W.

    That mean costs the same partition of the image ∝ 1/side of the patch grid (its boundary spans ~side pixels
    out of side²). ``reference_grid`` > 0 multiplies it by √(H·W) / reference_grid, so one shape costs at any grid
    what it costs at a reference_grid × reference_grid one (the paper's 37 = 518 px / patch 14); 0: unscaled."""
    maps = maps.float()
    b, _, h, w = maps.shape
    dh = (maps[:, :, 1:] - maps[:, :, :-1]).abs().sum()
    dw = (maps[:, :, :, 1:] - maps[:, :, :, :-1]).abs().sum()
    scale = math.sqrt(h * w) / reference_grid if reference_grid > 0 else 1.0
    return (dh + dw) / (b * h * w) * scale


def entropy_loss(maps: Tensor) -> Tensor:
    """Mean over pixels of the entropy over channels (maps clamped to [1e-6, 1] and renormalised first)."""
    p = maps.float().clamp(1e-6, 1.0)
    p = p / p.sum(dim=1, keepdim=True)
    return -(p * p.log()).sum(dim=1).mean()


def object_peak_loss(maps: Tensor) -> Tensor:
    """Where the concepts that an image lacks lie: Σ over images b and foreground concepts k that win no pixel of b
    (argmax over the channels) of Σ_l q_bk(l) · S̃_bg(b, l), q_bk = S̃[b,k] / Σ_l S̃[b,k](l), divided by B·P.

    ``maps`` (B, n, H, W): softmax maps, background last; P = n - 1. q_bk is where the absent concept k is least
    unlikely in image b — where the consistency protocol's argmax of its map falls — and the term is the background
    probability there, in [0, 1]. A concept that wins pixels costs nothing, and the background probability that
    weighs q_bk is a constant of the term. The gradient reaches q_bk through log(S̃_k / S̃_bg), which is a_k - a_bg
    while both probabilities are well above the maps' 1e-6 floor (the softmax normalisation cancels): there the
    term moves the absent concept's logit and the background's against each other and leaves the logits of the
    concepts that hold the pixels alone (moving through log S̃_k alone would shrink them: raising one channel of a
    softmax lowers the others). Near the floor the cancellation fails: at S_k ≈ 6e-6 the live concepts' logits get a
    sixth of the gradient the concept's own gets, below 1e-7 more than it (tests/test_losses.py). Not the paper."""
    flat = maps.float().flatten(2)  # (B, n, L)
    absent = ~present_concepts(maps)[:, :-1]  # (B, P)
    logs = flat.clamp_min(1e-30).log()  # hand-made maps may hold zeros; the model's are floored at 1e-6
    log_bg = logs[:, -1:]
    log_odds = logs[:, :-1] - log_bg + log_bg.detach()  # the value of log S̃_k, the gradient of a_k - a_bg
    where = log_odds.softmax(dim=2)
    background = flat[:, -1:].detach()  # (B, 1, L)
    return ((where * background).sum(dim=2) * absent).sum() / absent.numel()


def random_affine(
    batch: int,
    *,
    rotation_deg: float = 90.0,
    translate: float = 0.11,
    scale: tuple[float, float] = (0.8, 1.4),
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """One random similarity transform for the batch, as a (B, 2, 3) ``affine_grid`` matrix.

    Rotation U(-rotation_deg, rotation_deg), translation U(-translate, translate)·image side per axis, scale U(*scale).
    The matrix maps output coordinates to input coordinates in [-1, 1] units, so a translation of t·side is 2t.
    """
    r = torch.rand(4, generator=generator)
    angle = math.radians(rotation_deg) * (2 * r[0].item() - 1)
    s = scale[0] + (scale[1] - scale[0]) * r[1].item()
    tx, ty = (2 * translate * (2 * r[2:] - 1)).tolist()
    cos, sin = math.cos(angle) / s, math.sin(angle) / s
    theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=torch.float32)
    return to_device(theta.expand(batch, 2, 3).contiguous(), device)  # no host sync on CUDA


def _inv(a: Tensor) -> Tensor:
    """Inverse of (B, 2, 2) matrices without the error check of ``torch.linalg.inv``, which reads a flag back from
    the device (a host sync per call on CUDA); a similarity transform is never singular."""
    return torch.linalg.inv_ex(a).inverse


def invert_affine(theta: Tensor) -> Tensor:
    """Inverse of (B, 2, 3) affine matrices."""
    a, t = theta[:, :, :2], theta[:, :, 2:]
    a_inv = _inv(a)
    return torch.cat([a_inv, -a_inv @ t], dim=2)


def warp(images: Tensor, theta: Tensor, *, mode: str = "bilinear") -> Tensor:
    """Warp (B, C, H, W) by ``theta`` (B, 2, 3), sampling with ``mode`` (bilinear | nearest); outside the source
    is filled with 0. Under ``torch.use_deterministic_algorithms`` a differentiable warp samples with
    :func:`sample_by_gather` (``grid_sample``'s CUDA backward has no deterministic implementation)."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    if images.requires_grad and torch.are_deterministic_algorithms_enabled():
        return sample_by_gather(images, grid, mode=mode)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def sample_by_gather(images: Tensor, grid: Tensor, *, mode: str = "bilinear") -> Tensor:
    """``F.grid_sample(images, grid, mode, padding_mode="zeros", align_corners=False)`` from gathers, whose backward
    is deterministic under ``torch.use_deterministic_algorithms`` on every device.

    Args:
        images: (B, C, H, W).
        grid: (B, Ho, Wo, 2) sampling points in [-1, 1] units, x first.
        mode: ``bilinear`` (four taps weighted by distance) or ``nearest`` (the tap nearest, halves to even).
    Returns:
        (B, C, Ho, Wo); taps outside the source count as 0.
    """
    b, c, h, w = images.shape
    x = ((grid[..., 0] + 1) * w - 1) / 2  # (B, Ho, Wo) source pixel coordinates
    y = ((grid[..., 1] + 1) * h - 1) / 2
    flat = images.reshape(b, c, h * w)

    def tap(xi: Tensor, yi: Tensor, weight: Tensor) -> Tensor:
        inside = ((xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)).to(images.dtype)
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().flatten(1)  # (B, Ho*Wo)
        values = flat.gather(2, index.unsqueeze(1).expand(b, c, index.shape[1]))
        return values.view(b, c, *xi.shape[1:]) * (weight * inside).unsqueeze(1)

    if mode == "nearest":
        return tap(torch.round(x), torch.round(y), torch.ones_like(x))
    if mode != "bilinear":
        raise ValueError(f"mode={mode!r} must be 'bilinear' or 'nearest'")
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    return (tap(x0, y0, (1 - fx) * (1 - fy)) + tap(x0 + 1, y0, fx * (1 - fy))
            + tap(x0, y0 + 1, (1 - fx) * fy) + tap(x0 + 1, y0 + 1, fx * fy))


def warp_back(maps: Tensor, theta: Tensor, *, interpolation: str = "bilinear") -> Tensor:
    """Undo the warp by ``theta`` (B, 2, 3) on ``maps`` (B, C, H, W), zero outside.

    ``bilinear`` (ours): one bilinear resampling with the inverse matrix. ``nearest`` (the reference's procedure):
    with theta = [A | t], the forward warp is "rotate/scale about the centre by A⁻¹, then translate by -A⁻¹t"; the
    reference undoes the translation, then the rotation/scale, each as its own nearest-neighbour resampling
    (torchvision's ``affine`` default), i.e. a warp by [I | -A⁻¹t] followed by a warp by [A⁻¹ | 0].
    """
    theta = theta.float()
    if interpolation == "bilinear":
        return warp(maps, invert_affine(theta))
    if interpolation != "nearest":
        raise ValueError(f"interpolation={interpolation!r} must be 'bilinear' or 'nearest'")
    a_inv = _inv(theta[:, :, :2])
    eye = torch.eye(2, device=theta.device, dtype=theta.dtype).expand_as(a_inv)
    untranslated = warp(maps, torch.cat([eye, -a_inv @ theta[:, :, 2:]], dim=2), mode="nearest")
    return warp(untranslated, torch.cat([a_inv, torch.zeros_like(theta[:, :, 2:])], dim=2), mode="nearest")


def equivariance_loss(maps: Tensor, warped_maps: Tensor, theta: Tensor, *,
                      interpolation: str = "bilinear") -> Tensor:
    """1 - mean cosine similarity between foreground maps (B, n, H, W) of the clean view and the maps of the
    view warped by ``theta``, warped back by :func:`warp_back` with ``interpolation``. Flattened per
    (image, concept)."""
    back = warp_back(warped_maps[:, :-1].float(), theta, interpolation=interpolation)
    cos = F.cosine_similarity(maps[:, :-1].float().flatten(2), back.flatten(2), dim=-1, eps=1e-8)
    return 1.0 - cos.mean()


def ivpt_losses(
    out,
    labels: Tensor,
    cfg: LossConfig,
    *,
    warped_out=None,
    theta: Tensor | None = None,
    progress: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the loss terms (:data:`~ivpt.config.LOSS_TERMS`) for an :class:`~ivpt.models.ModelOutput`.

    ``warped_out`` is the output for the batch warped by ``theta`` (see :func:`random_affine`); without it the
    equivariance term is skipped. ``progress``: the training progress the weights are taken at
    (:meth:`LossConfig.weights`). Terms with weight 0 are not computed. Returns (total, {term: detached value}).
    """
    weights = cfg.weights(progress)
    maps = out.maps

    def stage_mean(fn):
        return torch.stack([fn(s) for s in maps]).mean()

    # Models without concept maps or grouped maps (the baselines) simply have fewer terms.
    terms: dict[str, callable] = {
        "classification": lambda: classification_loss(out.logits, labels, label_smoothing=cfg.label_smoothing),
    }
    if out.maps:
        terms["parts_only"] = lambda: parts_only_loss(out.part_logits, labels, label_smoothing=cfg.label_smoothing)
    if out.grouped_maps:
        terms["consistency"] = lambda: consistency_loss(maps[-1], out.grouped_maps)
    if out.modulated is not None:
        terms["orthogonality"] = lambda: orthogonality_loss(out.modulated)
    if maps:
        terms.update(
            presence=lambda: stage_mean(presence_loss),
            bg_presence=lambda: stage_mean(bg_presence_loss),
            tv=lambda: stage_mean(partial(tv_loss, reference_grid=cfg.tv_reference_grid)),
            entropy=lambda: stage_mean(entropy_loss),
            object_peak=lambda: stage_mean(object_peak_loss),
        )
        if warped_out is not None and theta is not None:
            terms["equivariance"] = lambda: torch.stack(
                [equivariance_loss(a, b, theta, interpolation=cfg.eq_inverse_interpolation)
                 for a, b in zip(maps, warped_out.maps)]
            ).mean()
    total = labels.new_zeros((), dtype=torch.float32)
    logged: dict[str, Tensor] = {}
    for name in LOSS_TERMS:
        if name not in terms or weights[name] == 0:
            continue
        value = terms[name]()
        logged[name] = value.detach()
        total = total + weights[name] * value
    return total, logged
