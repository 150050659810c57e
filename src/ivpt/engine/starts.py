"""``train.starts``: several starts of one run, only the most promising trained to the end (NOT the paper).

Where a run's concepts settle is decided early and differs from seed to seed (benchmarks/recipe.md, "Two starts"):
some seeds' concepts follow the parts, others carve the background while the [CLS] part carries the decision. With
``train.starts = K > 1`` a run trains K starts for ``train.start_epochs`` epochs each, start ``k`` the plain run of
seed ``train.seed * K + k`` (its model, data order and training/validation split), and continues only the start whose
parts decide the most on its validation split: the highest ``val_parts_only_top1`` (:mod:`ivpt.metrics.decision`),
ties broken by ``val_part_share``, then the lower ``k`` — both measure the parts, never the whole model's top-1,
which the [CLS] part can carry; a kind without a part-pooled head is chosen by ``val_top1``. The kept start then
trains to the end exactly as the plain run of its seed would, so a run with starts costs ``(K - 1) * start_epochs``
epochs more than one without.

The run folder ``out`` holds each start in ``out/starts/<k>/`` (its ``log.csv`` and ``config.yaml``; its ``last.pt``
and ``best/`` until the choice), ``out/starts.json`` (each start's seed, steps, seconds and validation scores, and
which was kept), and from the choice on the kept start's run: its ``log.csv``, ``last.pt``, ``best/``,
``metrics.json``. ``config.yaml`` is the run's own (``train.seed``, ``train.starts``), so ``--resume`` and
``ivpt compare`` continue it like any run: a run killed during the starts resumes the unfinished start.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .. import runtime as R
from ..checkpoint import RunLock, atomic_write_text, check_output_folder_all_ranks
from ..config import Config, config_changes, load_config
from .errors import TrainingError
from .runfolder import (RESUMABLE_CHANGES, STARTS_DIR, STARTS_FILE, _save_config, agree_on_rank0,
                        check_new_run_folder, has_started_starts)
from .trainer import Trainer

__all__ = ["start_score", "train_starts"]


def start_score(scores: dict[str, float]) -> tuple[float, ...]:
    """What a start is chosen by, to be maximised: (validation parts-only top-1, validation part share), or
    (validation top-1,) for a kind without a part-pooled head (``scores``: a run's ``val_*`` scores of its last
    epoch). The parts-only top-1 of a validation split of a few dozen images ties often; the part share rarely."""
    if "val_parts_only_top1" in scores:
        return scores["val_parts_only_top1"], scores.get("val_part_share", 0.0)
    return (scores["val_top1"],)


def _record(out: Path) -> dict:
    path = out / STARTS_FILE
    if not path.is_file():
        return {"starts": {}}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot resume: {path} is unreadable ({exc}); delete {out} to train it again") from None
    if not isinstance(record, dict) or not isinstance(record.get("starts"), dict):
        raise TrainingError(f"cannot resume: {path} was not written by `ivpt train`; delete {out} to train it again")
    return record


def train_starts(cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = True,
                 new_run: bool = False) -> dict:
    """Train ``cfg`` (``cfg.train.starts > 1``) into ``out``: the starts, the choice, then the kept start to the end;
    returns ``metrics.json``'s content. ``resume``, ``progress`` and ``new_run`` as for :func:`~.run.train`."""
    out = Path(out)
    t = cfg.train
    info = R.setup(t.device)
    if (out / "last.pt").is_file() and resume:  # the choice was made: the kept start goes on like any run
        return _continue(cfg, out, progress)
    check_output_folder_all_ranks(out, info)
    lock = RunLock(out)
    try:
        agree_on_rank0(info, out, lock.acquire)
        if new_run:
            agree_on_rank0(info, out, lambda: check_new_run_folder(out))
        if resume and not has_started_starts(out):
            raise TrainingError(f"cannot resume: {out} holds neither last.pt nor started starts; nothing to resume")
        if cfg.data.val_fraction == 0:
            raise TrainingError("train.starts chooses a start on the validation split, and this run has none: set "
                                "data.val_fraction > 0 (or train.starts=1)")
        if not resume and info.is_main:  # a fresh run: whatever an earlier run left goes
            shutil.rmtree(out / STARTS_DIR, ignore_errors=True)
            for name in (STARTS_FILE, "last.pt", "metrics.json", "log.csv"):
                (out / name).unlink(missing_ok=True)
        R.barrier()
        record = {"starts": {}}
        if resume:
            _check_same_config(cfg, out)
            record = _record(out)
        if info.is_main:
            _save_config(cfg, out)
        for k in range(t.starts):
            if str(k) not in record["starts"]:
                record["starts"][str(k)] = _train_start(cfg, out / STARTS_DIR / str(k), k, resume, progress)
                if info.is_main:
                    atomic_write_text(out / STARTS_FILE, json.dumps(record, indent=2))
        kept = max(range(t.starts), key=lambda k: (start_score(record["starts"][str(k)]), -k))
        record["kept"] = kept
        if info.is_main:
            _keep(out, kept, record)
            print(f"kept start {kept + 1} of {t.starts} (seed {t.start_seed(kept)}): "
                  + ", ".join(f"{k} {v:.4g}" for k, v in record["starts"][str(kept)].items() if k.startswith("val_")))
        R.barrier()
        return _continue(cfg, out, progress, lock)  # the folder stays held from the starts into the continuation
    finally:
        lock.release()  # idempotent: the continuation released it, or failed before taking it over


