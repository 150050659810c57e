"""Model kinds on a frozen timm ViT: IVPT and the baselines, one registry (:func:`register_model`,
:func:`create_model`).

- :mod:`.backbone`: the frozen timm ViT and its weights.
- :mod:`.base`: :class:`ModelOutput`, :class:`FrozenViT` (tokens, optimiser groups, save/load) and
  :class:`ConceptModel` (concept stages + the part-pooled head).
- :mod:`.prototypes`: one concept stage (prototypes, spatial prior, region pooling, fine→coarse assignment).
- :mod:`.ivpt`: IVPT. :mod:`.baselines`: linear probe, VPT-shallow/deep, last-layer parts, VPT-deep with
  prototypes. :mod:`.prompt_cam`: Prompt-CAM (class-specific prompts, trait maps).
- :mod:`.registry`: ``model.kind`` → class; how to add a kind.

The import order below is the order of the kinds (IVPT, the baselines, Prompt-CAM): each module registers its own.
"""
from __future__ import annotations

from .backbone import build_backbone
from .base import ConceptModel, FrozenViT, ModelOutput
from .registry import MODELS, create_model, describe, load_model, model_class, register_model, unregister_model
from .ivpt import IVPT  # noqa: I001 - registration order: ivpt first
from .baselines import VPT, LastLayerParts, LinearProbe, VPTDeep, VPTDeepProto, VPTShallow
from .prompt_cam import PromptCAM

__all__ = ["IVPT", "ModelOutput", "FrozenViT", "ConceptModel", "LinearProbe", "VPT", "VPTShallow", "VPTDeep",
           "LastLayerParts", "VPTDeepProto", "PromptCAM", "MODELS", "register_model", "unregister_model",
           "create_model", "load_model", "describe", "model_class", "build_backbone"]
