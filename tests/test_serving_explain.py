"""POST /v1/explain and /v1/preview: the overlay, the same limits and key as predict, 409 without weights."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from histoscan.data.imageio import read_image
from histoscan.explain import Explainer
from histoscan.serving.app import create_app
from histoscan.serving.state import ServeSettings


@pytest.fixture(scope="module")
def patch_file(kaggle_dir: Path) -> Path:
    return sorted((kaggle_dir / "test").glob("*.tif"))[0]


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> Iterator[TestClient]:
    with TestClient(create_app(ServeSettings(str(tiny_run), max_upload_mb=1.0))) as c:  # the model process
        yield c


def _post(c: TestClient, f: Path, path: str = "/v1/explain", **kw: object) -> object:
    return c.post(path, files={"file": (f.name, f.read_bytes(), "image/tiff")}, **kw)  # type: ignore[arg-type]


@pytest.mark.slow
def test_explain_returns_the_prediction_and_the_overlay(client: TestClient, tiny_run: Path, patch_file: Path) -> None:
    r = _post(client, patch_file)
    assert r.status_code == 200, r.text  # type: ignore[attr-defined]
    j = r.json()  # type: ignore[attr-defined]
    want = Explainer(tiny_run).explain_batch([read_image(patch_file).pixels])
    assert j["probabilities"]["tumor"] == pytest.approx(float(want.probabilities[0, 1]), abs=1e-5)
    assert j["map_max"] == pytest.approx(float(want.maps[0].max()), rel=1e-4, abs=1e-9)
    assert j["method"] == "gradcam" and j["target"] == "tumor" and j["scale"] == j["map_max"]
    png = Image.open(io.BytesIO(base64.b64decode(j["overlay_png"])))
    assert png.format == "PNG" and png.size[0] >= 96
    r = _post(client, patch_file, "/v1/explain?target=predicted&tta=true&scale=0.5", headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"  # type: ignore[attr-defined]
    assert Image.open(io.BytesIO(r.content)).format == "PNG" and r.headers["x-label"] in ("normal", "tumor")  # type: ignore[attr-defined]


def test_explain_refuses_bad_input_like_predict(client: TestClient, patch_file: Path) -> None:
    r = client.post("/v1/explain", files={"file": ("junk.png", b"not an image", "image/png")})
    assert r.status_code == 400 and "junk.png" in r.json()["error"]
    big = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    r = client.post("/v1/explain", files={"file": ("big.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413
    r = _post(client, patch_file, "/v1/explain?method=nope")
    assert r.status_code == 422 and "nope" in r.json()["error"]  # type: ignore[attr-defined]
    r = _post(client, patch_file, "/v1/explain?target=stroma")
    assert r.status_code == 422 and "stroma" in r.json()["error"]  # type: ignore[attr-defined]


def test_preview_turns_a_tiff_into_a_png(client: TestClient, patch_file: Path) -> None:
    r = _post(client, patch_file, "/v1/preview")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"  # type: ignore[attr-defined]
    got = np.asarray(Image.open(io.BytesIO(r.content)))  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got, read_image(patch_file).pixels)


def test_explain_needs_the_key_and_works_in_process(tiny_run: Path, patch_file: Path) -> None:
    settings = ServeSettings(str(tiny_run), api_key="s3cret", model_process=False)
    with TestClient(create_app(settings)) as c:
        assert _post(c, patch_file).status_code == 401  # type: ignore[attr-defined]
        assert _post(c, patch_file, "/v1/preview").status_code == 401  # type: ignore[attr-defined]
        r = _post(c, patch_file, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["overlay_png"]  # type: ignore[attr-defined]


def test_onnx_only_bundle_answers_409(tiny_run: Path, tmp_path: Path, patch_file: Path) -> None:
    from histoscan.inference.export import export_onnx

    run = tmp_path / "onnx-only"
    shutil.copytree(tiny_run, run)
    export_onnx(run)
    (run / "best.safetensors").unlink()
    with TestClient(create_app(ServeSettings(str(run), model_process=False))) as c:
        assert _post(c, patch_file, "/v1/predict").status_code == 200  # type: ignore[attr-defined]
        r = _post(c, patch_file)
        assert r.status_code == 409 and "Grad-CAM needs the model's weights" in r.json()["error"]  # type: ignore[attr-defined]
