"""The dataset-level evaluator and `ivpt eval` on a tiny part-world: keys, stage choice, brute-force accuracy,
and identical numbers under torchrun with a test set that does not divide by the world size."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

from ivpt.cli import main
from ivpt.config import Config, ConfigError
from ivpt.data import CubDataset, build_eval_transform
from ivpt.data.synth import make_partworld
from ivpt.config import EvalConfig
from ivpt.eval import evaluate

from .conftest import TINY, tiny_model

KEYS = {"top1", "top5", "balanced_top1", "consistency", "stability", "nmi", "ari", "kpr", "fg_iou", "stage"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pw")
    make_partworld(root, classes=3, per_class=7, size=64, seed=1, test_fraction=0.43)  # 3 per class: 9 test images, odd
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model(num_classes=3, n_pro=[6, 5, 4, 3], seed=4)
    with torch.no_grad():
        for s in model.stages:
            s.spatial_bias.normal_(std=2.0)  # distinct regions so every metric has something to measure
    path = tmp_path_factory.mktemp("ckpt") / "best"
    model.save_pretrained(path)
    return path, model


def _cfg(root, **eval_values) -> Config:
    return Config.from_dict({
        "model": dict(backbone="vit_small_patch14_reg4_dinov2", img_size=56, num_classes=3, n_pro=[6, 5, 4, 3],
                      weights="random", backbone_kwargs=dict(TINY)),
        "data": dict(root=str(root), num_workers=0),
        "eval": dict(batch_size=3, **eval_values),
    })


def test_stage_index():
    def resolve_stage(spec, n):
        return EvalConfig(stage=spec).stage_index(n)

    assert resolve_stage("auto", 5) == 2  # the stage with n_pro[-3] prototypes
    assert resolve_stage("auto", 2) == 1
    assert resolve_stage("final", 5) == 4
    assert resolve_stage("-1", 4) == 3 and resolve_stage(1, 4) == 1
    with pytest.raises(ConfigError):
        resolve_stage("7", 4)
    with pytest.raises(ConfigError):
        resolve_stage("middle", 4)
    with pytest.raises(ConfigError, match="out of range for 3 stages"):  # checked against model.n_pro up front
        Config.from_dict({"model": {"n_pro": [5, 4, 3]}, "eval": {"stage": "5"}})


def test_evaluate_all_metrics_and_brute_force_accuracy(world, checkpoint):
    _, model = checkpoint
    cfg = _cfg(world)
    result = evaluate(model, cfg, progress=False)
    assert KEYS <= set(result)
    assert result["stage"] == {"index": 1, "n_pro": 5, "spec": "auto"}
    assert [r["stage"] for r in result["per_stage"]] == [0, 1, 2, 3]
    for r in result["per_stage"]:
        assert {"consistency", "stability", "nmi", "ari", "kpr", "fg_iou"} <= set(r)
        assert 0 <= r["consistency"] <= 100 and 0 <= r["stability"] <= 100 and 0 <= r["fg_iou"] <= 100
    assert result["consistency"] == result["per_stage"][1]["consistency"]
    # accuracy by brute force over the same images
    ds = CubDataset(world, "test", transform=build_eval_transform(cfg.data, 56))
    model.eval()
    with torch.no_grad():
        preds = torch.stack([model(ds[i]["image"][None]).logits.argmax(1)[0] for i in range(len(ds))])
    labels = torch.tensor(ds.labels)
    assert result["top1"] == pytest.approx(100.0 * (preds == labels).float().mean().item())
    per_class = [(preds[labels == c] == c).float().mean().item() for c in labels.unique()]
    assert result["balanced_top1"] == pytest.approx(100.0 * sum(per_class) / len(per_class))
    assert result["top5"] == 100.0  # 3 classes
    assert result["data"]["images"] == len(ds) == 9


def test_stage_choice_and_subset(world, checkpoint):
    _, model = checkpoint
    result = evaluate(model, _cfg(world, stage="final"), metrics=["acc", "nmi_ari"], progress=False)
    assert result["stage"]["index"] == 3
    assert "consistency" not in result and "nmi" in result and "top1" in result
    with pytest.raises(ConfigError, match="unknown metric"):
        evaluate(model, _cfg(world), metrics=["accuracy"], progress=False)


def test_cli_eval_writes_eval_json(world, checkpoint, tmp_path):
    path, _ = checkpoint
    code = main(["eval", str(path), "--data", str(world), "--out", str(tmp_path), "--weights", "random",
                 "--no-progress", "--stage", "0", "eval.batch_size=4", "data.num_workers=0"])
    assert code == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert KEYS <= set(result) and result["stage"]["index"] == 0
    assert result["protocol"]["half_size"] == 36 and result["protocol"]["threshold"] == 0.8
    assert result["checkpoint"]["name"] == "vit_small_patch14_reg4_dinov2"


@pytest.mark.slow
def test_eval_under_torchrun_matches_one_process(world, checkpoint, tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    path, _ = checkpoint
    # the random backbone is rebuilt from the seed inside each process: pin it by saving real weights
    model = tiny_model(num_classes=3, n_pro=[6, 5, 4, 3], seed=4)
    weights = tmp_path / "backbone.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(weights))
    args = ["eval", str(path), "--data", str(world), "--weights", str(weights), "--no-progress",
            "eval.batch_size=2", "data.num_workers=0"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "ivpt.cli", *args,
                           "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "eval.json").read_text())
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    # Counts (accuracy, consistency, stability, NMI/ARI from an integer contingency table, IoU) are summed exactly;
    # keypoint regression solves a least-squares fit from float32 features whose moments are summed in another
    # order: relative error ~ (terms summed) x float32 eps, far below 1e-5.
    for key in KEYS - {"stage", "kpr"}:
        assert one[key] == pytest.approx(two[key], rel=1e-12, abs=1e-12), key
    assert one["kpr"] == pytest.approx(two["kpr"], rel=1e-5), "kpr"


def test_evaluation_precision_is_eval_amp_not_the_training_precision(world, checkpoint, monkeypatch):
    from ivpt import runtime as R

    _, model = checkpoint
    seen = []
    original = R.autocast
    monkeypatch.setattr(R, "autocast", lambda device, amp: seen.append(amp) or original(device, amp))
    cfg = _cfg(world).with_overrides(["optim.amp=bf16"])  # a bf16 training config evaluates in fp32 by default
    assert cfg.eval.amp == "none"
    evaluate(model, cfg, metrics=["acc", "consistency"], progress=False)
    assert seen and set(seen) == {"none"}
    seen.clear()
    evaluate(model, cfg.with_overrides(["eval.amp=bf16"]), metrics=["acc"], progress=False)
    assert set(seen) == {"bf16"}


def test_evaluate_reads_images_as_the_run_did_with_bbox_crop(world, checkpoint):
    """A run trained with data.bbox_crop=true is scored on box crops (as its trainer's test pass scored it): the
    images the model sees are the cropped ones, and top-1 is the brute force over them."""
    _, model = checkpoint
    cfg = Config.from_dict({**_cfg(world).to_dict(), "data": dict(root=str(world), num_workers=0, bbox_crop=True)})
    seen: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        result = evaluate(model, cfg, metrics=["acc"], progress=False)
    finally:
        handle.remove()
    transform = build_eval_transform(cfg.data, 56)
    cropped = CubDataset(world, "test", transform=transform, bbox_crop=True)
    full = CubDataset(world, "test", transform=transform)
    first = torch.stack([cropped[i]["image"] for i in range(3)])
    assert torch.equal(seen[0], first)
    assert not torch.equal(first, torch.stack([full[i]["image"] for i in range(3)]))
    model.eval()
    with torch.no_grad():
        preds = torch.stack([model(cropped[i]["image"][None]).logits.argmax(1)[0] for i in range(len(cropped))])
    assert result["top1"] == pytest.approx(100.0 * (preds == torch.tensor(cropped.labels)).float().mean().item())
