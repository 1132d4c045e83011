"""Shared fixtures: generated sources in every layout, and the real data folder when present."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from histoscan.data.synthetic import write_synthetic

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(name: str) -> Path:
    """A folder of ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data folder {path} is absent (CI has it; see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_xdist_worker() -> Iterator[None]:
    """Under ``pytest -n N`` (pytest-xdist) each worker computes on one thread, so N workers do not fight over cores.

    Sets torch's intra-op threads in the worker and OMP/MKL threads for the processes it starts (servers, CLIs).
    A plain ``pytest`` run is left as it is.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    import torch

    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    before = torch.get_num_threads()
    os.environ.update({k: "1" for k in saved})
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def kaggle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("kaggle"), "kaggle", 120, seed=1, test=20)


@pytest.fixture(scope="session")
def pcam_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("pcam"), "pcam", 100, seed=2)


@pytest.fixture(scope="session")
def folders_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("folders"), "folders", 90, seed=3, num_classes=3)


@pytest.fixture(scope="session")
def grouped_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("grouped"), "grouped-folders", 160, seed=4, groups=12)


@pytest.fixture(scope="session")
def manifest_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("manifest"), "manifest", 60, seed=5) / "manifest.csv"


@pytest.fixture(scope="session")
def tiny_run(kaggle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small binary model trained for 2 epochs on the synthetic Kaggle fixture (about 10 s)."""
    from histoscan.data.ingest import ingest
    from histoscan.training.config import TrainConfig
    from histoscan.training.fit import train

    root = tmp_path_factory.mktemp("tinyrun")
    store = ingest(kaggle_dir, root / "store", workers=1).store
    cfg = TrainConfig(
        data=str(store),
        out=str(root / "runs"),
        name="tiny",
        model="simple_cnn",
        model_args={"batch_norm": True},
        resize=48,
        batch_size=32,
        max_epochs=2,
        lr=3e-3,
        progress=False,
        early_stopping=None,
        val=0.2,
        test=0.1,
    )
    return train(cfg, printer=lambda *_: None).run_dir


@contextmanager
def headless_chrome(window: tuple[int, int] | None = None) -> Iterator[Any]:
    """A headless Chromium driven by Selenium (``window``: width, height in px), or skip saying what is missing."""
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip(
            "headless Chromium and chromedriver are not installed (.ci/run installs Debian's chromium and chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        opts.add_argument(flag)
    if window is not None:
        opts.add_argument(f"--window-size={window[0]},{window[1]}")
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        yield browser
    finally:
        browser.quit()


def assert_images_load(browser: Any, html_file: Path, expected: int) -> None:
    """Open a local HTML report and check every <img> decoded (naturalWidth > 0)."""
    browser.get(html_file.resolve().as_uri())
    widths = browser.execute_script("return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0);")
    assert len(widths) == expected, f"{html_file}: {len(widths)} images, expected {expected}"
    assert all(w > 0 for w in widths), f"{html_file}: some figures did not load: {widths}"
