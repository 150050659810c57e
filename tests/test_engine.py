"""The training engine on a tiny part-world: a run end to end, exact kill-and-resume, and torchrun DDP equal to
one process with the same global batch."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

from ivpt.config import Config
from ivpt.data.synth import make_partworld
from ivpt.engine import TrainingError, train

from .conftest import TINY


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("partworld")
    make_partworld(root, classes=3, per_class=8, size=56, seed=0, test_fraction=0.25)
    return root


# An optimiser schedule whose curve ignores the run's total steps (no cosine decay, warm-up or concept ramp), so that
# a resume may change epochs / max_steps.
TOTAL_FREE = dict(schedule="step", warmup=0.0, concept_lr_start=1.0, concept_lr_ramp=0.0)


def tiny_config(root, **sections) -> Config:
    data = {
        "model": dict(backbone="vit_small_patch14_reg4_dinov2", img_size=56, num_classes=3, n_pro=[5, 4, 3],
                      weights="random", backbone_kwargs=dict(TINY)),
        "optim": dict(epochs=2, min_steps=0, batch_size=4, amp="none"),
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
    assert not torch.are_deterministic_algorithms_enabled()
    metrics = train(tiny_config(world), tmp_path / "run", progress=False)
    assert not torch.are_deterministic_algorithms_enabled()  # train.deterministic holds for the run, not after it
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


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the trainer can catch it."""


def _kill_after_step(monkeypatch, n: int) -> None:
    """Make the trainer die right after optimiser step ``n`` (and its periodic checkpoint)."""
    from ivpt.engine.trainer import Trainer

    original = Trainer.optimizer_step

    def step_then_die(self, epoch, micro_batches):
        original(self, epoch, micro_batches)
        if self.step == n:
            self.save_last(epoch, self.batch_in_epoch)  # what ckpt_every_steps=1 writes after this step
            raise _Killed(f"killed after step {n}")

    monkeypatch.setattr(Trainer, "optimizer_step", step_then_die)


def _kill_at_checkpoint(monkeypatch, n: int) -> None:
    """Make the trainer die right after ``last.pt`` of optimiser step ``n`` is written (``train.ckpt_every_steps``
    checkpoints are written after the step's log row is taken)."""
    from ivpt.engine.trainer import Trainer

    original = Trainer.save_last

    def save_then_die(self, epoch, batch_in_epoch):
        original(self, epoch, batch_in_epoch)
        if self.step == n:
            raise _Killed(f"killed after the checkpoint of step {n}")

    monkeypatch.setattr(Trainer, "save_last", save_then_die)


def test_kill_and_resume_is_exact(world, tmp_path, monkeypatch):
    # rows every 2 steps, 3 steps per epoch: step 5's loss is in no row yet when the run dies after its checkpoint
    cfg = tiny_config(world, train=dict(ckpt_every_steps=1, log_every=2))
    train(cfg, tmp_path / "full", progress=False)
    with monkeypatch.context() as m:
        _kill_at_checkpoint(m, 5)
        with pytest.raises(_Killed):
            train(cfg, tmp_path / "killed", progress=False)  # mid-epoch 2
    state = torch.load(tmp_path / "killed" / "last.pt", map_location="cpu", weights_only=False)
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 2, 5)
    assert state["window"][0]["n"] == 1
    train(cfg, tmp_path / "killed", resume=True, progress=False)
    full, resumed = _params(tmp_path / "full"), _params(tmp_path / "killed")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # every log row as the uninterrupted run wrote it, epoch 2's closing row too: its loss means count step 5,
    # taken before the kill (only the throughput and the clock differ)
    rows = [_log_rows(tmp_path / run) for run in ("full", "killed")]
    assert [r["step"] for r in rows[0]] == ["2", "3", "4", "6"] and rows[0][-1]["total"]
    assert rows[1] == rows[0]


def _log_rows(run) -> list[dict]:
    """``log.csv``'s rows without the columns that time the run."""
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "elapsed_s")}
            for r in csv.DictReader((run / "log.csv").open())]


