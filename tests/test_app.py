"""``ivpt app``: the session's answers against direct recomputations on tiny trained runs (tests/fixtures/runs), bad
inputs, the command's errors, and — with gradio, Selenium, Chromium and chromedriver installed — the page driven by a
real headless browser (upload, regions, a concept, a screenshot that is neither blank nor an error page)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ivpt.app import AppInputError, AppSession, find_checkpoint, read_image
from ivpt.app.views import concept_page, contrast_view, image_page, model_page, region_images
from ivpt.checkpoint import CheckpointError
from ivpt.cli import main
from ivpt.data.synth import make_partworld

FIXTURES = Path(__file__).parent / "fixtures" / "runs"
EVAL = {"top1": 62.5, "top5": 100.0, "consistency": 41.0, "stability": 77.5,
        "per_stage": [{"stage": 0, "n_pro": 5, "consistency": 41.0, "stability": 77.5},
                      {"stage": 2, "n_pro": 3, "consistency": 30.0, "stability": 70.0}]}


def _copy_run(kind: str, out: Path) -> Path:
    """A fixture run without its last.pt, in a folder the test may write (eval.json)."""
    shutil.copytree(FIXTURES / kind, out, ignore=shutil.ignore_patterns("last.pt"))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The part-world the fixture runs were trained on (tests/fixtures/make_runs.py), made again."""
    root = tmp_path_factory.mktemp("world")
    make_partworld(root, classes=3, per_class=8, size=56, seed=0, test_fraction=0.25)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = _copy_run("ivpt", tmp_path_factory.mktemp("app") / "run")
    (run / "eval.json").write_text(json.dumps(EVAL))
    return run


@pytest.fixture(scope="module")
def session(run, world) -> AppSession:
    return AppSession.open(run, data=str(world), device="cpu", gallery_topk=3)


def _forward(session: AppSession, x: torch.Tensor):
    session.model.eval()
    with torch.no_grad():
        return session.model(x[None])


def test_find_checkpoint_accepts_a_run_or_its_checkpoint_and_names_what_is_wrong(run, tmp_path):
    assert find_checkpoint(run) == run / "best" and find_checkpoint(run / "best") == run / "best"
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="is not a run: it holds no config.json"):
        find_checkpoint(tmp_path)
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(CheckpointError, match="without a checkpoint yet"):
        find_checkpoint(tmp_path)


