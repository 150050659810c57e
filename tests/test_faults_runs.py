"""Fault injection for run folders: what ``ivpt train`` reads back (last.pt), who may write a run folder at once
(the lock), which folders a new run may use, what ``--resume`` honours, signals, non-finite parameters, DDP with an
unreadable micro-batch and a class without training images. Reuses the tiny part-world of ``test_faults``."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ivpt.checkpoint import OutputError, RunLock
from ivpt.cli import main

from .test_engine import TOTAL_FREE
from .test_faults import _copy, _one_line_error, _snapshot, _write_config, run, world  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]


def _same_params(a: Path, b: Path) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


# ----------------------------------------------------------------------------------- 1. last.pt is never unpickled

class _WritesAMarker:
    """Unpickling this calls ``open(marker, "w")``: code run by loading a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_a_last_pt_whose_unpickling_would_run_code(run, tmp_path, capsys):
    r = _copy(run, tmp_path / "run")
    marker = tmp_path / "pwned"
    state = torch.load(r / "last.pt", map_location="cpu", weights_only=False)  # our own file: trusted here
    state["payload"] = _WritesAMarker(marker)
    torch.save(state, r / "last.pt")
    before = _snapshot(r)
    err = _one_line_error(capsys, main(["train", "--resume", str(r), "optim.epochs=2", "--no-progress"]))
    assert not marker.exists(), "loading last.pt ran code"
    assert f"cannot resume: {r / 'last.pt'}" in err and "(io.open)" in err and "could run code" in err
    assert _snapshot(r) == before


def test_last_pt_loads_with_weights_only(run):
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)  # no numpy object inside
    assert state["step"] > 0 and isinstance(state["rng"][0]["numpy"], dict)


def test_an_old_last_pt_with_a_pickled_numpy_state_still_resumes_exactly(run, tmp_path):
    new, old = _copy(run, tmp_path / "new"), _copy(run, tmp_path / "old")
    state = torch.load(old / "last.pt", map_location="cpu", weights_only=True)
    for rng in state["rng"]:  # what ivpt wrote before: np.random.get_state()'s tuple with its ndarray
        n = rng["numpy"]
        rng["numpy"] = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                        n["cached_gaussian"])
    torch.save(state, old / "last.pt")
    for r in (new, old):
        assert main(["train", "--resume", str(r), "optim.epochs=2", "--no-progress"]) == 0
    _same_params(new, old)


# ------------------------------------------------------------------------------------------- 2. run-folder lock

def test_a_second_train_on_a_locked_run_folder_is_refused(world, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ivpt.checkpoint import RunLock\n"
                               "lock = RunLock(sys.argv[1])\nlock.acquire()\nprint('held', flush=True)\n"
                               "time.sleep(120)\n", str(out)],
        stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = _write_config(tmp_path / "cfg.yaml", world, optim=dict(epochs=1))
        err = _one_line_error(capsys, main(["train", "--config", str(cfg), "--out", str(out), "--no-progress"]))
        assert f"run folder {out} is in use by another ivpt process (pid {holder.pid} on " in err
        assert str(out / ".lock") in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing of the refused run was written
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and the next run takes it over.
    assert f"pid {holder.pid}" in (out / ".lock").read_text()
    assert main(["train", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert (out / "metrics.json").is_file() and not (out / ".lock").exists()


def test_a_held_lock_acquired_again_by_its_holder_stays_held_and_refuses_any_other(tmp_path):
    lock = RunLock(tmp_path).acquire()
    assert lock.acquire() is lock and lock.held  # the holder hands it on: no second lock, no error
    with pytest.raises(OutputError, match="in use by another ivpt process"):
        RunLock(tmp_path).acquire()  # another lock object, even in this process
    lock.release()
    assert not lock.held and not (tmp_path / RunLock.NAME).exists()
    RunLock(tmp_path).acquire().release()


def test_a_killed_runs_forked_workers_do_not_keep_its_folder_locked(tmp_path):
    # DataLoader workers are forked from the trainer and inherit its descriptors; a flock lives while any copy is
    # open, so after kill -9 of the trainer its orphaned workers kept the folder "in use" for a resume.
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\nfrom ivpt.checkpoint import RunLock\n"
                               "lock = RunLock(sys.argv[1]).acquire()\nchild = os.fork()\n"
                               "if child == 0:\n    time.sleep(120)\n    os._exit(0)\n"
                               "print(child, flush=True)\ntime.sleep(120)\n", str(out)],
        stdout=subprocess.PIPE, text=True, env=ENV)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(OutputError, match="in use by another ivpt process"):
            RunLock(out).acquire()  # the holder itself still holds it
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the forked child lives on ...
        lock = RunLock(out).acquire()  # ... and does not hold the dead holder's lock
        assert lock.held and f"pid {os.getpid()}" in (out / ".lock").read_text()
        lock.release()
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)


