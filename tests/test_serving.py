"""The HTTP service: every route, every bad upload, the API key, a live server under load, the web page."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image

from histoscan.data.imageio import read_image
from histoscan.inference.predictor import Predictor
from histoscan.serving.app import create_app
from histoscan.serving.state import ServeSettings
from tests.conftest import headless_chrome, shared


def _tif_bytes(img: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, img, **kw)  # type: ignore[arg-type]
    return buf.getvalue()


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def patch_files(kaggle_dir: Path) -> list[Path]:
    return sorted((kaggle_dir / "test").glob("*.tif"))[:6]


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> Iterator[TestClient]:
    with TestClient(create_app(ServeSettings(str(tiny_run), max_upload_mb=1.0, max_batch_files=4))) as c:
        yield c


def test_health_ready_and_model_card(client: TestClient, tiny_run: Path) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["ready"] is True and ready["saturated"] == [] and ready["queue"]["predict"]["limit"] == 512
    card = client.get("/v1/model").json()
    assert card["classes"] == ["normal", "tumor"] and card["architecture"] == "simple_cnn"
    assert card["input_size"] == 48 and card["threshold"] == 0.5 and "temperature" in card["calibration"]
    assert card["validation"]["name"] == "val_auroc" and card["model"] == tiny_run.name


def test_predict_one_matches_the_predictor(client: TestClient, tiny_run: Path, patch_files: list[Path]) -> None:
    f = patch_files[0]
    r = client.post("/v1/predict", files={"file": (f.name, f.read_bytes(), "image/tiff")})
    assert r.status_code == 200, r.text
    j = r.json()
    want = Predictor(tiny_run, backend="torch").predict_batch([read_image(f).pixels])
    assert j["probabilities"]["tumor"] == pytest.approx(float(want.probabilities[0, 1]), abs=1e-5)
    assert j["label"] == ["normal", "tumor"][int(want.predicted[0])] and j["prediction"] == int(want.predicted[0])
    assert j["confidence"] == pytest.approx(max(j["probabilities"].values()))
    assert j["model"] == tiny_run.name and "uncertainty" not in j
    j = client.post("/v1/predict?tta=true", files={"file": (f.name, f.read_bytes(), "image/tiff")}).json()
    assert "uncertainty" in j and j["uncertainty"] >= 0


def test_batch_keeps_order_and_reports_each_bad_file(client: TestClient, patch_files: list[Path]) -> None:
    files = [
        ("files", (patch_files[0].name, patch_files[0].read_bytes(), "image/tiff")),
        ("files", ("junk.png", b"not an image", "image/png")),
        ("files", (patch_files[1].name, patch_files[1].read_bytes(), "image/tiff")),
    ]
    r = client.post("/v1/predict/batch", files=files)
    assert r.status_code == 200
    res = r.json()["results"]
    assert res[0]["file"] == patch_files[0].name and "label" in res[0]
    assert res[1]["file"] == "junk.png" and "not an image" in res[1]["error"] and res[1]["status"] == 400
    assert res[2]["file"] == patch_files[1].name and "label" in res[2]
    too_many = [("files", (f"{i}.tif", patch_files[0].read_bytes(), "image/tiff")) for i in range(5)]
    r = client.post("/v1/predict/batch", files=too_many)
    assert r.status_code == 413 and "batch limit" in r.json()["error"]


@pytest.mark.parametrize(
    "name,payload,ctype,status,words",
    [
        ("notes.png", b"hello, this is text", "image/png", 400, "not an image"),
        ("empty.tif", b"", "image/tiff", 400, "empty"),
        ("notes.txt", b"hello", "text/plain", 415, "unsupported type"),
    ],
)
def test_bad_uploads_get_clear_4xx(
    client: TestClient, name: str, payload: bytes, ctype: str, status: int, words: str
) -> None:
    r = client.post("/v1/predict", files={"file": (name, payload, ctype)})
    assert r.status_code == status and words in r.json()["error"] and "Traceback" not in r.text


def test_truncated_tiff_bomb_oversize_and_missing_field(client: TestClient, patch_files: list[Path]) -> None:
    raw = patch_files[0].read_bytes()
    r = client.post("/v1/predict", files={"file": ("cut.tif", raw[:300], "image/tiff")})
    assert r.status_code == 400 and "cut.tif" in r.json()["error"]
    bomb = _png_bytes(Image.new("1", (12000, 12000)))  # 144 M pixels in a tiny file
    assert len(bomb) < 100_000
    r = client.post("/v1/predict", files={"file": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 413 and "too large" in r.json()["error"]
    big = np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)
    r = client.post("/v1/predict", files={"file": ("big.tif", _tif_bytes(big), "image/tiff")})
    assert r.status_code == 413 and "upload limit" in r.json()["error"]
    r = client.post("/v1/predict", data={"other": "x"})
    assert r.status_code == 422 and "file" in r.json()["error"]
    r = client.post("/v1/predict", data={"file": "/etc/passwd"})  # a path string is never opened
    assert r.status_code in (400, 422) and "root:" not in r.text
    assert client.get("/health").status_code == 200  # still serving


def test_grayscale_rgba_and_16_bit_are_converted(client: TestClient) -> None:
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 255, (96, 96), dtype=np.uint8)
    rgba = rng.integers(0, 255, (96, 96, 4), dtype=np.uint8)
    deep = rng.integers(0, 65535, (96, 96, 3), dtype=np.uint16)
    for name, data in [
        ("g.png", _png_bytes(Image.fromarray(gray))),
        ("a.png", _png_bytes(Image.fromarray(rgba, "RGBA"))),
        ("d.tif", _tif_bytes(deep, photometric="rgb")),
    ]:
        r = client.post(
            "/v1/predict", files={"file": (name, data, "image/png" if name.endswith("png") else "image/tiff")}
        )
        assert r.status_code == 200, (name, r.text)


@pytest.mark.slow
def test_api_key(tiny_run: Path, patch_files: list[Path]) -> None:
    with TestClient(create_app(ServeSettings(str(tiny_run), api_key="s3cret"))) as c:
        assert c.get("/health").status_code == 200
        for path in ("/ready", "/v1/model"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        f = patch_files[0]
        r = c.post("/v1/predict", files={"file": (f.name, f.read_bytes(), "image/tiff")})
        assert r.status_code == 401 and "API key" in r.json()["error"]
        r = c.post(
            "/v1/predict",
            files={"file": (f.name, f.read_bytes(), "image/tiff")},
            headers={"Authorization": "Bearer s3cret"},
        )
        assert r.status_code == 200


def test_page_and_openapi(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and '<input id="pick" type="file"' in r.text
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/health", "/ready", "/v1/model"} <= set(spec["paths"])
    answer = spec["components"]["schemas"]["PatchPrediction"]["properties"]
    assert {"label", "prediction", "confidence", "probabilities", "model", "uncertainty"} <= set(answer)


def test_in_process_model_answers_the_same(client: TestClient, tiny_run: Path, patch_files: list[Path]) -> None:
    f = patch_files[2]
    upload = {"file": (f.name, f.read_bytes(), "image/tiff")}
    with TestClient(create_app(ServeSettings(str(tiny_run), model_process=False))) as c:
        assert c.get("/v1/model").json()["backend"] == client.get("/v1/model").json()["backend"]
        assert c.post("/v1/predict", files=upload).json() == client.post("/v1/predict", files=upload).json()


@pytest.mark.slow
def test_a_dead_model_process_is_reported_then_restarted(tiny_run: Path, patch_files: list[Path]) -> None:
    f = patch_files[0]
    with TestClient(create_app(ServeSettings(str(tiny_run)))) as c:
        os.kill(c.app.state.histoscan.model._proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        deadline = time.time() + 20
        while c.get("/ready").status_code == 200 and time.time() < deadline:
            time.sleep(0.1)
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["ready"] is False and c.get("/health").status_code == 200
        r = c.post("/v1/predict", files={"file": (f.name, f.read_bytes(), "image/tiff")})
        assert r.status_code == 200, r.text
        assert c.get("/ready").json()["ready"] is True


# ---- a real server process ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server_process(run: Path, *options: str, key: str | None = None) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``histoscan serve RUN OPTIONS`` as a real process on a free loopback port: (url, process), until the block ends.

    ``key`` becomes HISTOSCAN_API_KEY (none by default).
    """
    import httpx

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "histoscan", "serve", str(run), "--port", str(port), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HISTOSCAN_API_KEY": key or ""},
    )
    url = f"http://127.0.0.1:{port}"
    headers = {"authorization": f"Bearer {key}"} if key else {}
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/ready", headers=headers, timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
    else:
        proc.kill()
        raise RuntimeError("server did not become ready in 120 s")
    try:
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def _server(run: Path, *options: str) -> Iterator[str]:
    """The url of ``server_process``."""
    with server_process(run, *options) as (url, _):
        yield url


