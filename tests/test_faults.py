"""Fault injection (issue 15): every bad input is named with its fix, nothing is silently wrong, nothing on disk
is damaged or lost. Each test breaks one thing in a tiny part-world (3 classes x 6 images, 56 px) or in a tiny
run trained on it, drives the ``ivpt`` command line and asserts the exit code, the one-line message (file, line or
key, and the fix) and what is on disk afterwards."""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from ivpt.checkpoint import OutputError, atomic_torch_save
from ivpt.cli import main
from ivpt.data import CubDataset, build_eval_transform, corrupt_count, reset_corrupt_count
from ivpt.data.synth import make_partworld

from .test_engine import TOTAL_FREE, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _write_config(path: Path, root: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(tiny_config(root, **sections).to_dict(), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "pw"
    make_partworld(root, classes=3, per_class=6, size=56, seed=0, test_fraction=0.25)
    return root


@pytest.fixture(scope="module")
def run(world, tmp_path_factory) -> Path:
    """A finished one-epoch run on ``world`` (do not modify: copy it first)."""
    base = tmp_path_factory.mktemp("run")
    # The paper's step schedule ignores the run's length, so resuming with more epochs stays exact.
    cfg = _write_config(base / "cfg.yaml", world, optim=dict(epochs=1, **TOTAL_FREE))
    assert main(["train", "--config", str(cfg), "--out", str(base / "run"), "--no-progress"]) == 0
    return base / "run"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured
    # The library's warnings (e.g. skipped corrupt images) may come first; the error is the rest, once.
    assert captured.err.count("error: ") == 1 and "Traceback" not in captured.err, captured.err
    message = captured.err[captured.err.index("error: "):]
    assert message == captured.err or captured.err[captured.err.index("error: ") - 1] == "\n", captured.err
    return message


def _replace_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- 1. metrics invented from nothing

def test_empty_part_locs_gives_absent_metrics_with_reasons(world, run, tmp_path, capsys):
    data = _copy(world, tmp_path / "pw")
    (data / "parts" / "part_locs.txt").write_text("")
    code = main(["eval", str(run / "best"), "--data", str(data), "--out", str(tmp_path / "ev"), "--no-progress"])
    assert code == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    for key in ("nmi", "ari", "consistency", "stability", "kpr"):
        assert key not in result, key
        assert all(key not in row for row in result["per_stage"])
    reason = "no visible part keypoint in the evaluated images"
    assert result["skipped"] == {"consistency": reason, "stability": reason, "nmi_ari": reason, "kpr": reason}
    assert 0 <= result["top1"] <= 100 and "fg_iou" in result
    assert f"skipped nmi_ari: {reason}" in capsys.readouterr().out


def test_empty_test_split_is_an_error_in_eval_and_train(world, run, tmp_path, capsys):
    data = _copy(world, tmp_path / "pw")
    split = data / "train_test_split.txt"
    split.write_text("".join(f"{line.split()[0]} 1\n" for line in split.read_text().splitlines()))
    code = main(["eval", str(run / "best"), "--data", str(data), "--out", str(tmp_path / "ev"), "--no-progress"])
    err = _one_line_error(capsys, code)
    assert f"the test split of {data} has no images" in err and "train_test_split.txt" in err
    assert not (tmp_path / "ev" / "eval.json").exists()
    cfg = _write_config(tmp_path / "cfg.yaml", data)
    code = main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--no-progress"])
    assert f"the test split of {data} has no images" in _one_line_error(capsys, code)
    assert not (tmp_path / "r" / "metrics.json").exists() and not (tmp_path / "r" / "last.pt").exists()


def test_unreadable_test_split_fails_train_instead_of_nan(world, tmp_path, capsys):
    data = _copy(world, tmp_path / "pw")
    test = CubDataset(data, "test")
    for row in test._rows:
        test.records.paths[row].write_bytes(b"junk")
    cfg = _write_config(tmp_path / "cfg.yaml", data, optim=dict(epochs=1))
    err = _one_line_error(capsys, main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--no-progress"]))
    assert f"no image of the test split of {data} could be read" in err and "replace the unreadable files" in err
    assert not (tmp_path / "r" / "metrics.json").exists()
    assert (tmp_path / "r" / "last.pt").is_file() and (tmp_path / "r" / "best" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------- 2. a failed --resume

@pytest.mark.parametrize("override,key", [("model.n_pro=6,4,3", "model.n_pro"), ("train.seed=4", "train.seed"),
                                          ("optim.batch_size=2", "optim.batch_size")])
def test_resume_with_inexact_change_is_refused_and_changes_nothing(run, tmp_path, capsys, override, key):
    r = _copy(run, tmp_path / "run")
    before = _snapshot(r)
    err = _one_line_error(capsys, main(["train", "--resume", str(r), override, "--no-progress"]))
    assert f"the config differs from the checkpoint's in {key}," in err and "start a new run with --out" in err
    assert _snapshot(r) == before
    # The run is intact: a plain resume of the finished run still works and trains nothing more.
    assert main(["train", "--resume", str(r), "--no-progress"]) == 0
    assert json.loads((r / "metrics.json").read_text())["steps"] == json.loads(before["metrics.json"])["steps"]


def test_resume_from_truncated_last_pt_names_the_file(run, tmp_path, capsys):
    r = _copy(run, tmp_path / "run")
    (r / "last.pt").write_bytes((r / "last.pt").read_bytes()[:1000])
    before = _snapshot(r)
    err = _one_line_error(capsys, main(["train", "--resume", str(r), "optim.epochs=2", "--no-progress"]))
    assert f"cannot resume: {r / 'last.pt'} is unreadable" in err and "finished checkpoint save" in err
    assert _snapshot(r) == before


def test_resume_with_more_epochs_continues(run, tmp_path):
    r = _copy(run, tmp_path / "run")
    steps = json.loads((r / "metrics.json").read_text())["steps"]
    assert main(["train", "--resume", str(r), "optim.epochs=2", "--no-progress"]) == 0
    assert json.loads((r / "metrics.json").read_text())["steps"] == 2 * steps
    assert yaml.safe_load((r / "config.yaml").read_text())["optim"]["epochs"] == 2


# ------------------------------------------------------------------------------------ 3. corrupt images

def test_eval_skips_a_fully_corrupt_batch_and_counts_it(world, run, tmp_path):
    data = _copy(world, tmp_path / "pw")
    test = CubDataset(data, "test")
    bad = test.records.paths[test._rows[0]]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated JPEG
    code = main(["eval", str(run / "best"), "--data", str(data), "--batch-size", "1", "--out", str(tmp_path / "ev"),
                 "--no-progress"])
    assert code == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["data"]["images"] == len(test) - 1 and result["data"]["images_listed"] == len(test)
    assert result["data"]["corrupt_images_skipped"] == 1  # read by the full and the crop pass: one file
    assert 0 <= result["top1"] <= 100 and "consistency" in result


def test_a_corrupt_training_image_counts_once_over_two_epochs(world, tmp_path):
    data = _copy(world, tmp_path / "pw")
    train = CubDataset(data, "train")
    bad = train.records.paths[train._rows[0]]
    bad.write_bytes(b"not an image")
    cfg = _write_config(tmp_path / "cfg.yaml", data, optim=dict(epochs=2))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["corrupt_images_skipped"] == 1


def test_corrupt_count_is_per_file(world, tmp_path):
    data = _copy(world, tmp_path / "pw")
    ds = CubDataset(data, "test", build_eval_transform(tiny_config(data).data, 56))
    ds.records.paths[ds._rows[1]].write_bytes(b"junk")
    reset_corrupt_count()
    assert ds[1] is None and ds[1] is None and ds[0] is not None
    assert corrupt_count() == 1
    reset_corrupt_count()


# ---------------------------------------------------------------------------- 4. messages, not tracebacks

def test_train_config_error_is_one_line_and_debug_shows_the_traceback(world, tmp_path, capsys):
    cfg = _write_config(tmp_path / "cfg.yaml", world)
    text = cfg.read_text().replace("base_lr: 1.0e-06", "base_lr: fast")
    assert "base_lr: fast" in text
    cfg.write_text(text)
    err = _one_line_error(capsys, main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]))
    assert err == "error: optim.base_lr='fast' (str) must be a number, e.g. optim.base_lr=0.001\n"
    assert not (tmp_path / "r").exists()
    from ivpt.config import ConfigError

    with pytest.raises(ConfigError, match="optim.base_lr"):
        main(["--debug", "train", "--config", str(cfg), "--out", str(tmp_path / "r")])


def test_train_dataset_error_is_one_line(tmp_path, capsys):
    cfg = _write_config(tmp_path / "cfg.yaml", tmp_path / "nowhere")
    err = _one_line_error(capsys, main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]))
    assert f"dataset folder {tmp_path / 'nowhere'} does not exist" in err