def test_a_run_killed_after_its_last_step_before_validation_ends_that_epoch_on_resume(world, tmp_path, monkeypatch):
    # max_steps 5 ends the run inside epoch 2 (3 steps per epoch); the kill falls between step 5's checkpoint and
    # that epoch's validation, so the resumed run must still validate epoch 2 and let best/ consider it; under the
    # cosine decay every step has its own rates, so the closing row's must be step 5's
    cfg = tiny_config(world, optim=dict(schedule="cosine"), train=dict(max_steps=5, ckpt_every_steps=1))
    full_metrics = train(cfg, tmp_path / "full", progress=False)
    assert full_metrics["best_epoch"] == 2  # the uninterrupted run keeps its last epoch: the case can fail
    with monkeypatch.context() as m:
        _kill_after_step(m, 5)
        with pytest.raises(_Killed):
            train(cfg, tmp_path / "killed", progress=False)
    resumed_metrics = train(cfg, tmp_path / "killed", resume=True, progress=False)
    for metrics in (full_metrics, resumed_metrics):
        metrics.pop("seconds")
    assert resumed_metrics == full_metrics
    states = [torch.load(tmp_path / run / "last.pt", map_location="cpu", weights_only=False)
              for run in ("full", "killed")]
    assert [(s["step"], s["val_step"], s["val_scores"]) for s in states[1:]] == [
        (s["step"], s["val_step"], s["val_scores"]) for s in states[:1]]
    # the epoch's closing log row: its validation scores and the concept health of the epoch's training batches
    closing = [[r for r in csv.DictReader((tmp_path / run / "log.csv").open()) if r["step"] == "5" and r["val_top1"]]
               for run in ("full", "killed")]
    columns = ["epoch", "val_top1", "val_parts_only_top1", "alive_s0", "entropy_s0", "alive_s2", "total",
               "classification", "lr_head", "lr_concepts"]
    assert [{k: r[k] for k in columns} for r in closing[1]] == [{k: r[k] for k in columns} for r in closing[0]]
    assert len(closing[0]) == 1 and closing[0][0]["alive_s0"]


def test_a_finished_last_pt_from_before_val_step_resumes_straight_to_the_test_pass(world, tmp_path, monkeypatch):
    from ivpt.engine.trainer import Trainer

    cfg = tiny_config(world, train=dict(max_steps=5))
    metrics = train(cfg, tmp_path / "run", progress=False)
    path = tmp_path / "run" / "last.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    del state["val_step"]  # as written before the key existed: at the end of a validated epoch
    torch.save(state, path)
    rows = (tmp_path / "run" / "log.csv").read_text()
    best = (tmp_path / "run" / "best" / "model.safetensors").read_bytes()
    validated = []
    original = Trainer.validate
    monkeypatch.setattr(Trainer, "validate", lambda self: validated.append(self.step) or original(self))
    again = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert validated == []  # no epoch validated twice
    assert (tmp_path / "run" / "log.csv").read_text() == rows
    assert (tmp_path / "run" / "best" / "model.safetensors").read_bytes() == best
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in metrics.items() if k != "seconds"}


def test_non_finite_loss_stops_with_named_term(world, tmp_path):
    cfg = tiny_config(world, optim=dict(head_lr_mult=1e30, base_lr=1.0), train=dict(ckpt_every_steps=1))
    with pytest.raises(TrainingError, match="non-finite loss .* term"):
        train(cfg, tmp_path / "nan", progress=False)
    assert (tmp_path / "nan" / "last.pt").is_file()


def _count_and_poison(monkeypatch, poison_call: int | None = None) -> list[int]:
    """Count compute_loss calls; make call number ``poison_call`` (1-based) return a NaN loss."""
    import ivpt.engine.trainer as T

    calls = [0]
    original = T.compute_loss

    def wrapped(*args, **kwargs):
        calls[0] += 1
        total, terms = original(*args, **kwargs)
        if calls[0] == poison_call:
            total = total * float("nan")
            terms = {**terms, "presence": terms["presence"] * float("nan")}
        return total, terms

    monkeypatch.setattr(T, "compute_loss", wrapped)
    return calls


