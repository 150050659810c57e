"""Fault injection in the commands after training (``eval``, ``explain``, ``report``, ``compare``): each test breaks
one thing in the tiny part-world of :mod:`tests.test_faults` (3 classes x 6 images, 56 px) or in a tiny run trained
on it, drives the ``ivpt`` command line and asserts the exit code, the one-line message and the files written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import ivpt.compare as C
from ivpt.cli import main
from ivpt.config import MODEL_KINDS
from ivpt.data import CubDataset

from .test_engine import tiny_config
from .test_faults import _copy, _one_line_error, run, world  # noqa: F401  (fixtures)


def _train(root: Path, out: Path, **model) -> Path:
    """A one-step run of ``model`` settings on ``root`` in the fresh folder ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(root, model=model, optim=dict(epochs=1), train=dict(max_steps=1))
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert main(["train", "--config", str(path), "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def runs(world, run, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """One finished run per model kind on ``world`` (``ivpt``: the global part on), plus ``ivpt-nogp`` (do not
    modify: copy first)."""
    base = tmp_path_factory.mktemp("kinds")
    found = {"ivpt": run, "ivpt-nogp": _train(world, base / "ivpt-nogp", global_part=False)}
    for kind in MODEL_KINDS:
        if kind != "ivpt":
            found[kind] = _train(world, base / kind, kind=kind)
    return found


def _test_images(world: Path) -> list[Path]:  # noqa: F811
    test = CubDataset(world, "test")
    return [test.records.paths[r] for r in test._rows]


def _eval(best: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["eval", str(best), "--data", str(data), "--out", str(out), "--no-progress", *extra])


# ------------------------------------------------------------------------- 1. explain over several batches

@pytest.mark.parametrize("name", ["ivpt", "ivpt-nogp"])
def test_explain_more_images_than_one_batch(world, runs, tmp_path, capsys, name):  # noqa: F811
    images = sorted((world / "images").rglob("*.jpg"))[:5]  # 2 x batch + 1
    out = tmp_path / "ex"
    code = main(["explain", str(runs[name] / "best"), *map(str, images), "--out", str(out), "--batch-size", "2",
                 "--weights", "random", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "written 5 explanation(s)" in capsys.readouterr().out
    for i, path in enumerate(images):
        assert (out / f"{i:02d}_{path.stem}_evidence.png").is_file()
    assert (out / "index.html").is_file()


def test_explanation_concat_keeps_the_global_evidence():
    from ivpt.explain import Explanation, explain

    from .conftest import tiny_model

    model = tiny_model(global_part=True)
    x = torch.randn(5, 3, 56, 56)
    whole = explain(model, x)
    parts = Explanation.concat([explain(model, x[:2]), explain(model, x[2:4]), explain(model, x[4:])])
    assert parts.global_evidence.shape == whole.global_evidence.shape
    assert torch.allclose(torch.from_numpy(parts.global_evidence), torch.from_numpy(whole.global_evidence),
                          atol=1e-5)


# ------------------------------------------------------------------------------ 2. report of every kind

@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_report_of_every_model_kind(world, runs, tmp_path, capsys, kind):  # noqa: F811
    out = tmp_path / "rep"
    code = main(["report", str(runs[kind] / "best"), "--data", str(world), "--out", str(out), "--samples", "3",
                 "--weights", "random", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    html = (out / "index.html").read_text()
    assert 'id="metrics"' in html and 'id="samples"' in html
    assert html.count('class="card sample"') == 3
    if kind == "ivpt":
        assert 'id="hierarchy"' in html and 'id="gallery-' in html
    else:  # no fine-to-coarse assignments: the section says why
        assert "has no concept hierarchy" in html
    if kind == "linear":  # no part maps at all
        assert 'id="gallery-' not in html and "has no part maps" in html
    elif kind != "ivpt":
        assert 'id="gallery-' in html


# --------------------------------------------------------------------------- 3. classes numbered otherwise

def _renumber_classes(root: Path, new_id: dict[int, int], rename: dict[int, str] | None = None) -> None:
    """Give every class of a CUB-layout dataset the id ``new_id[old]`` (classes.txt and image_class_labels.txt),
    and the names ``rename[old]`` where given."""
    rename = rename or {}
    classes = []
    for line in (root / "classes.txt").read_text().splitlines():
        cid, name = line.split(maxsplit=1)
        classes.append((new_id[int(cid)], rename.get(int(cid), name)))
    (root / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in sorted(classes)))
    labels = root / "image_class_labels.txt"
    rows = [line.split() for line in labels.read_text().splitlines()]
    labels.write_text("".join(f"{image} {new_id[int(c)]}\n" for image, c in rows))


def test_eval_on_classes_numbered_otherwise_remaps_the_labels(world, run, tmp_path, capsys):  # noqa: F811
    assert _eval(run / "best", world, tmp_path / "a", "--metrics", "acc") == 0
    original = json.loads((tmp_path / "a" / "eval.json").read_text())
    data = _copy(world, tmp_path / "pw")
    _renumber_classes(data, {1: 3, 2: 1, 3: 2})
    assert CubDataset(data, "test").class_names != CubDataset(world, "test").class_names
    capsys.readouterr()
    assert _eval(run / "best", data, tmp_path / "b", "--metrics", "acc") == 0
    assert "labels remapped by class name" in capsys.readouterr().err
    permuted = json.loads((tmp_path / "b" / "eval.json").read_text())
    for key in ("top1", "top5", "balanced_top1"):
        assert permuted[key] == pytest.approx(original[key]), key
    assert permuted["data"]["labels_remapped"] is True and "labels_remapped" not in original["data"]


def test_eval_on_a_renamed_class_is_refused(world, run, tmp_path, capsys):  # noqa: F811
    data = _copy(world, tmp_path / "pw")
    _renumber_classes(data, {1: 1, 2: 2, 3: 3}, rename={2: "002.a_bird_nobody_trained_on"})
    err = _one_line_error(capsys, _eval(run / "best", data, tmp_path / "ev"))
    assert f"the dataset at {data} names its classes differently from the checkpoint" in err
    assert "002.a_bird_nobody_trained_on" in err and "002.yellow_head_brown_body_striped_wing_forked_tail" in err
    assert not (tmp_path / "ev" / "eval.json").exists()
    # the report marks predictions right or wrong against the same labels: refused alike
    err = _one_line_error(capsys, main(["report", str(run / "best"), "--data", str(data), "--out",
                                        str(tmp_path / "rep"), "--weights", "random", "--device", "cpu"]))
    assert f"the dataset at {data} names its classes differently from the checkpoint" in err


# --------------------------------------------------------------------------------- 4. nothing was scored

def test_eval_with_every_test_image_unreadable_is_an_error(world, run, tmp_path, capsys):  # noqa: F811
    data = _copy(world, tmp_path / "pw")
    for path in _test_images(data):
        path.write_bytes(b"junk")
    err = _one_line_error(capsys, _eval(run / "best", data, tmp_path / "ev"))
    assert f"no image of the test split of {data} could be read" in err and "replace the unreadable files" in err
    assert not (tmp_path / "ev" / "eval.json").exists()


# ------------------------------------------------------------------------------------- 5. NaN checkpoint

def test_eval_refuses_a_checkpoint_with_nan_parameters(world, run, tmp_path, capsys):  # noqa: F811
    from safetensors.torch import load_file, save_file

    best = _copy(run / "best", tmp_path / "best")
    tensors = load_file(best / "model.safetensors")
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, best / "model.safetensors", metadata={"format": "pt"})
    err = _one_line_error(capsys, _eval(best, world, tmp_path / "ev"))
    assert str(best) in err and "non-finite" in err
    assert not (tmp_path / "ev" / "eval.json").exists()
    image = str(_test_images(world)[0])
    for command in (["explain", str(best), image, "--out", str(tmp_path / "ex")],
                    ["report", str(best), "--data", str(world), "--out", str(tmp_path / "rep")]):
        err = _one_line_error(capsys, main([*command, "--weights", "random", "--device", "cpu"]))
        assert str(best) in err and "non-finite" in err
    assert not (tmp_path / "ex" / "index.html").exists() and not (tmp_path / "rep" / "index.html").exists()


# ------------------------------------------------------------------------- 6-8. compare: stage, reuse, tabulate

def _record(kind: str, stage: dict | None, top1: float) -> dict:
    evaluation = {"top1": top1, "eval_protocol": "corrected", "protocol": {"protocol": "corrected"},
                  "data": {"root": "/d", "split": "test", "format": "cub", "images": 4}}
    if stage is not None:
        evaluation.update(stage=stage, consistency=10.0)
    return {"kind": kind, "seed": 0, "run": f"/runs/{kind}", "metrics": {"steps": 2}, "eval": evaluation}


def test_compare_md_labels_each_row_with_its_own_stage():
    """IVPT is scored at eval.stage (auto: n_pro[-3]); a VPT's one attention map is its final stage."""
    records = [_record("ivpt", {"index": 0, "n_pro": 5, "spec": "auto"}, 40.0),
               _record("vpt_deep", {"index": 2, "n_pro": 11, "spec": "auto"}, 30.0),
               _record("linear", None, 20.0)]
    table = C.format_markdown({"runs": records, "summary": C.summarise(records)})
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in table.splitlines() if line.startswith("| ")}
    assert cells["method"][1] == cells["run"][1] == "stage"
    assert cells["ivpt"][1] == cells["ivpt-seed0"][1] == "0 (5 prototypes)"
    assert cells["vpt_deep"][1] == cells["vpt_deep-seed0"][1] == "2 (11 prototypes)"
    assert cells["linear"][1] == cells["linear-seed0"][1] == C.DASH
    assert "interpretability at stage 0 (5 prototypes)" not in table


def test_compare_re_evaluates_an_eval_json_made_with_other_settings(world, tmp_path, capsys, monkeypatch):  # noqa: F811
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(world, optim=dict(epochs=1), train=dict(max_steps=1)).to_dict()))
    out = tmp_path / "cmp"
    command = ["compare", "--config", str(cfg), "--kinds", "linear", "--seeds", "0", "--out", str(out),
               "--no-progress"]
    assert main(command) == 0
    run_dir = out / "runs" / "linear-seed0"
    first = json.loads((run_dir / "eval.json").read_text())
    assert first["data"]["split"] == "test" and first["protocol"]["protocol"] == "corrected"
    # `ivpt eval` into the run folder with other settings overwrites its eval.json
    assert main(["eval", str(run_dir / "best"), "--split", "train", "--protocol", "reference", "--metrics", "acc",
                 "--no-progress"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(C, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "eval.json was made with other settings" in printed and "finished earlier, reusing" not in printed
    again = json.loads((run_dir / "eval.json").read_text())
    assert again["data"]["split"] == "test" and again["protocol"]["protocol"] == "corrected"
    assert again["metrics_requested"] == first["metrics_requested"] and again["top1"] == first["top1"]
    assert json.loads((out / "compare.json").read_text())["runs"][0]["eval"]["data"]["split"] == "test"
    # and when it matches, it is reused
    monkeypatch.setattr(C, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated again"))
    assert main(command) == 0
    assert "finished earlier, reusing" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated", "not_a_dict", "no_data"])
def test_tabulate_with_a_damaged_eval_json_names_the_file(tmp_path, capsys, damage):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"kind": "linear"}, "train": {"seed": 0}}))
    good = json.dumps(_record("linear", None, 20.0)["eval"])
    text = {"truncated": good[: len(good) // 2], "not_a_dict": "[1, 2]", "no_data": json.dumps({"top1": 1.0})}
    (run_dir / "eval.json").write_text(text[damage])
    err = _one_line_error(capsys, main(["compare", "--tabulate", str(run_dir), "--out", str(tmp_path / "t")]))
    assert str(run_dir / "eval.json") in err and f"ivpt eval {run_dir / 'best'}" in err
    assert not (tmp_path / "t" / "compare.json").exists()


# ------------------------------------------------------------------------------- 9. counts must be positive

@pytest.mark.parametrize("command,option", [
    ("explain", "--batch-size"), ("explain", "--topk"), ("explain", "--img-size"),
    ("report", "--limit"), ("report", "--batch-size"), ("report", "--samples"), ("report", "--gallery-topk"),
    ("eval", "--batch-size"), ("compare", "--jobs"),
])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_counts_must_be_positive(run, tmp_path, capsys, command, option, value):  # noqa: F811
    args = {"explain": [str(run / "best"), str(tmp_path / "x.jpg"), "--out", str(tmp_path / "o")],
            "report": [str(run / "best"), "--out", str(tmp_path / "o")],
            "eval": [str(run / "best")],
            "compare": ["--out", str(tmp_path / "o")]}[command]
    with pytest.raises(SystemExit) as info:
        main([command, *args, option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"ivpt {command}: error: argument {option}: {value} is not a positive whole number, e.g. 8 "
                   f"(see ivpt {command} --help)\n")
    assert not (tmp_path / "o").exists()


def test_report_workers_may_be_zero_but_not_negative(run, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit):
        main(["report", str(run / "best"), "--out", str(tmp_path / "o"), "--workers", "-1"])
    assert "argument --workers: -1 is not a whole number >= 0" in capsys.readouterr().err
