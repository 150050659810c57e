"""Keypoint regression from concept centroids (PDiscoFormer protocol, docs/method.md §4): the network-input images the
protocol scores, soft centroids of each concept in the bbox-normalised frame, a least-squares regressor from
centroids to landmarks fitted on the training split, and its error on the test split (in bbox units × 100).

Conventions as in :mod:`ivpt.metrics.discovery`: maps (B, K, h, w) with the background last; (x, y) ∈ [0, 1] over the
bbox crop's width and height for landmarks and centroids alike; ``protocol`` ``corrected`` or ``reference`` where
the authors' evaluation code differs (docs/deviations.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .discovery import as_numpy
from .parts import check_protocol
from .state import SumState

__all__ = [
    "discovery_input",
    "to_bbox_frame",
    "bbox_centroid_features",
    "soft_centroids",
    "centroid_features",
    "KeypointRegressor",
    "fit_keypoint_regressor",
    "keypoint_regression_error",
    "KeypointFitMeter",
    "KeypointErrorMeter",
]


def discovery_input(images: Tensor, mean, std, protocol: str = "corrected") -> Tensor:
    """What the part-discovery passes (NMI/ARI, keypoint regression, foreground IoU) feed the model.

    images (B, 3, H, W) normalised with ``mean``/``std`` → ``corrected``: the same tensor (the model's input
    distribution); ``reference``: un-normalised back to [0, 1] (the authors' part-discovery loaders apply
    ``ToTensor`` without ``Normalize``, a bug reproduced here only to match their numbers).
    """
    check_protocol(protocol)
    if protocol == "corrected":
        return images
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images * s + m


def to_bbox_frame(points: Tensor, bbox: Tensor, image_size: tuple[int, int], *,
                  protocol: str = "corrected") -> Tensor:
    """(B, P, 2) pixel coordinates of an H×W image → the bbox-normalised frame ((x - x0)/w, (y - y0)/h).

    bbox (B, 4): x0, y0, x1, y1 box edges in the image's pixels, NOT clipped to the image (the centre crop may
    cut it; build the eval transform with ``clip_box=False``); the image spans [-0.5, W - 0.5] × [-0.5, H - 0.5].
    ``corrected``: the box is clipped to the image first (origin and size both from the visible part).
    ``reference``: only the origin is clipped; the size stays the full box's (the authors' centre crop clamps
    the box's corner and keeps its width and height), so a box cut by the crop maps to less than [0, 1].
    """
    check_protocol(protocol)
    height, width = image_size
    low = torch.tensor([-0.5, -0.5], dtype=bbox.dtype, device=bbox.device)
    high = torch.tensor([width - 0.5, height - 0.5], dtype=bbox.dtype, device=bbox.device)
    corner, far = bbox[:, None, :2], bbox[:, None, 2:]
    origin = torch.maximum(torch.minimum(corner, high), low)
    if protocol == "corrected":
        corner, far = origin, torch.maximum(torch.minimum(far, high), low)
    return (points - origin) / (far - corner).clamp(min=1e-6)


# ------------------------------------------------------------------------------------ keypoint regression

def soft_centroids(maps: Tensor, *, active_threshold: float = 0.5,
                   protocol: str = "corrected") -> tuple[Tensor, Tensor]:
    """Mass centroid of each foreground concept and whether it is active.

    maps (B, K, h, w), background last → centroids (B, K-1, 2) as (x, y) in [0, 1] of the map frame, cell j at
    (j + 0.5)/w — its centre — under ``corrected``, at j/w — its corner, as the authors' code places it — under
    ``reference`` (rows likewise); active (B, K-1) bool = map max > ``active_threshold``.

    Inactive concepts KEEP their centroid here: the protocol sets them to 0 after standardisation (i.e. to the
    training mean), which the regressor does from ``active``; zeroing raw coordinates first would bias its
    mean/std. A map with zero mass gets centroid (0, 0) (it is inactive anyway).
    """
    check_protocol(protocol)
    fg = maps[:, :-1].float()
    h, w = fg.shape[-2:]
    offset = 0.5 if protocol == "corrected" else 0.0
    xs = (torch.arange(w, device=fg.device, dtype=torch.float32) + offset) / w
    ys = (torch.arange(h, device=fg.device, dtype=torch.float32) + offset) / h
    mass = fg.sum(dim=(2, 3))
    cx = (fg.sum(dim=2) * xs).sum(dim=2) / mass.clamp(min=1e-12)
    cy = (fg.sum(dim=3) * ys).sum(dim=2) / mass.clamp(min=1e-12)
    centroids = torch.stack((cx, cy), dim=-1) * (mass > 0).unsqueeze(-1)
    active = fg.amax(dim=(2, 3)) > active_threshold
    return centroids, active


def centroid_features(centroids: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """Regression inputs from :func:`soft_centroids`: X (B, 2(K-1)) = (x_1, y_1, x_2, y_2, ...) and the
    matching (B, 2(K-1)) bool activity mask."""
    return centroids.flatten(1), active.unsqueeze(-1).expand_as(centroids).flatten(1)


def bbox_centroid_features(maps: Tensor, bbox: Tensor, image_size: tuple[int, int], *,
                           active_threshold: float = 0.5, protocol: str = "corrected") -> tuple[Tensor, Tensor]:
    """Regression inputs in the bbox-normalised frame: maps (B, K, h, w) of an image of ``image_size`` (H, W),
    bbox (B, 4) unclipped box edges → :func:`centroid_features` of the :func:`soft_centroids` moved to pixels
    (centroid · (W, H)) and through :func:`to_bbox_frame`, both under ``protocol``."""
    cent, active = soft_centroids(maps, active_threshold=active_threshold, protocol=protocol)
    scale = torch.tensor([image_size[1], image_size[0]], dtype=cent.dtype, device=cent.device)
    framed = to_bbox_frame(cent * scale, bbox.to(cent.device, cent.dtype), image_size, protocol=protocol)
    return centroid_features(framed, active)


@dataclass
class KeypointRegressor:
    """Per-landmark linear maps from standardised features to standardised landmark coordinates.

    x_mean, x_std (P, F); y_mean, y_std (P, 2); weight (P, F, 2); fitted (P,) bool — False for a landmark
    never visible in training (it is then excluded from the error). float64 numpy arrays.
    """

    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray
    weight: np.ndarray
    fitted: np.ndarray

    def predict(self, x: Tensor | np.ndarray, active: Tensor | np.ndarray | None = None) -> np.ndarray:
        """x (N, F) raw features, active (N, F) bool or None (all active) → (N, P, 2) landmark coordinates."""
        x = as_numpy(x).astype(np.float64)
        xs = (x[:, None, :] - self.x_mean[None]) / self.x_std[None]  # (N, P, F)
        if active is not None:
            xs = np.where(as_numpy(active).astype(bool)[:, None, :], xs, 0.0)
        ys = np.einsum("npf,pfk->npk", xs, self.weight)
        return ys * self.y_std[None] + self.y_mean[None]


def _safe_std(var: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(std, constant): like scikit-learn's StandardScaler a (numerically) constant column keeps std 1; its
    standardised values are exactly 0 in both fits, so rounding noise cannot enter the least squares."""
    var = np.maximum(var, 0.0)
    constant = var <= 1e-12 * np.maximum(1.0, mean ** 2)
    return np.where(constant, 1.0, np.sqrt(var)), constant


