"""Grad-CAM speed, memory and faithfulness on real tissue (../shared/data/hcd).

(a) maps/s, batched, for the CPU default model (cpu-default architecture) and resnet18, against plain
    prediction throughput of the same model in the same run (Predictor, torch backend, same images).
    Target: ratio >= 0.25 for Grad-CAM.
(b) RSS before and after 5,000 maps. Target: growth <= 100 MB.
(c) Faithfulness: on real tumour patches (held-out split) that the run calls positive, grey out the 20%
    of pixels with the highest map values, 20% at random, a random block and a centred Gaussian blob of
    the same area; report P(tumour) drops, ratios and deletion curves; the randomised-weights sanity check.

Without --run, trains the cpu-default config for --epochs epochs on hcd first (a few minutes on 2 cores).

Run: python benchmarks/bench_explain.py [--run RUN | --keep DIR] [--epochs 4] [--maps 5000] [--faith 200]
     [--picture PNG]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import rss_mb, shared_or_exit
from histoscan.bundle import ModelBundle, build_model, save_weights
from histoscan.data.ingest import ingest
from histoscan.data.store import PatchStore
from histoscan.explain import Explainer
from histoscan.explain.faithfulness import STRATEGIES, Deletion, deletion_curve, rank_correlation
from histoscan.preprocessing import Preprocessing
from histoscan.runfolder import RunFolder
from histoscan.training.config import TrainConfig
from histoscan.training.fit import train


def train_default(work: Path, epochs: int) -> Path:
    """The cpu-default config on hcd for a few epochs (enough for a model that scores real patches)."""
    hcd = shared_or_exit("hcd")
    store = ingest(hcd, work / "store").store
    cfg = TrainConfig.load("cpu-default", {"data": str(store), "out": str(work / "runs"), "name": "default"})
    cfg = cfg.replace(seed=0)
    cfg = cfg.replace(max_epochs=epochs, progress=False, early_stopping=None)
    return train(cfg, printer=lambda *_: None).run_dir


def untrained_run(work: Path, architecture: str, like: ModelBundle) -> Path:
    """A run folder of ``architecture`` with fresh weights and the given bundle's preprocessing."""
    bundle = ModelBundle(architecture, like.classes, Preprocessing(**vars(like.preprocessing)))
    run = work / f"{architecture}-untrained"
    run.mkdir(parents=True, exist_ok=True)
    bundle.save(run)
    save_weights(build_model(bundle), run / "best.safetensors")
    return run


def throughput(run: Path, images: np.ndarray, batch: int, repeats: int = 2) -> tuple[float, float]:
    """(maps/s, predictions/s) of one model on the same images, best of ``repeats``."""
    e = Explainer(run, batch_size=batch)
    e.explain(images[:batch])  # warm-up
    e.predictor.predict_batch(images[:batch])
    maps, preds = 0.0, 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        e.explain(images)
        maps = max(maps, len(images) / (time.perf_counter() - t))
        t = time.perf_counter()
        e.predictor.predict_batch(images)
        preds = max(preds, len(images) / (time.perf_counter() - t))
    return maps, preds


def memory(run: Path, images: np.ndarray, total: int, batch: int) -> tuple[float, float, float]:
    """RSS (MB) after a warm-up batch and after ``total`` maps, and the seconds they took."""
    e = Explainer(run, batch_size=batch)
    e.explain(images[:batch])
    gc.collect()
    before = rss_mb()
    t = time.perf_counter()
    done = 0
    while done < total:
        chunk = images[(done % len(images)) : (done % len(images)) + batch]
        e.explain(chunk)
        done += len(chunk)
    gc.collect()
    return before, rss_mb(), time.perf_counter() - t


def picture(run: Path, path: Path) -> None:
    """An example for the README: the most confident held-out tumour patch, patch | map | overlay."""
    from histoscan.explain.render import Geometry, panel, png_bytes

    r = RunFolder(run)
    store, _ = r.select_patches(r.data_store(), "test")
    images = store.batch(np.flatnonzero(store.labels == 1)[:64])
    e = Explainer(run)
    ex = e.explain_batch(images)
    i = int(np.argmax(ex.probabilities[:, 1]))
    pre = e.pre
    caption = [f"held-out hcd tumour patch, P(tumour) = {ex.probabilities[i, 1]:.3f} (Grad-CAM, cpu-default)"]
    geometry = Geometry.from_preprocessing(pre.image_size, pre.label_size, pre.crop)
    path.write_bytes(png_bytes(panel(images[i], ex.maps[i], float(ex.maps[i].max()), caption, geometry)))
    print(f"picture: {path}")