def test_train_cli_subprocess_prints_one_line(tmp_path):
    """A real process: exit status 2 and no traceback on stderr."""
    cfg = _write_config(tmp_path / "cfg.yaml", tmp_path / "nowhere", optim=dict(epochs=1))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "ivpt.cli", "train", "--config", str(cfg), "--out",
                           str(tmp_path / "r"), "optim.epochs=1.5"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("error: override 'optim.epochs=1.5': cannot read '1.5' as int; "
                                                    "give a whole number, e.g. 5")


@pytest.mark.parametrize("damage,expected", [
    ("truncate", "model.safetensors is unreadable"),
    ("bad_json", "config.json is not valid JSON"),
    ("unknown_key", "unknown key(s) ['bogus'] in section 'model'"),
])
def test_damaged_checkpoint_names_the_file(run, tmp_path, capsys, damage, expected):
    best = _copy(run / "best", tmp_path / "best")
    if damage == "truncate":
        (best / "model.safetensors").write_bytes((best / "model.safetensors").read_bytes()[:20])
    elif damage == "bad_json":
        (best / "config.json").write_text("{\n")
    else:
        meta = json.loads((best / "config.json").read_text())
        meta["model"]["bogus"] = 1
        (best / "config.json").write_text(json.dumps(meta))
    # No config.yaml beside the copy, so --data is needed; the checkpoint fails before any dataset is read.
    err = _one_line_error(capsys, main(["eval", str(best), "--out", str(tmp_path / "ev"), "--no-progress",
                                        "--data", str(tmp_path)]))
    assert expected in err and str(best) in err
    assert not (tmp_path / "ev" / "eval.json").exists()


