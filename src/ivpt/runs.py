"""The library API for run folders: what the CLI, compare, the demo, explanations, reports and benchmarks load.

A run folder (``ivpt train --out RUN``) holds ``config.yaml`` (the whole run config) and pretrained folders such as
``RUN/best`` (``config.json`` + ``model.safetensors``). :func:`run_config` reads the config of either, :func:`load_run`
a checkpoint's model, :func:`open_split` one split of the run's dataset for evaluation-style passes, and
:func:`reuse_state` decides what a job that wants a run in a folder does with what is there (``ivpt compare`` and
the demo).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .config import Config, ConfigError, config_changes, load_config

__all__ = ["RunConflict", "run_config", "load_run", "reuse_state", "class_names_of", "open_split"]

class RunConflict(ConfigError):
    """A run folder holds a run whose config differs from the wanted one in a way that matters; the message names
    the keys and what to do."""


def run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, dict]:
    """(run config, the checkpoint's config.json content) of a pretrained folder (``RUN/best``) or a run folder
    (``RUN``; its dict is empty), with ``overrides`` applied.

    A pretrained folder's config is its run's ``config.yaml`` (the defaults when there is none beside it) with the
    checkpoint's own model section and input normalisation (``data.mean`` / ``data.std``; a checkpoint saved before
    they were kept there: those of the run, else the defaults, as it was trained). Configs of earlier versions are
    read as they were trained (:func:`ivpt.config.saved_config`)."""
    from .checkpoint import CONFIG_NAME, SAVED_DATA_FIELDS, CheckpointError, read_pretrained_config

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        if not (path / "config.yaml").is_file():
            raise CheckpointError(f"{path} holds neither {CONFIG_NAME} (a checkpoint such as RUN/best) nor config.yaml "
                                  "(a run folder written by `ivpt train`)")
        return load_config(path / "config.yaml", overrides, saved=True), {}
    _, meta = read_pretrained_config(path)
    run_yaml = path.parent / "config.yaml"
    data = load_config(run_yaml, saved=True).to_dict() if run_yaml.is_file() else {}
    data["model"] = {**data.get("model", {}), **meta["model"]}
    saved = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    data["data"] = {**data.get("data", {}), **{k: saved[k] for k in SAVED_DATA_FIELDS if k in saved}}
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


def reuse_state(run_dir: str | Path, cfg: Config, *, may_differ: frozenset[str] | set[str] = frozenset()) -> str:
    """What a job that wants a run of ``cfg`` in ``run_dir`` does with what is there: ``"new"`` (no run yet, or one
    killed before its first checkpoint: train), ``"started"`` (``last.pt``, or the ``starts/`` of a run with
    ``train.starts``, without ``metrics.json``: resume),
    ``"finished"`` (``metrics.json``: reuse).

    A run whose config differs from ``cfg`` in a key that matters to its model kind
    (:func:`ivpt.config.config_changes`: e.g. not an IVPT-only switch for a VPT run), other than ``may_differ``, is
    a :class:`RunConflict` naming the keys; nothing is written. ``ivpt train --resume`` refuses by the same rule, so
    a run that passes here also resumes."""
    from .engine import has_started_starts

    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file():
        changed = [k for k in config_changes(run_config(run_dir)[0], cfg) if k not in may_differ]
        if changed:
            raise RunConflict(f"{run_dir} holds a run with another config ({', '.join(changed)}); pass another --out, "
                              f"or delete {run_dir} to train it again")
    if (run_dir / "metrics.json").is_file():
        return "finished"
    started = (run_dir / "last.pt").is_file() or has_started_starts(run_dir)
    return "started" if started else "new"


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

    return open_dataset(cfg.data, split, build_eval_transform(cfg.data, cfg.model.img_size), root=root,
                        bbox_crop=cfg.data.bbox_crop)
