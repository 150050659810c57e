"""``ivpt compare`` end to end on a tiny ViT: 2 kinds x 2 seeds of 2 steps, an interrupted run resumed,
finished runs skipped, a changed config refused, ``--tabulate``; the table's mean ± std against numpy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

import ivpt.compare as C
from ivpt.cli import main
from ivpt.config import load_config

from .test_engine import _kill_after_step, _Killed, tiny_config, world  # noqa: F401  (fixture)

COLUMNS = ("consistency", "stability", "top1", "nmi", "ari", "kpr", "parts_only_top1", "parts_agree", "part_share")


@pytest.fixture
def cfg_file(world, tmp_path):
    cfg = tiny_config(world, optim=dict(epochs=1), train=dict(max_steps=2))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _compare(cfg_file, out, *extra):
    return main(["compare", "--config", str(cfg_file), "--kinds", "ivpt,linear", "--seeds", "0,1", "--out", str(out),
                 "--no-progress", *extra])


def test_compare_trains_resumes_skips_and_tabulates(cfg_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    with monkeypatch.context() as m:  # the first run dies after its first step: nothing else has started
        _kill_after_step(m, 1)
        with pytest.raises(_Killed):
            _compare(cfg_file, out)
    assert (out / "runs" / "ivpt-seed0" / "last.pt").is_file()
    assert not (out / "runs" / "ivpt-seed1").exists()
    capsys.readouterr()

    assert _compare(cfg_file, out) == 0
    printed = capsys.readouterr().out
    assert "[1/4] ivpt-seed0: resuming ivpt, seed 0" in printed
    for i, name in enumerate(("ivpt-seed1", "linear-seed0", "linear-seed1"), 2):
        assert f"[{i}/4] {name}: training" in printed
    assert printed.count(": done in ") == 4

    result = json.loads((out / "compare.json").read_text())
    assert result["kinds"] == ["ivpt", "linear"] and result["seeds"] == [0, 1]
    assert [(r["kind"], r["seed"], r["metrics"]["steps"]) for r in result["runs"]] == [
        ("ivpt", 0, 2), ("ivpt", 1, 2), ("linear", 0, 2), ("linear", 1, 2)]
    assert result["config"]["optim"]["schedule"] == "constant"
    for kind in ("ivpt", "linear"):
        runs = [r for r in result["runs"] if r["kind"] == kind]
        for key in COLUMNS:
            values = [r["eval"][key] for r in runs if key in r["eval"]]
            if not values:  # the linear probe has no concept maps
                assert key not in result["summary"][kind]
                continue
            stat = result["summary"][kind][key]
            assert stat["n"] == 2 and stat["values"] == values
            assert stat["mean"] == pytest.approx(np.mean(values))
            assert stat["std"] == pytest.approx(np.std(values, ddof=1))
    assert set(result["summary"]["ivpt"]) == set(COLUMNS)
    assert set(result["summary"]["linear"]) == {"top1"}

    table = (out / "compare.md").read_text()
    s = result["summary"]
    consistency, top1 = s["ivpt"]["consistency"], s["linear"]["top1"]
    assert f"| ivpt | 2 | 0 (5 prototypes) | {consistency['mean']:.1f} ± {consistency['std']:.1f} | " in table
    assert f"| linear | 2 | – | – | – | {top1['mean']:.1f} ± {top1['std']:.1f} | – | – | – |" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (out / "compare.svg").read_text()
    assert "<svg" in svg and "linear (no consistency)" in svg

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(C, "train", no_training)
    monkeypatch.setattr(C, "evaluate_checkpoint", no_training)
    assert _compare(cfg_file, out) == 0
    assert capsys.readouterr().out.count("finished earlier, reusing") == 4
    assert json.loads((out / "compare.json").read_text())["summary"] == result["summary"]

    assert main(["compare", "--tabulate", str(out / "runs" / "ivpt-seed1"), str(out / "runs" / "linear-seed0"),
                 "--out", str(tmp_path / "tab")]) == 0
    tab = json.loads((tmp_path / "tab" / "compare.json").read_text())
    assert tab["config"] is None and [(r["kind"], r["seed"]) for r in tab["runs"]] == [("ivpt", 1), ("linear", 0)]
    top1 = tab["summary"]["ivpt"]["top1"]
    assert top1["std"] is None and top1["values"] == [result["runs"][1]["eval"]["top1"]]
    assert f"| ivpt | 1 | 0 (5 prototypes) | {tab['summary']['ivpt']['consistency']['mean']:.1f} | " in \
        (tmp_path / "tab" / "compare.md").read_text()


def test_compare_refuses_a_run_folder_with_another_config(cfg_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    run = out / "runs" / "linear-seed0"
    run.mkdir(parents=True)
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["model"]["kind"], cfg["train"]["seed"], cfg["optim"]["batch_size"] = "linear", 0, 2
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(C, "train", lambda *a, **k: pytest.fail("trained before every folder was checked"))
    assert _compare(cfg_file, out) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {run} holds a run with another config (optim.batch_size); pass another --out, or delete {run} "
        "to train it again")


def test_tabulate_refuses_runs_measured_differently(tmp_path):
    for name, protocol in (("a", "corrected"), ("b", "reference")):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"kind": "linear"}, "train": {"seed": 0}}))
        (run / "eval.json").write_text(json.dumps({
            "top1": 50.0, "protocol": {"protocol": protocol, "batch_size": 8},
            "data": {"root": "/d", "split": "test", "format": "cub", "images": 4}}))
    with pytest.raises(C.CompareError, match="2 different evaluation protocols"):
        C.tabulate([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    with pytest.raises(C.CompareError, match=r"has no config.yaml or eval.json; train it"):
        C.tabulate([tmp_path / "missing"], tmp_path / "out")


def test_compare_reuses_a_finished_run_after_a_change_its_kind_does_not_read(cfg_file, tmp_path, monkeypatch, capsys):
    """A finished linear run stays in the comparison when only an IVPT-only switch changed; the ivpt run, which
    reads it, is refused."""
    out = tmp_path / "cmp"
    cfg = yaml.safe_load(cfg_file.read_text())
    for kind in ("linear", "ivpt"):
        run = out / "runs" / f"{kind}-seed0"
        run.mkdir(parents=True)
        saved = json.loads(json.dumps(cfg))
        saved["model"]["kind"], saved["train"]["seed"] = kind, 0
        saved["model"]["deep_prompts"] = not cfg["model"]["deep_prompts"]
        (run / "config.yaml").write_text(yaml.safe_dump(saved))
    monkeypatch.setattr(C, "train", lambda *a, **k: pytest.fail("trained before every folder was checked"))
    assert _compare(cfg_file, out, "--seeds", "0") == 2
    ivpt_run = out / "runs" / "ivpt-seed0"
    assert capsys.readouterr().err.strip() == (
        f"error: {ivpt_run} holds a run with another config (model.deep_prompts); pass another --out, or delete "
        f"{ivpt_run} to train it again")
    linear = load_config(cfg_file, ["model.kind=linear", "train.seed=0"])
    C._check_same_config(linear, out / "runs" / "linear-seed0")  # no error: the linear run belongs


def test_compare_with_jobs_trains_runs_in_parallel_processes_and_raises_a_failed_one(cfg_file, tmp_path, capfd):
    """--jobs 2: every run is trained and evaluated (in spawned processes) and tabulated in plan order; a second
    call reuses them all. A run that fails (here: a corrupt last.pt to resume from) does not lose the others: they
    finish and are kept, and the failure's error ends the command."""
    out = tmp_path / "cmp"
    bad = out / "runs" / "linear-seed1"
    bad.mkdir(parents=True)
    (bad / "last.pt").write_bytes(b"not a checkpoint")
    assert _compare(cfg_file, out, "--jobs", "2") == 2
    assert "error: cannot resume" in capfd.readouterr().err
    finished = sorted(p.parent.name for p in (out / "runs").glob("*/eval.json"))
    assert finished == ["ivpt-seed0", "ivpt-seed1", "linear-seed0"]
    assert not (out / "compare.json").exists()

    (bad / "last.pt").unlink()
    capfd.readouterr()
    assert _compare(cfg_file, out, "--jobs", "2") == 0
    printed = capfd.readouterr().out
    assert printed.count("finished earlier, reusing") == 3 and printed.count(": done in ") == 1
    result = json.loads((out / "compare.json").read_text())
    assert [(r["kind"], r["seed"], r["metrics"]["steps"]) for r in result["runs"]] == [
        ("ivpt", 0, 2), ("ivpt", 1, 2), ("linear", 0, 2), ("linear", 1, 2)]
    with pytest.raises(C.CompareError, match="--jobs 0"):
        C.compare(load_config(cfg_file), out, kinds=["ivpt"], seeds=[0], jobs=0)
