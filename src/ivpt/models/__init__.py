"""Model kinds on a frozen timm ViT: IVPT and the baselines, one registry (:func:`create_model`).

- :mod:`.backbone`: the frozen timm ViT and its weights.
- :mod:`.base`: :class:`IVPTOutput`, :class:`FrozenViT` (tokens, optimiser groups, save/load) and
  :class:`ConceptModel` (concept stages + the part-pooled head).
- :mod:`.prototypes`: one concept stage (prototypes, spatial prior, region pooling, fine→coarse assignment).
- :mod:`.ivpt`: IVPT. :mod:`.baselines`: linear probe, VPT-shallow/deep, last-layer parts, VPT-deep with
  prototypes.
- :mod:`.registry`: ``model.kind`` → class.
"""
from __future__ import annotations

from .backbone import build_backbone
from .base import ConceptModel, FrozenViT, IVPTOutput
from .baselines import VPT, LastLayerParts, LinearProbe, VPTDeep, VPTDeepProto, VPTShallow
from .ivpt import IVPT
from .registry import MODELS, create_model, describe, load_model, model_class

__all__ = ["IVPT", "IVPTOutput", "FrozenViT", "ConceptModel", "LinearProbe", "VPT", "VPTShallow", "VPTDeep",
           "LastLayerParts", "VPTDeepProto", "MODELS", "create_model", "load_model", "describe", "model_class", "build_backbone"]
