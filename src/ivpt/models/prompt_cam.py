"""Prompt-CAM (Chowdhury et al., "Prompt-CAM: Making Vision Transformers Interpretable for Fine-Grained Analysis",
CVPR 2025, arXiv 2501.09333): ``model.kind=prompt_cam``.

One learned prompt per class is put in front of the tokens of every block of the frozen ViT (the paper's default,
Prompt-CAM-Deep: each block owns its C prompts, the previous block's prompt outputs are dropped and replaced, as in
VPT-deep with C prompts). The final-normed output of the last block's prompt c is scored by a Linear(D, 1) shared by
all classes (with bias): logit_c = w · norm(z_c) + b. Plain cross-entropy trains the prompts and the scorer, so to
win, the true class's prompt must attend to what tells its class apart: the multi-head attention of class c's prompt
(query) over the patches (keys) in the last block, one map per head, are that class's "trait maps".

Part maps for the interpretability protocols (eval mode only, so training is plain Prompt-CAM): the trait maps of
the PREDICTED class, one channel per head (K = heads), made comparable as VPT's attention maps are: each head's
map divided by its maximum, background = 1 − the largest, the K+1 channels normalised per patch
(:func:`trait_part_maps`); their one map stage has index 0. :meth:`PromptCAM.trait_maps` gives the raw maps of the
predicted class and of any chosen class, for ``ivpt explain``.

Shapes: B batch, C classes (= prompts per block), R prefix tokens (cls + registers), L = H·W patches, T = R + L,
D width, K attention heads. Inside the blocks the sequence is [C class prompts | prefix | patches]; without an
attention mask the order changes nothing but where the prompts are cut out again.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config.model import PromptCAMConfig
from .base import FrozenViT, ModelOutput
from .registry import register_model

__all__ = ["PromptCAM", "prompt_attention", "trait_part_maps"]


def prompt_attention(block: nn.Module, tokens: Tensor, rows: Tensor, keys: slice) -> Tensor:
    """The softmax attention, per head, of the tokens at positions ``rows`` (B, Q) (queries) over every token of
    ``tokens`` (B, T', D), the input of the timm ``block``, kept at the positions ``keys``: (B, Q, K, len(keys)).

    Computed in float32 from the block's own ``norm1``, ``qkv`` (query and key rows), ``q_norm`` / ``k_norm`` and
    ``scale``, as its attention does before multiplying the values."""
    attn = block.attn
    x = block.norm1(tokens)
    width = attn.num_heads * attn.head_dim
    w_q, w_k = attn.qkv.weight[:width], attn.qkv.weight[width : 2 * width]
    b_q, b_k = (None, None) if attn.qkv.bias is None else (attn.qkv.bias[:width], attn.qkv.bias[width : 2 * width])
    queries = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))  # (B, Q, D)
    q = attn.q_norm(F.linear(queries, w_q, b_q).unflatten(-1, (attn.num_heads, attn.head_dim)))  # (B, Q, K, hd)
    k = attn.k_norm(F.linear(x, w_k, b_k).unflatten(-1, (attn.num_heads, attn.head_dim)))  # (B, T', K, hd)
    scores = torch.einsum("bqhd,bthd->bqht", q.float() * attn.scale, k.float())
    return scores.softmax(dim=-1)[..., keys]


def trait_part_maps(attention: Tensor, grid: tuple[int, int]) -> Tensor:
    """Part maps (B, K+1, H, W) from one class prompt's attention (B, K, L) over the L = H·W patches, per head.

    Head k's map is divided by its maximum (1 at the patch it attends to most); the background channel is 1 − the
    largest of them, so a patch that no head singles out is background; the K+1 channels are normalised to sum to
    one per patch (what the interpretability protocols read, as for VPT's attention maps)."""
    peak = attention / attention.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    maps = torch.cat([peak, 1.0 - peak.amax(dim=1, keepdim=True)], dim=1)
    return (maps / maps.sum(dim=1, keepdim=True)).unflatten(-1, grid)


@register_model("prompt_cam", config=PromptCAMConfig)
class PromptCAM(FrozenViT):
    """Prompt-CAM-Deep on a frozen timm ViT: C class prompts before every block, a shared Linear(D, 1) scorer.

    Trainable: ``prompts`` (depth, C, D), VPT's uniform initialisation (:meth:`FrozenViT.new_prompts`), and
    ``classifier`` (Linear(D, 1), PyTorch's default initialisation, as the authors' re-created head); the backbone's
    pos/cls/reg tokens per ``model.train_tokens``, the switch every tuned kind shares (the authors freeze them:
    ``model.train_tokens=false``).

    Args:
        cfg: the model config (``num_classes`` = C is also the prompt count of every block).
        backbone: a timm VisionTransformer without head; built from ``cfg`` when None.
    """

    has_part_maps = True
    cfg: PromptCAMConfig

    def __init__(self, cfg: PromptCAMConfig, backbone: nn.Module | None = None) -> None:
        super().__init__(cfg, backbone)
        self.prompts = self.new_prompts(len(self.backbone.blocks))
        self.classifier = nn.Linear(self.dim, 1)
        self.set_trainable()

    @property
    def num_heads(self) -> int:
        """K: attention heads of the last block, one trait map each."""
        return int(self.backbone.blocks[-1].attn.num_heads)

    def groups(self, head_lr: float, concept_lr: float) -> list[tuple[str, list[nn.Parameter], float]]:
        """``classifier`` at the head rate; ``prompts`` and (per ``train_tokens``) ``tokens`` at the concept rate,
        as VPT's (prompts live in the token-embedding space)."""
        return [
            ("classifier", list(self.classifier.parameters()), head_lr),
            ("prompts", [self.prompts], concept_lr),
            ("tokens", self.token_parameters() if self.tokens_trainable else [], concept_lr),
        ]

    def map_stages(self) -> list[tuple[int, int]]:
        return [(0, self.num_heads + 1)]

    def describe_stages(self) -> dict:
        return {"class_prompts_per_block": self.cfg.num_classes, "prompted_blocks": len(self.backbone.blocks),
                "trait_maps_per_class": self.num_heads}

    def trunk(self, x: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Images (B, 3, H, W) → (the last block's input (B, C+T, D), its output (B, C+T, D), the patch grid).
        Before every block, that block's C prompts take the place of the previous block's prompt outputs."""
        with self.frozen_context():
            tokens, grid = self.embed(x)
        C = self.cfg.num_classes
        for block, prompts in zip(self.backbone.blocks, self.prompts):
            last_input = torch.cat([prompts.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)
            out = block(last_input)
            tokens = out[:, C:]
        return last_input, out, grid

    def scores(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """The last block's output (B, C+T, D) → (logits (B, C): the shared scorer on each final-normed class prompt,
        final-normed tokens (B, T, D) without the prompts)."""
        normed = self.backbone.norm(out)
        C = self.cfg.num_classes
        return self.classifier(normed[:, :C]).squeeze(-1), normed[:, C:]

    def class_attention(self, last_input: Tensor, classes: Tensor) -> Tensor:
        """Trait maps before any normalisation: the attention (B, Q, K, L) of the prompts of ``classes`` (B, Q) in
        the last block whose input is ``last_input`` (B, C+T, D), over the patches."""
        keys = slice(self.cfg.num_classes + self.num_prefix, None)
        return prompt_attention(self.backbone.blocks[-1], last_input, classes, keys)

    def forward(self, x: Tensor) -> ModelOutput:
        """Images (B, 3, H, W) → logits (B, C); ``tokens`` final-normed (B, T, D), prompts excluded. In eval mode
        ``maps`` holds one (B, K+1, H', W') part map: the predicted class's trait maps and a background channel."""
        last_input, out, grid = self.trunk(x)
        logits, normed = self.scores(out)
        output = ModelOutput(logits=logits, part_logits=logits[:, None], maps=[], grouped_maps=[], assignments=[],
                             region_counts=[], modulated=None, tokens=normed)
        if not self.training:
            with torch.no_grad():
                predicted = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
                output.maps = [trait_part_maps(self.class_attention(last_input, predicted)[:, 0], grid)]
        return output

    @torch.no_grad()
    def trait_maps(self, x: Tensor, classes: Sequence[int] = ()) -> tuple[Tensor, Tensor, Tensor]:
        """One pass over images (B, 3, H, W) → (logits (B, C), the classes explained (B, Q): the predicted class of
        each image, then ``classes`` (ids, the same for every image), their trait maps (B, Q, K, H', W'): each
        head's softmax attention of the class prompt over the patches, a share of that head's attention in [0, 1],
        not renormalised)."""
        last_input, out, grid = self.trunk(x)
        logits, _ = self.scores(out)
        predicted = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        chosen = predicted.new_tensor(list(classes)).view(1, -1).expand(predicted.shape[0], -1)
        explained = torch.cat([predicted, chosen], dim=1)
        return logits, explained, self.class_attention(last_input, explained).unflatten(-1, grid)