def _check_regression_inputs(x: np.ndarray, y: np.ndarray, vis: np.ndarray) -> None:
    if x.ndim != 2 or y.ndim != 3 or y.shape[2] != 2 or y.shape[0] != x.shape[0] or vis.shape != y.shape[:2]:
        raise ValueError(f"expected X (N, F), Y (N, P, 2), visible (N, P); got {x.shape}, {y.shape}, {vis.shape}")


def fit_keypoint_regressor(x_train: Tensor | np.ndarray, y_train: Tensor | np.ndarray,
                           visible_train: Tensor | np.ndarray, *,
                           active_train: Tensor | np.ndarray | None = None) -> KeypointRegressor:
    """Fit one linear regression per landmark, as PDiscoFormer's protocol does.

    x_train (N, F) raw features (see :func:`centroid_features`), y_train (N, P, 2) landmarks, visible_train
    (N, P) bool, active_train (N, F) bool or None. For landmark p, on the images where it is visible: X and
    Y_p are standardised with their own mean/std (ddof 0, std 0 → 1); inactive features are then set to 0;
    the weights solve the least-squares problem with NO intercept (the standardised targets have mean 0).
    ``numpy.linalg.lstsq`` returns the minimum-norm solution when the system is rank deficient (a concept
    never active, two concepts that move together) — the same as scikit-learn's LinearRegression — so no
    ridge term is needed. float64 throughout.
    """
    x = as_numpy(x_train).astype(np.float64)
    y = as_numpy(y_train).astype(np.float64)
    vis = as_numpy(visible_train).astype(bool)
    _check_regression_inputs(x, y, vis)
    act = None if active_train is None else as_numpy(active_train).astype(bool)
    n_feat, n_land = x.shape[1], y.shape[1]
    reg = KeypointRegressor(np.zeros((n_land, n_feat)), np.ones((n_land, n_feat)), np.zeros((n_land, 2)),
                            np.ones((n_land, 2)), np.zeros((n_land, n_feat, 2)), np.zeros(n_land, dtype=bool))
    for p in range(n_land):
        rows = vis[:, p]
        if not rows.any():
            continue
        xp, yp = x[rows], y[rows, p]
        reg.x_mean[p], reg.y_mean[p] = xp.mean(0), yp.mean(0)
        reg.x_std[p], x_const = _safe_std(xp.var(0), reg.x_mean[p])
        reg.y_std[p], _ = _safe_std(yp.var(0), reg.y_mean[p])
        xs = (xp - reg.x_mean[p]) / reg.x_std[p]
        xs[:, x_const] = 0.0
        if act is not None:
            xs = np.where(act[rows], xs, 0.0)
        ys = (yp - reg.y_mean[p]) / reg.y_std[p]
        reg.weight[p] = np.linalg.lstsq(xs, ys, rcond=None)[0]
        reg.fitted[p] = True
    return reg


