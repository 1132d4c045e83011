"""Whole-slide scanning: throughput against the Predictor alone, memory on a huge slide, alignment on real patches.

Figures printed (and written with --json OUT: end_to_end_over_predictor {torch, onnx}, peak_rss_mb, ...):
1. tiles/s of a slide scan END TO END (open to summary.json: mask, tiles, model, every output) against
   the Predictor alone on the same tiles in memory, same run, torch and ONNX backends, alternating in one
   process (the machine may be shared): ratio, aim >= 0.85; and where the scan's time goes;
2. peak RSS while scanning a synthetic 100,000 x 100,000 px pyramidal slide with about 10% tissue
   (aim <= 1.5 GB) and its tissue-mask time (aim <= 5 s); the slide is generated once into the cache;
3. a mosaic slide of real ../shared/data/hcd test-split patches (tumour inside a drawn region, normal
   outside) scanned with stride 96: tile AUROC against the patch labels vs the Predictor's AUROC on
   the same patches (aim: equal within 0.002), and the Dice of the GeoJSON regions with the region;
4. seconds per real SVS file in ../shared/data/wsi.

The model is the shipped cpu-default config trained for a few minutes on ../shared/data/hcd (or
--run RUN). Run: python benchmarks/bench_slide.py [--run RUN] [--minutes 4] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, Recorder, add_json_option, rss_mb, shared_or_exit
from histoscan.bundle import read_bundle
from histoscan.inference.export import export_onnx
from histoscan.inference.predictor import Predictor
from histoscan.metrics import auroc
from histoscan.wsi.reader import open_slide
from histoscan.wsi.scan import ScanSettings, scan_slide
from histoscan.wsi.synthetic import sparse_tissue_slide, tumour_slide, write_slide

PCAM_MPP = 0.972  # PCam patches: 10x from 40x scans of 0.243 um/px (Veeling et al. 2018)


def train_hcd_model(cache: Path, minutes: float) -> Path:
    """The cpu-default config trained on ../shared/data/hcd for a few minutes (seed 0, 80/10/10)."""
    from histoscan.data.ingest import ingest
    from histoscan.training.config import TrainConfig, resolve_config_path
    from histoscan.training.fit import train

    run = cache / "runs" / "hcd-cpu-default"
    if (run / "model.onnx").is_file():
        return run
    store = cache / "hcd-store"
    if not (store / "meta.json").is_file():
        ingest(shared_or_exit("hcd"), store, force=True)
    cfg = TrainConfig.from_yaml(
        resolve_config_path("cpu-default"),
        {
            "data": str(store),
            "out": str(cache / "runs"),
            "name": "hcd-cpu-default",
            "max_time": minutes,
            "max_epochs": 30,
            "progress": False,
            "seed": 0,
        },
    )
    started = time.perf_counter()
    result = train(cfg, printer=lambda *_: None)
    print(
        f"trained cpu-default on hcd: {result.epochs} epochs in {time.perf_counter() - started:.0f} s, "
        f"best val AUROC {result.best_val_auroc:.4f}"
    )
    return run


def prepare(run: Path) -> Path:
    """State the model's resolution and label (Kaggle/PCam patches) and export ONNX."""
    bundle = read_bundle(run)
    if bundle.preprocessing.mpp is None:
        bundle.preprocessing.mpp = PCAM_MPP
    if bundle.preprocessing.label_size is None:
        bundle.preprocessing.label_size = 32
    bundle.save(run)
    if not (run / "model.onnx").is_file():
        export_onnx(run)
    return run


