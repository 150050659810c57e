"""Click latency of ``ivpt app``: what each click of the page computes, timed on a trained run after the model is
loaded (docs/app.md quotes the numbers).

    python benchmarks/app_latency.py RUN_DIR [--data ROOT] [--images 5] [--limit N] [--browser [--screenshot PNG]]

Without ``--browser`` the views are timed in this process (:mod:`ivpt.app.views`: what a click computes and draws,
without the web server). With ``--browser`` the app is served on 127.0.0.1 and headless Chromium (Debian's
chromium + chromium-driver, Selenium) uploads each image and waits until the prediction and every region image
are shown: the whole click as a person sees it; ``--screenshot`` then saves the page of the last image (how
docs/figures/app.png was made). Prints JSON: per action the median and the maximum in seconds,
the machine's CPU count, torch's threads and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ivpt.app import AppSession
from ivpt.app.views import concept_page, contrast_view, image_page, region_images


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3), "runs": len(times)}


def in_process(session: AppSession, images: int) -> dict:
    """A new image (the forward pass, then the prediction and regions: the first answer; then the evidence and
    hierarchy: the whole page), the same image again, the opacity slider, the 'why not' picker, the dataset index
    (once), then a concept of each map stage."""
    first, whole = [], []
    picks = range(min(images, len(session.dataset)))
    for i in picks:
        start = time.perf_counter()
        result = session.dataset_image(i)
        image_page(session, result, details=False)
        first.append(time.perf_counter() - start)
        image_page(session, result)
        whole.append(time.perf_counter() - start)
    results = [session.dataset_image(i) for i in picks]
    out = {"new image: first answer": summary(first), "new image: whole page": summary(whole),
           "same image again": summary([timed(lambda r=r: image_page(session, r)) for r in results]),
           "opacity slider": summary([timed(lambda r=r: region_images(r, 0.8)) for r in results]),
           "why-not class": summary([timed(lambda r=r: contrast_view(session, r, int(r.top(3)[-1][0])))
                                     for r in results])}
    if session.stages:
        out["dataset index (once)"] = summary([timed(session.index)])
        out["concept view"] = summary([timed(lambda j=j: concept_page(session, j, 0))
                                       for j in range(len(session.stages)) for _ in range(2)])
    return out


def in_browser(session: AppSession, images: int, port: int, screenshot: str | None = None) -> dict:
    """Each image uploaded through the page; seconds until its prediction and region images show (the first
    answer), and until the evidence and hierarchy drawings show too (the whole page)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from ivpt.app import serve

    app = serve(session, port=port, block=False, quiet=True)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1600", "--hide-scrollbars",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    first, whole = [], []
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(min(images, len(session.dataset))):
                path = Path(tmp) / f"image{i}.png"
                Image.fromarray(session.dataset_image(i).image).save(path)
                start = time.perf_counter()
                driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))
                wait.until(lambda d: _shown(d, "#regions") == len(session.stages) and _predicted(d))
                first.append(time.perf_counter() - start)
                wait.until(lambda d: _shown(d, "#evidence") == 1 and _shown(d, "#hierarchy") == 1)
                whole.append(time.perf_counter() - start)
                if i + 1 < images:
                    driver.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
                    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]") and
                               d.find_element(By.ID, "status").text.startswith("Upload an image"))
        if screenshot:  # the whole page: a viewport as tall as the page
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                   {"width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": False})
            time.sleep(1)
            driver.save_screenshot(screenshot)
    finally:
        driver.quit()
        app.close()
    return {"upload → prediction and regions shown": summary(first),
            "upload → whole page (evidence, hierarchy) shown": summary(whole)}


def _shown(driver, selector: str) -> int:
    """How many images under ``selector`` have loaded."""
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].filter(i => i.complete && "
                                 "i.naturalWidth > 0).length", f"{selector} img")


def _predicted(driver) -> bool:
    return driver.find_element("id", "status").text.startswith("Predicted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--data")
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="dataset images indexed for the concept view")
    parser.add_argument("--browser", action="store_true")
    parser.add_argument("--port", type=int, default=7899)
    parser.add_argument("--screenshot", help="with --browser: save the page of the last image to this PNG")
    args = parser.parse_args()
    load = os.getloadavg()
    start = time.perf_counter()
    session = AppSession.open(args.run, data=args.data, device="cpu", limit=args.limit)
    loaded = time.perf_counter() - start
    image_page(session, session.dataset_image(len(session.dataset) - 1))  # warm-up: first matplotlib and torch calls
    timings = (in_browser(session, args.images, args.port, args.screenshot) if args.browser
               else in_process(session, args.images))
    print(json.dumps({"run": args.run, "kind": session.kind, "img_size": session.cfg.model.img_size,
                      "backbone": session.cfg.model.backbone, "model load s": round(loaded, 1), "timings": timings,
                      "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                      "load_average_before": [round(v, 2) for v in load],
                      "load_average_after": [round(v, 2) for v in os.getloadavg()]}, indent=2))


if __name__ == "__main__":
    main()