def _check_same_config(cfg: Config, out: Path) -> None:
    """A resume of the starts continues them with the config they began with (the rule of ``--resume``: only the
    :data:`~.runfolder.RESUMABLE_CHANGES` may differ); checked before anything in ``out`` is written."""
    path = out / "config.yaml"
    if not path.is_file():
        return
    changed = [k for k in config_changes(load_config(path, saved=True), cfg) if k not in RESUMABLE_CHANGES]
    if changed:
        raise TrainingError(
            f"cannot resume {out}: the config differs from the run's ({path}) in {', '.join(changed)}, so its starts "
            "would not be compared alike; start a new run with --out")


def _train_start(cfg: Config, folder: Path, k: int, resume: bool, progress: bool) -> dict:
    """Train start ``k`` in ``folder`` to ``train.start_epochs`` epochs (resuming its ``last.pt`` when ``resume``);
    its ``starts.json`` entry: seed, steps, seconds and the validation scores it ends with."""
    t = cfg.train
    trainer = Trainer(cfg, folder, resume=resume and (folder / "last.pt").is_file(), progress=progress, start=k)
    try:
        if trainer.info.is_main:
            print(f"start {k + 1} of {t.starts} (seed {t.start_seed(k)}): {t.start_epochs} epochs")
        began = time.perf_counter()
        trainer.train_until(t.start_epochs)
        scores, seconds = dict(trainer.val_scores), time.perf_counter() - began
    finally:
        trainer.close()
    if not scores:
        raise TrainingError(f"start {k + 1} has no validation score: no image of its validation split could be read "
                            "(see the warnings above)")
    return {"seed": t.start_seed(k), "steps": trainer.step, "seconds": seconds, **scores}


def _keep(out: Path, kept: int, record: dict) -> None:
    """Make the kept start's run the run in ``out`` (rank 0): its ``best/``, ``log.csv`` and, last, ``last.pt`` (whose
    presence marks the choice made); the other starts' training states go."""
    folder = out / STARTS_DIR / str(kept)
    atomic_write_text(out / STARTS_FILE, json.dumps(record, indent=2))
    staged = out / ".best.kept"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(folder / "best", staged)
    shutil.rmtree(out / "best", ignore_errors=True)
    staged.rename(out / "best")
    shutil.copyfile(folder / "log.csv", out / ".log.csv.kept")
    (out / ".log.csv.kept").replace(out / "log.csv")
    shutil.copyfile(folder / "last.pt", out / ".last.pt.kept")
    (out / ".last.pt.kept").replace(out / "last.pt")
    for start in (out / STARTS_DIR).iterdir():
        (start / "last.pt").unlink(missing_ok=True)
        shutil.rmtree(start / "best", ignore_errors=True)


def _continue(cfg: Config, out: Path, progress: bool, lock: RunLock | None = None) -> dict:
    """The kept start from its ``last.pt`` in ``out`` to the end of the run; ``lock``: ``out``'s, when the caller
    holds it (the continuation takes it over and releases it)."""
    trainer = Trainer(cfg, out, resume=True, progress=progress, lock=lock)
    try:
        return trainer.fit()
    finally:
        trainer.close()