# --------------------------------------------------------------------------------- 5. misleading messages

def _cub_error(capsys, root: Path, tmp_path: Path) -> str:
    cfg = _write_config(tmp_path / "cfg.yaml", root)
    return _one_line_error(capsys, main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]))


def test_non_utf8_byte_in_images_txt_names_file_and_line(world, tmp_path, capsys):
    data = _copy(world, tmp_path / "pw")
    path = data / "images.txt"
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b".jpg", b"\xe9.jpg")
    path.write_bytes(b"\n".join(lines))
    err = _cub_error(capsys, data, tmp_path)
    assert f"{path}, line 3, column" in err and "byte 0xe9 is not UTF-8; save the file as UTF-8" in err


def test_yaml_types_are_coerced_or_refused_with_the_key(world, tmp_path, capsys):
    cfg = _write_config(tmp_path / "cfg.yaml", world)
    cfg.write_text(cfg.read_text().replace("base_lr: 1.0e-06", "base_lr: 1e-3"))  # YAML 1.1: a string
    assert main(["info", "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out)["param_groups"][0]["lr"] == pytest.approx(1e-3 * 1e4)
    cfg.write_text(cfg.read_text().replace("epochs: 2", "epochs: 1.5"))
    err = _one_line_error(capsys, main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]))
    assert err == "error: optim.epochs=1.5 (float) must be a whole number, e.g. optim.epochs=2\n"


def test_empty_train_split_is_named(world, tmp_path, capsys):
    data = _copy(world, tmp_path / "pw")
    split = data / "train_test_split.txt"
    split.write_text("".join(f"{line.split()[0]} 0\n" for line in split.read_text().splitlines()))
    err = _cub_error(capsys, data, tmp_path)
    assert f"the train split of {data} has no images" in err and "batch_size" not in err