def _error_sum(reg: KeypointRegressor, x: Tensor | np.ndarray, y: Tensor | np.ndarray,
               visible: Tensor | np.ndarray, active: Tensor | np.ndarray | None) -> tuple[float, int]:
    xn, yn, vis = as_numpy(x).astype(np.float64), as_numpy(y).astype(np.float64), as_numpy(visible)
    _check_regression_inputs(xn, yn, vis)
    use = vis.astype(bool) & reg.fitted[None, :]
    dist = np.linalg.norm(reg.predict(xn, active) - yn, axis=2)  # (N, P)
    return float(dist[use].sum()), int(use.sum())


def keypoint_regression_error(reg: KeypointRegressor, x_test: Tensor | np.ndarray, y_test: Tensor | np.ndarray,
                              visible_test: Tensor | np.ndarray, *,
                              active_test: Tensor | np.ndarray | None = None) -> float:
    """Mean L2 distance between predicted and true landmarks over the visible (test image, landmark) pairs,
    in bbox-normalised units × 100 (lower is better). Shapes as in :func:`fit_keypoint_regressor`."""
    total, count = _error_sum(reg, x_test, y_test, visible_test, active_test)
    return 100.0 * total / count if count else float("nan")


class KeypointFitMeter(SumState):
    """Streams the training split and fits the same regressor as :func:`fit_keypoint_regressor`.

    Standardisation and "inactive → 0" are affine per feature, so the normal equations of every landmark can
    be rebuilt from sums over its visible rows: with u = a·x (a = activity), the state holds n, Σx, Σx², Σy,
    Σy², Σuuᵀ, Σuaᵀ, Σaaᵀ, Σu yᵀ, Σa yᵀ, Σu, Σa (float64, summed under DDP). Memory is O(P·F²), independent
    of the number of images. The fit solves the normal equations with ``lstsq`` (minimum norm when singular);
    it matches the direct fit to about 1e-8 relative on well-conditioned features.
    """

    def __init__(self, num_features: int, num_landmarks: int, *, device: torch.device | str = "cpu") -> None:
        super().__init__(device=device)
        self.num_features, self.num_landmarks = num_features, num_landmarks
        f, p, d = num_features, num_landmarks, torch.float64
        self._add_state("n", (p,), d)
        for name, shape in (("sx", (p, f)), ("sxx", (p, f)), ("sy", (p, 2)), ("syy", (p, 2)),
                            ("suu", (p, f, f)), ("sua", (p, f, f)), ("saa", (p, f, f)), ("suy", (p, f, 2)),
                            ("say", (p, f, 2)), ("su", (p, f)), ("sa", (p, f))):
            self._add_state(name, shape, d)

    def update(self, x: Tensor, y: Tensor, visible: Tensor, *, active: Tensor | None = None,
               valid: Tensor | None = None) -> None:
        """Add a batch: x (B, F) raw features, y (B, P, 2), visible (B, P) bool, active (B, F) bool or None,
        valid (B,) bool or None."""
        x = x.to(self.device, torch.float64)
        y = y.to(self.device, torch.float64)
        if x.shape[1] != self.num_features or y.shape[1:] != (self.num_landmarks, 2):
            raise ValueError(f"expected X (B, {self.num_features}), Y (B, {self.num_landmarks}, 2)")
        a = torch.ones_like(x) if active is None else active.to(self.device, torch.float64)
        w = visible.to(self.device, torch.float64)  # (B, P): rows counted for each landmark
        w = w * self._rows(x.shape[0], valid, self.device).double().unsqueeze(1)
        u = a * x
        self.n.add_(w.sum(0))
        self.sx.add_(w.T @ x)
        self.sxx.add_(w.T @ (x * x))
        self.sy.add_(torch.einsum("bp,bpk->pk", w, y))
        self.syy.add_(torch.einsum("bp,bpk->pk", w, y * y))
        # Weighted outer products as plain matmuls over the batch: (P·F, B) @ (B, F) and (F, B) @ (B, P·2).
        b, f, p = x.shape[0], self.num_features, self.num_landmarks
        wu = (w.unsqueeze(2) * u.unsqueeze(1)).reshape(b, p * f)
        wa = (w.unsqueeze(2) * a.unsqueeze(1)).reshape(b, p * f)
        wy = (w.unsqueeze(2) * y).reshape(b, p * 2)
        self.suu.add_((wu.T @ u).view(p, f, f))
        self.sua.add_((wu.T @ a).view(p, f, f))
        self.saa.add_((wa.T @ a).view(p, f, f))
        self.suy.add_((u.T @ wy).view(f, p, 2).transpose(0, 1))
        self.say.add_((a.T @ wy).view(f, p, 2).transpose(0, 1))
        self.su.add_(w.T @ u)
        self.sa.add_(w.T @ a)

    def fit(self) -> KeypointRegressor:
        """The regressor fitted on everything accumulated (call :meth:`all_reduce` first under DDP)."""
        s = {name: getattr(self, name).cpu().numpy() for name in self._names}
        f, p_count = self.num_features, self.num_landmarks
        reg = KeypointRegressor(np.zeros((p_count, f)), np.ones((p_count, f)), np.zeros((p_count, 2)),
                                np.ones((p_count, 2)), np.zeros((p_count, f, 2)), s["n"] > 0)
        for p in np.nonzero(reg.fitted)[0]:
            n = s["n"][p]
            mx, my = s["sx"][p] / n, s["sy"][p] / n
            sdx, x_const = _safe_std(s["sxx"][p] / n - mx ** 2, mx)
            sdy, _ = _safe_std(s["syy"][p] / n - my ** 2, my)
            # Σ (a(x−μ)/σ)(a(x−μ)/σ)ᵀ and Σ (a(x−μ)/σ)((y−ν)/τ)ᵀ expanded into the accumulated sums.
            sua = s["sua"][p]
            gram = s["suu"][p] - sua * mx[None, :] - sua.T * mx[:, None] + s["saa"][p] * np.outer(mx, mx)
            gram /= np.outer(sdx, sdx)
            cross = (s["suy"][p] - s["su"][p][:, None] * my[None, :] - mx[:, None] * s["say"][p]
                     + np.outer(mx * s["sa"][p], my))
            cross /= np.outer(sdx, sdy)
            gram[x_const, :], gram[:, x_const], cross[x_const] = 0.0, 0.0, 0.0
            reg.x_mean[p], reg.x_std[p], reg.y_mean[p], reg.y_std[p] = mx, sdx, my, sdy
            reg.weight[p] = np.linalg.lstsq(gram, cross, rcond=None)[0]
        return reg