def test_nan_in_an_early_micro_batch_is_never_stepped_or_saved(world, tmp_path, monkeypatch):
    # grad_accum=2: step 1 = calls 1-2, step 2 = calls 3-4. Poison call 3, the FIRST micro-batch of step 2.
    cfg = tiny_config(world, optim=dict(grad_accum=2), train=dict(ckpt_every_steps=1))
    _count_and_poison(monkeypatch, poison_call=3)
    with pytest.raises(TrainingError, match="non-finite loss at epoch 1, step 2: term.s. presence"):
        train(cfg, tmp_path / "run", progress=False)
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_deferred_finite_check_names_the_step_and_never_saves_after_it(world, tmp_path, monkeypatch):
    # 3 steps per epoch, flags read every 8 steps, so within epoch 2 only at its last step (6); step 5 is poisoned.
    import csv

    cfg = tiny_config(world, train=dict(sync_every=8))
    _count_and_poison(monkeypatch, poison_call=5)
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 2, step 5: term.s. presence \(found by the "
                                            r"check of steps 4-6, train.sync_every=8\)"):
        train(cfg, tmp_path / "run", progress=False)
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 3  # the end of epoch 1, the last good state
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "run" / "log.csv").open())]
    assert steps == [1, 2, 3, 4]  # the rows before the bad step are kept, none from it on


def test_flags_are_read_only_at_due_steps(world, tmp_path, monkeypatch):
    from ivpt.engine.trainer import Trainer

    reads = []
    original = Trainer.sync

    def counting(self):
        if self.checks:
            reads.append([c.step for c in self.checks])
        original(self)

    monkeypatch.setattr(Trainer, "sync", counting)
    metrics = train(tiny_config(world, train=dict(sync_every=2, log_every=1)), tmp_path / "run", progress=False)
    assert metrics["steps"] == 6
    assert reads == [[1, 2], [3], [4], [5, 6]]  # every 2 steps and at each epoch's last step, nowhere else


def test_no_micro_batch_is_left_without_a_step(world, tmp_path, monkeypatch):
    # 15 training images, batch 4 in 2 micro-batches of 2: 3 steps per epoch use 6 of the 7 micro-batches; the
    # 7th (and the odd image) is dropped instead of leaking its gradient into the next epoch's first step.
    cfg = tiny_config(world, optim=dict(grad_accum=2, epochs=2))
    calls = _count_and_poison(monkeypatch)
    metrics = train(cfg, tmp_path / "run", progress=False)
    assert metrics["train_images"] == 15 and metrics["steps"] == 6
    assert calls[0] == 12


@pytest.mark.parametrize("gpu_augment", [False, True])
def test_persistent_workers_load_what_the_main_process_would(world, tmp_path, gpu_augment):
    # Items are seeded by (seed, epoch, index) and the epoch travels with each index: workers that persist across
    # epochs, each with its own copy of the dataset, give the same run as loading in the main process.
    cfg = tiny_config(world, data=dict(gpu_augment=gpu_augment))
    train(cfg, tmp_path / "main", progress=False)
    train(cfg.with_overrides(["data.num_workers=2"]), tmp_path / "workers", progress=False)
    a, b = _params(tmp_path / "main"), _params(tmp_path / "workers")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_compile_trains_and_falls_back_with_one_warning(world, tmp_path, monkeypatch, caplog):
    import functools

    cfg = tiny_config(world, optim=dict(epochs=1), train=dict(max_steps=2, compile=True))
    # Inductor needs ~75 s to compile this model on 2 CPU cores; the eager backend runs the same dynamo capture of
    # the training forward (both views, maps_only_from) in seconds.
    from torch._dynamo.utils import counters

    original = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(original, backend="eager"))
    counters.clear()
    with caplog.at_level("WARNING", logger="ivpt"):
        assert train(cfg, tmp_path / "compiled", progress=False)["steps"] == 2
    assert not [r for r in caplog.records if "train.compile" in r.getMessage()]
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # one graph, no breaks

    class FailsWhenCalled:  # what a missing compiler looks like: torch.compile is lazy, the first call fails
        def __init__(self, module):
            self.module_ = module

        def __getattr__(self, name):
            return getattr(self.module_, name)

        def __call__(self, *args, **kwargs):
            raise RuntimeError("no working C++ compiler found\n(a long traceback of the backend)")

    def refuses(module):
        raise RuntimeError("Python 3.99 is not supported")

    expected = {FailsWhenCalled: "RuntimeError: no working C++ compiler found",
                refuses: "RuntimeError: Python 3.99 is not supported"}
    for broken, reason in expected.items():
        monkeypatch.setattr(torch, "compile", broken)
        caplog.clear()
        with caplog.at_level("WARNING", logger="ivpt"):
            assert train(cfg, tmp_path / broken.__name__, progress=False)["steps"] == 2
        lines = [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()]
        assert lines == [f"train.compile: torch.compile failed ({reason}); continuing without compilation"]