# ----------------------------------------------------------------------------- 3. a new run never writes over one

@pytest.mark.parametrize("left", [("metrics.json", "best"), ("config.yaml", "log.csv")])
def test_train_refuses_a_folder_holding_a_run_without_last_pt(run, world, tmp_path, capsys, left):
    r = _copy(run, tmp_path / "run")
    for p in list(r.iterdir()):
        if p.name not in left:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    before = _snapshot(r)
    cfg = _write_config(tmp_path / "cfg.yaml", world, optim=dict(epochs=1))
    err = _one_line_error(capsys, main(["train", "--config", str(cfg), "--out", str(r), "--no-progress"]))
    assert f"{r} already holds a run" in err and all(name in err for name in left)
    assert _snapshot(r) == before
    err = _one_line_error(capsys, main(["train", "--resume", str(r), "--no-progress"]))
    assert f"cannot resume: {r / 'last.pt'} not found" in err
    if "metrics.json" in left:
        assert "finished" in err
    assert _snapshot(r) == before


# --------------------------------------------------------------------------- 4. --resume honours or refuses its inputs

def test_resume_refuses_a_config_file_that_differs_and_accepts_the_same_one(run, tmp_path, capsys):
    r = _copy(run, tmp_path / "run")
    other = tmp_path / "other.yaml"
    data = yaml.safe_load((r / "config.yaml").read_text())
    data["optim"]["epochs"], data["train"]["seed"] = 2, 7
    other.write_text(yaml.safe_dump(data))
    before = _snapshot(r)
    err = _one_line_error(capsys, main(["train", "--resume", str(r), "--config", str(other), "--no-progress"]))
    assert f"--config {other} differs from the config of {r} in optim.epochs, train.seed" in err
    assert _snapshot(r) == before
    err = _one_line_error(capsys, main(["train", "--resume", str(r), "--out", str(tmp_path / "else"), "--no-progress"]))
    assert f"--resume {r} continues the run in {r}" in err and not (tmp_path / "else").exists()
    same = tmp_path / "same.yaml"
    shutil.copy(r / "config.yaml", same)
    assert main(["train", "--resume", str(r), "--config", str(same), "--out", str(r), "optim.epochs=2",
                 "--no-progress"]) == 0


