"""EDA speed and memory.

``histoscan eda`` on a 100,000-patch synthetic 96x96 store: wall time (aim: under 60 s on 2 cores)
and resident memory growth (aim: under 500 MB). Per-patch quality checks cover every patch; mean
images and histograms use the default sample of 5,000 per class.

Run: python benchmarks/bench_eda.py [--n 100000] [--sample 5000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, add_json_option, rss_mb
from histoscan.data.synthetic import write_synthetic_store
from histoscan.eda.report import run_eda


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--sample", type=int, default=5000)
    add_json_option(ap)
    args = ap.parse_args()
    rec = Recorder("bench_eda", "Data report (eda) speed and memory", args.json)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = write_synthetic_store(Path(tmp) / "store", args.n)
        print(f"built a {args.n:,}-patch synthetic store in {time.perf_counter() - t0:.0f} s")
        before = rss_mb()
        peak = [before]

        def progress(total: int):  # sample RSS while the per-patch pass streams the store
            def advance(n: int) -> None:
                peak[0] = max(peak[0], rss_mb())

            return advance

        r = run_eda(store, Path(tmp) / "eda", sample=args.sample, progress=progress)
        peak[0] = max(peak[0], rss_mb())
        print(
            f"eda on {args.n:,} patches: {r.seconds:.1f} s (aim < 60 s), {len(r.figures)} figures; "
            f"RSS growth {peak[0] - before:.0f} MB at the peak of the per-patch pass, {rss_mb() - before:.0f} MB at the end "
            f"(aim < 500 MB)"
        )
        print(f"quality: {r.summary['quality']}, counts {r.summary['counts']}")
        rec.figures.update(
            patches=args.n,
            sample_per_class=args.sample,
            eda_seconds=round(r.seconds, 1),
            figures=len(r.figures),
            rss_growth_peak_mb=round(peak[0] - before),
            rss_growth_end_mb=round(rss_mb() - before),
        )
    rec.write()


if __name__ == "__main__":
    main()
