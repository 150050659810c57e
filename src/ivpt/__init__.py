"""ivpt: Interpretable Visual Prompt Tuning on frozen timm Vision Transformers."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import Config, ConfigError, load_config  # noqa: E402

__all__ = ["Config", "ConfigError", "load_config", "__version__"]