@pytest.fixture(scope="module")
def live_server(tiny_run: Path) -> Iterator[str]:
    with _server(tiny_run, "--backend", "torch") as url:
        yield url


@pytest.mark.slow
def test_serve_options_reach_the_server(tiny_run: Path, patch_files: list[Path]) -> None:
    import httpx

    f = patch_files[3]
    want = Predictor(tiny_run, backend="torch").predict_batch([read_image(f).pixels])
    with _server(
        tiny_run,
        "--backend",
        "torch",
        "--in-process",
        "--no-access-log",
        "--max-wait-ms",
        "2",
        "--max-batch",
        "4",
        "--threads",
        "1",
    ) as url:
        r = httpx.post(url + "/v1/predict", files={"file": (f.name, f.read_bytes(), "image/tiff")}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["probabilities"]["tumor"] == pytest.approx(float(want.probabilities[0, 1]), abs=1e-5)


@pytest.mark.slow
def test_live_server_under_16_concurrent_clients(live_server: str, tiny_run: Path, patch_files: list[Path]) -> None:
    import httpx

    predictor = Predictor(tiny_run, backend="torch")
    expected = {f.name: float(predictor.predict_batch([read_image(f).pixels]).probabilities[0, 1]) for f in patch_files}
    uploads = [(f.name, f.read_bytes(), "image/tiff") for f in patch_files] + [("bad.png", b"garbage", "image/png")]
    stop = time.time() + 20
    counts = {"ok": 0, "4xx": 0, "5xx": 0, "mismatch": 0}
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=live_server, timeout=30) as c:
            k = i
            for _ in range(10_000):  # bounded in count as well as in time
                if time.time() > stop:
                    break
                name, data, ctype = uploads[k % len(uploads)]
                k += 1
                r = c.post("/v1/predict", files={"file": (name, data, ctype)})
                with lock:
                    if r.status_code >= 500:
                        counts["5xx"] += 1
                    elif r.status_code >= 400:
                        counts["4xx"] += 1
                    else:
                        counts["ok"] += 1
                        if abs(r.json()["probabilities"]["tumor"] - expected[name]) > 1e-4:
                            counts["mismatch"] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert counts["5xx"] == 0 and counts["mismatch"] == 0, counts
    assert counts["ok"] > 50 and counts["4xx"] > 0, counts
    assert httpx.get(live_server + "/health", timeout=5).status_code == 200