def test_resume_refuses_other_backbone_weights_and_loose_state(world, tmp_path):
    cfg = tiny_config(world, optim=dict(epochs=1))
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    good = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    assert good["backbone"]["source"] == "random" and len(good["backbone"]["fingerprint"]) == 16

    other = {**good, "backbone": {**good["backbone"], "source": "/elsewhere/vit.safetensors",
                                  "fingerprint": "0123456789abcdef"}}
    torch.save(other, run / "last.pt")
    more = cfg.with_overrides(["optim.epochs=2"])
    with pytest.raises(TrainingError, match=r"other backbone weights.*'/elsewhere/vit.safetensors'.*'random'"):
        train(more, run, resume=True, progress=False)

    loose = {**good, "model": {k: v for k, v in good["model"].items() if not k.startswith("classifier")}}
    torch.save(loose, run / "last.pt")
    with pytest.raises(TrainingError, match="missing from checkpoint: classifier.weight"):
        train(more, run, resume=True, progress=False)


def test_resume_with_a_changed_config_is_refused_before_anything_is_written(world, tmp_path):
    cfg = tiny_config(world, optim=dict(epochs=1, **TOTAL_FREE))
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for change in (["model.n_pro=6,4,3"], ["train.seed=4"], ["optim.batch_size=2"]):
        key = change[0].split("=")[0]
        with pytest.raises(TrainingError, match=f"differs from the checkpoint's in {key}"):
            train(cfg.with_overrides(change + ["optim.epochs=2"]), run, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    train(cfg.with_overrides(["optim.epochs=2"]), run, resume=True, progress=False)  # more epochs: exact, allowed


def test_a_run_saved_before_newer_fields_resumes_as_it_was_trained(world, tmp_path):
    """last.pt and config.yaml written before model.global_share / model.deep_prompts / the concept ramp existed: both
    are read with the behaviour they were trained with (one-more-part weighting, no free prompts, no ramp), so the
    run resumes."""
    import yaml

    from ivpt.runs import run_config

    cfg = tiny_config(world, model=dict(global_part=True, global_share=None, deep_prompts=False),
                      optim=dict(epochs=1, **TOTAL_FREE))
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for config in (state["config"], saved):
        del config["model"]["global_share"], config["model"]["deep_prompts"]
        del config["optim"]["concept_lr_start"], config["optim"]["concept_lr_ramp"]
    torch.save(state, run / "last.pt")
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    old, _ = run_config(run)
    assert (old.model.global_share, old.model.deep_prompts) == (None, False)
    assert (old.optim.concept_lr_start, old.optim.concept_lr_ramp) == (1.0, 0.0)  # trained without the concept ramp
    metrics = train(old.with_overrides(["optim.epochs=2"]), run, resume=True, progress=False)
    assert metrics["steps"] > state["step"]


def test_new_parameters_do_not_depend_on_what_weight_resolution_drew(monkeypatch):
    import ivpt.weights as W
    from ivpt.checkpoint import adapter_state
    from ivpt.models import create_model

    cfg = tiny_config("unused").model
    plain = adapter_state(create_model(cfg, seed=5))
    original = W.resolve_backbone

    def hub_attempt_then_resolve(*args, **kwargs):
        torch.rand(1000)  # e.g. timm building a randomly initialised model before a failed hub download
        return original(*args, **kwargs)

    monkeypatch.setattr(W, "resolve_backbone", hub_attempt_then_resolve)
    torch.manual_seed(123)  # and whatever state the caller left the global generator in
    drawn = adapter_state(create_model(cfg, seed=5))
    assert plain.keys() == drawn.keys()
    for k in plain:
        assert torch.equal(plain[k], drawn[k]), k
    other_seed = adapter_state(create_model(cfg, seed=6))
    assert not torch.equal(plain["stages.0.prototypes"], other_seed["stages.0.prototypes"])


def test_loading_items_never_reseeds_cuda_generators(world, monkeypatch):
    from ivpt.data import CubDataset, build_train_transform
    from ivpt.engine.ordering import SeededDataset

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    cfg = tiny_config(world)
    ds = SeededDataset(CubDataset(world, "train", transform=build_train_transform(cfg.data, 56)), seed=0)
    a = ds[0]["image"]
    ds[1]
    assert torch.equal(ds[0]["image"], a)  # still a pure function of (seed, epoch, index)
    assert calls == []


def test_collectives_refuse_tensors_on_the_wrong_device(monkeypatch, tmp_path):
    import torch.distributed as dist

    from ivpt import runtime as R

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert R.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]  # gloo reduces CPU tensors
        monkeypatch.setattr(R, "group_device", lambda: torch.device("cuda", 0))  # as an NCCL group would
        with pytest.raises(R.DistributedError, match="tensor on cpu but the gloo process group reduces cuda"):
            R.all_reduce_sum(torch.ones(1))
    finally:
        dist.destroy_process_group()