def throughput(run: Path, cache: Path, repeats: int, workers: int) -> dict[str, float]:
    """Scan a synthetic slide, then run the Predictor alone on the very same tiles held in memory.

    The two alternate ``repeats`` times (other jobs share the machine, so each pair sees similar
    load); the median ratio is reported.
    """
    path, _ = tumour_slide(cache / "throughput.tif", 48, 64, (10, 30, 10, 40), PCAM_MPP, seed=3)
    predictor = Predictor(run, backend="onnx", batch_size=256)
    predictor.predict_batch(np.zeros((8, 96, 96, 3), np.uint8))  # warm up
    out = cache / "scan-throughput"
    ratios, scans, alones, ends = [], [], [], []
    diff = 0.0
    for _ in range(repeats):
        r = scan_slide(predictor, path, out, ScanSettings(workers=workers))
        s = r.summary
        tiles = pd.read_csv(r.folder / "tiles.csv")
        reader = open_slide(path)
        images = np.stack([reader.read(round(x), round(y), 0, 96, 96) for x, y in zip(tiles.tile_x, tiles.tile_y)])
        reader.close()
        started = time.perf_counter()
        p = predictor.predict_batch(images).probabilities[:, 1]
        alone = len(images) / (time.perf_counter() - started)
        scan_tps = s["tiles"] / s["tile_seconds"]  # reading + model, after the mask and before the outputs
        scans.append(scan_tps)
        alones.append(alone)
        ends.append(s["tiles"] / s["seconds"])
        ratios.append(scan_tps / alone)
        diff = max(diff, float(np.abs(p - tiles.probability.to_numpy()).max()))
        print(f"  scan {scan_tps:.0f} tiles/s, Predictor alone {alone:.0f} tiles/s: ratio {scan_tps / alone:.3f}")
    k = int(np.argsort(ratios)[len(ratios) // 2])
    return {
        "tiles": float(s["tiles"]),
        "scan_tiles_per_s": scans[k],
        "scan_end_to_end_tiles_per_s": ends[k],
        "predictor_tiles_per_s": alones[k],
        "ratio": ratios[k],
        "max_abs_diff_scan_vs_alone": diff,
    }


def end_to_end(run: Path, cache: Path, backend: str, repeats: int, workers: int) -> dict[str, float]:
    """Scan wall time (open to summary.json) against the Predictor alone on the same tiles; median ratio.

    Scan and Predictor-alone runs alternate so each pair sees similar load; the tiles for the Predictor
    are read once, before, and held in memory. Also where the scan's own time goes (from summary.json).
    """
    path, _ = tumour_slide(cache / "throughput.tif", 48, 64, (10, 30, 10, 40), PCAM_MPP, seed=3)
    predictor = Predictor(run, backend=backend, batch_size=256)
    predictor.predict_batch(np.zeros((8, 96, 96, 3), np.uint8))  # warm up
    out = cache / f"scan-e2e-{backend}"
    settings = ScanSettings(workers=workers, force=True, backend=backend)
    first = scan_slide(predictor, path, out, settings)
    tiles = pd.read_csv(first.folder / "tiles.csv")
    reader = open_slide(path)
    images = np.stack([reader.read(round(x), round(y), 0, 96, 96) for x, y in zip(tiles.tile_x, tiles.tile_y)])
    reader.close()
    ratios, cpu_ratios, parts = [], [], []
    for _ in range(repeats):
        started, cpu = time.perf_counter(), time.process_time()
        r = scan_slide(predictor, path, out, settings)
        scan_s, scan_cpu = time.perf_counter() - started, time.process_time() - cpu
        started, cpu = time.perf_counter(), time.process_time()
        predictor.predict_batch(images)
        alone_s, alone_cpu = time.perf_counter() - started, time.process_time() - cpu
        s = r.summary
        ratios.append(alone_s / scan_s)  # (tiles / scan_s) / (tiles / alone_s)
        cpu_ratios.append(alone_cpu / scan_cpu)  # the same in CPU seconds of this process: steadier under load
        parts.append(
            (scan_s, alone_s, s["mask_seconds"], s["tile_seconds"], scan_s - s["mask_seconds"] - s["tile_seconds"])
        )
        print(
            f"  {backend}: scan {len(images) / scan_s:.0f} tiles/s end to end (mask {s['mask_seconds']:.2f} s, "
            f"tiles {s['tile_seconds']:.2f} s, outputs {parts[-1][4]:.2f} s), Predictor alone "
            f"{len(images) / alone_s:.0f} tiles/s: ratio {alone_s / scan_s:.3f} (CPU seconds: {alone_cpu / scan_cpu:.3f})"
        )
    k = int(np.argsort(ratios)[len(ratios) // 2])
    scan_s, alone_s, mask_s, tile_s, rest_s = parts[k]
    return {
        "tiles": float(len(images)),
        "ratio": ratios[k],
        "ratios": ratios,
        "cpu_ratio": float(np.median(cpu_ratios)),
        "scan_tiles_per_s": len(images) / scan_s,
        "predictor_tiles_per_s": len(images) / alone_s,
        "mask_seconds": mask_s,
        "tile_seconds": tile_s,
        "outputs_seconds": rest_s,
    }


def big_slide(run: Path, cache: Path, stride: int, tissue: float = 0.10) -> dict[str, float]:
    """Peak RSS of a child process scanning the 100,000 px slide, and its mask time.

    ``tissue``: the generated slide's tissue fraction (less tissue bounds the run's time on a busy machine;
    the grid, the mask and the outputs still cover the whole slide).
    """
    path = cache / ("sparse-100k.tif" if tissue == 0.10 else f"sparse-100k-{tissue:g}.tif")
    if not path.is_file():
        started = time.perf_counter()
        partial = path.with_name(path.name + ".partial")
        sparse_tissue_slide(partial, side=100_000, tissue=tissue)
        partial.rename(path)
        print(f"generated {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.0f} s")
    # VmHWM (the process's own peak), not ru_maxrss: a child's ru_maxrss starts from its parent's RSS at fork
    code = (
        "import json, sys\n"
        "from histoscan.inference.predictor import Predictor\n"
        "from histoscan.wsi.scan import ScanSettings, scan_slide\n"
        "def kb(key):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)) / 1024\n"
        "p = Predictor(sys.argv[1], backend='onnx', batch_size=256)\n"
        "base = kb('VmHWM:')\n"
        "r = scan_slide(p, sys.argv[2], sys.argv[3], ScanSettings(stride=int(sys.argv[4])))\n"
        "print(json.dumps({**r.summary, 'rss_before_scan_mb': base, 'peak_rss_mb': kb('VmHWM:')}))\n"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, str(run), str(path), str(cache / f"scan-big-{tissue:g}"), str(stride)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode:
        raise SystemExit(f"big-slide scan failed: {done.stderr[-2000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "peak_rss_mb": summary["peak_rss_mb"],
        "rss_before_scan_mb": summary["rss_before_scan_mb"],
        "mask_seconds": summary["mask_seconds"],
        "tissue_fraction_of_slide": summary["tissue_mm2"] / (100_000 * 100_000 * summary["slide_mpp"] ** 2 / 1e6),
        "tiles": summary["tiles"],
        "scan_seconds": summary["seconds"],
        "wall_seconds": time.perf_counter() - started,
        "level": summary["level"],
    }


def hcd_mosaic(run: Path, cache: Path) -> dict[str, float]:
    """Real test-split patches laid out as a slide (tumour inside a disc); stride 96: one tile per patch."""
    from shapely import box, union_all
    from shapely.geometry import shape

    from histoscan.data.splits import read_split
    from histoscan.data.store import PatchStore

    bundle = read_bundle(run)
    store = PatchStore(bundle.training["store"])
    split = read_split(run / "split.csv", store)
    test = store.subset(np.flatnonzero(split == "test"))
    images, labels = test.batch(np.arange(len(test))), np.asarray(test.labels)
    n = len(images)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    rr, cc = np.mgrid[0:rows, 0:cols]
    order = np.argsort(((rr - rows / 2 + 0.5) ** 2 + (cc - cols / 2 + 0.5) ** 2).ravel(), kind="stable")
    tumour, normal = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    placed = np.concatenate([tumour, normal])  # the nearest cells to the centre get the tumour patches
    cell_patch = np.full(rows * cols, -1)
    cell_patch[order[:n]] = placed
    img = np.full((rows * 96, cols * 96, 3), 243, np.uint8)
    mask = np.zeros((rows, cols), np.uint8)
    for cell, patch in enumerate(cell_patch):
        if patch >= 0:
            r, c = divmod(cell, cols)
            img[r * 96 : (r + 1) * 96, c * 96 : (c + 1) * 96] = images[patch]
            mask[r, c] = 255
    slide = write_slide(cache / "hcd-mosaic.tif", img, bundle.preprocessing.mpp, (1, 2, 4))
    mask_png = cache / "hcd-mosaic-mask.png"
    Image.fromarray(mask).save(mask_png)
    predictor = Predictor(run, backend="onnx", batch_size=256)
    r = scan_slide(predictor, slide, cache / "scan-hcd", ScanSettings(stride=96, mask=str(mask_png), min_tissue=0.5))
    tiles = pd.read_csv(r.folder / "tiles.csv")
    patch_of_tile = cell_patch[tiles.row.to_numpy() * cols + tiles.col.to_numpy()]
    assert (patch_of_tile >= 0).all() and len(tiles) == n
    p_tile = tiles.probability.to_numpy()
    y_tile = labels[patch_of_tile]
    p_alone = predictor.predict_batch(images).probabilities
    auc_tiles = auroc(y_tile, np.stack([1 - p_tile, p_tile], axis=1))
    auc_alone = auroc(labels, p_alone)
    drawn = union_all(
        [box(c * 96, r * 96, (c + 1) * 96, (r + 1) * 96) for r, c in (divmod(k, cols) for k in order[: len(tumour)])]
    )
    geo = json.loads((r.folder / "regions.geojson").read_text())
    found = union_all([shape(f["geometry"]) for f in geo["features"]]) if geo["features"] else box(0, 0, 0, 0)
    dice = 2 * found.intersection(drawn).area / (found.area + drawn.area)
    return {
        "patches": float(n),
        "tile_auroc": auc_tiles,
        "predictor_auroc": auc_alone,
        "difference": abs(auc_tiles - auc_alone),
        "max_abs_prob_diff": float(np.abs(p_tile - p_alone[patch_of_tile, 1]).max()),
        "geojson_dice": dice,
        "threshold": r.summary["threshold"],
    }


def real_svs(run: Path, cache: Path) -> dict[str, float]:
    """Seconds per real SVS file (end to end: mask, tiles, model, outputs)."""
    predictor = Predictor(run, backend="onnx", batch_size=256)
    out = {}
    for name, mpp in [("CMU-1-Small-Region.svs", None), ("TCGA-CR-7395-01A-01-TS1.svs", 0.5)]:
        path = SHARED / "wsi" / name
        if not path.is_file():
            print(f"skipped {name}: {path} is absent")
            continue
        r = scan_slide(predictor, path, cache / "scan-svs", ScanSettings(slide_mpp=mpp))
        out[name] = r.summary["seconds"]
        print(f"{name}: {r.summary['seconds']:.2f} s, {r.summary['tiles']} tiles, {r.summary['resolution']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a run folder (default: train cpu-default on hcd for --minutes)")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--cache", default="/tmp/histoscan-bench-slide", help="generated slides and the trained run")
    ap.add_argument("--big-stride", type=int, default=32, help="stride for the 100,000 px slide (32: the default scan)")
    ap.add_argument("--repeats", type=int, default=3, help="scan / Predictor-alone pairs for the throughput ratio")
    ap.add_argument("--workers", type=int, default=2, help="tile-reading threads of the scan")
    ap.add_argument("--skip", nargs="*", default=[], help="parts to skip: e2e throughput big hcd svs")
    ap.add_argument("--backends", nargs="*", default=["torch", "onnx"], help="backends for the end-to-end ratio")
    ap.add_argument("--big-tissue", type=float, default=0.10, help="tissue fraction of the generated 100,000 px slide")
    add_json_option(ap)
    args = ap.parse_args()
    rec = Recorder("bench_slide", "Slide scanning end to end against the Predictor, and peak memory", args.json)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    run = prepare(Path(args.run) if args.run else train_hcd_model(cache, args.minutes))
    print(f"run: {run} ({read_bundle(run).architecture}); rss now {rss_mb():.0f} MB")
    figures: dict[str, object] = {"run": str(run), "architecture": read_bundle(run).architecture}
    if "e2e" not in args.skip:
        e2e = {b: end_to_end(run, cache, b, args.repeats, args.workers) for b in args.backends}
        figures["end_to_end_over_predictor"] = {b: round(v["ratio"], 4) for b, v in e2e.items()}
        figures["end_to_end_detail"] = e2e
        for b, v in e2e.items():
            print(
                f"end to end ({b}, median of {args.repeats}): {v['tiles']:.0f} tiles; scan {v['scan_tiles_per_s']:.0f} "
                f"tiles/s open to summary.json, Predictor alone {v['predictor_tiles_per_s']:.0f} tiles/s: ratio "
                f"{v['ratio']:.3f} (aim >= 0.85; in CPU seconds {v['cpu_ratio']:.3f}); mask {v['mask_seconds']:.2f} s, tiles {v['tile_seconds']:.2f} s, "
                f"outputs {v['outputs_seconds']:.2f} s"
            )
    if "throughput" not in args.skip:
        t = throughput(run, cache, args.repeats, args.workers)
        print(
            f"throughput (median of {args.repeats}): {t['tiles']:.0f} tiles; scan {t['scan_tiles_per_s']:.0f} tiles/s "
            f"({t['scan_end_to_end_tiles_per_s']:.0f} end to end with mask and outputs), Predictor alone "
            f"{t['predictor_tiles_per_s']:.0f} tiles/s: ratio {t['ratio']:.3f} (aim >= 0.85); "
            f"max |p_scan - p_alone| {t['max_abs_diff_scan_vs_alone']:.2e}"
        )
    if "hcd" not in args.skip:
        h = hcd_mosaic(run, cache)
        print(
            f"hcd mosaic: {h['patches']:.0f} test patches; tile AUROC {h['tile_auroc']:.4f} vs Predictor "
            f"{h['predictor_auroc']:.4f} (|diff| {h['difference']:.4f}, aim <= 0.002; max |dp| "
            f"{h['max_abs_prob_diff']:.2e}); GeoJSON Dice with the drawn region {h['geojson_dice']:.3f} "
            f"at threshold {h['threshold']:.3f}"
        )
    if "svs" not in args.skip:
        real_svs(run, cache)
    if "big" not in args.skip:
        b = big_slide(run, cache, args.big_stride, args.big_tissue)
        figures["peak_rss_mb"] = round(b["peak_rss_mb"], 1)
        figures["big_slide"] = b
        print(
            f"100,000 x 100,000 px slide ({b['tissue_fraction_of_slide']:.1%} tissue, level {b['level']}, stride "
            f"{args.big_stride}): {b['tiles']} tiles in {b['scan_seconds']:.0f} s; peak RSS {b['peak_rss_mb']:.0f} MB "
            f"(aim <= 1536; {b['rss_before_scan_mb']:.0f} MB with the model loaded, before the scan); tissue mask in "
            f"{b['mask_seconds']:.2f} s (aim <= 5)"
        )
    rec.figures.update(figures)
    rec.write()


if __name__ == "__main__":
    main()
