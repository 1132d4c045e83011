"""Serving speed: requests/s and latency with 1 and 16 concurrent clients, against the Predictor.

For each model (by default the cpu-default CNN and a ResNet18), a briefly trained run is exported
to ONNX and served by ``histoscan serve`` with its defaults, in a process on 127.0.0.1. Clients
post real 96x96 TIFF patches from ../shared/data/hcd to /v1/predict as multipart uploads, for a
bounded time each, over keep-alive connections. The Predictor's batch throughput is measured on the
same decoded images in this process, before and after the server runs (the mean is the reference).
Target: with 16 clients, served images/s >= 0.7 of the Predictor's.

The clients are asyncio sockets, each request prepared once, so they cost the shared CPU little
(an httpx client thread per connection took about as much CPU as the server itself). The CPU each
process used is printed too: on a small machine the server, the model and the clients share the
same cores, which the Predictor alone has to itself.

With ``--slides`` (the default) the first model's server also serves a folder of scanned slides (the
shared CMU-1 region and TCGA slide, scanned by that model) and, on the same server after the predict
loads, Deep Zoom tiles are fetched by 16 clients: every tile of the two pyramids once with an empty
cache (cold), then again from the cache (cached), then more until 10,000 tile requests were made in all; the
server's RSS is read before the first tile and after the last (aim: growth <= 200 MB).

Run: python benchmarks/bench_serve.py [--seconds 15] [--models cpu-default resnet18] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, add_json_option, finish, shared_or_exit
from histoscan.data.imageio import read_image
from histoscan.data.ingest import ingest
from histoscan.inference.export import export_onnx
from histoscan.inference.predictor import Predictor
from histoscan.training.config import TrainConfig, resolve_config_path
from histoscan.training.fit import train
from histoscan.wsi.scan import ScanSettings, scan_slide


def make_run(store: Path, out: Path, model: str) -> Path:
    """A run of ``model`` (a shipped config name or an architecture) trained for a few steps, exported to ONNX."""
    quick = {
        "data": str(store),
        "out": str(out),
        "name": model,
        "max_epochs": 1,
        "limit_train_batches": 5,
        "progress": False,
        "early_stopping": None,
    }
    try:
        cfg = TrainConfig.from_yaml(resolve_config_path(model), quick)
    except Exception:
        cfg = TrainConfig(model=model, pretrained=False, **quick)  # type: ignore[arg-type]
    run = train(cfg, printer=lambda *_: None).run_dir
    export_onnx(run)
    return run


def predictor_rate(predictor: Predictor, images: list[np.ndarray], seconds: float) -> float:
    """Images/s of ``predict_batch`` on all ``images`` (after a warm-up at the same batch shapes)."""
    predictor.predict_batch(images)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        predictor.predict_batch(images)
        n += len(images)
    return n / (time.perf_counter() - start)


# ---- a light HTTP/1.1 client ---------------------------------------------------------------
def multipart_request(port: int, name: str, data: bytes) -> bytes:
    """The bytes of one POST /v1/predict with ``data`` as the multipart field ``file``."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: image/tiff\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _client(
    port: int, requests: list[bytes], first: int, stop: float, latencies: list[float], statuses: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    k = first
    try:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            writer.write(requests[k % len(requests)])
            k += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                None,
            )
            if length is None:
                raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t)
            statuses.append(int(head[9:12]))
    finally:
        writer.close()


def load(port: int, requests: list[bytes], clients: int, seconds: float) -> tuple[float, list[float], int]:
    """Requests/s, latencies (s) and non-200 count for ``clients`` connections posting for ``seconds``."""
    latencies: list[float] = []
    statuses: list[int] = []

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(
            *(_client(port, requests, i * 7, start + seconds, latencies, statuses) for i in range(clients))
        )
        return time.perf_counter() - start

    elapsed = asyncio.run(run())
    return len(latencies) / elapsed, latencies, sum(s != 200 for s in statuses)


# ---- CPU used per process (Linux /proc) -------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        out += [int(k) for k in kids]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(run: Path, port: int, *options: str) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [sys.executable, "-m", "histoscan", "serve", str(run), "--port", str(port), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(f"GET /ready HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
                if b'"ready":true' in s.recv(4096) + s.recv(4096):
                    return server
        except OSError:
            time.sleep(0.3)
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
    server.kill()
    raise RuntimeError("the server was not ready in 120 s")


