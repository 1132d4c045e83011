"""Slides, round 2: resolution truth, one slide never sinks a batch, results know what made them, options checked first.

Lying files are built with tifffile and opened through OpenSlide; the model is the coordinate stand-in.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from histoscan.errors import ConfigError, HistoscanError
from histoscan.wsi import scan as scan_module
from histoscan.wsi.batch import run_slides
from histoscan.wsi.grid import SlideGrid
from histoscan.wsi.provenance import model_fingerprint
from histoscan.wsi.reader import SlideError, open_slide
from histoscan.wsi.resolution import implausible, slide_resolution
from histoscan.wsi.scan import ScanSettings, scan_slide
from histoscan.wsi.synthetic import write_slide
from tests.wsi_helpers import CoordinatePredictor, coordinate_image


def hot_square(x: int, y: int) -> float:
    return 0.9 if 100 <= x < 260 and 100 <= y < 260 else 0.1


def quiet(*_: object) -> None:
    pass


@pytest.fixture()
def mask_png(tmp_path: Path) -> Path:
    path = tmp_path / "full.png"
    Image.fromarray(np.full((40, 60), 255, np.uint8)).save(path)  # 3:2, as the 600 x 400 slides
    return path


def slide(folder: Path, name: str, **kw: object) -> Path:
    """A 600 x 400 coordinate slide, levels 1 and 2; 1 um/px unless ``kw`` says otherwise."""
    kw.setdefault("mpp", 1.0)
    mpp = kw.pop("mpp")
    return write_slide(folder / name, coordinate_image(400, 600), mpp, (1, 2), **kw)  # type: ignore[arg-type]


# ---- resolution truth -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tag", "read_as"), [((72.0, "INCH"), 352.78), ((10.0, "CENTIMETER"), 1000.0)])
def test_lying_resolution_tags_are_refused_naming_the_file_and_the_fix(
    tmp_path: Path, tag: tuple[float, str], read_as: float
) -> None:
    path = slide(tmp_path, "liar.tif", resolution_tag=tag)
    reader = open_slide(path)
    assert reader.mpp == pytest.approx(read_as, rel=1e-3)  # what OpenSlide 4 reports for the tag
    with pytest.raises(SlideError) as e:
        slide_resolution(path, reader.mpp, None, None, reader.objective_power)
    msg = str(e.value)
    assert "liar.tif" in msg and "--slide-mpp" in msg and "\n" not in msg
    assert ("72 dpi" in msg) if tag[1] == "INCH" else ("10 px/cm" in msg)
    filled = slide_resolution(path, reader.mpp, 0.5, None, reader.objective_power)  # a placeholder is missing
    assert filled.mpp == 0.5 and filled.source == "--slide-mpp" and "refused" in filled.note
    reader.close()


def test_plausible_range_and_override() -> None:
    assert implausible(0.25) is None and implausible(0.499) is None and implausible(2.0) is None
    assert implausible(0.05) and implausible(25.0) and implausible(25400 / 300)  # too fine, too coarse, 300 dpi
    assert slide_resolution("a.svs", 0.5, 0.25).source == "metadata"  # credible metadata wins over the fill-in
    r = slide_resolution("a.svs", 0.5, None, 1.8)
    assert (r.mpp, r.source) == (1.8, "--slide-mpp-override")  # the override wins over metadata
    with pytest.raises(ConfigError, match="not both"):
        ScanSettings(slide_mpp=0.5, slide_mpp_override=0.5)
    with pytest.raises(ConfigError, match="--slide-mpp-override must be positive"):
        ScanSettings(slide_mpp_override=-1.0)


def test_resolution_contradicting_objective_power_is_refused_naming_both(tmp_path: Path) -> None:
    desc = "Aperio Image Library v10.0.0\n600x400 [0,0 600x400] (128x128) RGB|AppMag = 40|MPP = 1.0"
    path = slide(tmp_path, "mag.svs", description=desc)
    reader = open_slide(path)
    assert (reader.mpp, reader.objective_power) == (1.0, 40.0)
    reader.close()
    with pytest.raises(SlideError) as e:
        scan_slide(CoordinatePredictor(hot_square), path, tmp_path / "out", ScanSettings())
    msg = str(e.value)
    assert "mag.svs" in msg and "1 um/px" in msg and "40x" in msg and "--slide-mpp-override" in msg
    agree = slide(tmp_path, "ok.svs", description=desc.replace("AppMag = 40", "AppMag = 10"))
    r = scan_slide(CoordinatePredictor(hot_square), agree, tmp_path / "out", ScanSettings(min_tissue=0.0))
    assert r.summary["slide_mpp_source"] == "metadata"


@pytest.mark.slow  # two batches of three slides: about 4 s
def test_lying_slides_fail_alone_and_the_batch_goes_on(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slide(slides, "good.tif")
    slide(slides, "dpi72.tif", resolution_tag=(72.0, "INCH"))
    slide(slides, "pxcm10.tif", resolution_tag=(10.0, "CENTIMETER"))
    out = tmp_path / "out"
    r = run_slides(lambda: CoordinatePredictor(hot_square), [slides], out, ScanSettings(min_tissue=0.0), printer=quiet)
    assert [s.slide for s in r.scanned] == ["good"] and set(r.failed) == {"dpi72", "pxcm10"}
    table = pd.read_csv(out / "slides.csv").set_index("slide")
    assert table.loc["good", "status"] == "done" and table.loc["good", "slide_mpp_source"] == "metadata"
    assert table.loc["dpi72", "status"] == "failed" and "72 dpi" in table.loc["dpi72", "error"]
    note = json.loads((out / "_failed" / "pxcm10.json").read_text())
    assert "pxcm10.tif" in note["error"] and "--slide-mpp" in note["error"]
    # the fix the message names: one fill-in for the folder; the good slide's own metadata still wins
    r2 = run_slides(
        lambda: CoordinatePredictor(hot_square),
        [slides],
        out,
        ScanSettings(min_tissue=0.0, slide_mpp=1.0),
        printer=quiet,
    )
    assert not r2.failed and {s.slide for s in r2.scanned} >= {"dpi72", "pxcm10"}
    summary = json.loads((out / "dpi72" / "summary.json").read_text())
    assert summary["slide_mpp"] == 1.0 and summary["slide_mpp_source"].startswith("--slide-mpp (metadata refused")


# ---- one slide never sinks a batch ------------------------------------------------------------------------


def test_grid_over_budget_is_refused_before_allocation(tmp_path: Path, mask_png: Path) -> None:
    path = slide(tmp_path, "s.tif")
    settings = ScanSettings(slide_mpp_override=1000.0, mask=str(mask_png))  # 1000x too coarse: 234 M cells
    with pytest.raises(SlideError) as e:
        scan_slide(CoordinatePredictor(hot_square), path, tmp_path / "out", settings)
    msg = str(e.value)
    assert "s.tif" in msg and "1000 um/px (--slide-mpp-override)" in msg and "budget" in msg and "\n" not in msg
    reader = open_slide(path)
    grid = scan_module.plan_grid(reader, CoordinatePredictor(hot_square), ScanSettings())
    grid.check_budget(path)  # the true resolution is far within budget
    with pytest.raises(SlideError, match="cells"):
        grid.check_budget(path, max_cells=grid.rows * grid.cols - 1)
    reader.close()
    assert isinstance(grid, SlideGrid) and grid.mpp_source == "metadata"


def test_any_exception_in_one_slide_is_its_failed_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slides = tmp_path / "slides"
    slide(slides, "a.tif")
    slide(slides, "b.tif")
    real = scan_module.tissue_fractions

    def flaky(grid, mask, chunk_cells=1_000_000):  # type: ignore[no-untyped-def]
        if flaky.calls == 0:  # the first slide runs out of memory, as a 64 GiB np.mgrid did
            flaky.calls += 1
            raise MemoryError("Unable to allocate 64.6 GiB for an array")
        return real(grid, mask, chunk_cells)

    flaky.calls = 0  # type: ignore[attr-defined]
    monkeypatch.setattr(scan_module, "tissue_fractions", flaky)
    out = tmp_path / "out"
    r = run_slides(lambda: CoordinatePredictor(hot_square), [slides], out, ScanSettings(min_tissue=0.0), printer=quiet)
    assert list(r.failed) == ["a"] and [s.slide for s in r.scanned] == ["b"]
    assert "out of memory" in r.failed["a"] and "a.tif" in r.failed["a"] and "\n" not in r.failed["a"]
    assert (out / "_failed" / "a.json").is_file() and (out / "slides.csv").is_file()
    assert not (out / "a").exists() and not list(out.glob(".*partial"))


def test_a_corrupt_tile_mid_slide_fails_that_slide_cleanly(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slide(slides, "fine.tif")
    bad = slide(slides, "corrupt.tif")
    with tifffile.TiffFile(bad) as tf:
        page = tf.pages[0]
        offset, count = page.dataoffsets[len(page.dataoffsets) // 2], page.databytecounts[len(page.dataoffsets) // 2]
    with bad.open("r+b") as fh:  # scramble one zlib tile in the middle of level 0
        fh.seek(offset)
        fh.write(bytes(count))
    out = tmp_path / "out"
    settings = ScanSettings(min_tissue=0.0, slide_mpp_override=0.5)  # read level 0, where the bad tile is
    r = run_slides(lambda: CoordinatePredictor(hot_square), [slides], out, settings, printer=quiet)
    assert list(r.failed) == ["corrupt"] and [s.slide for s in r.scanned] == ["fine"]
    assert "corrupt.tif" in r.failed["corrupt"] and "unreadable region" in r.failed["corrupt"]
    assert not (out / "corrupt").exists() and not list(out.glob(".*partial"))


# ---- a result knows what made it ----------------------------------------------------------------------------


def test_outputs_of_another_model_or_settings_are_rescanned_never_reused(tmp_path: Path) -> None:
    model_a, model_b = tmp_path / "model-a", tmp_path / "model-b"
    for d, weights in ((model_a, b"a"), (model_b, b"b")):
        d.mkdir()
        (d / "model.json").write_text("{}")
        (d / "best.safetensors").write_bytes(weights * 100)
    assert model_fingerprint(model_a) != model_fingerprint(model_b)
    path = slide(tmp_path, "s.tif")
    out = tmp_path / "out"

    def predictor(run: Path) -> CoordinatePredictor:
        p = CoordinatePredictor(hot_square)
        p.run_dir = run
        return p

    settings = ScanSettings(min_tissue=0.0)
    first = run_slides(lambda: predictor(model_a), [path], out, settings, printer=quiet)
    summary = json.loads((out / "s" / "summary.json").read_text())
    assert summary["model"] == model_fingerprint(model_a) and summary["identity"]["threshold"] == 0.5
    assert summary["identity"]["predictor"]["backend"] == "coordinates" and first.scanned
    again = run_slides(lambda: predictor(model_a), [path], out, settings, printer=quiet)
    assert again.skipped == ["s"] and not again.scanned  # the same model and settings: reused
    other = run_slides(lambda: predictor(model_b), [path], out, settings, printer=quiet)
    assert other.recomputed == ["s"] and [s.slide for s in other.scanned] == ["s"]
    assert json.loads((out / "s" / "summary.json").read_text())["model"] == model_fingerprint(model_b)
    lower = run_slides(
        lambda: predictor(model_b), [path], out, ScanSettings(min_tissue=0.0, threshold=0.3), printer=quiet
    )
    assert lower.recomputed == ["s"]  # the threshold that draws the regions changed
    table = pd.read_csv(out / "slides.csv")
    assert table.loc[0, "model"] == model_fingerprint(model_b) and table.loc[0, "threshold"] == 0.3


# ---- options checked before work ------------------------------------------------------------------------------


def test_impossible_options_are_refused_before_any_slide_is_read(
    tmp_path: Path, mask_png: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = slide(tmp_path, "s.tif")

    def no_reading(*_: object) -> None:
        raise AssertionError("a slide was opened")

    monkeypatch.setattr(scan_module, "open_slide", no_reading)
    cases = [
        (ScanSettings(explain_top=3), "best.safetensors"),  # the stand-in model has no torch weights
        (ScanSettings(mask=str(tmp_path / "none.png")), "no such file"),
        (ScanSettings(mask=str(tmp_path / "s.tif")), "PNG or a QuPath GeoJSON"),
        (ScanSettings(mask=str(tmp_path / "masks")), "no mask for s.tif"),
        (ScanSettings(shard="4/4"), "0 <= I < N"),
        (ScanSettings(positive_class="lymph"), "--positive-class"),
    ]
    (tmp_path / "masks").mkdir()
    for settings, words in cases:
        with pytest.raises(HistoscanError, match=words) as e:
            run_slides(lambda: CoordinatePredictor(hot_square), [path], tmp_path / "out", settings, printer=quiet)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_mask_of_the_wrong_size_fails_its_slide_before_tiles_are_read(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slide(slides, "right.tif")
    slide(slides, "wrong.tif")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.full((40, 60), 255, np.uint8)).save(masks / "right.png")
    Image.fromarray(np.full((60, 40), 255, np.uint8)).save(masks / "wrong.png")  # portrait for a landscape slide
    pred = CoordinatePredictor(hot_square)
    r = run_slides(lambda: pred, [slides], tmp_path / "out", ScanSettings(mask=str(masks)), printer=quiet)
    assert list(r.failed) == ["wrong"] and "wrong.png" in r.failed["wrong"] and "aspect ratio" in r.failed["wrong"]
    assert [s.slide for s in r.scanned] == ["right"]


def test_describe_slide_resolution_says_what_a_scan_would_do(tmp_path: Path) -> None:
    from histoscan.wsi.resolution import describe_slide_resolution

    good = describe_slide_resolution(slide(tmp_path, "good.tif"))
    assert "states 1 um/px" in good and "A scan uses 1 um/px (from its metadata)" in good
    liar = describe_slide_resolution(slide(tmp_path, "liar.tif", resolution_tag=(72.0, "INCH")))
    assert "states 352.8 um/px" in liar and "A scan refuses it" in liar and "72 dpi" in liar and "\n" not in liar
