"""The slide viewer: /v1/slides (list, Deep Zoom, overlay, regions), bad input, paths that must stay out of reach,
open_viewer, and the pages in headless Chromium on the shared CMU-1 region."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from shapely.geometry import shape

from histoscan.serving.slides import open_viewer
from histoscan.serving.slides.deepzoom import ByteLRU
from histoscan.serving.slides.library import SlideFolderError, SlideLibrary
from histoscan.serving.slides.overlay import colour_stops
from histoscan.serving.slides.routes import SlideSettings, create_viewer_app
from histoscan.wsi.scan import ScanSettings, scan_slide
from histoscan.wsi.synthetic import write_slide
from tests.conftest import headless_chrome, shared
from tests.wsi_helpers import CoordinatePredictor, coordinate_image, train_mosaic_run

HOT = (256, 384, 160, 288)  # level-0 x0, x1, y0, y1 of the cells the stand-in model calls tumour


def square(x: int, y: int) -> float:
    return 0.9 if HOT[0] <= x < HOT[1] and HOT[2] <= y < HOT[3] else 0.1


def _scan(slide: Path, out: Path, tmp: Path) -> Path:
    mask = tmp / f"{slide.stem}-mask.png"
    Image.fromarray(np.full((70, 100), 255, np.uint8)).save(mask)
    return scan_slide(CoordinatePredictor(square), slide, out, ScanSettings(mask=str(mask))).folder


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scan folder: 'alpha' and 'beta' (1000 x 700 px coordinate slides at 1 um/px, one hot square each),
    'gone' (its slide deleted after the scan), and 'broken' (a failure note)."""
    tmp = tmp_path_factory.mktemp("viewer")
    out = tmp / "out"
    for name in ("alpha", "beta", "gone"):
        slide = write_slide(tmp / "slides" / f"{name}.tif", coordinate_image(700, 1000), 1.0, (1, 2))
        _scan(slide, out, tmp)
    (tmp / "slides" / "gone.tif").unlink()
    (out / "_failed").mkdir()
    note = {"slide": "broken", "path": str(tmp / "slides" / "broken.svs"), "status": "failed", "error": "not a slide"}
    (out / "_failed" / "broken.json").write_text(json.dumps(note))  # the layout wsi/batch.py writes
    return out


@pytest.fixture(scope="module")
def client(served: Path) -> Iterator[TestClient]:
    with TestClient(create_viewer_app(SlideSettings(str(served), cache_mb=4))) as c:
        yield c


def test_the_list_pages_and_says_what_each_slide_is(client: TestClient, served: Path) -> None:
    j = client.get("/v1/slides").json()
    assert j["total"] == 4 and [s["name"] for s in j["slides"]] == ["alpha", "beta", "broken", "gone"]
    alpha, _, broken, gone = j["slides"]
    summary = json.loads((served / "alpha" / "summary.json").read_text())
    assert alpha["status"] == "done" and alpha["dzi"] == "/v1/slides/alpha.dzi" and alpha["viewer"] == "/slides/alpha"
    for k in ("tumour_mm2", "tissue_mm2", "max_probability", "topk_mean_probability", "top_k", "tiles"):
        assert alpha[k] == summary[k], k
    for k in ("model", "identity_key", "slide_mpp_source"):  # what made the result (issue 35)
        assert alpha[k] == summary[k] and summary[k], k
    assert alpha["max_probability"] == pytest.approx(0.9)
    assert gone["status"] == "missing" and gone["dzi"] is None and "gone.tif" in gone["message"]
    assert "moved or deleted" in gone["message"] and gone["viewer"] == "/slides/gone"
    assert broken["status"] == "failed" and "not a slide" in broken["message"] and broken["viewer"] is None
    page = client.get("/v1/slides?offset=1&limit=2").json()
    assert page["total"] == 4 and [s["name"] for s in page["slides"]] == ["beta", "broken"]
    assert [s["name"] for s in client.get("/v1/slides?q=ET").json()["slides"]] == ["beta"]
    assert client.get("/v1/slides?limit=0").status_code == 422
    assert client.get("/v1/slides?limit=100000").status_code == 422


