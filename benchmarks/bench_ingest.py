"""Ingest and store-reading speed.

(a) Ingest of ../shared/data/hcd (parallel decode into the store) against a plain
    single-process loop that opens each file with Pillow into a list, in the same run.
    Target: ratio >= 1.6 on 2 cores.
(b) Random training batches of 256 from a 100,000-patch synthetic store, with dihedral +
    colour augmentation: images/s (target >= 5,000 on 2 cores) and RSS growth (target < 300 MB).

Run: python benchmarks/bench_ingest.py [--n-store 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, add_json_option, rss_mb, shared_or_exit
from histoscan.data.ingest import ingest
from histoscan.data.store import PatchStore
from histoscan.data.synthetic import write_synthetic_store
from histoscan.data.transforms import ColourJitter, RandomDihedral, to_float_nchw
from histoscan.system import available_cores


def pillow_loop(paths: list[Path]) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def bench_ingest(repeats: int, work: Path) -> dict[str, float]:
    root = shared_or_exit("hcd")
    paths = sorted((root / "train").glob("*.tif"))
    for p in paths:  # warm the page cache so both sides read from memory
        p.read_bytes()
    base, ours = [], []
    for r in range(repeats):
        t = time.perf_counter()
        imgs = pillow_loop(paths)
        base.append(len(imgs) / (time.perf_counter() - t))
        del imgs
        out = work / f"store{r}"
        t = time.perf_counter()
        res = ingest(root, out, workers=available_cores())
        ours.append(res.report["stored"] / (time.perf_counter() - t))
        shutil.rmtree(out)
    b, o = max(base), max(ours)
    print(
        f"ingest hcd ({len(paths)} tif, {available_cores()} workers): {o:,.0f} img/s; "
        f"Pillow loop: {b:,.0f} img/s; ratio {o / b:.2f} (target >= 1.6)"
    )
    return {"patches": len(paths), "workers": available_cores(), "ingest_img_s": round(o), "pillow_loop_img_s": round(b),
            "ratio": round(o / b, 3)}  # fmt: skip


def bench_stream(n: int, work: Path, seconds: float) -> dict[str, float]:
    t = time.perf_counter()
    path = write_synthetic_store(work / "big", n, seed=0)
    print(f"built a {n:,}-patch synthetic store in {time.perf_counter() - t:.0f} s")
    store = PatchStore(path)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dihedral, colour = RandomDihedral(), ColourJitter(0.15, 0.15, 0.15)
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    perm = rng.permutation(n)
    # warm-up batch, then measure
    x = colour(dihedral(to_float_nchw(store.batch(perm[:256])), gen), gen)
    rss0 = rss_mb()
    done, peak = 0, rss0
    t = time.perf_counter()
    pos = 0
    while time.perf_counter() - t < seconds or pos < 256 * 20:
        if pos + 256 > n:
            perm, pos = rng.permutation(n), 0
        x = colour(dihedral(to_float_nchw(store.batch(perm[pos : pos + 256])), gen), gen)
        pos += 256
        done += x.shape[0]
        peak = max(peak, rss_mb())
    dt = time.perf_counter() - t
    print(
        f"random batches of 256 + dihedral + colour jitter: {done / dt:,.0f} img/s over {done:,} images "
        f"({torch.get_num_threads()} torch threads; target >= 5,000); RSS growth {peak - rss0:.0f} MB (target < 300 MB)"
    )
    return {"store_patches": n, "img_s": round(done / dt), "images": done, "torch_threads": torch.get_num_threads(),
            "rss_growth_mb": round(peak - rss0)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-store", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stream-seconds", type=float, default=30.0)
    add_json_option(ap)
    args = ap.parse_args()
    rec = Recorder("bench_ingest", "Ingest and store-reading speed", args.json)
    with tempfile.TemporaryDirectory(prefix="histoscan-bench-") as tmp:
        rec.figures["ingest"] = bench_ingest(args.repeats, Path(tmp))
        rec.figures["stream"] = bench_stream(args.n_store, Path(tmp), args.stream_seconds)
    rec.write()


if __name__ == "__main__":
    main()
