"""Serving speed: requests/s and latency with 1 and 16 concurrent clients, against the Predictor.

Same run and model throughout (the cpu-default architecture, exported to ONNX, served with the
default backend). Clients post real 96x96 TIFF patches from ../shared/data/hcd to /v1/predict on a
server process on 127.0.0.1 for a bounded time each. The Predictor's batch throughput is measured on
the same decoded images in this process. Target: with 16 clients, served images/s >= 0.7 of the Predictor's.

Run: python benchmarks/bench_serve.py [--seconds 15]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import shared_or_exit  # noqa: E402

from histoscan.data.imageio import read_image  # noqa: E402
from histoscan.data.ingest import ingest  # noqa: E402
from histoscan.inference.export import export_onnx  # noqa: E402
from histoscan.inference.predictor import Predictor  # noqa: E402
from histoscan.training.config import TrainConfig, resolve_config_path  # noqa: E402
from histoscan.training.fit import train  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load(url: str, files: list[tuple[str, bytes]], clients: int, seconds: float) -> tuple[float, list[float], int]:
    """Requests/s, latencies (s) and non-200 count for ``clients`` threads posting for ``seconds``."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for k in range(i, i + 100_000):  # bounded in count and in time
                if time.perf_counter() > stop:
                    return
                name, data = files[k % len(files)]
                t = time.perf_counter()
                r = c.post("/v1/predict", files={"file": (name, data, "image/tiff")})
                dt = time.perf_counter() - t
                with lock:
                    latencies.append(dt)
                    errors[0] += r.status_code != 200

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.perf_counter() - start), latencies, errors[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--n", type=int, default=512)
    args = ap.parse_args()
    hcd = shared_or_exit("hcd")
    with tempfile.TemporaryDirectory(prefix="histoscan-bench-serve-") as tmp:
        work = Path(tmp)
        store = ingest(hcd, work / "store").store
        cfg = TrainConfig.from_yaml(resolve_config_path("cpu-default"), {
            "data": str(store), "out": str(work / "runs"), "name": "bench", "max_epochs": 1, "limit_train_batches": 20,
            "progress": False})
        run = train(cfg, printer=lambda *_: None).run_dir
        export_onnx(run)
        paths = sorted((hcd / "train").glob("*.tif"))[: args.n]
        files = [(p.name, p.read_bytes()) for p in paths]
        images = [read_image(p).pixels for p in paths]
        predictor = Predictor(run)  # same default backend the server picks
        predictor.predict_batch(images[:64])
        t = time.perf_counter()
        for _ in range(3):
            predictor.predict_batch(images)
        batch_rate = 3 * len(images) / (time.perf_counter() - t)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "histoscan", "serve", str(run), "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(url + "/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            load(url, files[:16], 4, 2.0)  # warm-up
            print(f"backend {predictor.backend.name}; Predictor batch throughput {batch_rate:,.0f} img/s on {len(images)} patches")
            for clients in (1, 16):
                rate, lat, errors = load(url, files, clients, args.seconds)
                p50, p99 = np.percentile(lat, [50, 99]) * 1000
                line = (f"{clients:2d} client(s): {rate:7.1f} req/s (= img/s), p50 {p50:6.1f} ms, p99 {p99:6.1f} ms, "
                        f"{errors} errors")
                if clients == 16:
                    line += f"; served / Predictor = {rate / batch_rate:.2f} (target >= 0.7)"
                print(line)
        finally:
            server.terminate()
            server.wait(timeout=15)


if __name__ == "__main__":
    main()