def test_thousands_of_slides_are_listed_a_page_at_a_time(tmp_path: Path) -> None:
    for i in range(3000):
        folder = tmp_path / f"s{i:05d}"
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps({"slide": folder.name, "path": "x.svs", "max_probability": i}))
    with TestClient(create_viewer_app(SlideSettings(str(tmp_path)))) as c:
        j = c.get("/v1/slides?offset=2950&limit=100").json()
    assert j["total"] == 3000 and len(j["slides"]) == 50 and j["slides"][0]["name"] == "s02950"
    assert all(s["status"] == "missing" for s in j["slides"])


def test_deep_zoom_descriptor_and_tiles_at_two_levels(client: TestClient) -> None:
    dzi = client.get("/v1/slides/alpha.dzi")
    assert dzi.status_code == 200 and dzi.headers["content-type"].startswith("application/xml")
    assert 'Width="1000"' in dzi.text and 'Height="700"' in dzi.text and 'TileSize="254"' in dzi.text
    top = 10  # ceil(log2(1000)): the full-resolution level
    full = Image.open(io.BytesIO(client.get(f"/v1/slides/alpha_files/{top}/1_1.jpeg").content))
    assert full.size == (256, 256)  # 254 + 1 px overlap on each side
    pixels = np.asarray(full, np.int16)  # coordinate pixels (R = x % 256, G = y % 256), through JPEG
    assert abs(int(np.median(pixels[100, :, 0] - (np.arange(256) + 253) % 256))) <= 3
    small = Image.open(io.BytesIO(client.get("/v1/slides/alpha_files/8/0_0.jpeg").content))
    assert small.size == (250, 175)  # level 8: the slide at 1/4 scale, one tile
    assert (
        client.get(f"/v1/slides/alpha_files/{top}/1_1.jpeg").content
        == client.get(f"/v1/slides/alpha_files/{top}/1_1.jpeg").content
    )


@pytest.mark.parametrize(
    "path,words",
    [("alpha_files/11/0_0.jpeg", "level 11 is outside"), ("alpha_files/10/4_0.jpeg", "tile 4_0 is outside level 10")],
)
def test_a_tile_outside_the_pyramid_is_404(client: TestClient, path: str, words: str) -> None:
    r = client.get("/v1/slides/" + path)
    assert r.status_code == 404 and words in r.json()["error"]


def test_negative_or_malformed_tile_addresses_are_422_naming_the_field(client: TestClient) -> None:
    for path, field in (
        ("alpha_files/-1/0_0.jpeg", "level"),
        ("alpha_files/1/x_0.jpeg", "col"),
        ("alpha_files/1/0_1e9.jpeg", "row"),
    ):
        r = client.get("/v1/slides/" + path)
        assert r.status_code == 422 and f"path.{field}" in r.json()["error"], (path, r.text)
    assert client.get("/v1/slides/alpha_files/1/0_0.png").status_code == 404  # no such route


