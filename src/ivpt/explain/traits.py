"""Trait maps of a Prompt-CAM model (``model.kind=prompt_cam``): compute once (:func:`explain_traits`), draw without
the model (:func:`ivpt.explain.render.render_traits`).

A class's trait maps are the last block's attention of that class's prompt over the patches, one map per head
(:meth:`ivpt.models.PromptCAM.trait_maps`). The first class of every image is its predicted class; ``classes``
adds the same chosen classes to every image (what would the model look at to call this image class c?).
Shapes: B images, Q classes per image, K heads, (h, w) patch grid, (H, W) input pixels, C classes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from torch import Tensor

from ..config import ConfigError
from ..models.prompt_cam import PromptCAM, trait_part_maps
from .core import IMAGENET_MEAN, IMAGENET_STD, _device, _eval_mode, denormalise

__all__ = ["TraitExplanation", "explain_traits", "class_ids"]


@dataclass
class TraitExplanation:
    """One pass of a Prompt-CAM model over a batch, kept for drawing. All arrays are numpy on the CPU.

    images: (B, H, W, 3) uint8 de-normalised inputs.
    classes: (B, Q) int64, the classes explained; column 0 is the predicted class, the others the chosen ones.
    attention: (B, Q, K, h, w) float32, each head's softmax attention of the class's prompt over the patches (a
        share of that head's attention, in [0, 1]).
    part_maps: (B, Q, K+1, h, w) float32, the same as part maps (each head over its maximum, background = 1 − the
        largest, normalised per patch; background last): for column 0, what the interpretability metrics score.
    logits: (B, C). probs: (B, C) softmax of the logits.
    top_classes: (B, k) int64 and top_probs: (B, k) float32, the k most probable classes.
    class_names: C names, or None (figures then show class ids).
    """

    images: np.ndarray
    classes: np.ndarray
    attention: np.ndarray
    part_maps: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    top_classes: np.ndarray
    top_probs: np.ndarray
    class_names: list[str] | None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_heads(self) -> int:
        return self.attention.shape[2]

    def class_name(self, c: int) -> str:
        """Name of class ``c`` (its id as text when no names are known)."""
        if self.class_names is not None and 0 <= c < len(self.class_names):
            return str(self.class_names[c])
        return f"class {c}"

    @classmethod
    def concat(cls, parts: Sequence["TraitExplanation"]) -> "TraitExplanation":
        """The images of several explanations of one model (e.g. batches), in order."""
        arrays = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
                  for f in dataclasses.fields(cls) if f.name != "class_names"}
        return cls(**arrays, class_names=parts[0].class_names)


def class_ids(specs: Sequence[str], class_names: Sequence[str] | None, num_classes: int) -> list[int]:
    """The class ids that ``specs`` name: each a class id (0 to C-1, as predictions number them) or a class name
    (exact, else the one name equal to it ignoring case). Anything else is a :class:`ConfigError` in one line."""
    names = [str(n) for n in class_names] if class_names is not None else []
    ids = []
    for spec in specs:
        text = str(spec).strip()
        if text in names:
            ids.append(names.index(text))
            continue
        folded = [i for i, n in enumerate(names) if n.lower() == text.lower()]
        if len(folded) == 1:
            ids.append(folded[0])
        elif text.isdigit() and int(text) < num_classes:
            ids.append(int(text))
        else:
            known = f"; names such as {', '.join(repr(n) for n in names[:3])}" if names else ""
            raise ConfigError(f"--class {spec!r} names no class of the model: give a class id from 0 to "
                              f"{num_classes - 1}{known}")
    return ids


def explain_traits(model: PromptCAM, images: Tensor, *, classes: Sequence[int] = (),
                   class_names: Sequence[str] | None = None, topk: int = 5, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> TraitExplanation:
    """Trait maps of a batch with one forward pass (eval mode, no gradient): the predicted class's for every image,
    then those of ``classes`` (class ids, the same for every image).

    Args:
        model: an :class:`ivpt.models.PromptCAM`.
        images: (B, 3, H, W) inputs normalised with ``mean``/``std``; any size the model accepts.
        classes: further classes to explain in every image.
        class_names: C names shown in figures.
        topk: how many classes the prediction keeps.
    """
    with _eval_mode(model):
        logits, explained, attention = model.trait_maps(images.to(_device(model)), classes)
        logits = logits.float()
        B, Q, K, h, w = attention.shape
        part_maps = trait_part_maps(attention.flatten(0, 1).flatten(-2), (h, w)).unflatten(0, (B, Q))
        probs = logits.softmax(dim=-1)
        top_p, top_c = probs.topk(min(topk, logits.shape[-1]), dim=-1)
        return TraitExplanation(
            images=denormalise(images, mean=mean, std=std), classes=explained.cpu().numpy(),
            attention=attention.float().cpu().numpy(), part_maps=part_maps.float().cpu().numpy(),
            logits=logits.cpu().numpy(), probs=probs.cpu().numpy(), top_classes=top_c.cpu().numpy(),
            top_probs=top_p.cpu().numpy(), class_names=list(class_names) if class_names is not None else None)