def faithfulness(run: Path, work: Path, n: int) -> None:
    """Deletion curves and ratios on held-out real tumour patches the run calls positive; randomised weights."""
    r = RunFolder(run)
    store, split = r.select_patches(r.data_store(), "test")
    tumour = np.flatnonzero(store.labels == 1)
    images = store.batch(tumour[: 4 * n])
    e = Explainer(run, batch_size=64)
    ex = e.explain_batch(images)
    keep = np.flatnonzero(ex.predicted == 1)[:n]
    images, maps = images[keep], np.stack(ex.maps)[keep]
    print(f"\n(c) faithfulness: {len(keep)} {split}-split tumour patches the run calls positive (of {len(tumour)})")
    fractions = [0.05, 0.1, 0.2, 0.3, 0.5]
    at20: dict[str, Deletion] = {}
    for fill in ("grey", "blur"):
        curve = deletion_curve(e, images, maps, 1, fractions, fill=fill)
        print(f"    deletion by {fill}: mean P(tumour) after (before: {float(curve[0].before.mean()):.3f})")
        print("    fraction " + " ".join(f"{s:>8s}" for s in STRATEGIES))
        for d in curve:
            print(f"    {d.fraction:8.2f} " + " ".join(f"{float(d.after[s].mean()):8.3f}" for s in STRATEGIES))
        a = at20[fill] = curve[fractions.index(0.2)]
        print(
            f"    at 20% ({fill}): mean drop map {float(a.drop('map').mean()):+.3f}, "
            + ", ".join(f"{k} {float(a.drop(k).mean()):+.3f}" for k in STRATEGIES[1:])
            + "; ratio map/baseline: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in a.ratios().items())
            + "; images where the map wins: "
            + ", ".join(f"{k} {v:.0%}" for k, v in a.wins().items())
        )
    rand = untrained_run(work, e.bundle.architecture, e.bundle)
    rmaps = np.stack(Explainer(rand, batch_size=64).explain_batch(images).maps)
    # inside the crop the model sees: outside it both maps are zero by construction, which would inflate the correlation
    c = e.pre.crop or 0
    h, w = maps.shape[1:]
    top, left = (h - c) // 2 if c else 0, (w - c) // 2 if c else 0
    inner = (slice(None), slice(top, h - top), slice(left, w - left))
    corr = [rank_correlation(a, b) for a, b in zip(maps[inner], rmaps[inner])]
    flat = int(sum(m.max() == m.min() for m in rmaps))
    d_rand = deletion_curve(e, images, rmaps, 1, [0.2], fill="blur")[0]
    print(
        f"    randomised weights: Spearman rank correlation with the trained maps (inside the crop), mean {np.mean(corr):.2f} "
        f"(median {np.median(corr):.2f}; {flat} of {len(rmaps)} random maps are flat); blurring the random "
        f"maps' top 20% drops P(tumour) by {float(d_rand.drop('map').mean()):+.3f} "
        f"(trained maps: {float(at20['blur'].drop('map').mean()):+.3f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="A trained cpu-default run on hcd (default: train one)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--maps", type=int, default=5000)
    ap.add_argument("--faith", type=int, default=200)
    ap.add_argument("--n", type=int, default=512, help="Images per throughput measurement")
    ap.add_argument("--keep", type=Path, help="Keep the trained run (and its store) in this folder")
    ap.add_argument("--picture", type=Path, help="Write an example panel PNG here")
    ap.add_argument("--faith-only", action="store_true", help="Only the faithfulness figures (c)")
    ap.add_argument("--no-faith", action="store_true", help="Skip the faithfulness figures (c)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as tmp:
        work = args.keep or Path(tmp)
        t = time.perf_counter()
        run = args.run or train_default(work, args.epochs)
        if not args.run:
            print(f"trained cpu-default for {args.epochs} epochs on hcd in {time.perf_counter() - t:.0f} s")
        if args.faith_only:
            faithfulness(run, work, args.faith)
            return
        store = PatchStore(RunFolder(run).data_store())
        images = store.batch(np.arange(min(args.n, len(store))))
        before, after, secs = memory(run, images, args.maps, 100)  # first: a fresh process, this model only
        print(
            f"(b) RSS {before:.0f} MB after warm-up and {after:.0f} MB after {args.maps:,} more maps "
            f"(growth {after - before:+.1f} MB; {args.maps / secs:.0f} maps/s)"
        )
        bundle = Explainer(run).bundle
        print(
            f"(a) throughput on {len(images)} real 96 px patches, Grad-CAM vs prediction (torch backend, same model):"
        )
        for name, r, batch in [("cpu-default", run, 64), ("resnet18", untrained_run(work, "resnet18", bundle), 32)]:
            maps, preds = throughput(r, images if name == "cpu-default" else images[:128], batch)
            print(f"    {name:12s} {maps:8.1f} maps/s  {preds:8.1f} predictions/s  ratio {maps / preds:.2f}")
        if not args.no_faith:
            faithfulness(run, work, args.faith)
        if args.picture:
            picture(run, args.picture)


if __name__ == "__main__":
    main()