def test_every_collective_goes_through_the_checked_helpers():
    import ast
    from pathlib import Path

    import ivpt

    collectives = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "reduce", "barrier",
                   "reduce_scatter", "all_to_all", "gather", "scatter"}
    root = Path(ivpt.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "runtime.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in collectives and \
                    isinstance(node.value, ast.Name) and node.value.id == "dist":
                offenders.append(f"{path.relative_to(root)}:{node.lineno} dist.{node.attr}")
    assert offenders == []


_RECORDING_LAUNCHER = """
import os
import sys
from pathlib import Path

import torch
import yaml

from ivpt.config import Config
from ivpt.engine import train

records = []


class RecordingSGD(torch.optim.SGD):
    # Records the gradients that reach the optimiser (after DDP's all-reduce and clipping) and never moves a
    # parameter (lr 0): every step compares gradients at identical parameters on a new batch. Moving them would let
    # rounding noise flip the argmax region assignment of a pixel near a tie, a discrete change of the next
    # gradient (and Adam turns rounding noise in near-zero gradients into +-lr).
    def __init__(self, groups, betas=None, weight_decay=0.0):
        super().__init__([{**g, "lr": 0.0} for g in groups], lr=0.0)

    def step(self, closure=None):
        records.append({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                        if p.grad is not None})
        return super().step(closure)


torch.optim.Adam = RecordingSGD
cfg = Config.from_dict(yaml.safe_load(Path(sys.argv[1]).read_text()))
out = Path(sys.argv[2])
train(cfg, out, progress=False)
if int(os.environ.get("RANK", "0")) == 0:
    torch.save(records, out / "grads.pt")
"""


@pytest.mark.slow
def test_torchrun_gradients_equal_one_process(world, tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    # Gumbel noise is drawn per process, and presence takes a max over each process's batch: both off here.
    cfg = tiny_config(world, model=dict(train_gumbel=False), loss=dict(presence=0.0), optim=dict(epochs=2))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    launcher = tmp_path / "launch.py"
    launcher.write_text(_RECORDING_LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {"single": [sys.executable, str(launcher)],
            "ddp": [torchrun, "--standalone", "--nproc_per_node=2", str(launcher)]}
    for name, cmd in runs.items():
        proc = subprocess.run(cmd + [str(tmp_path / "cfg.yaml"), str(tmp_path / name)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = torch.load(tmp_path / "single" / "grads.pt", weights_only=False)
    ddp = torch.load(tmp_path / "ddp" / "grads.pt", weights_only=False)
    assert len(single) == len(ddp) == 6
    for step, (a, b) in enumerate(zip(single, ddp)):
        assert len(a) == len(b)
        for i, (ga, gb) in enumerate(zip(a.values(), b.values())):
            # The same sums in another order (two half-batch means averaged by the all-reduce): float32 rounding,
            # a few eps (1.2e-7) of the largest entry, far below 1e-5 of it; a wrong batch split is O(1).
            scale = ga.abs().max().item()
            assert (ga - gb).abs().max().item() <= 1e-5 * scale + 1e-30, (step, i, scale)
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["test_images"] == 6


@pytest.mark.slow
def test_torchrun_one_process_joins_a_group_and_finishes(world, tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    cfg = tiny_config(world, optim=dict(epochs=1), train=dict(max_steps=2))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    code = ("import sys, torch.distributed as dist, ivpt.runtime as R\n"
            "setup = R.setup\n"
            "def reporting_setup(*a, **k):\n"
            "    info = setup(*a, **k)\n"
            "    print('group', dist.get_backend(), dist.get_world_size(), info.distributed, flush=True)\n"
            "    return info\n"
            "R.setup = reporting_setup\n"
            "from ivpt.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    (tmp_path / "main.py").write_text(code)
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=1", str(tmp_path / "main.py"), "train", "--config",
         str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "one"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert "group gloo 1 True" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["steps"] == 2


def test_a_moving_global_share_reaches_its_end_and_best_keeps_the_share_it_was_saved_at(world, tmp_path):
    """model.global_share_end: the trainer sets the share of each step before taking it, (step + 1) / total of
    the way from global_share to global_share_end, so last.pt ends at the end share and best/ holds the share of
    the step it was saved at; a model loaded from best/ scores with that share."""
    from ivpt.checkpoint import load_pretrained
    from ivpt.models import create_model

    cfg = tiny_config(world, model=dict(global_part=True, global_share=0.4, global_share_end=0.1))
    metrics = train(cfg, tmp_path / "run", progress=False)
    total = metrics["steps"]
    last = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert float(last["global_share"]) == pytest.approx(0.1, rel=1e-6)
    best_step = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["step"]
    model = load_pretrained(create_model(cfg.model), tmp_path / "run" / "best")
    share = 0.4 + (0.1 - 0.4) * best_step / total
    assert model.logit_weights() == pytest.approx(((1 - share) / 2, share), rel=1e-6)


def test_log_rates_follow_the_group_roles_not_their_names():
    """lr_head / lr_concepts come from each group's rate role, whatever a kind names its groups; NaN for a role
    that has no group."""
    from ivpt.engine.records import _rate_lrs
    from ivpt.models.base import CONCEPT_RATE, HEAD_RATE

    p = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.SGD([{"params": [p[0]], "lr": 3e-2, "name": "scorer", "rate": HEAD_RATE},
                           {"params": [p[1]], "lr": 5e-4, "name": "atoms", "rate": CONCEPT_RATE},
                           {"params": [p[2]], "lr": 3e-2, "name": "readout", "rate": HEAD_RATE}])
    assert _rate_lrs(opt) == {"lr_head": 3e-2, "lr_concepts": 5e-4}
    lrs = _rate_lrs(torch.optim.SGD([{"params": [p[0]], "lr": 1e-3, "name": "classifier", "rate": HEAD_RATE}]))
    assert lrs["lr_head"] == 1e-3 and lrs["lr_concepts"] != lrs["lr_concepts"]


@pytest.mark.parametrize("kind", ["linear", "vpt_deep", "last_layer_parts", "vpt_deep_proto"])
def test_baselines_train_and_evaluate(world, tmp_path, kind):
    import csv

    from ivpt.checkpoint import load_pretrained
    from ivpt.eval import evaluate
    from ivpt.models import create_model

    cfg = tiny_config(world, model=dict(kind=kind, num_prompts=2), optim=dict(epochs=1), train=dict(max_steps=2))
    metrics = train(cfg, tmp_path / kind, progress=False)
    assert metrics["steps"] == 2
    rows = list(csv.DictReader((tmp_path / kind / "log.csv").open()))
    lr_concepts = float(rows[-1]["lr_concepts"])
    if kind == "linear":  # a true probe: only the classifier trains, so there is no concept-rate group
        assert lr_concepts != lr_concepts
    else:  # the second of 2 steps at the recipe's constant rate (no warm-up step at 5 % of 2) runs at the peak 4e-4:
        assert lr_concepts == pytest.approx(4e-4)  # the concept ramp's half (2e-4) at step 0, its end after 1 step
    model = create_model(cfg.model)
    load_pretrained(model, tmp_path / kind / "best")
    result = evaluate(model, cfg, progress=False)
    assert 0 <= result["top1"] <= 100
    if kind == "linear":  # no part maps: accuracy only, each skipped metric with its reason
        assert "nmi" not in result and "stage" not in result
        assert result["skipped"]["consistency"] == "model.kind=linear has no part maps"
    else:  # concept maps (final stage) or VPT's prompt-attention maps: the same protocol for every kind
        # the index: the final stage of model.n_pro for the concept models, the one map stage (0) of a VPT
        assert result["stage"]["index"] == (0 if kind == "vpt_deep" else 2)
        assert "nmi" in result and "consistency" in result and "kpr" in result
        assert result["stage"]["n_pro"] == (3 if kind != "vpt_deep" else 2 + 1)  # n_pro[-1], or P prompts + bg


def test_resuming_a_run_that_reached_max_steps_takes_no_further_step(world, tmp_path):
    # e.g. killed during its test pass: demo and compare resume whenever last.pt exists without metrics.json
    cfg = tiny_config(world, optim=dict(epochs=2), train=dict(max_steps=2))
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    before = _params(run)
    (run / "metrics.json").unlink()
    metrics = train(cfg, run, resume=True, progress=False)
    assert metrics["steps"] == 2
    after = _params(run)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_training_split_smaller_than_one_step_is_named(world, tmp_path):
    # 15 training images: micro-batches of 8 fit, a step of 16 does not (no epoch of zero steps)
    cfg = tiny_config(world, optim=dict(batch_size=16, grad_accum=2))
    with pytest.raises(TrainingError, match="has 15 images, fewer than one optimiser step of optim.batch_size=16"):
        train(cfg, tmp_path / "run", progress=False)


def test_feature_mean_prototype_init_centres_the_prototypes_before_training(world, tmp_path):
    """model.prototype_init=feature_mean: a fresh run starts from create_model's prototypes shifted by one vector per
    stage, the mean feature of 64 training images spread over the split (the tiny world has fewer: all of them);
    =normal (the default) starts from create_model's prototypes exactly."""
    from ivpt.engine.trainer import Trainer
    from ivpt.models import create_model

    cfg = tiny_config(world)
    assert cfg.model.prototype_init == "normal"
    centred = Trainer(cfg.with_overrides(["model.prototype_init=feature_mean"]), tmp_path / "a", progress=False).model
    normal = Trainer(cfg, tmp_path / "b", progress=False).model
    fresh = create_model(cfg.model, seed=cfg.train.seed)
    for a, b, c in zip(centred.stages, normal.stages, fresh.stages, strict=True):
        assert torch.equal(b.prototypes, c.prototypes)
        shift = a.prototypes - c.prototypes
        assert shift.abs().min() > 0
        assert torch.allclose(shift, shift[:1].expand_as(shift), atol=1e-6 * shift.abs().max().item())


def test_kmeans_prototype_init_is_the_same_start_for_the_same_seed(world, tmp_path):
    """model.prototype_init=kmeans: a fresh run's prototypes are data-driven (not create_model's), identical for two
    runs of one seed (every rank of a DDP run computes the same start), and another seed gives another start."""
    from ivpt.engine.trainer import Trainer
    from ivpt.models import create_model

    cfg = tiny_config(world).with_overrides(["model.prototype_init=kmeans"])
    a = Trainer(cfg, tmp_path / "a", progress=False).model
    b = Trainer(cfg, tmp_path / "b", progress=False).model
    c = Trainer(cfg.with_overrides(["train.seed=7"]), tmp_path / "c", progress=False).model
    fresh = create_model(cfg.model, seed=cfg.train.seed)
    for sa, sb, sc, sf in zip(a.stages, b.stages, c.stages, fresh.stages, strict=True):
        assert torch.equal(sa.prototypes, sb.prototypes)
        assert not torch.equal(sa.prototypes, sc.prototypes)
        assert (sa.prototypes - sf.prototypes).abs().amax(dim=1).min() > 0.1  # every prototype moved


def test_fp16_steps_the_schedule_without_torchs_order_warning(world, tmp_path):
    # The GradScaler skips the first fp16 steps while it finds its scale; the schedule still counts them, and torch's
    # "lr_scheduler.step() before optimizer.step()" check must not reach the user for that.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_config(world, optim=dict(amp="fp16", epochs=1, schedule="cosine")), tmp_path / "run",
              progress=False)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    lrs = [float(r["lr_head"]) for r in csv.DictReader(open(tmp_path / "run" / "log.csv")) if r["lr_head"]]
    assert len(lrs) >= 2 and lrs[0] != lrs[-1]  # the schedule moved on every step, skipped or not
