"""EDA on generated and real stores: statistics, figures, quality checks and the HTML report in a browser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from histoscan.cli import app
from histoscan.data.ingest import ingest
from histoscan.data.store import PatchStore
from histoscan.data.synthetic import write_synthetic
from histoscan.eda import stats as st
from histoscan.eda.report import run_eda
from tests.conftest import assert_images_load, headless_chrome, shared


def _valid_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.fixture(scope="module")
def odd_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic Kaggle store with planted blank, dark, blurry and duplicate patches."""
    root = tmp_path_factory.mktemp("eda")
    src = write_synthetic(root / "src", "kaggle", 80, seed=11)
    train = sorted((src / "train").glob("*.tif"))
    import tifffile

    tifffile.imwrite(train[0], np.full((96, 96, 3), 245, np.uint8))  # blank
    tifffile.imwrite(train[1], np.full((96, 96, 3), 20, np.uint8))  # dark
    flat = np.zeros((96, 96, 3), np.uint8)
    flat[:] = np.linspace(120, 180, 96, dtype=np.uint8)[None, :, None]  # smooth ramp: no fine detail
    tifffile.imwrite(train[2], flat)
    tifffile.imwrite(train[4], tifffile.imread(train[3]))  # exact duplicate
    return ingest(src, root / "store", workers=1).store


def test_patch_stats_find_planted_problems(odd_store: Path) -> None:
    store = PatchStore(odd_store)
    s = st.patch_stats(store)
    ids = list(store.ids)
    order = sorted(p for p in (odd_store.parent / "src" / "train").glob("*.tif"))
    blank, dark, blurry = (ids.index(order[i].stem) for i in range(3))
    assert s.blank[blank] and not s.blank[dark]
    assert s.dark[dark] and s.brightness[dark] == pytest.approx(20, abs=0.5)
    assert s.blurry[blurry] and not s.blurry[blank]
    assert s.blank.sum() == 1 and s.dark.sum() == 1
    # the streaming pass agrees with a direct computation
    img = store.batch([5]).astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert s.brightness[5] == pytest.approx(img.mean(), rel=1e-4)
    assert s.contrast[5] == pytest.approx(img.std(ddof=1), rel=1e-3)


def test_class_sample_mean_image_and_histograms(odd_store: Path) -> None:
    store = PatchStore(odd_store)
    pos = np.flatnonzero(store.labels == 1)
    cs = st.class_sample(store, pos)
    direct = store.batch(pos).astype(np.float64).mean(axis=0)
    assert np.abs(cs.mean_image.astype(float) - direct).max() <= 0.5 + 1e-9
    assert cs.rgb_density.sum(axis=1) == pytest.approx([1, 1, 1])
    assert cs.grey_density.sum() == pytest.approx(1)


@pytest.mark.slow
def test_eda_report(odd_store: Path, tmp_path: Path) -> None:
    r = run_eda(odd_store, tmp_path / "eda", sample=50, grid=8)
    s = r.summary
    assert (
        s["patches"] == 80 and s["quality"]["blank"] == 1 and s["quality"]["dark"] == 1 and s["quality"]["blurry"] >= 1
    )
    assert s["duplicate_groups"] == 1
    for name in (
        "class_counts",
        "samples_normal",
        "samples_tumor",
        "mean_images",
        "rgb_histograms",
        "intensity",
        "sizes",
        "blank_examples",
        "dark_examples",
        "blurry_examples",
        "duplicates",
    ):
        assert name in r.figures, name
        w, h = _valid_png(r.figures[name])
        assert w >= 200 and h >= 100
    assert _valid_png(r.figures["class_counts"]) == (560, 400)
    assert _valid_png(r.figures["rgb_histograms"]) == (960, 320)
    assert json.loads((r.out / "eda.json").read_text())["counts"] == PatchStore(odd_store).counts()
    assert s["duplicate_groups"] == 1  # the one planted copy
    with headless_chrome() as browser:
        assert_images_load(browser, r.out / "report.html", expected=len(r.figures))


@pytest.mark.slow
def test_eda_on_real_grouped_multiclass_stores(tmp_path: Path) -> None:
    idc = ingest(shared("idc"), tmp_path / "idc", workers=2).store
    r = run_eda(idc, tmp_path / "idc-eda", sample=200)
    assert r.summary["groups"]["count"] == 60 and "groups" in r.figures
    assert sum(r.summary["counts"].values()) == 2551
    lung = ingest(shared("lc25000-lung"), tmp_path / "lung", workers=2).store
    r = run_eda(lung, tmp_path / "lung-eda", sample=100, grid=4)
    assert set(r.summary["counts"]) == {"lung_aca", "lung_n", "lung_scc"}
    assert all(f"samples_{c}" in r.figures for c in r.summary["counts"])
    assert r.summary["duplicate_groups"] == 4 and "duplicates" in r.figures  # this LC25000 subset holds 4 exact copies


@pytest.mark.slow
def test_cli_eda(odd_store: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["eda", str(odd_store), str(tmp_path / "out"), "--sample", "20"])
    assert res.exit_code == 0, res.output
    assert "blank 1" in res.output and (tmp_path / "out" / "report.html").is_file()
    res = CliRunner().invoke(app, ["eda", str(tmp_path / "nothing"), str(tmp_path / "o2")])
    assert res.exit_code == 2 and "not a histoscan store" in res.output
