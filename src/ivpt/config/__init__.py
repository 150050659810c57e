"""Configuration: typed dataclasses that validate themselves, load from YAML, take dotted overrides
(``model.n_pro=17,14,11,8,5``) and round-trip through JSON.

A run is described by one :class:`Config` holding one section per concern. Every field has a default, so a YAML file
only lists what differs; unknown keys are errors (a typo must not silently fall back to a default). The model section
is its kind's own config class (:mod:`.model`: which fields a kind reads follows from its class), and
:func:`config_changes` says which differences between two run configs matter to their kind.

- :mod:`.fields`: :class:`ConfigError`, the declared bounds of numbers, reading values by their field's type.
- :mod:`.model`: the model config classes and :data:`MODEL_KINDS`, the table of kinds (filled by
  :func:`ivpt.models.register_model`).
- :mod:`.sections`: loss, optim, data, train, eval.
- :mod:`.run`: :class:`Config`, :func:`load_config`, :func:`saved_config`, :func:`config_changes`.
"""
from __future__ import annotations

from .fields import Bounds, ConfigError, Limits, check_limits, check_number
from .model import (DEFAULT_KIND, MIN_GRID, MODEL_KINDS, PROTOTYPE_INITS, ConceptConfig, IVPTConfig, ModelConfig,
                    ModelKind, TunedConfig, VPTConceptConfig, VPTConfig, check_img_size, config_class, model_config,
                    model_fields, register_kind, unregister_kind)
from .run import SECTIONS, Config, config_changes, load_config, saved_config
from .sections import (AFFINE_FILLS, AMP_MODES, EVAL_PROTOCOLS, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS,
                       LOSS_TERMS, PAPER_LOSS_TERMS, SCHEDULES, DataConfig, EvalConfig, LossConfig, OptimConfig,
                       TrainConfig)

__all__ = [
    "ConfigError", "Bounds", "Limits", "check_limits", "check_number",
    "ModelConfig", "TunedConfig", "VPTConfig", "ConceptConfig", "VPTConceptConfig", "IVPTConfig", "ModelKind",
    "MODEL_KINDS", "DEFAULT_KIND", "register_kind", "unregister_kind", "config_class", "model_fields", "model_config",
    "check_img_size", "MIN_GRID", "PROTOTYPE_INITS",
    "LossConfig", "OptimConfig", "DataConfig", "TrainConfig", "EvalConfig", "LOSS_TERMS", "PAPER_LOSS_TERMS",
    "AMP_MODES", "SCHEDULES", "INTERPOLATIONS", "AFFINE_FILLS", "EVAL_PROTOCOLS", "IMAGENET_MEAN", "IMAGENET_STD",
    "SECTIONS", "Config", "load_config", "saved_config", "config_changes",
]
