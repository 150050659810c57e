"""One micro-batch's forward pass and loss, exactly as the trainer takes it (also timed by ``ivpt bench``)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from .. import runtime as R
from ..config import PAPER_LOSS_TERMS, Config
from ..losses import ivpt_losses, random_affine, warp
from .health import ConceptHealth

__all__ = ["compute_loss", "training_net", "may_leave_parameters_unused"]


def compute_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config, eq_gen: torch.Generator,
                 health: ConceptHealth | None = None, progress: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Forward the clean batch (plus its warped copy when equivariance is on) and return the loss weighted as at
    training ``progress`` ((step + 1) / total steps: :meth:`~ivpt.config.LossConfig.weights`); ``health``
    accumulates the clean batch's concept maps."""
    model = getattr(net, "module", net)  # under DDP, the wrapped model
    b = x.shape[0]
    theta = None
    if model.has_concept_maps and cfg.loss.equivariance > 0:
        theta = random_affine(b, rotation_deg=cfg.loss.eq_rotation_deg, translate=cfg.loss.eq_translate,
                              scale=tuple(cfg.loss.eq_scale), device=x.device, generator=eq_gen)
        x = torch.cat([x, warp(x, theta)])
    # IVPT needs only the concept maps of the warped view, so its backbone pass there skips autograd.
    kwargs = {"maps_only_from": b} if theta is not None and model.maps_only_view else {}
    with R.autocast(x.device, cfg.optim.amp):
        out = net(x, **kwargs)
    warped = None
    if theta is not None:
        out, warped = _split_output(out, b)
    if health is not None:
        health.add(out.maps)
    return ivpt_losses(out, y, cfg.loss, warped_out=warped, theta=theta, progress=progress)


def _split_output(out: Any, n: int) -> tuple[Any, Any]:
    """Split every batch-major tensor of a model output dataclass at ``n``: (first n, rest)."""
    first, rest = {}, {}
    for f in dataclasses.fields(out):
        value = getattr(out, f.name)
        if isinstance(value, list):
            first[f.name], rest[f.name] = [v[:n] for v in value], [v[n:] for v in value]
        elif isinstance(value, torch.Tensor):
            first[f.name], rest[f.name] = value[:n], value[n:]
        else:
            first[f.name] = rest[f.name] = value
    return type(out)(**first), type(out)(**rest)


def may_leave_parameters_unused(model: nn.Module, cfg: Config) -> bool:
    """Whether a training step can leave a trained parameter without a gradient (DDP's ``find_unused_parameters``):
    every IVPT parameter receives one when all the paper's loss terms are on (terms of ours, such as
    ``loss.object_peak``, add no parameter); baselines and IVPT with a paper term at weight 0 may leave some unused."""
    weights = cfg.loss.weights()
    return not model.maps_only_view or any(weights[t] == 0 for t in PAPER_LOSS_TERMS)


def training_net(model: nn.Module, cfg: Config, info: R.DistInfo) -> tuple[nn.Module, nn.Module, bool]:
    """(net, eager_net, compile_pending): ``model`` wrapped in DDP under torchrun and compiled with
    ``train.compile`` (what the forward passes run through), the same uncompiled, and whether compilation is still
    to happen (at the first forward/backward; if it fails there, the trainer goes on with ``eager_net``)."""
    unused = may_leave_parameters_unused(model, cfg)
    net: nn.Module = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=unused,
        )
    eager_net, compile_pending = net, False  # pending: not yet through one forward/backward
    if cfg.train.compile:
        net, warning = R.compile_module(net)
        compile_pending = warning is None
        if warning and info.is_main:
            logging.getLogger("ivpt").warning(warning)
    return net, eager_net, compile_pending
