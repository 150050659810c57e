"""ivpt: Interpretable Visual Prompt Tuning on frozen timm Vision Transformers."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import Config, ConfigError, load_config  # noqa: E402
from .losses import ivpt_losses  # noqa: E402
from .models import IVPT, ModelOutput, create_model, register_model  # noqa: E402

__all__ = ["Config", "ConfigError", "load_config", "IVPT", "ModelOutput", "create_model", "register_model",
           "ivpt_losses", "__version__"]
