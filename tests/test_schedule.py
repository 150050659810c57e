"""Learning-rate schedules on training progress and concept health: values known by construction, the paper's
schedule identical to the per-epoch StepLR it replaces, exact resume mid-warm-up, the one-line warnings."""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytest
import torch

from ivpt.config import ConfigError, OptimConfig, load_config
from ivpt.engine import TrainingError, train
from ivpt.engine.health import ConceptHealth, collapse_warning, health_summary
from ivpt.engine.schedule import (
    build_scheduler,
    concept_factor,
    depends_on_total,
    lr_factor,
    run_epochs,
    schedule_warning,
    steps_above_half_peak,
    total_steps,
    warmup_steps,
)

from .test_engine import TOTAL_FREE, _kill_after_step, _Killed, _params, tiny_config, world  # noqa: F401  (fixture)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER_CONFIGS = sorted(CONFIGS.glob("*_paper*.yaml"))


def test_step_schedule_decays_per_epoch():
    o = OptimConfig(schedule="step", warmup=0.0, step_epochs=2, gamma=0.5)
    # 3 steps per epoch: epochs 0-1 are steps 0-5 (factor 1), epochs 2-3 steps 6-11 (0.5), epoch 4 0.25.
    assert [lr_factor(s, 30, 3, o) for s in (0, 5, 6, 11, 12, 29)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.0625]


def test_cosine_schedule_with_warmup():
    o = OptimConfig(schedule="cosine", warmup=0.2)
    assert warmup_steps(10, o) == 2
    # Warm-up: steps 0, 1 at 1/2, 2/2. Then progress (s - 2) / 8: 0 at step 2, 1/4 at step 4, 1/2 at step 6.
    assert lr_factor(0, 10, 5, o) == 0.5
    assert lr_factor(1, 10, 5, o) == 1.0
    assert lr_factor(2, 10, 5, o) == 1.0
    assert lr_factor(4, 10, 5, o) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)  # 0.853553
    assert lr_factor(6, 10, 5, o) == pytest.approx(0.5)
    assert lr_factor(9, 10, 5, o) == pytest.approx((1 + math.cos(7 * math.pi / 8)) / 2)  # 0.038060
    assert lr_factor(10, 10, 5, o) == pytest.approx(0.0)


def test_constant_and_step_schedules_multiply_the_warmup():
    const = OptimConfig(schedule="constant", warmup=0.1)
    assert [lr_factor(s, 100, 10, const) for s in (0, 4, 9, 10, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    step = OptimConfig(schedule="step", warmup=0.1, step_epochs=1, gamma=0.5)
    assert lr_factor(4, 100, 5, step) == 0.5  # warm-up 5/10, still epoch 0
    assert lr_factor(7, 100, 5, step) == 0.4  # warm-up 8/10 x decay 0.5 (epoch 1)
    assert lr_factor(10, 100, 5, step) == 0.25


def test_concept_rate_ramp_multiplies_the_concept_groups_only():
    """concept_factor rises linearly from concept_lr_start to 1 over round(concept_lr_ramp x T) steps; the scheduler
    applies it on top of lr_factor to the groups tagged ``concept`` and leaves the others alone (float64 formula)."""
    o = OptimConfig(schedule="constant", warmup=0.1, concept_lr_mult=400.0, concept_lr_start=0.5,
                    concept_lr_ramp=0.5)
    assert [concept_factor(s, 100, o) for s in (0, 10, 25, 49, 50, 99)] == pytest.approx(
        [0.5, 0.6, 0.75, 0.99, 1.0, 1.0], rel=1e-12)
    assert concept_factor(0, 100, OptimConfig(concept_lr_start=1.0, concept_lr_ramp=0.0)) == 1.0  # no ramp
    head, concept = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"name": "classifier", "params": [head], "lr": 1e-2, "rate": "head"},
                           {"name": "prototypes", "params": [concept], "lr": 4e-4, "rate": "concept"}], lr=1.0)
    sched = build_scheduler(opt, 100, 10, o)
    for s in range(100):
        warm = min(1.0, (s + 1) / 10)
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * warm, rel=1e-12)
        assert opt.param_groups[1]["lr"] == pytest.approx(4e-4 * warm * (0.5 + 0.5 * min(1.0, s / 50)), rel=1e-12)
        opt.step()
        sched.step()
    cfg = load_config(CONFIGS / "cpu_vits14_224.yaml")
    cfg.optim = o
    assert "optim.concept_lr_ramp=0.5" in depends_on_total(cfg)  # a resume must keep the total it follows
    for start, ramp in ((0.5, 0.0), (1.0, 0.5)):
        with pytest.raises(ConfigError, match=r"concept_lr_start=.* and optim.concept_lr_ramp=.* go together"):
            OptimConfig(concept_lr_start=start, concept_lr_ramp=ramp)
    with pytest.raises(ConfigError, match=r"optim.concept_lr_start=0.0 is a fraction of the concept groups' peak"):
        OptimConfig(concept_lr_start=0.0, concept_lr_ramp=0.5)


