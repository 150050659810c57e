"""Model selection that respects the concepts, and dead-concept revival inside the training loop."""
import json
import logging

import pytest
import torch

import ivpt.engine.trainer as T
from ivpt.engine import train
from ivpt.engine.trainer import Trainer

from .test_engine import _kill_after_step, _Killed, _params, tiny_config, world  # noqa: F401  (fixture)

DEAD = {"alive_s0": 0.0, "entropy_s0": 0.1, "alive_s1": 1.0, "entropy_s1": 0.1, "alive_s2": 1.0, "entropy_s2": 0.1}
ALIVE = {**DEAD, "alive_s0": 0.75}


def test_best_is_the_best_top1_among_epochs_whose_concepts_are_alive(world, tmp_path, monkeypatch):
    # (val top-1, validation health) per epoch: a dead epoch never displaces an alive one, however accurate.
    script = iter([(90.0, DEAD), (50.0, ALIVE), (95.0, DEAD), (70.0, ALIVE), (65.0, ALIVE)])
    monkeypatch.setattr(Trainer, "validate", lambda self: next(script))
    metrics = train(tiny_config(world, optim=dict(epochs=5)), tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert meta["epoch"] == 4 and meta["val_top1"] == 70.0 and meta["concepts_alive"] is True
    assert meta["val_health"] == ALIVE
    assert metrics["best_concepts_alive"] is True and metrics["best_val_top1"] == pytest.approx(0.70)


def test_until_an_epoch_is_alive_best_is_the_best_top1_and_says_so(world, tmp_path, monkeypatch):
    script = iter([(40.0, DEAD), (60.0, DEAD), (50.0, DEAD)])
    monkeypatch.setattr(Trainer, "validate", lambda self: next(script))
    metrics = train(tiny_config(world, optim=dict(epochs=3)), tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert meta["epoch"] == 2 and meta["concepts_alive"] is False and metrics["best_concepts_alive"] is False


def test_validation_measures_the_health_of_the_eval_maps(world, tmp_path):
    train(tiny_config(world, optim=dict(epochs=1)), tmp_path / "ivpt", progress=False)
    meta = json.loads((tmp_path / "ivpt" / "best" / "config.json").read_text())
    assert set(meta["val_health"]) == {f"{k}_s{i}" for i in range(3) for k in ("alive", "entropy")}
    assert all(0.0 <= v <= 1.0 for v in meta["val_health"].values())
    assert meta["concepts_alive"] == all(meta["val_health"][f"alive_s{i}"] >= 0.5 for i in range(3))
    import csv

    with open(tmp_path / "ivpt" / "log.csv") as f:
        scored = [r for r in csv.DictReader(f) if r["val_top1"]]
    assert len(scored) == 1 and float(scored[0]["val_top1"]) == pytest.approx(meta["val_top1"], abs=1e-4)
    assert scored[0]["alive_s0"] != ""  # the same row carries the epoch's training health
    train(tiny_config(world, model=dict(kind="vpt_deep"), optim=dict(epochs=1)), tmp_path / "vpt", progress=False)
    meta = json.loads((tmp_path / "vpt" / "best" / "config.json").read_text())
    assert meta["val_health"] == {} and meta["concepts_alive"] is True  # no concepts: nothing to be dead


def _kill_prototype(monkeypatch):
    """Models start with stage 0's first prototype far from every feature: dead from the first step."""
    original = T.create_model

    def create(*args, **kwargs):
        model = original(*args, **kwargs)
        with torch.no_grad():
            model.stages[0].prototypes[0] += 100.0
        return model

    monkeypatch.setattr(T, "create_model", create)


def test_revival_brings_a_dead_prototype_back(world, tmp_path, monkeypatch, caplog):
    _kill_prototype(monkeypatch)
    caplog.set_level(logging.INFO, logger="ivpt")
    train(tiny_config(world, optim=dict(epochs=1, revive_until=1.0)), tmp_path / "on", progress=False)
    assert "revived dead concepts" in caplog.text and "0:0<-" in caplog.text
    revived = _params(tmp_path / "on")["stages.0.prototypes"][0]
    assert float(revived.abs().max()) < 50  # now a split of a live region, no longer 100 away
    caplog.clear()
    train(tiny_config(world, optim=dict(epochs=1)), tmp_path / "off", progress=False)
    assert "revived" not in caplog.text
    assert float(_params(tmp_path / "off")["stages.0.prototypes"][0].abs().max()) > 50


def test_kill_and_resume_is_exact_with_revival(world, tmp_path, monkeypatch, caplog):
    # A kill in the middle of epoch 2: its revival at the end of the epoch needs the pixel counts of the epoch's
    # first step, taken before the kill (saved in last.pt).
    _kill_prototype(monkeypatch)
    caplog.set_level(logging.INFO, logger="ivpt")
    cfg = tiny_config(world, optim=dict(revive_until=1.0), train=dict(ckpt_every_steps=1))
    train(cfg, tmp_path / "full", progress=False)
    assert "revived dead concepts" in caplog.text
    with monkeypatch.context() as m:
        _kill_after_step(m, 4)
        with pytest.raises(_Killed):
            train(cfg, tmp_path / "killed", progress=False)
    train(cfg, tmp_path / "killed", resume=True, progress=False)
    full, resumed = _params(tmp_path / "full"), _params(tmp_path / "killed")
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # The epoch's health row counts every step of the epoch, those before the kill included.
    rows = {name: _health_rows(tmp_path / name / "log.csv") for name in ("full", "killed")}
    assert rows["full"] == rows["killed"] and len(rows["full"]) == 2


def _health_rows(log) -> list[dict]:
    import csv

    with open(log) as f:
        return [{k: v for k, v in r.items() if k.startswith(("alive_", "entropy_"))}
                for r in csv.DictReader(f) if r.get("entropy_s0")]
