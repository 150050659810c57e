"""train.starts (ivpt.engine.starts): the starts, the choice, the kept start to the end, resume."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from ivpt.config import ConfigError
from ivpt.engine import TrainingError, train
from ivpt.engine.starts import start_score

from .test_engine import _Killed, _params, tiny_config, world  # noqa: F401  (fixture)

TIMING = ("img_per_s", "elapsed_s")


def _rows(run) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader((run / "log.csv").open())]


def _starts_config(world, **train_extra):
    # 3 steps per epoch, 3 epochs; each of the 3 starts trains 1 epoch before the choice
    return tiny_config(world, optim=dict(epochs=3), train=dict(seed=2, starts=3, start_epochs=1, **train_extra))


def test_start_seeds_and_the_score():
    cfg = tiny_config(".", train=dict(seed=2, starts=3))
    assert [cfg.train.start_seed(k) for k in range(3)] == [6, 7, 8]
    assert tiny_config(".", train=dict(seed=5)).train.start_seed(0) == 5  # one start: the plain run of the seed
    assert start_score({"val_top1": 50.0, "val_parts_only_top1": 40.0, "val_part_share": 0.5}) == (40.0, 0.5)
    assert start_score({"val_top1": 50.0}) == (50.0,)
    with pytest.raises(ConfigError, match="train.starts"):
        tiny_config(".", train=dict(starts=0))


def test_starts_keep_the_best_start_and_continue_it_as_the_plain_run_of_its_seed(world, tmp_path):
    cfg = _starts_config(world)
    metrics = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    record = json.loads((run / "starts.json").read_text())
    starts = record["starts"]
    assert [starts[str(k)]["seed"] for k in range(3)] == [6, 7, 8] and all(s["steps"] == 3 for s in starts.values())
    order = ("parts_only_top1", "part_share")
    kept = max(range(3), key=lambda k: tuple(starts[str(k)][f"val_{n}"] for n in order))
    assert record["kept"] == kept == 2  # starts 0 and 2 tie on parts-only top-1; 2 has the larger part share
    for k in range(3):  # each start's score is its log's first validation row
        (row,) = [r for r in _rows(run / "starts" / str(k)) if r["val_top1"]]
        assert float(row["val_parts_only_top1"]) == pytest.approx(starts[str(k)]["val_parts_only_top1"], rel=1e-5)
        assert not (run / "starts" / str(k) / "last.pt").exists()  # the training states went after the choice
    # the run from the choice on is the plain run of the kept start's seed: the same steps, parameters, best/
    plain = train(tiny_config(world, optim=dict(epochs=3), train=dict(seed=6 + kept)), tmp_path / "plain",
                  progress=False)
    assert _rows(run) == _rows(tmp_path / "plain")
    a, b = _params(run), _params(tmp_path / "plain")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics["test_top1"] == plain["test_top1"] and metrics["best_epoch"] == plain["best_epoch"]
    saved = (run / "config.yaml").read_text()  # the run's own config: its seed and starts
    assert "starts: 3" in saved and "seed: 2" in saved


def test_a_run_killed_during_the_starts_resumes_exactly(world, tmp_path, monkeypatch):
    from ivpt.engine.trainer import Trainer

    cfg = _starts_config(world, ckpt_every_steps=1)
    train(cfg, tmp_path / "full", progress=False)
    original = Trainer.optimizer_step

    def die_in_start_1(self, epoch, micro_batches):
        original(self, epoch, micro_batches)
        if self.start == 1 and self.step == 2:
            self.save_last(epoch, self.batch_in_epoch)
            raise _Killed("killed in start 1")

    shutil.copytree(tmp_path / "full", tmp_path / "killed")  # a fresh run into a folder holding a finished one
    with monkeypatch.context() as m:
        m.setattr(Trainer, "optimizer_step", die_in_start_1)
        with pytest.raises(_Killed):
            train(cfg, tmp_path / "killed", progress=False)
    assert list(json.loads((tmp_path / "killed" / "starts.json").read_text())["starts"]) == ["0"]
    # the earlier run's state went: a resume continues the starts, not the old run
    assert not (tmp_path / "killed" / "last.pt").exists() and not (tmp_path / "killed" / "metrics.json").exists()
    with pytest.raises(TrainingError, match="already holds a run"):
        train(cfg, tmp_path / "killed", progress=False, new_run=True)
    train(cfg, tmp_path / "killed", resume=True, progress=False)
    full, killed = tmp_path / "full", tmp_path / "killed"
    records = [json.loads((run / "starts.json").read_text()) for run in (full, killed)]
    for record in records:  # all but the time each start took
        for start in record["starts"].values():
            assert start.pop("seconds") > 0
    assert records[0] == records[1]
    a, b = _params(full), _params(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(full) == _rows(killed)


def test_starts_need_a_validation_split(world, tmp_path):
    cfg = tiny_config(world, data=dict(val_fraction=0.0), train=dict(starts=2, start_epochs=1))
    with pytest.raises(TrainingError, match="train.starts chooses a start on the validation split"):
        train(cfg, tmp_path / "run", progress=False)


@pytest.mark.slow
def test_starts_under_torchrun_finish_with_one_kept_start(world, tmp_path):
    import os
    import subprocess

    import yaml

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    cfg = tiny_config(world, optim=dict(epochs=2), train=dict(starts=2, start_epochs=1))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "ivpt.cli", "train", "--config",
                           str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    record = json.loads((run / "starts.json").read_text())
    assert sorted(record["starts"]) == ["0", "1"] and record["kept"] in (0, 1)
    assert proc.stdout.count("kept start") == 1  # rank 0 reports the choice; both ranks made it
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6 and (run / "best" / "config.json").is_file()
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["start"] == record["kept"] and state["step"] == 6


def test_compare_json_says_which_start_each_run_kept(world, tmp_path):
    import ivpt.compare as C

    cfg = tiny_config(world, optim=dict(epochs=2), train=dict(starts=2, start_epochs=1))
    result = C.compare(cfg, tmp_path / "cmp", kinds=["ivpt", "vpt_deep"], seeds=[1], progress=False,
                       say=lambda line: None)
    for record in result["runs"]:
        starts = json.loads((tmp_path / "cmp" / "runs" / f"{record['kind']}-seed1" / "starts.json").read_text())
        assert record["starts"] == starts and [s["seed"] for s in starts["starts"].values()] == [2, 3]
        kept = starts["starts"][str(starts["kept"])]
        # VPT-deep has no part head: its starts are chosen by validation top-1 and carry no parts-only score
        assert ("val_parts_only_top1" in kept) == (record["kind"] == "ivpt")


def test_resume_from_the_command_line_and_with_another_config(world, tmp_path, monkeypatch):
    import yaml

    from ivpt.cli import main
    from ivpt.engine.trainer import Trainer

    cfg = _starts_config(world, ckpt_every_steps=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    original = Trainer.optimizer_step

    def die_in_start_1(self, epoch, micro_batches):
        original(self, epoch, micro_batches)
        if self.start == 1 and self.step == 1:
            raise _Killed("killed in start 1")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "optimizer_step", die_in_start_1)
        with pytest.raises(_Killed):
            main(["train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"), "--no-progress"])
    saved = (tmp_path / "run" / "config.yaml").read_text()
    # start 1 had no checkpoint yet: nothing else checks a changed config, so the starts do, before writing
    with pytest.raises(TrainingError, match="differs from the run's .* in optim.base_lr"):
        train(cfg.with_overrides(["optim.base_lr=0.5"]), tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "starts.json").read_text())["kept"] in (0, 1, 2)
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_a_start_killed_after_max_steps_before_its_validation_is_scored_as_an_uninterrupted_one(world, tmp_path,
                                                                                                monkeypatch):
    from ivpt.engine.trainer import Trainer

    # max_steps 5 ends every start inside its second epoch; each start is scored after step 5
    cfg = tiny_config(world, optim=dict(epochs=3), train=dict(seed=2, starts=2, start_epochs=2, max_steps=5,
                                                               ckpt_every_steps=1))
    train(cfg, tmp_path / "full", progress=False)
    original = Trainer.validate

    def die_validating_start_1(self):
        if self.start == 1 and self.step == 5:
            raise _Killed("killed in start 1's last validation")
        return original(self)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "validate", die_validating_start_1)
        with pytest.raises(_Killed):
            train(cfg, tmp_path / "killed", progress=False)
    train(cfg, tmp_path / "killed", resume=True, progress=False)
    records = [json.loads((run / "starts.json").read_text()) for run in (tmp_path / "full", tmp_path / "killed")]
    for record in records:
        for start in record["starts"].values():
            start.pop("seconds")
    assert records[0] == records[1]


def test_the_run_folder_is_held_from_the_first_start_to_the_end_without_a_gap(world, tmp_path, monkeypatch):
    from ivpt.checkpoint import RunLock

    events = []
    acquire, release = RunLock.acquire, RunLock.release

    def recording_acquire(self):
        if not self.held:  # a held lock acquired again by its holder stays as it is
            events.append(("acquire", self.folder.name))
        return acquire(self)

    def recording_release(self):
        if self.held:
            events.append(("release", self.folder.name))
        release(self)

    monkeypatch.setattr(RunLock, "acquire", recording_acquire)
    monkeypatch.setattr(RunLock, "release", recording_release)
    train(_starts_config(world), tmp_path / "run", progress=False)
    # the run folder: one hold over the starts, the choice and the continuation; each start's folder its own
    assert [e for e in events if e[1] == "run"] == [("acquire", "run"), ("release", "run")]
    assert [e for e in events if e[1] != "run"] == [(what, k) for k in "012" for what in ("acquire", "release")]
    assert events[0] == ("acquire", "run") and events[-1] == ("release", "run")


def test_a_continuation_that_fails_before_taking_the_lock_over_still_releases_the_folder(world, tmp_path,
                                                                                         monkeypatch):
    import ivpt.engine.trainer as trainer_module
    from ivpt.checkpoint import RunLock

    def refuse(out):
        raise TrainingError(f"refused {out}")

    monkeypatch.setattr(trainer_module, "check_resumable", refuse)  # the continuation's first check
    with pytest.raises(TrainingError, match="refused") as failed:
        train(_starts_config(world), tmp_path / "run", progress=False)
    assert failed.value is not None  # the traceback, and whatever it references, is still alive here
    RunLock(tmp_path / "run").acquire().release()  # the run folder is free
