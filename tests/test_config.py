"""Checks that involve two config sections live in Config and fire before any work starts."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ivpt.config import Config, ConfigError, TrainConfig, load_config


def test_cross_section_checks():
    with pytest.raises(ConfigError, match=r"optim.batch_size=10 must split evenly into optim.grad_accum=4"):
        Config.from_dict({"optim": {"batch_size": 10, "grad_accum": 4}})
    with pytest.raises(ConfigError, match=r"eval.stage=4 is out of range for 3 stages \(model.n_pro\)"):
        Config.from_dict({"model": {"n_pro": [5, 4, 3]}, "eval": {"stage": "4"}})
    with pytest.raises(ConfigError, match="train.ckpt_every_steps=5 exceeds train.max_steps=2"):
        Config.from_dict({"train": {"ckpt_every_steps": 5, "max_steps": 2}})
    ok = Config.from_dict({"optim": {"batch_size": 12, "grad_accum": 4}, "eval": {"stage": "-1"}})
    assert ok.eval.stage_index(len(ok.model.n_pro)) == len(ok.model.n_pro) - 1


def test_no_dead_fields():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not names & {"wandb", "frozen_prefix_no_grad"}
    with pytest.raises(ConfigError, match="unknown key"):
        Config.from_dict({"train": {"wandb": True}})


def test_speed_options():
    with pytest.raises(ConfigError, match=r"train.sync_every=0 must be at least 1"):
        Config.from_dict({"train": {"sync_every": 0}})
    cfg = Config().with_overrides(["train.sync_every=1", "train.compile=true", "data.gpu_augment=true"])
    assert (cfg.train.sync_every, cfg.train.compile, cfg.data.gpu_augment) == (1, True, True)
    defaults = Config()
    assert (defaults.train.sync_every, defaults.train.compile, defaults.data.gpu_augment) == (16, False, False)


def test_saved_configs_from_before_a_field_keep_how_they_were_trained(tmp_path):
    """A run's config.yaml written before model.global_part / global_share / deep_prompts, loss.tv_reference_grid
    and optim.min_steps / ema_decay existed is read as trained (parts-only head, one-more-part weighting, no free
    prompts, plain TV, exact epochs, no parameter average); a user's config file missing them gets the defaults."""
    import yaml

    from ivpt.runs import run_config

    data = Config().to_dict()
    for section, name in (("model", "global_part"), ("model", "global_share"), ("model", "deep_prompts"),
                          ("loss", "tv_reference_grid"), ("optim", "min_steps"), ("optim", "ema_decay")):
        del data[section][name]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    old, _ = run_config(tmp_path)
    m = old.model
    assert (m.global_part, m.global_share, m.deep_prompts, old.loss.tv_reference_grid, old.optim.min_steps,
            old.optim.ema_decay) == (False, None, False, 0.0, 0, 0.0)
    new = load_config(tmp_path / "config.yaml")
    m = new.model
    assert (m.global_part, m.global_share, m.deep_prompts, new.loss.tv_reference_grid, new.optim.min_steps,
            new.optim.ema_decay) == (True, 0.25, True, 37.0, 1000, 0.99)


def test_cpu_configs_train_the_recipe_and_paper_configs_the_paper():
    """Every bundled ``*_cpu.yaml`` trains the method of ``cpu_vits14_224.yaml`` (the recipe); every ``*_paper*.yaml``
    keeps the paper's rates and its parts-only head."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    recipe = load_config(configs / "cpu_vits14_224.yaml")
    method = [("model", "global_part"), ("model", "global_share"), ("model", "deep_prompts"),
              ("model", "train_tokens"), ("model", "n_pro"), ("loss", "tv_reference_grid"), ("optim", "base_lr"),
              ("optim", "head_lr_mult"), ("optim", "concept_lr_mult"), ("optim", "schedule"), ("optim", "warmup"),
              ("optim", "min_steps"), ("optim", "ema_decay"), ("train", "starts"), ("train", "start_epochs")]
    cpu = sorted(configs.glob("*_cpu.yaml"))
    paper = sorted(configs.glob("*_paper*.yaml"))
    assert len(cpu) == 5 and len(paper) == 8
    for path in cpu:
        cfg = load_config(path)
        for section, name in method:
            assert getattr(getattr(cfg, section), name) == getattr(getattr(recipe, section), name), (path.name, name)
    for path in paper:
        cfg = load_config(path)
        assert (cfg.optim.base_lr * cfg.optim.head_lr_mult, cfg.optim.base_lr * cfg.optim.concept_lr_mult) == \
            pytest.approx((1e-2, 2e-4), rel=1e-12), path.name
        assert not cfg.model.global_part and not cfg.model.deep_prompts and cfg.optim.ema_decay == 0, path.name
        assert cfg.train.starts == 1, path.name