def test_total_steps_is_the_smaller_of_epochs_and_max_steps():
    o = OptimConfig(epochs=25)
    assert total_steps(o, 375) == 9375
    assert total_steps(o, 375, max_steps=100) == 100
    assert total_steps(o, 375, max_steps=10**6) == 9375


def test_min_steps_raises_the_epochs_of_small_datasets_only():
    o = OptimConfig(epochs=10, min_steps=1000)
    assert run_epochs(o, 54) == 19 and total_steps(o, 54) == 19 * 54  # ceil(1000 / 54) = 19 epochs
    assert run_epochs(o, 375) == 10 and total_steps(o, 375) == 3750  # already above: optim.epochs as set
    assert total_steps(o, 54, max_steps=500) == 500
    assert run_epochs(OptimConfig(epochs=10, min_steps=0), 1) == 10  # min_steps=0: the paper's exact epochs


def test_trainer_runs_the_epochs_min_steps_needs(world, tmp_path):
    cfg = tiny_config(world, optim=dict(epochs=1, min_steps=5))  # 3 steps per epoch: 2 epochs, 6 steps
    metrics = train(cfg, tmp_path / "run", progress=False)
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert metrics["steps"] == 6 and rows[-1]["epoch"] == "2"


def test_schedule_fields_are_checked():
    with pytest.raises(ConfigError, match="optim.schedule='linear' must be one of step, cosine, constant"):
        OptimConfig(schedule="linear")
    with pytest.raises(ConfigError, match=r"optim.warmup=5.0 is a fraction .* \[0, 1\)"):
        OptimConfig(warmup=5.0)
    with pytest.raises(ConfigError, match=r"optim.min_steps=-1 must be >= 0"):
        OptimConfig(min_steps=-1)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_schedule_equals_the_per_epoch_steplr_at_every_step(path):
    o = load_config(path).optim
    assert (o.schedule, o.warmup, o.step_epochs, o.gamma, o.epochs) == ("step", 0.0, 4, 0.5, 25)
    spe = 375  # CUB: 5,994 training images at batch 16
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    groups = lambda: [{"params": [params[0]], "lr": 1e-2}, {"params": [params[1]], "lr": 2e-4}]  # noqa: E731
    new, old = torch.optim.Adam(groups()), torch.optim.Adam(groups())
    per_step = build_scheduler(new, total_steps(o, spe), spe, o)
    per_epoch = torch.optim.lr_scheduler.StepLR(old, step_size=o.step_epochs, gamma=o.gamma)  # before issue 11
    for epoch in range(o.epochs):
        for _ in range(spe):
            assert [g["lr"] for g in new.param_groups] == [g["lr"] for g in old.param_groups]  # bit for bit
            new.step()  # no gradients: nothing moves, the schedulers only see a step was taken
            per_step.step()
        old.step()
        per_epoch.step()
    assert new.param_groups[0]["lr"] == 1e-2 * 0.5 ** 6


