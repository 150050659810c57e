"""The whole run config: :class:`Config` (one section per concern, and the checks that involve two), YAML loading
with dotted overrides, the fields earlier versions did not save, and :func:`config_changes` — the one answer to
"does this difference matter for this run's model kind", used by ``ivpt train --resume``, ``ivpt compare`` and the
demo alike.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fields import MAPS_ONLY, ConfigError, coerce, parse_value
from .model import MODEL_KINDS, ConceptConfig, ModelConfig, model_config, model_fields
from .sections import DataConfig, EvalConfig, LossConfig, OptimConfig, TrainConfig

__all__ = ["SECTIONS", "Config", "load_config", "saved_config", "config_changes"]

# The config class of each section; the model section's is its kind's (ivpt.config.model: ModelConfig and its
# subclasses, MODEL_KINDS).
SECTIONS = {
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


@dataclass
class Config:
    """The whole run: one section per concern, plus the checks that involve two sections."""

    model: ModelConfig = field(default_factory=model_config)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        o = self.optim
        if o.batch_size % o.grad_accum:
            raise ConfigError(f"optim.batch_size={o.batch_size} must split evenly into optim.grad_accum={o.grad_accum} "
                              "micro-batches")
        if isinstance(self.model, ConceptConfig):  # an eval.stage that names no stage of model.n_pro
            self.eval.stage_index(len(self.model.n_pro))
        if self.train.max_steps and self.train.ckpt_every_steps > self.train.max_steps:
            raise ConfigError(f"train.ckpt_every_steps={self.train.ckpt_every_steps} exceeds train.max_steps="
                              f"{self.train.max_steps}: no periodic checkpoint would be written")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise ConfigError(
                f"unknown config section(s) {sorted(unknown)}; the sections are {', '.join(SECTIONS)}"
            )
        return cls(**{name: _build(name, data.get(name) or {}) for name in SECTIONS})

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> "Config":
        """A copy with ``section.field=value`` strings applied (values parsed by the field's type; ``model.*``: any
        field of a registered kind, ignored by the kinds that do not read it)."""
        data = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.field=value, e.g. optim.epochs=5")
            key, raw = item.split("=", 1)
            parts = key.strip().split(".")
            if len(parts) != 2 or parts[0] not in SECTIONS:
                raise ConfigError(
                    f"override {item!r}: the key must be section.field with a section among {', '.join(SECTIONS)}"
                )
            section, name = parts
            hints = _hints(section)
            if name not in hints:
                raise ConfigError(f"override {item!r}: {section} has no field {name!r}; its fields are "
                                  + ", ".join(hints))
            data[section][name] = parse_value(raw.strip(), hints[name], item)
        return Config.from_dict(data)


def _hints(section: str) -> dict[str, Any]:
    """Field name → type hint of a section (the model section: every registered kind's fields)."""
    return model_fields() if section == "model" else typing.get_type_hints(SECTIONS[section])


def _build(section: str, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {type(values).__name__}")
    if section == "model":
        return model_config(values)
    section_cls = SECTIONS[section]
    names = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in section {section!r}; valid keys: {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(section_cls)
    return section_cls(**{name: coerce(value, hints[name], f"{section}.{name}") for name, value in values.items()})


# --------------------------------------------------------------------------------------------- what matters
def _read_keys(cfg: Config) -> set[str]:
    """The dotted keys the run ``cfg`` reads: its model section's (less the fields its values make unread) and every
    other section's, less the ``maps_only`` ones when its kind has no concept maps."""
    kind = MODEL_KINDS.get(cfg.model.kind)
    maps = kind.concept_maps if kind is not None else True
    keys = {f"model.{name}" for name in cfg.model.reads()}
    for name in SECTIONS:
        if name != "model":
            keys |= {f"{name}.{f.name}" for f in dataclasses.fields(getattr(cfg, name))
                     if maps or not f.metadata.get(MAPS_ONLY)}
    return keys


def config_changes(old: Config, new: Config) -> list[str]:
    """The dotted keys in which ``new`` differs from ``old`` in a way that matters to their model kind: a field the
    kind's config holds (two configs of one kind that agree on them build the same model), less those the values make
    unread (``model.global_share`` without ``model.global_part``), and the other sections' fields but, for a kind
    without concept maps, those only such kinds read (``loss.consistency``, ``optim.revive_until``, ...). A change of
    ``model.kind`` is always named. ``ivpt train --resume``, ``ivpt compare`` and the demo decide by it alike."""
    a, b = old.to_dict(), new.to_dict()
    read = _read_keys(old) | _read_keys(new)
    absent = object()  # a field of the other kind's config
    return [f"{s}.{k}" for s in SECTIONS for k in dict.fromkeys([*a[s], *b[s]])
            if f"{s}.{k}" in read and a[s].get(k, absent) != b[s].get(k, absent)]


# ------------------------------------------------------------------------------------------------ loading
# Fields added after run folders and checkpoints were first saved, with the behaviour a saved config that lacks them
# was trained with (which is not today's default).
_BEFORE_FIELD = {
    ("model", "global_part"): False,
    ("model", "global_share"): None,
    ("model", "deep_prompts"): False,
    ("loss", "tv_reference_grid"): 0.0,
    ("optim", "min_steps"): 0,
    ("optim", "concept_lr_start"): 1.0,
    ("optim", "concept_lr_ramp"): 0.0,
    ("optim", "ema_decay"): 0.0,
    ("train", "selection"): "best_top1",
}


def saved_config(data: dict) -> dict:
    """A config SAVED by ivpt (a run's config.yaml, a checkpoint's config.json), with the fields it predates
    filled in as it was trained: an older run keeps its parts-only head, plain TV term and exact epochs."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for (section, name), value in _BEFORE_FIELD.items():
        if isinstance(out.get(section), dict):
            out[section].setdefault(name, value)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                saved: bool = False) -> Config:
    """Read a YAML (or JSON) config file, apply dotted overrides, validate. ``path=None`` gives the defaults;
    ``saved``: the file was written by ivpt for a run (:func:`saved_config` fills the fields it predates)."""
    if path is None:
        cfg = Config()
    else:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; the bundled ones are in the configs/ folder")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p} is not valid UTF-8 YAML ({exc}); fix the file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections (model:, loss:, optim:, ...)")
        cfg = Config.from_dict(saved_config(data) if saved else data)
    return cfg.with_overrides(list(overrides)) if overrides else cfg