def test_img_size_not_a_multiple_of_the_patch(world, tmp_path, capsys):
    cfg = _write_config(tmp_path / "cfg.yaml", world)
    err = _one_line_error(capsys, main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"),
                                        "model.img_size=60"]))
    assert err == ("error: model.img_size=60 is not a multiple of the patch size 14 of "
                   "model.backbone='vit_small_patch14_reg4_dinov2'; use model.img_size=56 or 70\n")
    assert not (tmp_path / "r" / "last.pt").exists()


def test_unknown_class_id_names_file_and_line(world, tmp_path, capsys):
    data = _copy(world, tmp_path / "pw")
    path = data / "image_class_labels.txt"
    image_id = path.read_text().splitlines()[4].split()[0]
    _replace_line(path, 5, f"{image_id} 99")
    err = _cub_error(capsys, data, tmp_path)
    assert f"{path}, line 5: class id 99 is not in {data / 'classes.txt'}" in err
    assert "fix the id or add the class to classes.txt" in err and "num_classes" not in err


def test_eval_on_a_dataset_with_another_class_count_is_named(world, run, tmp_path, capsys):
    data = _copy(world, tmp_path / "pw")
    with (data / "classes.txt").open("a") as handle:
        handle.write("4 a_fourth_class\n")
    test = CubDataset(data, "test")
    image_id = test.meta.image_ids[test._rows[0]]
    labels = data / "image_class_labels.txt"
    lineno = next(i for i, line in enumerate(labels.read_text().splitlines(), 1) if line.split()[0] == image_id)
    _replace_line(labels, lineno, f"{image_id} 4")
    err = _one_line_error(capsys, main(["eval", str(run / "best"), "--data", str(data), "--out",
                                        str(tmp_path / "ev"), "--no-progress"]))
    assert err == (f"error: the dataset at {data} has 4 classes but the model has 3 (model.num_classes); evaluate "
                   "it on the dataset it was trained on (--data ROOT), or check the class files of this one\n")


@pytest.mark.parametrize("box,problem", [("nan 1 10 10", "is not finite"), ("1 1 -5 10", "both must be > 0")])
def test_bad_bounding_box_names_file_and_line(world, tmp_path, capsys, box, problem):
    data = _copy(world, tmp_path / "pw")
    path = data / "bounding_boxes.txt"
    image_id = path.read_text().splitlines()[1].split()[0]
    _replace_line(path, 2, f"{image_id} {box}")
    err = _cub_error(capsys, data, tmp_path)
    assert f"{path}, line 2: bounding box" in err and problem in err


# ------------------------------------------------------------------------------------ 6. work lost at the end