class KeypointErrorMeter(SumState):
    """Streams the test split through a fitted regressor.

    State (summed under DDP): ``err_sum`` (1,) float64 — Σ L2 errors; ``count`` (1,) int64 — visible pairs.
    """

    def __init__(self, *, device: torch.device | str = "cpu") -> None:
        super().__init__(device=device)
        self._add_state("err_sum", (1,), torch.float64)
        self._add_state("count", (1,))

    def update(self, reg: KeypointRegressor, x: Tensor, y: Tensor, visible: Tensor, *,
               active: Tensor | None = None, valid: Tensor | None = None) -> None:
        """Add a batch: shapes as :meth:`KeypointFitMeter.update`."""
        if valid is not None:
            keep = as_numpy(valid).astype(bool)
            visible = as_numpy(visible).astype(bool) & keep[:, None]
        total, count = _error_sum(reg, x, y, visible, active)
        self.err_sum += total
        self.count += count

    def no_data(self) -> dict[str, str]:
        return {"kp_error": "no visible part keypoint in the evaluated images"} if int(self.count) == 0 else {}

    def compute(self) -> dict[str, float]:
        """{"kp_error"}: mean L2 error in bbox-normalised units × 100; {} before any visible landmark."""
        n = int(self.count)
        return {"kp_error": 100.0 * float(self.err_sum) / n} if n else {}


# --------------------------------------------------------------------------------------- foreground IoU