def test_cli_refuses_what_is_not_a_run_in_one_line(tmp_path, capsys):
    for path in (tmp_path, tmp_path / "nowhere"):
        assert main(["app", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "is not a run" in err


def test_cli_without_gradio_says_how_to_install_it(run, capsys, monkeypatch):
    import importlib.util

    import ivpt.app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert ivpt.app.gradio_missing() == "the app needs gradio, which is not installed: pip install -e '.[app]'"
    monkeypatch.undo()
    monkeypatch.setattr(ivpt.app, "gradio_missing", lambda: "the app needs gradio: pip install -e '.[app]'")
    assert main(["app", str(run)]) == 2
    assert capsys.readouterr().err == "error: the app needs gradio: pip install -e '.[app]'\n"


def test_the_library_never_imports_gradio():
    code = "import sys, ivpt, ivpt.app, ivpt.app.views, ivpt.cli.main, ivpt.cli.app; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_an_image_result_is_the_models_answer(session):
    item = session.dataset[1]
    result = session.dataset_image(1)
    out = _forward(session, item["image"])
    np.testing.assert_allclose(result.logits, out.logits[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(result.probs.sum(), 1.0, atol=1e-5)
    assert result.label == item["label"] and result.predicted == int(out.logits[0].argmax())
    assert [c for c, _ in result.top(3)] == out.logits[0].argsort(descending=True).tolist()
    assert [(st.index, st.maps.shape[0]) for st in result.stages] == session.stages == [(0, 5), (1, 4), (2, 3)]
    for st, maps, counts in zip(result.stages, out.maps, out.region_counts):
        np.testing.assert_allclose(st.maps, maps[0].numpy(), atol=1e-6)
        assert (st.present == (counts[0] > 0).numpy()).all()
    # evidence: the parts' share of the logits (1 - global_share)/N per part, the rest is the global token's
    w_part = session.model.logit_weights()[0]
    np.testing.assert_allclose(result.evidence, out.part_logits[0].numpy() * w_part, atol=1e-6)
    np.testing.assert_allclose(result.evidence.sum(0) + result.global_evidence, result.logits, atol=1e-5)
    assert np.abs(result.global_evidence).max() > 0  # the fixture has model.global_part
    assert result.hierarchy is not None and len(result.hierarchy.assignments) == 2


def test_why_a_and_not_b_is_the_logit_difference_split_over_concepts(session):
    result = session.dataset_image(2)
    out = _forward(session, session.dataset[2]["image"])
    logits = out.logits[0].numpy()
    evidence = out.part_logits[0].numpy() * session.model.logit_weights()[0]  # (N, C), recomputed
    global_part = logits - evidence.sum(0)
    for a in range(3):
        for b in range(3):
            contrast = result.contrast(a, b)
            np.testing.assert_allclose(contrast.per_concept, evidence[:, a] - evidence[:, b], atol=1e-5)
            assert contrast.per_concept.sum() == pytest.approx(
                (logits[a] - logits[b]) - (global_part[a] - global_part[b]), abs=1e-5)
            assert contrast.total == pytest.approx(logits[a] - logits[b], abs=1e-5)
    drawing, text = contrast_view(session, result, None)
    runner_up = result.top(2)[1][0]
    assert drawing.ndim == 3 and drawing.std() > 10
    assert f"not **{session.class_name(runner_up)}**" in text
    assert f"{logits[result.predicted] - logits[runner_up]:+.2f}" in text


def test_each_image_is_computed_once_and_kept_by_its_hash(run, world, monkeypatch):
    s = AppSession.open(run, data=str(world), device="cpu", cache_size=2)
    calls = []
    forward = s.model.forward
    monkeypatch.setattr(s.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    x = s.dataset[0]["image"]
    first = s.explain_tensor(x)
    assert s.explain_tensor(x.clone()) is first and len(calls) == 1  # equal pixels, equal key: no second pass
    assert s.cached(first.key) is first
    s.explain_tensor(s.dataset[1]["image"])
    s.explain_tensor(s.dataset[2]["image"])  # the cache holds 2: the oldest goes
    assert len(calls) == 3 and s.cached(first.key) is None
    page = image_page(s, s.explain_tensor(s.dataset[2]["image"]), alpha=0.3)
    assert len(calls) == 3 and region_images(s.cached(page.key), 0.3) is page.regions  # drawn once per opacity


def test_concept_presence_is_the_share_of_images_where_it_wins_a_patch(session):
    seen = []
    index = session.index(lambda done, total: seen.append((done, total)))
    assert session.index() is index and seen[-1] == (len(session.dataset), len(session.dataset))
    counts = [np.zeros(n) for _, n in session.stages]
    for i in range(len(session.dataset)):
        out = _forward(session, session.dataset[i]["image"])
        for j, c in enumerate(out.region_counts):
            counts[j] += (c[0] > 0).numpy()
    for j in range(len(session.stages)):
        np.testing.assert_allclose(index.presence[j], counts[j] / len(session.dataset))
    assert index.num_images == len(session.dataset) == 6


def test_concept_view_parents_children_patches_and_stage_scores(session):
    h = session.index().hierarchy
    info = session.concept(0, 1)
    row = h.assignments[0][1]
    assert [n for n, _ in info.parents] == sorted(range(2), key=lambda n: -row[n]) and info.children == []
    assert [w for _, w in info.parents] == pytest.approx(sorted(row, reverse=True))
    assert info.scores == {"consistency": 41.0, "stability": 77.5}
    # every image is a candidate for every concept: the gallery holds the gallery_topk=3 images whose map of
    # concept 1 peaks highest, best first, each captioned with its dataset index and that peak
    peaks = [float(_forward(session, session.dataset[i]["image"]).maps[0][0, 1].max())
             for i in range(len(session.dataset))]
    assert len(info.patches) == 3 and all(crop.ndim == 3 and crop.shape[-1] == 3 for crop, _ in info.patches)
    listed = [re.match(r"image #(\d+) · (\d+\.\d\d)", caption) for _, caption in info.patches]
    assert all(listed)
    chosen = [int(m.group(1)) for m in listed]
    assert len(set(chosen)) == 3
    # the index runs batches, this recomputation one image at a time: the peaks agree to float32 rounding
    eps = 1e-5
    assert all(abs(float(m.group(2)) - peaks[i]) <= 0.005 + eps for m, i in zip(listed, chosen))
    assert all(peaks[a] >= peaks[b] - eps for a, b in zip(chosen, chosen[1:]))
    assert min(peaks[i] for i in chosen) >= max(p for i, p in enumerate(peaks) if i not in chosen) - eps
    coarse = session.concept(2, 0)
    winners = {(i, k) for i, q in enumerate(h.assignments) for k in range(q.shape[0])
               if np.isfinite(q[k]).all() and q[k].argmax() == 0}
    assert {(i, k) for i, k, _ in coarse.children} == winners and coarse.parents == []
    assert coarse.scores == {"consistency": 30.0, "stability": 70.0} and session.concept(1, 0).scores == {}
    page = concept_page(session, 2, 0)
    assert "Present (claims at least one patch)" in page.text and "consistency 30.0 %" in page.text
    assert page.hierarchy is not None and page.hierarchy.std() > 10
    with pytest.raises(ValueError, match="concepts 0 to 1"):
        session.concept(2, 2)  # the background is not a concept


def test_image_page_shows_every_stage_the_hierarchy_and_the_evidence(session):
    result = session.dataset_image(0)
    page = image_page(session, result, alpha=0.7)
    assert page.key == result.key and page.status.startswith(f"**Predicted: {session.class_name(result.predicted)}**")
    assert "true class" in page.status and list(page.top) == [session.class_name(c) for c, _ in result.top(3)]
    assert len(page.regions) == 3 and all(img.std() > 10 for img, _ in page.regions)
    assert page.regions[0][1].startswith("stage 0 · input of block 2 · 4 foreground + background · present:")
    assert page.hierarchy is not None and page.evidence is not None and "logit difference" in page.evidence_text
    first = image_page(session, result, alpha=0.7, details=False)  # what the page shows while the rest is drawn
    assert first.regions is page.regions and first.evidence is None and first.hierarchy is None
    faint, strong = (region_images(result, a)[0][0].astype(float) for a in (0.1, 0.9))
    assert np.abs(faint - strong).mean() > 1  # the opacity slider changes the drawing


def test_model_page_shows_eval_json_per_stage_scores_and_concept_health(session):
    page = model_page(session)
    rows = {r[0]: r for r in page.metrics[1]}
    assert rows["top-1"][1] == "62.5 %" and rows["consistency"][1] == "41.0 %"
    assert page.per_stage[0][:2] == ["stage", "prototypes"] and page.per_stage[1][1][0] == "2"
    assert [r[0] for r in page.health[1]] == ["stage 0", "stage 1", "stage 2"]  # alive_s*/entropy_s* of log.csv
    assert page.curves is not None and page.curves.std() > 10 and "eval.json" in page.summary


def _write(path: Path, mode: str, size: tuple[int, int], colour) -> Path:
    Image.new(mode, size, colour).save(path)
    return path


def test_bad_inputs_are_refused_or_converted(session, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(AppInputError, match="notes.png is not an image the app can read"):
        session.upload(text)
    huge = _write(tmp_path / "huge.png", "1", (10000, 10000), 0)  # 100 MP, a few kB on disk
    with pytest.raises(AppInputError, match=r"huge.png is 10000 × 10000 px \(100 MP\).*downscale it first"):
        read_image(huge)
    good = _write(tmp_path / "ok.jpg", "RGB", (300, 200), (200, 30, 30))
    with pytest.raises(AppInputError, match="is 300 × 200 px"):
        read_image(good, max_pixels=1000)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(AppInputError, match="cut.jpg is not an image"):
        read_image(truncated)
    grey = read_image(_write(tmp_path / "grey.png", "L", (40, 60), 128))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (128, 128, 128)
    clear = read_image(_write(tmp_path / "clear.png", "RGBA", (40, 40), (0, 0, 0, 0)))
    assert clear.mode == "RGB" and clear.getpixel((5, 5)) == (255, 255, 255)  # transparent: laid on white
    result = session.upload(tmp_path / "clear.png")
    assert result.image.shape == (56, 56, 3) and result.label is None


@pytest.mark.parametrize("kind", ["linear", "vpt_deep", "last_layer_parts"])
def test_other_kinds_show_what_they_have(kind, tmp_path, world):
    s = AppSession.open(_copy_run(kind, tmp_path / kind), data=str(world), device="cpu")
    page = image_page(s, s.dataset_image(0))
    assert page.status.startswith("**Predicted:") and len(page.top) == 3 and page.hierarchy is None
    if kind == "linear":
        assert s.stages == [] and page.regions == [] and "has no part maps" in page.status
    else:
        assert len(page.regions) == 1 and s.concept(0, 0).num_images == len(s.dataset)
    assert (page.evidence is not None) == (kind == "last_layer_parts")
    if kind == "vpt_deep":
        assert "no evidence per concept" in page.status and "has no part maps" not in page.status
    assert model_page(s).metrics[1]  # metrics.json, converted to eval.json's keys


def test_without_its_dataset_the_app_still_explains_uploads(run, tmp_path):
    s = AppSession.open(run, device="cpu")  # data.root of the fixture was deleted after training
    assert s.dataset is None and "--data ROOT" in s.dataset_note and s.dataset_choices() == []
    image = _write(tmp_path / "x.png", "RGB", (64, 64), (10, 200, 10))
    assert image_page(s, s.upload(image)).status.startswith("**Predicted:")


def test_page_callbacks_answer_in_two_steps_and_report_bad_input(session, tmp_path):
    pytest.importorskip("gradio", reason="needs gradio (pip install -e '.[app]')")
    from ivpt.app import ui

    image = _write(tmp_path / "x.png", "RGB", (80, 60), (30, 90, 200))
    first, whole = list(ui.on_upload(session, str(image), 0.5, ui.RUNNER_UP))
    key, status, _, top, regions, hierarchy, evidence, text = first
    assert status.startswith("**Predicted:") and len(regions) == 3 and hierarchy is None and evidence is None
    assert whole[: ui.SENT_FIRST] == (ui.gr.update(),) * ui.SENT_FIRST  # sent already: left as they are
    assert whole[5] is not None and whole[6] is not None and "logit difference" in whole[7]
    assert len(ui.on_alpha(session, key, 0.9)) == 3 and ui.on_alpha(session, None, 0.9) == []
    drawing, why = ui.on_versus(session, key, 2)
    assert drawing is not None and (f"not **{session.class_name(2)}**" in why or "pick another class" in why)
    bogus = tmp_path / "bogus.jpg"
    bogus.write_bytes(b"\x00" * 10)
    (error,) = list(ui.on_upload(session, str(bogus), 0.5, ui.RUNNER_UP))
    assert error[0] is None and error[1].startswith("**Cannot explain this input.**") and error[4] == []
    concepts, info, patches, _ = ui.on_stage(session, 1)
    assert [c for _, c in concepts["choices"]] == [0, 1, 2] and info.startswith("### Concept 0 of stage 1")
    assert patches and ui.on_concept(session, 1, 9)[0].startswith("**Cannot show this concept.**")


# ------------------------------------------------------------------------------------------ a real browser
def _browser_missing() -> str | None:
    needs = {"gradio": find_spec("gradio"), "selenium": find_spec("selenium"),
             "chromium": shutil.which("chromium"), "chromedriver": shutil.which("chromedriver")}
    missing = [name for name, found in needs.items() if not found]
    return f"needs {', '.join(missing)} (pip install -e '.[test,app]'; apt-get install chromium chromium-driver)" \
        if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_served(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"ivpt app exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"ivpt app did not answer on {url} within {timeout:.0f} s")


@pytest.fixture
def served_app(run, world):
    """`ivpt app RUN --data WORLD` in a subprocess on a free local port; its URL."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(run.parent / "gradio")}
    proc = subprocess.Popen([sys.executable, "-m", "ivpt.cli", "app", str(run), "--data", str(world), "--port",
                             str(port), "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_served(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _chrome(monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1700",
                "--disable-background-networking", "--disable-component-update", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def _images_shown(driver, selector: str) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].filter(i => i.complete && i.naturalWidth > 0).length",
        f"{selector} img")


# Skipped only outside CI: `bash .ci/run` installs all four, and there (CI=true) a missing one is a failure.
@pytest.mark.skipif(_browser_missing() is not None and not os.environ.get("CI"), reason=str(_browser_missing()))
def test_the_page_in_a_real_browser(served_app, world, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chrome(monkeypatch)
    try:
        driver.get(served_app)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        status = lambda d: d.find_element(By.ID, "status").text  # noqa: E731
        # a file that is not an image: a clear message in the page, and the app keeps running
        bogus = tmp_path / "bogus.png"
        bogus.write_text("not an image")
        driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(bogus))
        wait.until(lambda d: "Cannot explain this input" in status(d))
        assert "bogus.png is not an image the app can read" in status(driver)
        driver.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        image = next((world / "images").rglob("*.jpg"))
        driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(image))
        wait.until(lambda d: status(d).startswith("Predicted:") and _images_shown(d, "#regions") == 3
                   and _images_shown(d, "#hierarchy") == 1 and _images_shown(d, "#evidence") == 1)
        assert "Why" in driver.find_element(By.ID, "evidence-text").text
        next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Concept").click()
        wait.until(lambda d: _images_shown(d, "#concept-gallery") >= 1 and "Present" in
                   d.find_element(By.ID, "concept-info").text and _images_shown(d, "#dataset-hierarchy") == 1)
        shot = tmp_path / "app.png"
        driver.save_screenshot(str(shot))
        text = driver.find_element(By.TAG_NAME, "body").text
        outside = [url for url in _requested(driver) if not url.startswith(
            ("http://127.0.0.1", "http://localhost", "data:", "blob:", "about:", "chrome"))]
    finally:
        driver.quit()
    assert "Concept 0 of stage 2" in text and "Error" not in text and not outside, outside
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.std() > 20 and (pixels < 200).mean() > 0.05  # not a blank page
    artifacts = os.environ.get("IVPT_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / "app_screenshot.png")


def _requested(driver) -> list[str]:
    """Every URL the page asked for (Chrome's performance log)."""
    messages = (json.loads(entry["message"])["message"] for entry in driver.get_log("performance"))
    return [m["params"]["request"]["url"] for m in messages if m["method"] == "Network.requestWillBeSent"]