def test_eval_refuses_an_unwritable_out_before_evaluating(run, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    import ivpt.eval

    def never(*args, **kwargs):
        raise AssertionError("evaluated although the output folder is unwritable")

    monkeypatch.setattr(ivpt.eval, "evaluate_checkpoint", never)
    err = _one_line_error(capsys, main(["eval", str(run / "best"), "--out", str(blocker / "ev"), "--no-progress"]))
    assert f"cannot write to output folder {blocker / 'ev'}" in err and "choose another folder" in err


def test_report_refuses_an_unwritable_out_before_its_passes(run, world, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    import ivpt.explain.report

    def never(*args, **kwargs):
        raise AssertionError("ran the report passes although the output folder is unwritable")

    monkeypatch.setattr(ivpt.explain.report, "report_checkpoint", never)
    err = _one_line_error(capsys, main(["report", str(run / "best"), "--data", str(world), "--out",
                                        str(blocker / "rep"), "--weights", "random", "--device", "cpu"]))
    assert f"cannot write to output folder {blocker / 'rep'}" in err


def test_eval_prints_results_before_a_failing_write(run, tmp_path, capsys, monkeypatch):
    import ivpt.checkpoint

    def full_disk(path, text):
        raise OutputError(f"cannot write {path} (OSError: [Errno 28] No space left on device)")

    monkeypatch.setattr(ivpt.checkpoint, "atomic_write_text", full_disk)
    code = main(["eval", str(run / "best"), "--out", str(tmp_path / "ev"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2 and "top-1" in captured.out and "consistency" in captured.out
    assert captured.err == f"error: cannot write {tmp_path / 'ev' / 'eval.json'} (OSError: [Errno 28] No space " \
                           "left on device)\n"


def test_train_refuses_a_non_utf8_out_before_training(world, tmp_path, capsys):
    cfg = _write_config(tmp_path / "cfg.yaml", world)
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/run\xff")
    err = _one_line_error(capsys, main(["train", "--config", str(cfg), "--out", out, "--no-progress"]))
    assert "has a name that is not valid UTF-8" in err and "choose a UTF-8 name" in err
    assert not os.path.exists(os.fsencode(out))


def test_full_disk_names_the_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def full(obj, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputError) as info:
        atomic_torch_save({"a": 1}, tmp_path / "last.pt")
    assert str(info.value) == (f"cannot write {tmp_path / 'last.pt'} (RuntimeError: basic_ios::clear: iostream "
                               f"error); check the free space and the permissions of {tmp_path}")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- 7. explain, bad images

def test_explain_skips_unreadable_images(world, run, tmp_path, capsys):
    good = next((world / "images").rglob("*.jpg"))
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    code = main(["explain", str(run / "best"), str(junk), str(good), "--out", str(tmp_path / "ex"),
                 "--weights", "random", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.startswith(f"skipped {junk}: not a readable image (UnidentifiedImageError")
    assert "written 1 explanation(s)" in captured.out and "(1 unreadable image(s) skipped)" in captured.out
    assert (tmp_path / "ex" / f"00_{good.stem}_regions.png").is_file() and (tmp_path / "ex" / "index.html").is_file()


def test_explain_decompression_bomb_only_is_exit_2(run, tmp_path, capsys, monkeypatch):
    bomb = tmp_path / "bomb.png"
    Image.new("L", (64, 64)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 > 2 x 100: a "bomb"
    code = main(["explain", str(run / "best"), str(bomb), "--out", str(tmp_path / "ex"), "--weights", "random",
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2 and "DecompressionBombError" in captured.err
    assert captured.err.strip().splitlines()[-1] == "error: none of the 1 image(s) could be read; nothing was explained"
    assert not (tmp_path / "ex" / "index.html").exists()


# ---------------------------------------------------------------------------------------------- 8. minor

def test_resume_truncates_the_log_and_removes_stale_temporaries(run, tmp_path):
    r = _copy(run, tmp_path / "run")
    steps = json.loads((r / "metrics.json").read_text())["steps"]
    with (r / "log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert int(rows[-1]["step"]) == steps
    # What a kill after two more logged steps, in the middle of a checkpoint write, leaves behind:
    with (r / "log.csv").open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        for step in (steps + 1, steps + 2):
            writer.writerow({**rows[-1], "step": step})
    (r / ".last.pt.k1ll3d.tmp").write_bytes(b"half")
    assert main(["train", "--resume", str(r), "optim.epochs=2", "--no-progress"]) == 0
    with (r / "log.csv").open() as handle:
        logged = [int(row["step"]) for row in csv.DictReader(handle)]
    assert logged == sorted(set(logged)) and logged[-1] == 2 * steps
    assert not list(r.glob(".*.tmp"))


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_torch_save({"a": 1}, tmp_path / "a.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o640


def test_tiny_image_and_outside_annotation_warned_once(world, tmp_path, caplog):
    data = _copy(world, tmp_path / "pw")
    ds = CubDataset(data, "train", build_eval_transform(tiny_config(data).data, 56), with_parts=True)
    path = ds.records.paths[ds._rows[0]]
    Image.new("RGB", (1, 1)).save(path, format="JPEG")
    with caplog.at_level(logging.WARNING, logger="ivpt.data"):
        ds[0]
        ds[0]
    warnings = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"image {path} (1x1): it is only 1x1 pixels; its bounding box")
    assert "visible keypoint(s) lie outside it; check its annotation" in warnings[0]
    assert not math.isnan(float(ds[0]["image"].sum()))