def serve_and_load(
    run: Path,
    port: int,
    requests: list[bytes],
    seconds: float,
    clients_list: tuple[int, ...],
    *options: str,
    then: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> list[tuple[object, float, float, float, int, str]]:
    """Start the server, post with each number of clients, run ``then(server)``, stop it; one line per load."""
    server = start_server(run, port, *options)
    lines: list[tuple[object, float, float, float, int, str]] = []
    try:
        load(port, requests[:16], 4, 2.0)  # warm-up
        for clients in clients_list:
            kids = children(server.pid)[:1]
            pids = {"server": server.pid, **({"model process": kids[0]} if kids else {})}
            cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
            client0, wall0 = time.process_time(), time.perf_counter()
            rate, lat, errors = load(port, requests, clients, seconds)
            wall = time.perf_counter() - wall0
            used = {k: (cpu_seconds(p) - cpu0[k]) / wall for k, p in pids.items()}
            used["clients"] = (time.process_time() - client0) / wall
            p50, p99 = np.percentile(lat, [50, 99]) * 1000
            lines.append(
                (clients, rate, float(p50), float(p99), errors, ", ".join(f"{k} {v:.2f}" for k, v in used.items()))
            )
        if then is not None:
            then(server)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return lines


# ---- Deep Zoom tiles on the same server ----------------------------------------------------------
TILE_REQUESTS = 10_000


def scanned_slides(run: Path, out: Path) -> Path:
    """The shared CMU-1 region and TCGA slide scanned by ``run`` into ``out`` (what ``--slides`` serves)."""
    wsi = shared_or_exit("wsi")
    predictor = Predictor(run)
    model_mpp = None if predictor.bundle.preprocessing.mpp else 1.0  # a store without a resolution: say 1 um/px
    for name, mpp in (("CMU-1-Small-Region.svs", None), ("TCGA-CR-7395-01A-01-TS1.svs", 0.5)):
        scan_slide(predictor, wsi / name, out, ScanSettings(slide_mpp=mpp, model_mpp=model_mpp))
    return out


def tile_requests(port: int, folder: Path) -> list[bytes]:
    """One GET per tile of every level of every slide in ``folder``."""
    from openslide import open_slide
    from openslide.deepzoom import DeepZoomGenerator

    out = []
    for summary in sorted(folder.glob("*/summary.json")):
        info = json.loads(summary.read_text())
        dz = DeepZoomGenerator(open_slide(info["path"]), 254, 1, limit_bounds=True)
        for level, (cols, rows) in enumerate(dz.level_tiles):
            out += [
                f"GET /v1/slides/{summary.parent.name}_files/{level}/{c}_{r}.jpeg HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\n\r\n".encode()
                for r in range(rows)
                for c in range(cols)
            ]
    return out


def fetch_all(port: int, requests: list[bytes], clients: int) -> tuple[float, int]:
    """Send every request once, split over ``clients`` connections: (requests/s, non-200 count)."""
    statuses: list[int] = []

    async def one(share: list[bytes]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for req in share:
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(x.split(b":", 1)[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                statuses.append(int(head[9:12]))
        finally:
            writer.close()

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(one(requests[i::clients]) for i in range(clients)))
        return time.perf_counter() - start

    elapsed = asyncio.run(run())
    return len(statuses) / elapsed, sum(s != 200 for s in statuses)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return kb / 1000


def bench_tiles(port: int, folder: Path, server: subprocess.Popen[bytes], figures: dict[str, Any]) -> None:
    """Cold and cached Deep Zoom tiles/s with 16 clients, and the server's RSS before the first of 10,000 tile
    requests and after the last."""
    requests = tile_requests(port, folder)
    before = rss_mb(server.pid)  # before the first tile: the growth includes the cache filling up
    cold, cold_errors = fetch_all(port, requests, 16)
    cached, cached_errors = fetch_all(port, requests, 16)
    rest = max(0, TILE_REQUESTS - 2 * len(requests))  # 10,000 tile requests in all, the two passes included
    many = (requests * (rest // max(1, len(requests)) + 1))[:rest]
    _, many_errors = fetch_all(port, many, 16) if many else (0.0, 0)
    after = rss_mb(server.pid)
    figures.update(
        deepzoom_tiles=len(requests),
        deepzoom_tiles_per_s_cold=round(cold, 1),
        deepzoom_tiles_per_s_cached=round(cached, 1),
        deepzoom_errors=cold_errors + cached_errors + many_errors,
        tile_requests=TILE_REQUESTS,
        server_rss_mb_before_tiles=round(before, 1),
        server_rss_mb_after_tiles=round(after, 1),
        server_rss_growth_mb=round(after - before, 1),
    )
    print(
        f"  Deep Zoom, 16 clients, {len(requests)} distinct tiles: cold {cold:,.0f} tiles/s, cached {cached:,.0f} "
        f"tiles/s; server RSS {before:,.0f} MB -> {after:,.0f} MB after {TILE_REQUESTS:,} tile requests "
        f"(growth {after - before:+.0f} MB, aim <= 200); {cold_errors + cached_errors + many_errors} errors"
    )


def bench_model(
    run: Path, paths: list[Path], seconds: float, in_process: bool, slides: Path | None = None
) -> dict[str, Any]:
    images = [read_image(p).pixels for p in paths]
    predictor = Predictor(run)  # the same default backend the server picks
    before = predictor_rate(predictor, images, seconds / 3)
    port = free_port()
    requests = [multipart_request(port, p.name, p.read_bytes()) for p in paths]
    figures: dict[str, Any] = {}
    options = ("--slides", str(slides)) if slides is not None else ()

    def tiles(server: subprocess.Popen[bytes]) -> None:
        if slides is not None:
            bench_tiles(port, slides, server, figures)

    lines = serve_and_load(run, port, requests, seconds, (1, 16), *options, then=tiles)
    if in_process:  # the same server with the model in a thread of its own process
        lines += [
            ("in-process", *line[1:]) for line in serve_and_load(run, port, requests, seconds, (16,), "--in-process")
        ]
    after = predictor_rate(predictor, images, seconds / 3)
    reference = (before + after) / 2
    print(
        f"{run.name} ({predictor.backend.name}): Predictor {reference:,.0f} img/s on {len(images)} patches "
        f"(before {before:,.0f}, after {after:,.0f})"
    )
    figures.update(model=run.name, backend=predictor.backend.name, predictor_img_per_s=round(reference, 1))
    for clients, rate, p50, p99, errors, cpu in lines:
        who = f"{clients:2d} client(s)" if clients != "in-process" else "16 clients, --in-process"
        line = f"  {who}: {rate:7.1f} req/s (= img/s), p50 {p50:6.1f} ms, p99 {p99:6.1f} ms, {errors} errors"
        if clients != 1:
            line += f"; served / Predictor = {rate / reference:.2f} (target >= 0.7)"
        print(line + f"\n      CPU cores busy: {cpu}")
        tag = "in_process_16" if clients == "in-process" else f"clients_{clients}"
        figures[f"predict_img_per_s_{tag}"] = round(rate, 1)
        figures[f"predict_p99_ms_{tag}"] = round(p99, 1)
        figures[f"predict_errors_{tag}"] = errors
    if "deepzoom_tiles_per_s_cold" in figures:  # printed after the predict figures it sat beside
        print(
            f"  Deep Zoom on the same server: cold {figures['deepzoom_tiles_per_s_cold']:,.0f} tiles/s, cached "
            f"{figures['deepzoom_tiles_per_s_cached']:,.0f} tiles/s, RSS growth {figures['server_rss_growth_mb']:+.0f} MB"
        )
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--n", type=int, default=512, help="Patches posted (and given to the Predictor).")
    ap.add_argument(
        "--models", nargs="*", default=["cpu-default", "resnet18"], help="Shipped config names or architectures."
    )
    ap.add_argument("--no-in-process", action="store_true", help="Skip the 16-client run with --in-process.")
    ap.add_argument("--no-slides", action="store_true", help="Skip the Deep Zoom tiles (served with --slides).")
    add_json_option(ap)
    args = ap.parse_args()
    rec = Recorder("bench_serve", "Serving speed against the Predictor", args.json)
    hcd = shared_or_exit("hcd")
    print(f"{os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory(prefix="histoscan-bench-serve-") as tmp:
        work = Path(tmp)
        store = ingest(hcd, work / "store").store
        paths = sorted((hcd / "train").glob("*.tif"))[: args.n]
        results = []
        for i, model in enumerate(args.models):
            run = make_run(store, work / "runs", model)
            slides = None if args.no_slides or i > 0 else scanned_slides(run, work / "slides")
            results.append(bench_model(run, paths, args.seconds, not args.no_in_process, slides))
    rec.figures.update({"cpu_cores": os.cpu_count(), "models": results})  # written by finish(), in the envelope


if __name__ == "__main__":
    main()
    finish()
