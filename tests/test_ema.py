"""``optim.ema_decay``: the moving average of the trained parameters against a float64 recomputation of its
recurrence, what validation and ``best/`` read, and an exact resume."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ivpt.config import Config, ConfigError
from ivpt.engine import train
from ivpt.engine.ema import ParameterEma

from .test_engine import TOTAL_FREE, _kill_after_step, _Killed, tiny_config, world  # noqa: F401  (world: a fixture)


def _recompute(trajectory: list[torch.Tensor], decay: float) -> torch.Tensor:
    """The average after ``trajectory[1:]`` (the values after each step; ``[0]`` the start), in float64."""
    average = trajectory[0].double()
    for n, value in enumerate(trajectory[1:], start=1):
        d = min(decay, (1 + n) / (10 + n))
        average = d * average + (1 - d) * value.double()
    return average


def test_the_average_follows_its_recurrence_and_applied_restores_the_parameters():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5, 3, generator=gen)), torch.nn.Parameter(torch.randn(4, generator=gen))
    ema = ParameterEma({"a": a, "b": b}, 0.9)
    seen = {"a": [a.detach().clone()], "b": [b.detach().clone()]}
    for step in range(1, 101):  # d_n = (1 + n) / (10 + n) up to n = 80, then 0.9: both regimes are covered
        with torch.no_grad():
            a.add_(torch.randn(5, 3, generator=gen))
            if step <= 40:
                b.mul_(1.1)
        ema.update()
        seen["a"].append(a.detach().clone())
        seen["b"].append(b.detach().clone())
        if step == 40:
            assert ema.current_decay() == pytest.approx(42 / 51)
    assert ema.current_decay() == 0.9
    live = a.detach().clone()
    for name, average in zip(ema.names, ema.averages):
        expected = _recompute(seen[name], 0.9)
        # float32 lerps, 100 of them: each rounds to half an ulp of values of order max|x|
        tol = 100 * 2 ** -24 * float(torch.stack(seen[name]).abs().max())
        assert torch.allclose(average.double(), expected, rtol=0, atol=tol), name
    with pytest.raises(RuntimeError, match="inside"):
        with ema.applied():
            assert torch.equal(a.detach(), ema.averages[0]) and not torch.equal(a.detach(), live)
            raise RuntimeError("inside")
    assert torch.equal(a.detach(), live)  # restored although the block raised


def test_the_state_round_trips_and_a_foreign_state_is_refused():
    a = torch.nn.Parameter(torch.zeros(3))
    ema = ParameterEma({"a": a}, 0.5)
    with torch.no_grad():
        a.fill_(2.0)
    ema.update()
    other = ParameterEma({"a": torch.nn.Parameter(torch.zeros(3))}, 0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and torch.equal(other.averages[0], ema.averages[0])
    # d_1 = min(0.5, 2/11): the first update moves 9/11 of the way
    assert torch.allclose(other.averages[0], torch.full((3,), 2.0 * 9 / 11))
    with pytest.raises(ValueError, match="do not match"):
        ParameterEma({"a": torch.nn.Parameter(torch.zeros(4))}, 0.5).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="do not match"):
        ParameterEma({"b": torch.nn.Parameter(torch.zeros(3))}, 0.5).load_state_dict(ema.state_dict())


@pytest.mark.parametrize("value", [1.0, -0.1])
def test_a_decay_outside_its_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match="optim.ema_decay"):
        Config.from_dict({"optim": {"ema_decay": value}})


def _trajectory(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Record the trained parameters before the first optimiser step and after each one."""
    from ivpt.engine.trainer import Trainer

    seen: list[dict[str, torch.Tensor]] = []
    original = Trainer.optimizer_step

    def trained(model) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def record(self, epoch, micro_batches):
        if not seen:
            seen.append(trained(self.model))
        original(self, epoch, micro_batches)
        seen.append(trained(self.model))

    monkeypatch.setattr(Trainer, "optimizer_step", record)
    return seen


def test_best_holds_the_average_of_the_trajectory_and_last_pt_the_parameters(world, tmp_path, monkeypatch):
    # No validation split: best/ is the last epoch, saved from the average; last.pt keeps the parameters to continue.
    cfg = tiny_config(world, optim=dict(ema_decay=0.7, epochs=3), data=dict(val_fraction=0.0))
    seen = _trajectory(monkeypatch)
    train(cfg, tmp_path / "run", progress=False)
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    best = load_file(tmp_path / "run" / "best" / "model.safetensors")
    steps = len(seen) - 1
    assert state["step"] == steps == 12 and state["ema"]["updates"] == steps
    moved = 0
    for name, average in state["ema"]["averages"].items():
        values = [s[name] for s in seen]
        expected = _recompute(values, 0.7)
        tol = steps * 2 ** -24 * float(torch.stack(values).abs().max()) + 1e-30
        assert torch.allclose(average.double(), expected, rtol=0, atol=tol), name
        assert torch.equal(best[name], average), name  # best/ is the average
        assert torch.equal(state["model"][name], seen[-1][name]), name  # last.pt: the parameters themselves
        moved += not torch.equal(seen[-1][name], seen[0][name])
    assert moved >= 5  # prototypes, head, prompts... trained, so the average differs from the parameters


def test_kill_and_resume_with_the_average_is_exact(world, tmp_path, monkeypatch):
    cfg = tiny_config(world, optim=dict(ema_decay=0.8), train=dict(ckpt_every_steps=1))
    train(cfg, tmp_path / "full", progress=False)
    with monkeypatch.context() as m:
        _kill_after_step(m, 4)
        with pytest.raises(_Killed):
            train(cfg, tmp_path / "killed", progress=False)
    train(cfg, tmp_path / "killed", resume=True, progress=False)
    full = torch.load(tmp_path / "full" / "last.pt", map_location="cpu", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "last.pt", map_location="cpu", weights_only=True)
    assert full["ema"]["updates"] == resumed["ema"]["updates"] == full["step"]
    for k in full["model"]:
        assert torch.equal(full["model"][k], resumed["model"][k]), k
    for k in full["ema"]["averages"]:
        assert torch.equal(full["ema"]["averages"][k], resumed["ema"]["averages"][k]), k
    a, b = (load_file(tmp_path / run / "best" / "model.safetensors") for run in ("full", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_the_average_last_pt_holds_none(world, tmp_path):
    train(tiny_config(world, optim=dict(epochs=1, ema_decay=0.0)), tmp_path / "run", progress=False)
    assert "ema" not in torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)


def test_a_last_pt_without_the_averages_is_refused_on_resume(world, tmp_path):
    from ivpt.engine import TrainingError

    cfg = tiny_config(world, optim=dict(ema_decay=0.9, epochs=1, **TOTAL_FREE))  # a resume may add epochs
    train(cfg, tmp_path / "run", progress=False)
    path = tmp_path / "run" / "last.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    del state["ema"]
    torch.save(state, path)
    with pytest.raises(TrainingError, match="holds no parameter averages for optim.ema_decay"):
        train(cfg.with_overrides(["optim.epochs=2"]), tmp_path / "run", resume=True, progress=False)