def test_the_new_dataset_recipe_and_the_paper_configs():
    """The CPU configs (and the built-in defaults) carry the recipe of benchmarks/recipe.md; every paper config
    turns its non-paper switches off and keeps exactly 25 epochs."""
    from ivpt.config import Config

    for cfg in [Config()] + [load_config(p) for p in sorted(CONFIGS.glob("*cpu*.yaml"))]:
        m = cfg.model
        assert (m.global_part, m.global_share, m.deep_prompts, m.prototype_init, cfg.loss.tv_reference_grid,
                cfg.optim.min_steps, cfg.optim.schedule, cfg.optim.warmup, cfg.optim.concept_lr_mult,
                cfg.optim.concept_lr_start, cfg.optim.concept_lr_ramp, cfg.optim.ema_decay) == (
            True, 0.25, True, "normal", 37.0, 1000, "constant", 0.05, 400.0, 0.5, 0.5, 0.99)
    for p in sorted(CONFIGS.glob("*cpu*.yaml")):
        cfg = load_config(p)
        assert (cfg.model.n_pro, cfg.model.train_tokens, cfg.optim.batch_size) == ([9, 7, 5], False, 8), p.name
    for p in PAPER_CONFIGS:
        cfg = load_config(p)
        m = cfg.model
        o = cfg.optim
        assert (m.global_part, m.deep_prompts, m.prototype_init, cfg.loss.tv_reference_grid, o.min_steps,
                o.concept_lr_mult, o.concept_lr_start, o.concept_lr_ramp, o.ema_decay) == (
            False, False, "normal", 0.0, 0, 200.0, 1.0, 0.0, 0.0), p.name


def test_paper_schedule_on_a_large_dataset_does_not_warn_but_on_a_small_one_does():
    o = load_config(CONFIGS / "cub_vitb14_reg4_paper.yaml").optim
    assert steps_above_half_peak(total_steps(o, 375), 375, o) == 1500  # epochs 0-3
    assert schedule_warning(total_steps(o, 375), 375, o) is None
    message = schedule_warning(total_steps(o, 63), 63, o)  # Flowers-102: 1,020 training images
    assert message == ("the schedule leaves 252 of 1575 optimiser steps with the concept groups above half their "
                       "peak rate (optim.schedule=step, 63 steps per epoch); with fewer than 500 the concepts may "
                       "not form: train longer or use optim.schedule=constant (the recipe)")
    cosine = OptimConfig(schedule="cosine", warmup=0.05, epochs=25)
    assert schedule_warning(total_steps(cosine, 63), 63, cosine) is None  # about half of 1575 steps


def test_schedule_warning_counts_the_concept_groups_rate_under_the_ramp():
    """The concept groups start at concept_lr_start x their peak: with a start of 0.25 over a ramp of 0.8 of a
    constant 1,000-step run they pass half their peak only after step s with 0.25 + 0.75 s / 800 > 0.5, i.e. from
    step 267 on (733 steps); with a ramp of the whole run from 0.1, from step 445 on (555)."""
    late = OptimConfig(schedule="constant", warmup=0.0, epochs=10, concept_lr_start=0.25, concept_lr_ramp=0.8)
    assert steps_above_half_peak(1000, 100, late) == 1000 - 267
    slow = OptimConfig(schedule="constant", warmup=0.0, epochs=10, concept_lr_start=0.1, concept_lr_ramp=1.0)
    assert steps_above_half_peak(1000, 100, slow) == 1000 - 445
    assert schedule_warning(1000, 100, slow) is None
    short = OptimConfig(schedule="constant", warmup=0.0, epochs=8, concept_lr_start=0.1, concept_lr_ramp=1.0)
    # 800 steps, ramp 800: above half from 0.1 + 0.9 s / 800 > 0.5, s ≥ 356 → 444 steps
    assert schedule_warning(800, 100, short) == (
        "the schedule leaves 444 of 800 optimiser steps with the concept groups above half their peak rate "
        "(optim.schedule=constant, optim.concept_lr_start=0.1 over optim.concept_lr_ramp=1.0, 100 steps per epoch); "
        "with fewer than 500 the concepts may not form: train longer")
    flat = OptimConfig(schedule="constant", warmup=0.0, epochs=8, concept_lr_start=1.0, concept_lr_ramp=0.0)  # no ramp
    assert steps_above_half_peak(800, 100, flat) == 800 and schedule_warning(800, 100, flat) is None


