"""What every model kind shares: the output type, a frozen timm ViT base class with its token parameters,
optimiser groups and ``save_pretrained`` / ``from_pretrained``, and the part-pooled classification head of the
concept models (IVPT, the last-layer ablation and VPT-deep with prototypes).

Shapes: B batch, D width, T = R prefix tokens + L patch tokens, H×W patch grid, C classes, N+1 parts.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..checkpoint import CheckpointError, load_pretrained, read_pretrained_config, save_pretrained
from ..config import ConceptConfig, ConfigError, DataConfig, ModelConfig, TunedConfig
from .backbone import build_backbone
from .prototypes import ConceptStage, region_pool, renormalise

__all__ = ["ModelOutput", "FrozenViT", "ConceptModel", "checked_groups"]


@dataclass
class ModelOutput:
    """Everything one forward pass of any model kind produces. m = prompted stages, N = coarse concepts,
    n_i = n_pro[i]. A kind without concept maps fills ``logits``, ``part_logits = logits[:, None]`` and ``tokens``
    and leaves the map lists empty and ``modulated`` None, so the trainer, losses and evaluator need no special case.

    logits: (B, C) part-averaged class scores.
    part_logits: (B, N, C) score of each foreground part.
    maps: m+1 tensors (B, n_i, H, W): the recomputed maps S̃_i (sum to 1 over channels; background last). The
        last one is the final (coarse) stage. Empty for models without concept maps.
    grouped_maps: m tensors (B, N+1, H, W): fine maps grouped through the assignments, M_i.
    assignments: m tensors (B, n_i-1, N): fine→coarse assignment Q_i of every foreground concept.
    region_counts: m+1 tensors (B, n_i): pixels won by each concept (argmax).
    modulated: (B, D, N+1) modulated part features (foreground parts, then background); None without parts.
    tokens: (B, T, D) final-normed output tokens of the last block (prefix tokens first, prompts excluded).
    """

    logits: Tensor
    part_logits: Tensor
    maps: list[Tensor]
    grouped_maps: list[Tensor]
    assignments: list[Tensor]
    region_counts: list[Tensor]
    modulated: Tensor | None
    tokens: Tensor


HEAD_RATE = "head"  # a group at optim.base_lr x optim.head_lr_mult
CONCEPT_RATE = "concept"  # a group at optim.base_lr x optim.concept_lr_mult; the concept ramp scales it


class GroupRate(float):
    """A group's learning rate that remembers which multiplier made it: ``role`` is :data:`HEAD_RATE` or
    :data:`CONCEPT_RATE` (the schedule's concept ramp follows the latter). It is the float that
    :meth:`FrozenViT.groups` receives."""

    role: str

    def __new__(cls, value: float, role: str) -> "GroupRate":
        rate = super().__new__(cls, value)
        rate.role = role
        return rate


def checked_groups(model: nn.Module, groups: list[tuple[str, list[nn.Parameter], float]]) -> list[dict]:
    """Turn (name, params, lr) into optimiser groups (dicts with ``name``, ``params``, ``lr`` and ``rate``: the
    :class:`GroupRate` role of ``lr``, :data:`HEAD_RATE` for a plain float), refusing a trainable parameter in no
    group or in two."""
    seen: dict[int, str] = {}
    out = []
    for name, params, lr in groups:
        params = [p for p in params if p.requires_grad]
        for p in params:
            if id(p) in seen:
                raise RuntimeError(f"parameter in two optimiser groups: {seen[id(p)]} and {name}")
            seen[id(p)] = name
        if params:
            out.append({"name": name, "params": params, "lr": float(lr), "rate": getattr(lr, "role", HEAD_RATE)})
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise RuntimeError(f"trainable parameters in no optimiser group: {missing}")
    return out


class FrozenViT(nn.Module):
    """A frozen timm VisionTransformer plus whatever a subclass trains on top of it.

    A subclass is registered as a model kind by :func:`ivpt.models.register_model` (which sets ``kind``, its
    ``model.kind``, and ``config_class``, the config class it reads), builds its parameters in ``__init__`` and calls
    :meth:`set_trainable`; it implements ``forward(x) -> ModelOutput`` and :meth:`groups` (checked by
    :meth:`param_groups`).

    Args:
        cfg: the model section of the config (an instance of the kind's ``config_class``).
        backbone: a timm VisionTransformer without head; built from ``cfg`` when None.
    """

    kind: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    has_concept_maps: ClassVar[bool] = False  # trained concept maps: the map losses and equivariance apply
    has_part_maps: ClassVar[bool] = False  # eval-mode outputs carry part maps: interpretability metrics apply
    maps_only_view: ClassVar[bool] = False  # forward(x, maps_only_from=k) computes only maps for images k..
    has_part_head: ClassVar[bool] = False  # part-pooled head with logit_weights(): the decision metrics apply

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise ConfigError(f"{type(self).__name__} reads a {self.config_class.__name__}, not a "
                              f"{type(cfg).__name__} (model.kind={cfg.kind!r}); build it with "
                              "ivpt.models.create_model(cfg) or a config of its own kind")
        self.cfg = cfg
        self.backbone = build_backbone(cfg) if backbone is None else backbone
        for attr in ("patch_embed", "blocks", "norm", "_pos_embed"):
            if not hasattr(self.backbone, attr):
                raise ConfigError(f"model.backbone={cfg.backbone!r} is not a timm VisionTransformer (no {attr})")
        self.dim = self.backbone.embed_dim
        self.num_prefix = self.backbone.num_prefix_tokens
        self.patch_size = tuple(self.backbone.patch_embed.patch_size)
        self.grid = (cfg.img_size // self.patch_size[0], cfg.img_size // self.patch_size[1])

    # ----------------------------------------------------------------------------------------------- parameters
    @property
    def tokens_trainable(self) -> bool:
        """Whether pos_embed / cls_token / reg_token train: ``model.train_tokens`` for the kinds whose config has it
        (:class:`~ivpt.config.TunedConfig`), frozen for the others."""
        return isinstance(self.cfg, TunedConfig) and self.cfg.train_tokens

    def token_parameters(self) -> list[nn.Parameter]:
        """pos_embed, cls_token and reg_token of the backbone (those it has)."""
        bb = self.backbone
        return [p for p in (getattr(bb, n, None) for n in ("pos_embed", "cls_token", "reg_token")) if p is not None]

    def set_trainable(self) -> None:
        """Freeze the backbone except (per :attr:`tokens_trainable`) its embedding tokens; the rest trains."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for p in self.token_parameters():
            p.requires_grad_(self.tokens_trainable)

    def param_groups(self, base_lr: float, head_mult: float, concept_mult: float) -> list[dict]:
        """Optimiser groups (dicts with ``name``, ``params``, ``lr``, ``rate``: :data:`HEAD_RATE` or
        :data:`CONCEPT_RATE`, which multiplier set ``lr``); every trainable parameter in exactly one."""
        return checked_groups(self, self.groups(GroupRate(base_lr * head_mult, HEAD_RATE),
                                                GroupRate(base_lr * concept_mult, CONCEPT_RATE)))

    def groups(self, head_lr: float, concept_lr: float) -> list[tuple[str, list[nn.Parameter], float]]:
        """(name, parameters, lr) of every group; :meth:`param_groups` checks them."""
        raise NotImplementedError

    def follow_progress(self, progress: float) -> None:
        """Set what changes with the share of the run done, ``progress`` = (optimiser step + 1) / total steps, for
        the step about to be taken (the trainer calls it before each step); nothing by default."""

    def map_stages(self) -> list[tuple[int, int]]:
        """(stage index, channels) of each part map in an eval-mode output's ``maps``, in order; background is the
        last channel of each. Stage indices follow ``model.n_pro`` where the maps are concept stages."""
        return []

    def describe_stages(self) -> dict:
        """What ``ivpt info`` adds to :func:`ivpt.models.describe` for this kind (IVPT: its concept stages)."""
        return {}

    def new_prompts(self, layers: int) -> nn.Parameter:
        """(layers, P, D) prompt tokens (P = ``model.num_prompts``), row i feeding the i-th prompted block, in VPT's
        initialisation: uniform(±sqrt(6 / (3·p_h·p_w + D))), Xavier-uniform for a patch-embedding-like map from
        3·p_h·p_w pixels to D."""
        prompts = nn.Parameter(torch.empty(layers, self.cfg.num_prompts, self.dim))
        bound = math.sqrt(6.0 / (3 * self.patch_size[0] * self.patch_size[1] + self.dim))
        nn.init.uniform_(prompts, -bound, bound)
        return prompts

    # ------------------------------------------------------------------------------------------------- forward
    def frozen_context(self):
        """No autograd for the embedding when nothing in it trains: saves the activations of the frozen path."""
        return contextlib.nullcontext() if self.tokens_trainable else torch.no_grad()

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images (B, 3, H·p, W·p) → tokens (B, T, D) exactly as timm's forward_features begins, and the grid."""
        bb = self.backbone
        grid = (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
        tokens = bb.patch_embed(x)
        tokens = bb._pos_embed(tokens)
        tokens = bb.patch_drop(tokens)
        tokens = bb.norm_pre(tokens)
        return tokens, grid

    def global_token(self, normed: Tensor) -> Tensor:
        """Image feature (B, D) from final-normed tokens (B, T, D): the cls token, else the mean patch token."""
        if getattr(self.backbone, "cls_token", None) is not None:
            return normed[:, 0]
        return normed[:, self.num_prefix :].mean(dim=1)

    def prompted_block(self, block: nn.Module, tokens: Tensor, prompts: Tensor) -> Tensor:
        """Run ``block`` on tokens (B, T, D) with ``prompts`` (P, D) inserted after the prefix tokens (VPT's layout:
        [prefix | prompts | patches]); returns (B, T, D) with the prompts' outputs dropped."""
        R, P = self.num_prefix, prompts.shape[0]
        prompts = prompts.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        out = block(torch.cat([tokens[:, :R], prompts, tokens[:, R:]], dim=1))
        return torch.cat([out[:, :R], out[:, R + P :]], dim=1)

    def stage_features(self, tokens: Tensor) -> Tensor:
        """Detached, final-normed patch tokens (B, L, D) that concept stages look at (the norm is per token, so
        the prefix tokens are dropped first: contiguous features, no norm of tokens nobody reads)."""
        return self.backbone.norm(tokens.detach()[:, self.num_prefix :])

    # ------------------------------------------------------------------------------------------ save and load
    def save_pretrained(self, directory: str | Path, *, extra: dict | None = None,
                        data: DataConfig | None = None) -> Path:
        """``config.json`` + ``model.safetensors`` (trained parameters only; with ``data``, the run's data section,
        its input normalisation too), see :mod:`ivpt.checkpoint`."""
        return save_pretrained(self, directory, extra=extra, data=data)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, weights: str | None = None, map_location: str = "cpu",
                        allow_backbone_mismatch: bool = False):
        """Rebuild the model saved in ``directory``; ``weights`` overrides where the frozen backbone comes from.
        Backbone weights other than those it was trained on are refused unless ``allow_backbone_mismatch``."""
        cfg, meta = read_pretrained_config(directory)
        if cfg.kind != cls.kind:
            raise CheckpointError(f"{directory} holds a model.kind={cfg.kind!r} model, not {cls.kind!r}; load it "
                                  "with ivpt.runs.load_run (any kind)")
        model = cls(cfg, build_backbone(cfg, weights=weights))
        load_pretrained(model, directory, meta=meta, allow_backbone_mismatch=allow_backbone_mismatch)
        return model.to(map_location)


class ConceptModel(FrozenViT):
    """A frozen ViT with concept stages (``stages``) and the part-pooled classification head (docs/method.md §2 step 5):
    the final map pools the last tokens into N+1 part features, one LayerNorm with a (D, N+1) affine
    ("modulation") normalises them, and a bias-free Linear(D, C) shared by the parts scores each foreground part.
    """

    has_concept_maps = True
    has_part_maps = True
    has_part_head = True
    config_class = ConceptConfig
    cfg: ConceptConfig

    def __init__(self, cfg: ConceptConfig, backbone: nn.Module | None = None) -> None:
        super().__init__(cfg, backbone)
        self.stages = nn.ModuleList()
        self.prompts: nn.Parameter | None = None  # free (VPT-deep) prompts (layers, P, D) of the kinds that have them

    def map_stages(self) -> list[tuple[int, int]]:
        """The last ``len(stages)`` entries of ``model.n_pro`` (IVPT: all; single-stage heads: the final one)."""
        n_pro = self.cfg.n_pro
        first = len(n_pro) - len(self.stages)
        return [(first + i, stage.num_prototypes) for i, stage in enumerate(self.stages)]

    def build_head(self, num_parts: int) -> None:
        """``modulation`` over (D, ``num_parts``) and the shared part ``classifier`` (trunc-normal std 0.02)."""
        self.modulation = nn.LayerNorm([self.dim, num_parts])
        self.classifier = nn.Linear(self.dim, self.cfg.num_classes, bias=False)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)
        # model.global_part: its own LayerNorm (D) in front of the shared classifier.
        self.global_norm = nn.LayerNorm(self.dim) if self.cfg.global_part else None
        if self.cfg.global_part and self.cfg.global_share_end is not None:  # the share moves over the run
            self.register_buffer("global_share", torch.tensor(self.start_share()))

    def start_share(self) -> float:
        """``model.global_share``, or 1/(N+1) when it is None: the global part's share of the logits before the
        first step (all the time without ``model.global_share_end``)."""
        return 1.0 / (self.cfg.num_coarse + 1) if self.cfg.global_share is None else self.cfg.global_share

    def _share(self) -> Tensor | float:
        """The global part's share now: the moving share's 0-dim buffer under ``model.global_share_end`` (kept on
        the device: no host sync per forward), else :meth:`start_share`."""
        return self.global_share if hasattr(self, "global_share") else self.start_share()

    def follow_progress(self, progress: float) -> None:
        """Under ``model.global_share_end``, the share of the step about to be taken: linear from
        :meth:`start_share` (progress 0) to ``global_share_end`` (progress 1, the last step)."""
        if hasattr(self, "global_share"):
            start = self.start_share()
            self.global_share.fill_(start + (self.cfg.global_share_end - start) * min(1.0, max(0.0, progress)))

    def new_stage(self, n: int, *, num_coarse: int | None = None) -> ConceptStage:
        return ConceptStage(n, self.dim, self.grid, num_coarse=num_coarse, init_std=self.cfg.prototype_init_std)

    def groups(self, head_lr: float, concept_lr: float) -> list[tuple[str, list[nn.Parameter], float]]:
        """Groups from explicit module membership: classifier, modulation, prompt projections and assigners at the
        head rate; prototypes, spatial biases, (per ``train_tokens``) backbone tokens and free prompts (as VPT's) at the
        concept rate."""
        prompted = [s for s in self.stages if s.assigner is not None]
        return [
            ("classifier", list(self.classifier.parameters()), head_lr),
            ("modulation", list(self.modulation.parameters()), head_lr),
            ("global_norm", list(self.global_norm.parameters()) if self.global_norm is not None else [], head_lr),
            ("prompt_proj", [p for s in prompted for p in s.prompt_proj.parameters()], head_lr),
            ("assigners", [p for s in prompted for p in s.assigner.parameters()], head_lr),
            ("prototypes", [s.prototypes for s in self.stages], concept_lr),
            ("spatial_bias", [s.spatial_bias for s in self.stages], concept_lr),
            ("tokens", self.token_parameters() if self.tokens_trainable else [], concept_lr),
            ("prompts", [self.prompts] if self.prompts is not None else [], concept_lr),
        ]

    def concept_features(self, x: Tensor) -> list[Tensor]:
        """The features (B, L, D) each concept stage reads on images (B, 3, H, W), in stage order (eval mode)."""
        raise NotImplementedError

    @torch.no_grad()
    def centre_prototypes(self, images: Tensor, *, batch_size: int = 16) -> None:
        """``model.prototype_init="feature_mean"``: shift every stage's prototypes by the mean of the features it
        reads on ``images`` (B, 3, H, W), stage by stage (a stage's features depend on the earlier stages' prompts,
        so each mean is taken with the stages before it already centred). Maps are a softmax over
        -||f - π_k||², so a feature component shared by every pixel favours whichever random π_k points along it,
        everywhere; centred, the prototypes compete on what differs between pixels. Runs in eval mode."""
        for stage, batches in self._features_stage_by_stage(images, batch_size):
            total = torch.zeros(self.dim, dtype=torch.float64, device=stage.prototypes.device)
            count = 0
            for feats in batches:
                total += feats.double().sum(dim=(0, 1))
                count += feats.shape[0] * feats.shape[1]
            stage.prototypes.add_((total / count).to(stage.prototypes.dtype))

    @torch.no_grad()
    def cluster_prototypes(self, images: Tensor, *, seed: int, batch_size: int = 16, spread: float = 1.0) -> None:
        """``model.prototype_init="kmeans"``: set every stage's n prototypes to the k-means centres (k = n) of the
        patch features it reads on ``images`` (B, 3, H, W), stage by stage (a stage's features depend on the earlier
        stages' prompts), their offsets from the centres' mean multiplied by ``spread``. The background slot, the
        last, gets the cluster with the largest share of its patches on the grid's outer ring; the foreground
        concepts follow in order of size, largest first. Maps are a softmax over -||f - π_k||², so at the start each
        pixel goes to its nearest centre: the k-means partition (``spread`` s = 1; with centres c_k of mean m, a
        pixel's argmax is that of 2(f - m)·(c_k - m) - s·||c_k - m||², so a smaller s softens the maps and favours
        the centres far from m). Runs in eval mode; ``seed`` fixes k-means++'s draws, so every rank computes the
        same start."""
        from sklearn.cluster import KMeans

        ring = _outer_ring(self.grid).flatten()
        for stage, batches in self._features_stage_by_stage(images, batch_size):
            feats = torch.cat([f.float().cpu() for f in batches])
            n_img, n_pix, dim = feats.shape
            n = stage.num_prototypes
            km = KMeans(n_clusters=n, n_init=4, random_state=seed).fit(feats.reshape(-1, dim).numpy())
            labels = torch.from_numpy(km.labels_).long().view(n_img, n_pix)
            centres = torch.from_numpy(km.cluster_centers_).to(torch.float64)
            if spread != 1.0:
                mean = centres.mean(dim=0, keepdim=True)
                centres = mean + spread * (centres - mean)
            size = torch.bincount(labels.flatten(), minlength=n).double()
            on_ring = torch.bincount(labels[:, ring].flatten(), minlength=n).double()
            background = int((on_ring / size.clamp_min(1)).argmax())
            foreground = [k for k in size.argsort(descending=True, stable=True).tolist() if k != background]
            order = torch.tensor(foreground + [background])
            stage.prototypes.copy_(centres[order].to(stage.prototypes))

    def _features_stage_by_stage(self, images: Tensor,
                                 batch_size: int) -> Iterator[tuple[ConceptStage, Iterator[Tensor]]]:
        """(stage, its features (b, L, D) on each batch of ``batch_size`` of ``images``), stage by stage, in eval mode
        (the caller's mode is restored after the last stage). Lazy: a caller that sets a stage's prototypes before
        asking for the next stage gets features that read them through that stage's prompts."""
        was_training = self.training
        self.eval()
        try:
            for i, stage in enumerate(self.stages):
                yield stage, (self.concept_features(x)[i] for x in images.split(batch_size))
        finally:
            self.train(was_training)

    def single_stage_output(self, tokens: Tensor, grid: tuple[int, int]) -> ModelOutput:
        """The output of a model whose only concept stage reads the last block's tokens (B, T, D): one map
        (B, n, H, W), part-pooled logits, no grouped maps or assignments."""
        final = renormalise(self.stages[0].maps(self.stage_features(tokens), grid))
        logits, part_logits, modulated, counts, normed = self.classify(tokens, final)
        return ModelOutput(logits=logits, part_logits=part_logits, maps=[final], grouped_maps=[], assignments=[],
                          region_counts=[counts], modulated=modulated, tokens=normed)

    def classify(self, tokens: Tensor, final_map: Tensor):
        """Part-pooled classification from the last tokens (B, T, D) and the final map (B, N+1, H, W), both NOT
        detached: (logits (B, C), part_logits (B, N, C), modulated (B, D, N+1), counts (B, N+1), normed tokens).

        With ``model.global_part`` the global token's score joins the N foreground parts' (:meth:`logit_weights`).
        """
        normed = self.backbone.norm(tokens)
        parts, counts = region_pool(final_map.flatten(2), normed[:, self.num_prefix :])  # (B, N+1, D)
        modulated = self.modulation(parts.transpose(1, 2).to(self.modulation.weight.dtype))  # (B, D, N+1)
        part_logits = self.classifier(modulated[:, :, :-1].transpose(1, 2))  # (B, N, C)
        if self.global_norm is None:
            return part_logits.mean(dim=1), part_logits, modulated, counts, normed
        token = self.global_token(normed).to(self.global_norm.weight.dtype)  # (B, D)
        global_logits = self.classifier(self.global_norm(token))  # (B, C)
        share = self._share()
        logits = (1 - share) / self.cfg.num_coarse * part_logits.sum(dim=1) + share * global_logits
        return logits, part_logits, modulated, counts, normed

    def logit_weights(self) -> tuple[float, float]:
        """(w_part, w_global): logits = w_part · Σ_k part_logits_k + w_global · global_logits. The parts only
        (the paper): (1/N, 0); with ``model.global_part``: s = ``model.global_share`` (1/(N+1) when None) gives
        ((1 - s)/N, s); under ``model.global_share_end``, s is the share of the last step trained (or loaded)."""
        N = self.cfg.num_coarse
        if not self.cfg.global_part:
            return 1.0 / N, 0.0
        share = float(self._share())
        return (1.0 - share) / N, share


def _outer_ring(grid: tuple[int, int]) -> Tensor:
    """(H, W) bool mask of a patch grid's outermost rows and columns."""
    ring = torch.ones(grid, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    return ring
