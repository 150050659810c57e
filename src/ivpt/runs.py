"""The library API for finished runs: what the CLI, explanations, reports and benchmarks load.

A run folder (``ivpt train --out RUN``) holds ``config.yaml`` (the whole run config) and pretrained folders such as
``RUN/best`` (``config.json`` + ``model.safetensors``). :func:`run_config` rebuilds a checkpoint's run config,
:func:`load_run` the model itself, :func:`open_split` one split of the run's dataset for evaluation-style passes.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .config import Config, load_config

__all__ = ["run_config", "load_run", "class_names_of", "open_split"]


def run_config(checkpoint: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, dict]:
    """(config of the run that produced ``checkpoint`` with the checkpoint's own model section and ``overrides``
    applied, the checkpoint's config.json). Without a ``config.yaml`` beside it, the defaults stand in."""
    from .checkpoint import read_pretrained_config

    checkpoint = Path(checkpoint)
    _, meta = read_pretrained_config(checkpoint)
    run_yaml = checkpoint.parent / "config.yaml"
    data = load_config(run_yaml, saved=True).to_dict() if run_yaml.is_file() else {}
    data["model"] = {**data.get("model", {}), **meta["model"]}
    return Config.from_dict(data).with_overrides(list(overrides)), meta


def load_run(checkpoint: str | Path, *, weights: str | None = None, device: str = "cpu",
             overrides: list[str] | tuple[str, ...] = (), allow_backbone_mismatch: bool = False,
             ) -> tuple[nn.Module, Config, dict]:
    """(model on ``device`` in eval mode, run config, config.json) of the pretrained folder ``checkpoint``.

    ``weights`` overrides where the frozen backbone comes from; weights other than those the checkpoint was
    trained on are refused unless ``allow_backbone_mismatch``.
    """
    from .models import load_model
    from .runtime import resolve_device

    cfg, meta = run_config(checkpoint, overrides)
    model = load_model(checkpoint, cfg.model, meta, weights=weights, allow_backbone_mismatch=allow_backbone_mismatch)
    return model.to(resolve_device(device)).eval(), cfg, meta


def class_names_of(meta: dict, num_classes: int) -> list[str] | None:
    """Class names stored in a checkpoint's config.json (``class_names``), if they match the head."""
    names = meta.get("class_names")
    if isinstance(names, list) and len(names) == num_classes:
        return [str(n) for n in names]
    return None


def open_split(cfg: Config, split: str, *, root: str | None = None):
    """The ``split`` of the run's dataset (``root`` or ``cfg.data.root``, format ``cfg.data.format``) with the
    deterministic eval transform."""
    from .data import build_eval_transform, open_dataset

    return open_dataset(cfg.data, split, build_eval_transform(cfg.data, cfg.model.img_size), root=root)