def test_trainer_steps_the_rate_per_step_and_logs_concept_health(world, tmp_path):
    cfg = tiny_config(world, optim=dict(schedule="step", warmup=0.0, step_epochs=1, gamma=0.5))
    train(cfg, tmp_path / "run", progress=False)
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    # 3 steps per epoch; each row's rate is the one its step ran at: 1e-2 in epoch 1, 5e-3 in epoch 2.
    assert [(r["step"], r["lr_head"]) for r in rows] == [
        ("1", "0.01"), ("2", "0.01"), ("3", "0.01"), ("4", "0.005"), ("5", "0.005"), ("6", "0.005")]
    columns = ["alive_s0", "entropy_s0", "alive_s1", "entropy_s1", "alive_s2", "entropy_s2"]
    assert list(rows[0])[-6:] == columns
    for r in rows:  # the health of an epoch is in its last row only
        filled = r["step"] in ("3", "6")
        assert all((r[c] != "") == filled for c in columns), r
    alive = [float(rows[2][f"alive_s{i}"]) for i in range(3)]
    # n_pro 5, 4, 3: the share of 4, 3, 2 foreground prototypes, so multiples of 1/4, 1/3, 1/2.
    assert [a * n for a, n in zip(alive, (4, 3, 2))] == pytest.approx([round(a * n) for a, n in zip(alive, (4, 3, 2))])
    assert all(0 < float(rows[2][f"entropy_s{i}"]) <= 1 for i in range(3))