def test_resume_names_a_moved_dataset_and_refuses_another_one(run, world, tmp_path, capsys):
    r = _copy(run, tmp_path / "run")
    moved = _copy(world, tmp_path / "moved")
    code = main(["train", "--resume", str(r), f"data.root={moved}", "optim.epochs=2", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"data.root={moved} (the run was trained on {world})" in captured.err
    other = tmp_path / "other"
    from ivpt.data.synth import make_partworld

    make_partworld(other, classes=3, per_class=9, size=56, seed=1, test_fraction=0.25)
    r2 = _copy(run, tmp_path / "run2")
    before = _snapshot(r2)
    err = _one_line_error(capsys, main(["train", "--resume", str(r2), f"data.root={other}", "optim.epochs=2",
                                        "--no-progress"]))
    assert f"cannot resume {r2}: the dataset at {other}" in err and f"the run was trained on {world}" in err
    assert _snapshot(r2) == before


# ------------------------------------------------------------------------------------- 5. SIGTERM saves and stops

_SLOW_STEPS = """
import sys, time
from ivpt.engine.trainer import Trainer
step = Trainer.optimizer_step
def announced(self, epoch, micro):
    step(self, epoch, micro)
    print(f"step {self.step}", flush=True)
    time.sleep(1.0)
Trainer.optimizer_step = announced
from ivpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_saves_the_step_and_resume_ends_where_an_uninterrupted_run_does(world, tmp_path):
    cfg = _write_config(tmp_path / "cfg.yaml", world, optim=dict(epochs=2, **TOTAL_FREE))
    cli = [sys.executable, "-m", "ivpt.cli", "train", "--no-progress"]
    full = subprocess.run(cli + ["--config", str(cfg), "--out", str(tmp_path / "full")], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    (tmp_path / "slow.py").write_text(_SLOW_STEPS)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "slow.py"), "train", "--no-progress", "--config",
                             str(cfg), "--out", str(tmp_path / "cut")], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "step 1":
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM after step 1" in err
    state = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (0, 1, 1)
    assert not (tmp_path / "cut" / ".lock").exists()
    resumed = subprocess.run(cli + ["--resume", str(tmp_path / "cut")], env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_params(tmp_path / "full", tmp_path / "cut")
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("full", "cut"))
    assert a["steps"] == b["steps"] and a["test_top1"] == b["test_top1"]


# ----------------------------------------------------------------------------- 6. non-finite parameters never saved

def test_non_finite_parameters_are_never_saved(world, tmp_path, monkeypatch):
    """A step that leaves NaN parameters with a finite loss and gradient (what optim.base_lr=nan does): the run
    stops before the end-of-epoch save, so neither best/ nor last.pt holds NaN; the earlier checkpoint stays."""
    from ivpt.engine import TrainingError, train
    from ivpt.engine.trainer import Trainer

    from .test_engine import tiny_config

    original = Trainer.optimizer_step

    def poisoned(self, epoch, micro):
        original(self, epoch, micro)
        if self.step == 4:  # the last step of epoch 2 (2 steps per epoch), before its validation and saves
            next(iter(self.trainable)).data.fill_(float("nan"))

    monkeypatch.setattr(Trainer, "optimizer_step", poisoned)
    cfg = tiny_config(world, optim=dict(epochs=2))
    with pytest.raises(TrainingError, match=r"non-finite parameters after step 4 .*the last good checkpoint"):
        train(cfg, tmp_path / "r", progress=False)
    state = torch.load(tmp_path / "r" / "last.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    from safetensors.torch import load_file

    best = load_file(str(tmp_path / "r" / "best" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in best.values())


def test_eval_refuses_a_checkpoint_with_non_finite_parameters(run, world, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    best = _copy(run / "best", tmp_path / "best")
    state = load_file(str(best / "model.safetensors"))
    name = sorted(state)[0]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(best / "model.safetensors"), metadata={"format": "pt"})
    err = _one_line_error(capsys, main(["eval", str(best), "--out", str(tmp_path / "ev"), "--no-progress",
                                        "--data", str(world)]))
    assert f"{best / 'model.safetensors'} holds non-finite values in {name}" in err
    assert not (tmp_path / "ev" / "eval.json").exists()


# ------------------------------------------------------------------- 7. DDP: a rank with an unreadable micro-batch

_EMPTY_ON_RANK_1 = """
import sys
from ivpt.engine.trainer import Trainer
step = Trainer.optimizer_step
def unreadable(self, epoch, micro):
    if self.info.rank == 1 and self.step == 0:
        micro = [None] * len(micro)  # what collate_skip_corrupt gives when every image is unreadable
    step(self, epoch, micro)
Trainer.optimizer_step = unreadable
from ivpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process descended from it (found through /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_torchrun_rank_with_an_unreadable_micro_batch_does_not_hang(world, tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    cfg = _write_config(tmp_path / "cfg.yaml", world, optim=dict(epochs=1), train=dict(max_steps=2))
    (tmp_path / "main.py").write_text(_EMPTY_ON_RANK_1)
    log = (tmp_path / "log.txt").open("w")
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=2", str(tmp_path / "main.py"), "train",
                             "--config", str(cfg), "--out", str(tmp_path / "r"), "--no-progress"],
                            env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=150)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)  # torchrun starts each worker in a session of its own
        proc.wait()
        pytest.fail("torchrun hung: the rank with the unreadable micro-batch left the gradient all-reduce")
    finally:
        log.close()
    assert proc.returncode == 0, (tmp_path / "log.txt").read_text()[-3000:]
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["steps"] == 2


# ------------------------------------------------------------------------ 8. a class without training images

def test_a_class_without_training_images_is_warned_at_set_up(world, tmp_path, caplog):
    from ivpt.data import CubDataset
    from ivpt.engine.trainer import Trainer

    from .test_engine import tiny_config

    data = _copy(world, tmp_path / "pw")
    full = CubDataset(data, "train")
    name = full.class_names[2]
    ids = {full.meta.image_ids[row] for row, label in zip(full._rows, full.labels) if label == 2}
    split = data / "train_test_split.txt"
    split.write_text("".join(f"{line.split()[0]} 0\n" if line.split()[0] in ids else line + "\n"
                             for line in split.read_text().splitlines()))
    with caplog.at_level(logging.WARNING, logger="ivpt"):
        trainer = Trainer(tiny_config(data), tmp_path / "r", progress=False)
    trainer.close()
    warnings = [r.getMessage() for r in caplog.records if "no training image" in r.getMessage()]
    assert len(warnings) == 1 and f"class 2 ({name})" in warnings[0], [r.getMessage() for r in caplog.records]
