"""Screenshots for the README: the EDA report, the evaluation report and the web page, in headless Chromium.

Builds everything from synthetic data (``histoscan.demo.run_demo``) in a temporary folder, serves the demo's
model on 127.0.0.1, and writes small PNGs to ``docs/images/``. Needs chromium and chromedriver
(Debian: ``apt-get install chromium chromium-driver``) and the dev extra (selenium, pytest: the browser is
started by the tests' ``headless_chrome``).

Run: python docs/screenshots.py [--out docs/images] [--width 1100]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.conftest

from tests.conftest import headless_chrome

from histoscan.demo import run_demo

MAX_BYTES = 200_000


def save_small(png: bytes, path: Path, width: int) -> Path:
    """Scale a screenshot to ``width`` px and store it as a palette PNG under MAX_BYTES."""
    import io

    img = Image.open(io.BytesIO(png)).convert("RGB")
    for w in (width, int(width * 0.85), int(width * 0.7)):
        small = img.resize((w, round(img.height * w / img.width)), Image.Resampling.LANCZOS)
        small.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if path.stat().st_size <= MAX_BYTES:
            break
    return path


def shoot_page(browser: Any, url: str, path: Path, width: int) -> Path:
    """Open ``url``, wait for its images, and save the top of the page."""
    browser.get(url)
    deadline = time.time() + 20
    while time.time() < deadline and not browser.execute_script(
        "return Array.from(document.images).every(i => i.complete)"
    ):
        time.sleep(0.2)
    return save_small(browser.get_screenshot_as_png(), path, width)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(run: Path) -> Iterator[str]:
    """``histoscan serve RUN`` on 127.0.0.1; stops the server it started (by its pid) on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "histoscan", "serve", str(run), "--port", str(port), "--host", "127.0.0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise SystemExit(f"the server did not become ready in 90 s: {' '.join(cmd)}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def shoot_web_page(browser: Any, url: str, patches: list[Path], path: Path, width: int) -> Path:
    """The web page after predicting a few patches."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    WebDriverWait(browser, 20).until(lambda d: "classes" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "pick").send_keys("\n".join(str(p.resolve()) for p in patches))
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card .label")) == len(patches))
    WebDriverWait(browser, 10).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".card img")))
    return save_small(browser.get_screenshot_as_png(), path, width)


def example_patches(source: Path, out: Path, per_class: int = 2) -> list[Path]:
    """A few labelled patches of each class as PNG (browsers do not show TIFF thumbnails)."""
    import pandas as pd

    labels = pd.read_csv(source / "train_labels.csv", dtype={"id": str})
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for _, rows in labels.groupby("label"):
        for i in rows["id"][:per_class]:
            with Image.open(source / "train" / f"{i}.tif") as im:
                im.convert("RGB").save(out / f"{i[:12]}.png")
            paths.append(out / f"{i[:12]}.png")
    return paths


def main() -> None:
    """Build the demo, then take the three screenshots."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "images")
    ap.add_argument("--width", type=int, default=1000, help="width of the saved PNGs in px")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="histoscan-shots-") as tmp:
        print("building the demo on synthetic data (about a minute)")
        demo = run_demo(Path(tmp) / "demo", n=300, epochs=3, printer=lambda *_: None)
        patches = example_patches(demo.source, Path(tmp) / "patches")
        with headless_chrome(window=(1280, 1000)) as browser:
            shots = [
                shoot_page(browser, demo.eda_report.resolve().as_uri(), args.out / "eda-report.png", args.width),
                shoot_page(
                    browser, demo.eval_report.resolve().as_uri(), args.out / "evaluation-report.png", args.width
                ),
            ]
            with served(demo.run) as url:
                shots.append(shoot_web_page(browser, url, patches, args.out / "web-page.png", args.width))
    for p in shots:
        print(f"{p} ({p.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