def test_resume_mid_warmup_is_exact(world, tmp_path, monkeypatch):
    cfg = tiny_config(world, optim=dict(schedule="cosine", warmup=0.5, concept_lr_start=0.5, concept_lr_ramp=0.5),
                      train=dict(ckpt_every_steps=1))
    train(cfg, tmp_path / "full", progress=False)  # 6 steps, 3 of them warm-up and concept ramp
    with monkeypatch.context() as m:
        _kill_after_step(m, 1)
        with pytest.raises(_Killed):
            train(cfg, tmp_path / "killed", progress=False)
    state = torch.load(tmp_path / "killed" / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 1 and state["scheduler"]["last_epoch"] == 1 and state["total_steps"] == 6
    rates = {group["name"]: group["rate"] for group in state["optimizer"]["param_groups"]}
    assert rates["prototypes"] == "concept" and rates["classifier"] == "head"
    for group in state["optimizer"]["param_groups"]:  # the next step, index 1, runs at 2/3 of the peak, the
        ramp = 0.5 + 0.5 / 3 if group["rate"] == "concept" else 1.0  # concept groups at 2/3 of that again
        assert group["lr"] == pytest.approx(group["initial_lr"] * 2 / 3 * ramp, rel=1e-12)
    train(cfg, tmp_path / "killed", resume=True, progress=False)
    full, resumed = _params(tmp_path / "full"), _params(tmp_path / "killed")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    with pytest.raises(TrainingError, match="follows the run's total steps, which would change from 6 to 9"):
        train(cfg.with_overrides(["optim.epochs=3"]), tmp_path / "killed", resume=True, progress=False)


def test_trainer_ramps_the_entropy_weight_and_resume_keeps_its_total(world, tmp_path, monkeypatch):
    import ivpt.engine.trainer as trainer_module
    seen = []
    real = trainer_module.compute_loss

    def recording(*args, progress=1.0, **kwargs):
        seen.append(progress)
        return real(*args, progress=progress, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_loss", recording)
    cfg = tiny_config(world, optim=dict(TOTAL_FREE, schedule="constant"), loss=dict(entropy_warmup=0.5))
    train(cfg, tmp_path / "run", progress=False)  # 6 steps, one micro-batch each
    assert seen == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    # the rate is constant without a warm-up, so only the entropy ramp follows the total steps
    with pytest.raises(TrainingError, match=r"loss.entropy_warmup=0.5 follows the run's total steps, which would "
                                            r"change from 6 to 9"):
        train(cfg.with_overrides(["optim.epochs=3"]), tmp_path / "run", resume=True, progress=False)
    plain = tiny_config(world, optim=dict(TOTAL_FREE, schedule="constant"))
    train(plain, tmp_path / "plain", progress=False)
    train(plain.with_overrides(["optim.epochs=3"]), tmp_path / "plain", resume=True, progress=False)
    assert torch.load(tmp_path / "plain" / "last.pt", map_location="cpu", weights_only=True)["step"] == 9


def test_tiny_schedule_warns_in_one_line(world, tmp_path, caplog):
    cfg = tiny_config(world, optim=dict(epochs=1))
    with caplog.at_level(logging.WARNING, logger="ivpt"):
        train(cfg, tmp_path / "run", progress=False)
    lines = [r.getMessage() for r in caplog.records if "peak rate" in r.getMessage()]
    # The recipe's constant rate over 3 steps, no warm-up step (round(0.15) = 0); the concept groups' ramp over
    # round(0.5 x 3) = 2 steps runs step 0 at exactly half their peak (0.5), steps 1 and 2 above it (0.75, 1).
    assert lines == ["the schedule leaves 2 of 3 optimiser steps with the concept groups above half their peak rate "
                     "(optim.schedule=constant, optim.concept_lr_start=0.5 over optim.concept_lr_ramp=0.5, 3 steps "
                     "per epoch); with fewer than 500 the concepts may not form: train longer"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ivpt"):  # VPT-deep has no concepts to form: no such warning
        train(cfg.with_overrides(["model.kind=vpt_deep"]), tmp_path / "vpt", progress=False)
    assert not [r for r in caplog.records if "concepts may not form" in r.getMessage()]


def _one_hot(winners: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, W) prototype indices → (B, n, H, W) one-hot maps."""
    return torch.nn.functional.one_hot(winners, n).permute(0, 3, 1, 2).float()


def test_concept_health_of_constructed_maps():
    # Stage 0: 4 prototypes (3 foreground) over 2 x 10 x 10 = 200 pixels: prototype 0 wins 50, 1 wins 148,
    # 2 wins 1 (0.5 % < 1 %: not alive), background 1. One-hot maps: entropy 0.
    winners = torch.full((2, 10, 10), 1)
    winners.view(-1)[:50] = 0
    winners.view(-1)[50] = 2
    winners.view(-1)[51] = 3
    hard = _one_hot(winners, 4)
    # Stage 1: 3 prototypes, half the pixels (1, 1, 0) / 2, half uniform; ties go to the first index, so
    # prototype 0 wins everything and prototype 1 nothing. Entropy per pixel: log 2 / log 3 and 1.
    soft = torch.full((2, 3, 10, 10), 1 / 3)
    soft[:, :, :5] = torch.tensor([0.5, 0.5, 0.0]).view(1, 3, 1, 1)
    health = ConceptHealth()
    health.add([hard, soft])
    assert health.columns == ["alive_s0", "entropy_s0", "alive_s1", "entropy_s1"]
    row = health.flush()
    assert row["alive_s0"] == pytest.approx(2 / 3)
    assert row["entropy_s0"] == pytest.approx(0.0, abs=1e-9)
    assert row["alive_s1"] == 0.5
    assert row["entropy_s1"] == pytest.approx((math.log(2) / math.log(3) + 1) / 2)
    assert health.flush() == {}  # reset after a flush
    health.add([_one_hot(torch.zeros(1, 10, 10, dtype=torch.long), 4), soft[:1]])
    health.add([_one_hot(torch.full((1, 10, 10), 2), 4), soft[:1]])  # summed over batches: 0 and 2 alive
    assert health.flush()["alive_s0"] == pytest.approx(2 / 3)


def test_models_without_maps_give_no_health():
    health = ConceptHealth()
    health.add([])
    assert health.columns == [] and health.flush() == {}


def test_collapse_warning_threshold():
    # 10 foreground prototypes: 4 alive (0.4 < 0.5) warns, 5 alive (0.5) does not.
    assert health_summary([[5.0] * 4 + [0.0] * 6 + [80.0]], [0.0])["alive_s0"] == 0.4
    assert collapse_warning({"alive_s0": 0.5, "alive_s1": 1.0}, [11, 5], epoch=1) is None
    assert collapse_warning({"alive_s0": 0.4, "alive_s1": 0.25}, [11, 5], epoch=2) == (
        "concepts collapsing after epoch 2: foreground prototypes alive (winning >= 1% of pixels) stage 0 4/10, "
        "stage 1 1/4; check the learning rates, the schedule (optim.schedule, optim.warmup) and the map losses: "
        "loss.entropy and loss.tv empty the stages when the object covers few patches (data.bbox_crop=true trains "
        "on box crops where the dataset has boxes)")
    assert collapse_warning({}, [], epoch=1) is None


@pytest.mark.parametrize("global_part", [True, False])
def test_validation_logs_how_much_the_parts_decide(world, tmp_path, global_part):
    from ivpt.engine.trainer import Trainer
    from ivpt.eval.builtin import DecisionConsumer
    from ivpt.eval.runner import AccuracyConsumer, run_pass

    cfg = tiny_config(world, optim=dict(epochs=1), model=dict(global_part=global_part))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    try:
        trainer.fit()  # one epoch: best/ (loaded by the test pass) is the validated state
        acc, decision = AccuracyConsumer(3), DecisionConsumer(*trainer.model.logit_weights())
        run_pass(trainer.model, trainer.data.val, cfg, trainer.info, [acc, decision])
    finally:
        trainer.close()
    (row,) = [r for r in csv.DictReader((tmp_path / "run" / "log.csv").open()) if r["val_top1"]]
    expected = {"val_top1": acc.meter.compute()["top1"], **{f"val_{k}": v for k, v in decision.meter.compute().items()
                                                            if k != "parts_agree"}}
    assert {k: float(row[k]) for k in expected} == pytest.approx(expected, rel=1e-5)  # the log's 6 digits
    if not global_part:  # the logits are the parts' own: 100 % agreement by construction
        assert float(row["val_parts_only_top1"]) == float(row["val_top1"]) and float(row["val_part_share"]) == 1.0


def test_a_run_with_the_parts_only_term_weighs_it_by_its_ramp_and_resume_keeps_its_total(world, tmp_path):
    from ivpt.config import LOSS_TERMS

    cfg = tiny_config(world, optim=dict(TOTAL_FREE, schedule="constant"),
                      loss=dict(parts_only=0.5, parts_only_warmup=0.5))
    train(cfg, tmp_path / "run", progress=False)  # 6 steps, one micro-batch each, one log row per step
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    for r in rows:
        weight = 0.5 * min(1.0, int(r["step"]) / 6 / 0.5)  # progress (step + 1) / total, 0-based step
        values = {t: float(r[t]) for t in LOSS_TERMS if r[t]}
        assert values["parts_only"] > 0
        expected = sum(v for t, v in values.items() if t != "parts_only") + weight * values["parts_only"]
        assert float(r["total"]) == pytest.approx(expected, rel=1e-4)  # the log's 6 significant digits
    with pytest.raises(TrainingError, match=r"loss.parts_only_warmup=0.5 follows the run's total steps"):
        train(cfg.with_overrides(["optim.epochs=3"]), tmp_path / "run", resume=True, progress=False)