@pytest.mark.slow
def test_web_page_in_a_real_browser(live_server: str, tiny_run: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    patch = sorted((shared("hcd") / "train").glob("*.tif"))[0]
    with headless_chrome() as browser:
        browser.get(live_server + "/")
        WebDriverWait(browser, 20).until(lambda d: "simple_cnn" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "pick").send_keys(str(patch.resolve()))
        label = WebDriverWait(browser, 30).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".card .label")))
        want = Predictor(tiny_run, backend="torch").predict_batch([read_image(patch).pixels])
        assert label.text == "model's class: " + ["normal", "tumor"][int(want.predicted[0])]
        # the answer (a class, or refer / not tissue / out of distribution) and the tissue check's flag
        assert want.answers is not None and want.quality is not None
        assert browser.find_element(By.CSS_SELECTOR, ".card .answer").text == want.answers[0]
        assert browser.find_element(By.CSS_SELECTOR, ".card .quality").text == f"tissue check: {want.quality[0]}"
        assert browser.find_element(By.CSS_SELECTOR, ".card b").text == patch.name
        # browsers do not display TIFF: the page shows the server's PNG preview instead of a broken image
        shown = "const i = document.querySelector(arguments[0]); return i && i.complete ? i.naturalWidth : 0;"
        WebDriverWait(browser, 30).until(lambda d: d.execute_script(shown, ".card img.upload") > 0)
        browser.find_element(By.CSS_SELECTOR, ".card button.why").click()  # "Why?": the Grad-CAM overlay
        WebDriverWait(browser, 60).until(lambda d: d.execute_script(shown, ".card img.overlay") > 0)
        assert "evidence for" in browser.find_element(By.CSS_SELECTOR, ".explanation").text


@pytest.mark.slow
def test_container_entry_command_starts_the_server(tiny_run: Path, tmp_path: Path) -> None:
    """The Dockerfile's CMD (histoscan serve /model --host 0.0.0.0 --port 8000), from a plain install."""
    import httpx

    cmd_line = next(
        line
        for line in (Path(__file__).resolve().parents[1] / "Dockerfile").read_text().splitlines()
        if line.startswith("CMD")
    )
    import json

    argv = json.loads(cmd_line[3:].strip())
    port = str(_free_port())
    argv = [a if a != "/model" else str(tiny_run) for a in argv]
    argv[argv.index("--port") + 1] = port
    argv[argv.index("--host") + 1] = "127.0.0.1"  # the test talks only to loopback
    exe = shutil.which(argv[0], path=str(Path(sys.executable).parent)) or argv[0]
    proc = subprocess.Popen(
        [exe, *argv[1:]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HISTOSCAN_API_KEY": ""},
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            pytest.fail("the container's entry command did not bring up /health in 90 s")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
