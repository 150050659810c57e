"""Model selection that respects the concepts, and dead-concept revival inside the training loop."""
import json
import logging
import math

import pytest
import torch

import ivpt.engine.trainer as T
from ivpt.config import ConfigError, load_config
from ivpt.data import build_datasets
from ivpt.engine import train
from ivpt.engine.selection import Selection, top1_standard_error
from ivpt.engine.trainer import Trainer

from .test_engine import _kill_after_step, _Killed, _params, tiny_config, world  # noqa: F401  (fixture)

DEAD = {"alive_s0": 0.0, "entropy_s0": 0.1, "alive_s1": 1.0, "entropy_s1": 0.1, "alive_s2": 1.0, "entropy_s2": 0.1}
ALIVE = {**DEAD, "alive_s0": 0.75}


BEST_TOP1 = dict(selection="best_top1")


def _scores(top1: float, health: dict) -> tuple[dict, dict]:
    """What Trainer.validate returns: the validation scores and the map health."""
    return {"val_top1": top1}, health


def test_best_is_the_best_top1_among_epochs_whose_concepts_are_alive(world, tmp_path, monkeypatch):
    # (val top-1, validation health) per epoch: a dead epoch never displaces an alive one, however accurate.
    script = iter([(90.0, DEAD), (50.0, ALIVE), (95.0, DEAD), (70.0, ALIVE), (65.0, ALIVE)])
    monkeypatch.setattr(Trainer, "validate", lambda self: _scores(*next(script)))
    metrics = train(tiny_config(world, optim=dict(epochs=5), train=BEST_TOP1), tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert meta["epoch"] == 4 and meta["val_top1"] == 70.0 and meta["concepts_alive"] is True
    assert meta["val_health"] == ALIVE
    assert metrics["best_concepts_alive"] is True and metrics["best_val_top1"] == pytest.approx(0.70)


def test_until_an_epoch_is_alive_best_is_the_best_top1_and_says_so(world, tmp_path, monkeypatch):
    script = iter([(40.0, DEAD), (60.0, DEAD), (50.0, DEAD)])
    monkeypatch.setattr(Trainer, "validate", lambda self: _scores(*next(script)))
    metrics = train(tiny_config(world, optim=dict(epochs=3), train=BEST_TOP1), tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert meta["epoch"] == 2 and meta["concepts_alive"] is False and metrics["best_concepts_alive"] is False


def test_the_standard_error_of_a_top1():
    assert top1_standard_error(80.0, 48) == pytest.approx(100 * math.sqrt(0.8 * 0.2 / 48))  # 5.77 points
    assert top1_standard_error(100.0, 48) == 0.0 and top1_standard_error(0.0, 10) == 0.0
    assert top1_standard_error(50.0, 100) == pytest.approx(5.0)


def test_latest_within_one_standard_error_of_the_best_so_far():
    # 48 images: SE at 80 % is 5.77 points, at 85 % 5.15.
    rule = Selection("latest_within_se")
    picks = [rule.consider(v, alive, 48) for v, alive in
             [(60.0, False), (50.0, True), (80.0, True), (75.0, True), (85.0, True), (79.0, True), (90.0, False),
              (80.5, True)]]
    # a dead epoch is taken until one is alive; 75 is within 5.77 of 80; 79 is not within 5.15 of 85, 80.5 is;
    # the accurate dead epoch never displaces an alive best/.
    assert picks == [True, True, True, True, True, False, False, True]
    assert rule.best_val == 85.0 and rule.best_alive is True
    assert Selection("latest_within_se").consider(None, False, 0) is True  # no validation split: every epoch
    with pytest.raises(ValueError, match="best_top1"):
        Selection("best")


def test_the_default_rule_keeps_a_later_epoch_the_validation_split_cannot_tell_apart(world, tmp_path,
                                                                                      monkeypatch):
    cfg = tiny_config(world, optim=dict(epochs=4))
    assert cfg.train.selection == "latest_within_se"
    n = len(build_datasets(cfg).val)
    se = top1_standard_error(80.0, n)
    assert se > 1.0
    script = iter([(80.0, ALIVE), (80.0 - 0.5 * se, ALIVE), (80.0 - 1.5 * se, ALIVE), (95.0, DEAD)])
    monkeypatch.setattr(Trainer, "validate", lambda self: _scores(*next(script)))
    metrics = train(cfg, tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert meta["epoch"] == 2 and meta["val_top1"] == pytest.approx(80.0 - 0.5 * se)
    assert metrics["best_val_top1"] == pytest.approx((80.0 - 0.5 * se) / 100)  # best/'s own, not the maximum


def test_a_saved_config_without_the_rule_keeps_the_rule_it_was_trained_with(tmp_path):
    (tmp_path / "config.yaml").write_text("train:\n  seed: 1\n")
    assert load_config(tmp_path / "config.yaml", saved=True).train.selection == "best_top1"
    assert load_config(tmp_path / "config.yaml").train.selection == "latest_within_se"
    with pytest.raises(ConfigError, match="train.selection"):
        load_config(None, ["train.selection=top1"])


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
