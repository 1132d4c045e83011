"""The service under attack: 8 good clients for 30 s, with and without a ninth that loops over the hostile corpus.

A briefly trained cpu-default run (ONNX) is served by ``histoscan serve`` with its defaults on
127.0.0.1. Phase 1: 8 good clients post real 96x96 HCD patches for ``--seconds`` (the
baseline). Phase 2: the same, while a ninth client sends tests/hostile_corpus.py's cases
(decompression bombs, truncated and looping files, NaN floats, malformed multipart) in a
loop. Meanwhile /health is polled every 20 ms and the RSS of the whole server process tree
(server, model process, decode threads) is sampled every 20 ms. Phase 3: each hostile case
alone, then two large uploads just inside the limits (an 18 MB PNG and a JPEG, both 4000x4000),
the tree's RSS sampled every 5 ms during each, so the rise caused by one request is known.

Figures: good-request throughput with / without the hostile client (target >= 0.8), /health
p99 (target <= 100 ms), peak RSS and the largest rise caused by one request under the upload
limit (target <= 300 MB), 5xx count (target 0), and 503s counted apart (documented
backpressure, each must carry Retry-After).

Run: python benchmarks/bench_hostile.py [--seconds 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.hostile_corpus import image_corpus, large_allowed, malformed_multipart, tree_rss_mb

from _common import shared_or_exit
from bench_serve import free_port, load, make_run, multipart_request, start_server
from histoscan.data.ingest import ingest


class Sampler(threading.Thread):
    """Polls /health and the tree's RSS every ``period`` s until stopped (bounded by ``limit`` samples)."""

    def __init__(self, url: str, pid: int, period: float = 0.02, limit: int = 20_000) -> None:
        super().__init__(daemon=True)
        self.url, self.pid, self.period, self.limit = url, pid, period, limit
        self.health: list[float] = []
        self.rss: list[float] = []
        self.health_errors = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=10) as c:
            while not self._halt.is_set() and len(self.rss) < self.limit:
                self.rss.append(tree_rss_mb(self.pid))
                t0 = time.perf_counter()
                try:
                    ok = c.get("/health").status_code == 200
                except Exception:
                    ok = False
                self.health.append(time.perf_counter() - t0)
                self.health_errors += not ok
                time.sleep(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=15)


class Hostile(threading.Thread):
    """Sends the hostile corpus in a loop until stopped (bounded in count); counts statuses."""

    def __init__(self, url: str, good: bytes, limit: int = 100_000) -> None:
        super().__init__(daemon=True)
        self.url, self.limit = url, limit
        self.cases = [c for c in image_corpus(good) if c.name != "good.tif"]
        self.statuses: Counter[int] = Counter()
        self.missing_retry_after = 0
        self._halt = threading.Event()

    def one(self, c: object, k: int) -> None:
        import httpx

        assert isinstance(c, httpx.Client)
        if k % (len(self.cases) + 1) == len(self.cases):
            for _, headers, body in malformed_multipart():
                self.count(c.post("/v1/predict", content=body, headers=headers))
            return
        case = self.cases[k % (len(self.cases) + 1)]
        self.count(c.post("/v1/predict", files={"file": (case.name, case.data, case.content_type)}))

    def count(self, r: object) -> None:
        import httpx

        assert isinstance(r, httpx.Response)
        self.statuses[r.status_code] += 1
        if r.status_code == 503 and "retry-after" not in r.headers:
            self.missing_retry_after += 1

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=60) as c:
            for k in range(self.limit):
                if self._halt.is_set():
                    break
                try:
                    self.one(c, k)
                except httpx.HTTPError:
                    self.statuses[0] += 1  # connection closed by the server (e.g. after a 413 mid-body)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=90)