def test_overlay_is_the_grid_in_colour_where_the_summary_places_it(client: TestClient, served: Path) -> None:
    info = client.get("/v1/slides/alpha").json()
    meta = json.loads((served / "alpha" / "probabilities.json").read_text())
    ov = info["overlay"]
    assert (ov["rows"], ov["cols"]) == (meta["rows"], meta["cols"]) == (22, 32)
    assert (ov["x"], ov["y"], ov["cell_level0_px"]) == (0, 0, 32) and ov["width"] == 32 * 32
    assert info["width"] == 1000 and info["height"] == 700 and info["mpp"] == 1.0
    png = Image.open(io.BytesIO(client.get(ov["url"]).content))
    assert png.mode == "RGBA" and png.size[0] / 32 == png.size[1] / 22  # whole-pixel squares per cell
    k = png.size[0] // 32
    rgba = np.asarray(png)
    hot, cold = rgba[5 * k + k // 2, 8 * k + k // 2], rgba[0, 0]  # cell (row 5, col 8) is in the hot square
    stops = colour_stops(11)
    assert "#{:02x}{:02x}{:02x}".format(*hot[:3]) != stops[1] and hot[3] == 255
    assert np.abs(hot[:3].astype(int) - [int(stops[9][i : i + 2], 16) for i in (1, 3, 5)]).max() <= 40  # ~P 0.9
    assert np.abs(cold[:3].astype(int) - [int(stops[1][i : i + 2], 16) for i in (1, 3, 5)]).max() <= 40  # ~P 0.1


def test_the_overlay_is_level_0_of_the_pyramidal_ome_tiff(client: TestClient, served: Path) -> None:
    import tifffile

    from histoscan.serving.slides.overlay import read_grid

    with tifffile.TiffFile(served / "alpha" / "probabilities.tif") as tif:
        assert tif.is_ome and len(tif.series[0].levels) >= 2  # issue 35: a pyramid, level 0 first
        level0 = tif.series[0].levels[0].asarray()
    grid = read_grid(served / "alpha" / "probabilities.tif")
    assert grid.shape == level0.shape == (22, 32) and np.array_equal(grid, level0, equal_nan=True)


def test_regions_with_slide_bounds_land_where_the_scan_put_them(
    client: TestClient, served: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slide with a bounds corner (MRXS, some TIFFs): GeoJSON is level-0 minus that corner, and the Deep Zoom
    pyramid starts there too, so regions and overlay move with it and stay on the same tissue."""
    from histoscan.serving.slides import deepzoom

    real = deepzoom.open_deepzoom
    bx, by = 300.0, 200.0

    def with_bounds(path: Path) -> deepzoom.OpenedSlide:
        opened = real(path)
        return deepzoom.OpenedSlide(opened.path, opened.deepzoom, (bx, by), opened.size)

    shifted = served.parent / "shifted"
    shutil.copytree(served / "alpha", shifted / "alpha")
    summary = json.loads((shifted / "alpha" / "summary.json").read_text())
    summary["bounds"].update(x=bx, y=by)  # as the scan records a slide whose bounds start at (300, 200)
    (shifted / "alpha" / "summary.json").write_text(json.dumps(summary))
    meta = json.loads((shifted / "alpha" / "probabilities.json").read_text())
    meta["origin_level0_px"] = [bx, by]
    (shifted / "alpha" / "probabilities.json").write_text(json.dumps(meta))
    monkeypatch.setattr(deepzoom, "open_deepzoom", with_bounds)
    with TestClient(create_viewer_app(SlideSettings(str(shifted), cache_mb=4))) as c:
        info = c.get("/v1/slides/alpha").json()
        (region,) = c.get(info["regions"]["url"]).json()["features"]
    dx, dy = info["regions"]["offset"]
    x0, y0, x1, y1 = shape(region["geometry"]).bounds
    assert (dx, dy) == (0.0, 0.0) and (x0 + dx, x1 + dx, y0 + dy, y1 + dy) == HOT  # same pixels of the pyramid
    assert (info["overlay"]["x"], info["overlay"]["y"]) == (0.0, 0.0)
    assert info["overlay"]["origin_level0_px"] == [bx, by]


def test_regions_are_the_annotations_in_image_pixels(client: TestClient, served: Path) -> None:
    info = client.get("/v1/slides/alpha").json()
    geo = client.get(info["regions"]["url"]).json()
    stored = json.loads((served / "alpha" / "regions.geojson").read_text())
    assert geo["features"] == [f for f in stored["features"] if f["properties"]["objectType"] != "tile"]
    (region,) = geo["features"]
    dx, dy = info["regions"]["offset"]
    x0, y0, x1, y1 = shape(region["geometry"]).bounds
    assert (x0 + dx, x1 + dx, y0 + dy, y1 + dy) == HOT
    assert region["properties"]["measurements"]["area_um2"] == pytest.approx(128 * 128)


def test_a_moved_slide_keeps_its_row_and_says_why_it_cannot_be_shown(client: TestClient) -> None:
    info = client.get("/v1/slides/gone").json()
    assert info["status"] == "missing" and "moved or deleted after the scan" in info["message"]
    assert info["overlay"] is not None and info["regions"] is not None  # the scan's outputs are still there
    for path in ("gone.dzi", "gone_files/0/0_0.jpeg"):
        r = client.get("/v1/slides/" + path)
        assert r.status_code == 410 and "gone.tif is no longer where it was scanned" in r.json()["error"]
    r = client.get("/v1/slides/broken.dzi")
    assert r.status_code == 409 and "scan failed" in r.json()["error"]


@pytest.mark.parametrize(
    "path",
    [
        "..%2F..%2F..%2Fetc%2Fpasswd.dzi",
        "..%2Falpha.dzi",
        "%2E%2E%2Falpha%2Fsummary.json",
        "..%5C..%5Calpha.dzi",
        "alpha%5Csummary.json",
        "%2Fetc%2Fpasswd.dzi",
        "%2e%2e/regions.geojson",
        "..%252Falpha.dzi",
        "alpha%00.dzi",
        ".hidden.dzi",
        "C:%5Cwindows.dzi",
        "alpha%2F..%2Fbeta/regions.geojson",
    ],
)
def test_traversal_and_encoded_separators_reach_nothing(client: TestClient, path: str) -> None:
    r = client.get("/v1/slides/" + path)
    assert r.status_code in (400, 404), (path, r.status_code)
    assert "root:" not in r.text and "FeatureCollection" not in r.text and "slide_mpp" not in r.text


def test_symlinks_out_of_the_served_folder_are_refused(served: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(served / "alpha", outside / "evil")
    (outside / "secret.geojson").write_text('{"type": "FeatureCollection", "features": [{"secret": 1}]}')
    root = tmp_path / "served"
    shutil.copytree(served / "beta", root / "beta")
    (root / "evil").symlink_to(outside / "evil", target_is_directory=True)  # a slide folder that is a link out
    (root / "beta" / "regions.geojson").unlink()
    (root / "beta" / "regions.geojson").symlink_to(outside / "secret.geojson")  # an output file that is a link out
    with TestClient(create_viewer_app(SlideSettings(str(root)))) as c:
        assert [s["name"] for s in c.get("/v1/slides").json()["slides"]] == ["beta"]
        assert c.get("/v1/slides/evil").status_code == 404 and c.get("/v1/slides/evil.dzi").status_code == 404
        r = c.get("/v1/slides/beta/regions.geojson")
        assert r.status_code == 404 and "secret" not in r.text
        assert c.get("/v1/slides/beta").json()["regions"] is None
        assert c.get("/v1/slides/beta.dzi").status_code == 200  # the rest of beta is inside and served


def test_a_folder_that_is_not_there_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SlideFolderError, match="no-such: no such folder of scanned slides"):
        SlideLibrary(tmp_path / "no-such")
    with pytest.raises(SlideFolderError, match="no such folder"):
        open_viewer(tmp_path / "no-such")


def test_a_summary_that_is_not_json_is_left_out(served: Path, tmp_path: Path) -> None:
    root = tmp_path / "served"
    shutil.copytree(served / "alpha", root / "alpha")
    (root / "bad").mkdir()
    (root / "bad" / "summary.json").write_text("{not json")
    assert SlideLibrary(root).names() == ["alpha"]


def test_a_new_slide_appears_without_a_restart(served: Path, tmp_path: Path) -> None:
    root = tmp_path / "served"
    shutil.copytree(served / "alpha", root / "alpha")
    lib = SlideLibrary(root)
    assert lib.names() == ["alpha"]
    shutil.copytree(served / "beta", root / ".beta.partial")
    os.replace(root / ".beta.partial", root / "beta")  # how wsi/outputs.publish puts a finished slide in place
    assert lib.names() == ["alpha", "beta"]


def test_the_tile_cache_is_bounded_in_bytes() -> None:
    cache = ByteLRU(1000)
    for i in range(50):
        cache.put(i, bytes(300))
    assert cache.used <= 1000 and len(cache) == 3 and cache.get(49) is not None and cache.get(0) is None
    cache.put("big", bytes(5000))  # larger than the whole cache: never kept
    assert cache.get("big") is None and cache.used <= 1000


def test_open_viewer_serves_the_folder_on_loopback(served: Path) -> None:
    import httpx

    viewer = open_viewer(served, api_key="k")
    try:
        assert viewer.url.startswith("http://127.0.0.1:") and viewer.url.endswith("/slides")
        assert "Scanned slides" in httpx.get(viewer.url, timeout=10).text
        api = viewer.url.replace("/slides", "/v1/slides")
        assert httpx.get(api, timeout=10).status_code == 401
        j = httpx.get(api, headers={"authorization": "Bearer k"}, timeout=10).json()
        assert j["total"] == 4
    finally:
        viewer.stop()


@pytest.mark.slow
def test_serve_with_slides_needs_the_key_like_every_v1_route(tiny_run: Path, served: Path) -> None:
    from histoscan.serving.app import create_app
    from histoscan.serving.state import ServeSettings

    settings = ServeSettings(str(tiny_run), slides=str(served), model_process=False, api_key="s3cret")
    with TestClient(create_app(settings)) as c:
        for path in ("/v1/slides", "/v1/slides/alpha.dzi", "/v1/slides/alpha_files/8/0_0.jpeg"):
            assert c.get(path).status_code == 401, path
        ok = {"authorization": "Bearer s3cret"}
        assert c.get("/v1/slides", headers=ok).json()["total"] == 4
        assert c.get("/v1/slides/alpha_files/8/0_0.jpeg", headers=ok).headers["content-type"] == "image/jpeg"
        assert c.get("/slides").status_code == 200  # the page is open; it sends the key the user types
        # tiles are admitted with the model work, as their own kind with its own limit, and counted
        admission = c.app.state.histoscan.batcher.admission  # type: ignore[attr-defined]
        assert admission.limits["tile"] == settings.max_tile_queue
        admission.take("tile", settings.max_tile_queue)  # as if every tile slot were taken
        try:
            r = c.get("/v1/slides/alpha_files/9/0_0.jpeg", headers=ok)  # not cached yet: needs a slot
            assert (
                r.status_code == 503 and r.headers["retry-after"] == "1" and "slide tiles queued" in r.json()["error"]
            )
            ready = c.get("/ready", headers=ok)
            assert ready.status_code == 503 and "tile" in ready.json()["saturated"]
        finally:
            admission.give("tile", settings.max_tile_queue)
        assert c.get("/v1/slides/alpha_files/9/0_0.jpeg", headers=ok).status_code == 200
        text = c.get("/metrics", headers=ok).text
    tile_route = 'route="/v1/slides/{slide}_files/{level}/{col}_{row}.jpeg"'
    assert f'histoscan_queue_limit{{kind="tile"}} {settings.max_tile_queue}.0' in text
    assert f'histoscan_responses_total{{{tile_route},status="503"}} 1.0' in text
    assert f'histoscan_responses_total{{{tile_route},status="200"}} 2.0' in text
    with TestClient(create_app(ServeSettings(str(tiny_run), model_process=False))) as c:
        r = c.get("/v1/slides")
        assert r.status_code == 404 and "--slides" in r.json()["error"]


# ---- the pages in a real browser, on the shared CMU-1 region -----------------------------------
SHOWN = "const i = arguments[0]; return i.complete ? i.naturalWidth : 0;"


@pytest.fixture(scope="module")
def cmu_scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny mosaic model (about 15 s) and a folder with the CMU-1 region scanned by it, plus a copy whose
    slide was moved away after its scan."""
    from histoscan.inference.predictor import Predictor

    svs = shared("wsi") / "CMU-1-Small-Region.svs"
    run = train_mosaic_run(tmp_path_factory)
    out = tmp_path_factory.mktemp("cmu-viewer")
    folder = scan_slide(Predictor(run, backend="torch"), svs, out, ScanSettings()).folder
    moved = out / "CMU-1-moved"
    shutil.copytree(folder, moved)
    summary = json.loads((moved / "summary.json").read_text())
    summary.update(slide="CMU-1-moved", path=str(out / "elsewhere" / "CMU-1-moved.svs"))
    (moved / "summary.json").write_text(json.dumps(summary))
    return run, out


@pytest.mark.slow
def test_viewer_in_a_real_browser(cmu_scan: tuple[Path, Path], tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_serving import server_process

    run, out = cmu_scan
    with server_process(run, "--backend", "torch", "--slides", str(out)) as (url, _), headless_chrome((1200, 900)) as b:
        b.get(url + "/slides")
        WebDriverWait(b, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#slides tbody tr")) == 2)
        rows = b.find_elements(By.CSS_SELECTOR, "#slides tbody tr")
        assert "moved or deleted" in rows[0].find_element(By.CSS_SELECTOR, ".status").text  # CMU-1-moved
        assert rows[1].find_element(By.CSS_SELECTOR, ".status").text == "scanned"
        rows[1].find_element(By.TAG_NAME, "a").click()

        WebDriverWait(b, 30).until(lambda d: d.execute_script("return window.histoscan && window.histoscan.ready"))
        WebDriverWait(b, 30).until(lambda d: d.execute_script("return Object.keys(histoscan.tilesByLevel).length") >= 1)
        first = set(b.execute_script("return Object.keys(histoscan.tilesByLevel)"))
        for _ in range(2):
            b.find_element(By.ID, "zoom-in").click()
        WebDriverWait(b, 30).until(
            lambda d: set(d.execute_script("return Object.keys(histoscan.tilesByLevel)")) - first
        )  # tiles of a second, finer level loaded
        assert b.find_element(By.ID, "scalebar").text.endswith("µm")

        heat = b.find_element(By.ID, "heat")
        assert b.execute_script(SHOWN, heat) > 0 and heat.value_of_css_property("visibility") == "visible"
        b.find_element(By.ID, "overlay-toggle").click()
        assert heat.value_of_css_property("visibility") == "hidden"
        b.find_element(By.ID, "overlay-toggle").click()
        assert heat.value_of_css_property("visibility") == "visible"
        b.execute_script(
            "const o = document.getElementById('opacity'); o.value = 0.4; o.dispatchEvent(new Event('input'));"
        )
        assert heat.value_of_css_property("opacity") == "0.4"

        # click inside the largest region: its measurements show
        regions = json.loads((out / "CMU-1-Small-Region" / "regions.geojson").read_text())["features"]
        assert regions, "the tiny model found no region on CMU-1"
        largest = max(regions, key=lambda f: shape(f["geometry"]).area)
        point = shape(largest["geometry"]).representative_point()
        b.execute_script("histoscan.viewer.viewport.goHome(true);")
        x, y = b.execute_script(
            "const p = histoscan.viewer.world.getItemAt(0).imageToViewerElementCoordinates("
            "new OpenSeadragon.Point(arguments[0], arguments[1])); return [p.x, p.y];",
            point.x,
            point.y,
        )
        stage = b.find_element(By.ID, "viewer")
        size = stage.size
        ActionChains(b).move_to_element_with_offset(
            stage, int(x - size["width"] / 2), int(y - size["height"] / 2)
        ).click().perform()
        info = WebDriverWait(b, 10).until(
            lambda d: d.find_element(By.ID, "region-info").text and d.find_element(By.ID, "region-info")
        )
        m = largest["properties"]["measurements"]
        assert info.find_element(By.CSS_SELECTOR, ".m-max_probability").text == f"{m['max_probability']:.3f}"
        assert f"{m['area_um2'] / 1e6:.4f} mm²" in info.find_element(By.CSS_SELECTOR, ".m-area_um2").text
        WebDriverWait(b, 30).until(
            lambda d: d.execute_script("return histoscan.viewer.world.getItemAt(0).getFullyLoaded()")
        )
        _screenshot(b.get_screenshot_as_png(), tmp_path)

        b.get(url + "/slides/CMU-1-moved")  # the moved slide: a clear message instead of an empty viewer
        WebDriverWait(b, 20).until(lambda d: d.find_element(By.ID, "message").text)
        assert "moved or deleted after the scan" in b.find_element(By.ID, "message").text


def _screenshot(png: bytes, tmp_path: Path) -> None:
    """The viewer screenshot, small; into docs/images/ when HISTOSCAN_SCREENSHOTS=1 (how the committed one is made)."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img = img.resize((900, round(img.height * 900 / img.width)), Image.Resampling.LANCZOS)
    small = img.quantize(colors=192, method=Image.Quantize.MEDIANCUT)
    target = (
        Path(__file__).resolve().parents[1] / "docs" / "images" if os.environ.get("HISTOSCAN_SCREENSHOTS") else tmp_path
    )
    small.save(target / "slide-viewer.png", optimize=True)
