"""The training engine on a tiny part-world: a run end to end, exact kill-and-resume, and torchrun DDP equal to
one process with the same global batch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from ivpt.config import Config
from ivpt.data.synth import make_partworld
from ivpt.engine import SimulatedCrash, TrainingError, train

from .conftest import TINY


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("partworld")
    make_partworld(root, classes=3, per_class=8, size=56, seed=0, test_fraction=0.25)
    return root


def tiny_config(root, **sections) -> Config:
    data = {
        "model": dict(backbone="vit_small_patch14_reg4_dinov2", img_size=56, num_classes=3, n_pro=[5, 4, 3],
                      weights="random", backbone_kwargs=dict(TINY)),
        "optim": dict(epochs=2, batch_size=4, amp="none"),
        "data": dict(root=str(root), num_workers=0, val_fraction=0.2, resize=64),
        "train": dict(seed=3, log_every=1, deterministic=True),
        "eval": dict(batch_size=8),
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return Config.from_dict(data)


def _params(run_dir):
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)["model"]


def test_train_writes_run_folder(world, tmp_path):
    metrics = train(tiny_config(world), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for name in ("config.yaml", "log.csv", "last.pt", "metrics.json", "best/config.json", "best/model.safetensors"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == pytest.approx(metrics) or saved["test_top1"] == metrics["test_top1"]
    assert 0 <= saved["test_top1"] <= 1 and saved["num_classes"] == 3 and saved["chance"] == pytest.approx(1 / 3)
    header, *rows = (run / "log.csv").read_text().strip().splitlines()
    for term in ("classification", "consistency", "equivariance", "presence", "tv", "entropy", "img_per_s"):
        assert term in header.split(",")
    assert len(rows) >= 2
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["n_pro"] == [5, 4, 3]


def test_kill_and_resume_is_exact(world, tmp_path):
    cfg = tiny_config(world, train=dict(ckpt_every_steps=1))
    train(cfg, tmp_path / "full", progress=False)
    with pytest.raises(SimulatedCrash):
        train(cfg, tmp_path / "killed", progress=False, crash_after_step=4)  # mid-epoch 2 (3 steps per epoch)
    state = torch.load(tmp_path / "killed" / "last.pt", map_location="cpu", weights_only=False)
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 1, 4)
    train(cfg, tmp_path / "killed", resume=True, progress=False)
    full, resumed = _params(tmp_path / "full"), _params(tmp_path / "killed")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_non_finite_loss_stops_with_named_term(world, tmp_path):
    cfg = tiny_config(world, optim=dict(head_lr_mult=1e30, base_lr=1.0), train=dict(ckpt_every_steps=1))
    with pytest.raises(TrainingError, match="non-finite loss .* term"):
        train(cfg, tmp_path / "nan", progress=False)
    assert (tmp_path / "nan" / "last.pt").is_file()


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(world, tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    # Gumbel noise is drawn per process, and presence takes a max over each process's batch: both off here.
    cfg = tiny_config(world, model=dict(train_gumbel=False), loss=dict(presence=0.0),
                      optim=dict(epochs=1), train=dict(max_steps=3))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    train(cfg, tmp_path / "single", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "ivpt.cli", "train", "--config",
         str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "ddp"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, ddp = _params(tmp_path / "single"), _params(tmp_path / "ddp")
    for k in single:
        assert torch.allclose(single[k], ddp[k], atol=1e-5, rtol=1e-4), k
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["test_images"] == 6


@pytest.mark.parametrize("kind", ["linear", "vpt_deep", "last_layer_parts"])
def test_baselines_train_and_evaluate(world, tmp_path, kind):
    import csv

    from ivpt.checkpoint import load_pretrained
    from ivpt.evaluation import evaluate
    from ivpt.model import create_model

    cfg = tiny_config(world, model=dict(kind=kind, num_prompts=2), optim=dict(epochs=1), train=dict(max_steps=2))
    metrics = train(cfg, tmp_path / kind, progress=False)
    assert metrics["steps"] == 2
    rows = list(csv.DictReader((tmp_path / kind / "log.csv").open()))
    lr_concepts = float(rows[-1]["lr_concepts"])
    if kind == "linear":  # a true probe: only the classifier trains, so there is no concept-rate group
        assert lr_concepts != lr_concepts
    else:
        assert lr_concepts == pytest.approx(2e-4)
    model = create_model(cfg.model)
    load_pretrained(model, tmp_path / kind / "best")
    result = evaluate(model, cfg, progress=False)
    assert 0 <= result["top1"] <= 100
    if kind == "last_layer_parts":  # concept maps, so the interpretability metrics apply (final stage)
        assert result["stage"]["index"] == 2 and "nmi" in result and "consistency" in result
    else:
        assert "nmi" not in result and "stage" not in result
