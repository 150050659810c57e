"""Shared fixtures: tiny random ViTs (4 blocks, width 32) that build and run in milliseconds."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ivpt.config import ModelConfig, model_config  # noqa: E402
from ivpt.models import IVPT  # noqa: E402

TINY = dict(depth=4, embed_dim=32, num_heads=2, init_values=1.0)  # LayerScale 1: blocks that matter


def tiny_cfg(**overrides) -> ModelConfig:
    values = dict(
        backbone="vit_small_patch14_reg4_dinov2",
        img_size=56,
        num_classes=7,
        n_pro=[5, 4, 3],
        weights="random",
        backbone_kwargs=dict(TINY),
        global_part=False,  # the paper's head; the global part's own tests ask for it
        deep_prompts=False,  # the paper's prompts; the deep prompts' own tests ask for them
    )
    values.update(overrides)
    return model_config(values)  # the kind's own config class; the fields it does not read are ignored


def tiny_model(seed: int = 0, **overrides) -> IVPT:
    torch.manual_seed(seed)
    return IVPT(tiny_cfg(**overrides))


@pytest.fixture
def model() -> IVPT:
    return tiny_model()