def phase(url: str, port: int, pid: int, requests: list[bytes], seconds: float, good: bytes | None) -> dict:
    """8 good clients for ``seconds`` (and the hostile one when ``good`` is given)."""
    sampler = Sampler(url, pid)
    hostile = Hostile(url, good) if good is not None else None
    sampler.start()
    if hostile:
        hostile.start()
    rate, lat, non200 = load(port, requests, 8, seconds)
    if hostile:
        hostile.stop()
    sampler.stop()
    return {"rate": rate, "non200": non200, "sampler": sampler, "hostile": hostile, "p99": np.percentile(lat, 99)}


def _watch(pid: int, peak: list[float], done: threading.Event) -> None:
    while not done.is_set():
        peak.append(tree_rss_mb(pid))
        time.sleep(0.005)


def one_by_one(url: str, pid: int, good: bytes) -> list[tuple[str, int, float]]:
    """Each hostile case alone: (name, status, rise of the tree's RSS over its idle value in MB)."""
    import httpx

    out = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for case in [*image_corpus(good), *large_allowed()]:
            time.sleep(0.5)
            idle = tree_rss_mb(pid)
            peak, done = [idle], threading.Event()
            w = threading.Thread(target=_watch, args=(pid, peak, done), daemon=True)
            w.start()
            r = c.post("/v1/predict", files={"file": (case.name, case.data, case.content_type)})
            time.sleep(0.1)
            done.set()
            w.join()
            out.append((case.name, r.status_code, max(peak) - idle))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--n", type=int, default=256, help="Real patches the good clients post.")
    args = ap.parse_args()
    hcd = shared_or_exit("hcd")
    print(f"{os.cpu_count()} CPU cores (other jobs may share them)")
    with tempfile.TemporaryDirectory(prefix="histoscan-bench-hostile-") as tmp:
        work = Path(tmp)
        run = make_run(ingest(hcd, work / "store").store, work / "runs", "cpu-default")
        paths = sorted((hcd / "train").glob("*.tif"))[: args.n]
        good = paths[0].read_bytes()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        requests = [multipart_request(port, p.name, p.read_bytes()) for p in paths]
        server = start_server(run, port, "--no-access-log")
        try:
            load(port, requests[:16], 4, 2.0)  # warm-up
            idle = tree_rss_mb(server.pid)
            base = phase(url, port, server.pid, requests, args.seconds, None)
            attacked = phase(url, port, server.pid, requests, args.seconds, good)
            singles = one_by_one(url, server.pid, good)
        finally:
            server.terminate()
            server.wait(timeout=30)
    h: Hostile = attacked["hostile"]
    for name, res in (("without", base), ("with", attacked)):
        s: Sampler = res["sampler"]
        p99 = np.percentile(s.health, 99) * 1000 if s.health else float("nan")
        print(
            f"{name:>7} the hostile client: {res['rate']:7.1f} good req/s (p99 {res['p99'] * 1000:.0f} ms, "
            f"{res['non200']} non-200), /health p99 {p99:.1f} ms over {len(s.health)} polls "
            f"({s.health_errors} failed), tree RSS peak {max(s.rss):.0f} MB (idle {idle:.0f} MB)"
        )
    print(f"throughput ratio with / without: {attacked['rate'] / base['rate']:.2f} (target >= 0.8)")
    fivexx = sum(v for k, v in h.statuses.items() if k >= 500 and k != 503)
    print(
        f"hostile client: {sum(h.statuses.values())} requests, statuses {dict(sorted(h.statuses.items()))}; "
        f"5xx other than 503: {fivexx} (target 0); 503s: {h.statuses.get(503, 0)} "
        f"({h.missing_retry_after} without Retry-After)"
    )
    worst = max(singles, key=lambda t: t[2])
    print(
        f"one request at a time: largest tree RSS rise {worst[2]:.0f} MB ({worst[0]}, status {worst[1]}) (target <= 300)"
    )
    for name, status, rise in singles:
        print(f"  {name:>22}: {status}  +{rise:.0f} MB")


if __name__ == "__main__":
    main()
