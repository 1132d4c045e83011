"""Grad-CAM speed, memory and faithfulness on real tissue (../shared/data/hcd).

(a) maps/s, batched, for the CPU default model (cpu-default architecture) and resnet18, against plain
    prediction throughput of the same model in the same run (Predictor, torch backend, same images).
    Target: ratio >= 0.25 for Grad-CAM.
(b) RSS over 5,000 maps, read every --every maps: as glibc leaves it, and after malloc_trim(0) at each
    reading (growth that survives the trim is a leak, growth a trim removes is allocator retention);
    the trend (least-squares slope over the second half) and live Python objects. Target: growth <= 100 MB.
    Run it again under MALLOC_ARENA_MAX=2 to see the effect of fewer glibc arenas.
(c) Faithfulness: on real tumour patches (held-out split) that the run calls positive, delete the 20%
    of the crop's pixels with the highest map values, 20% at random, a random block and a centred Gaussian
    blob of the same area, with each fill (grey, blur, normal tissue), after checking on true negatives
    whether the fill itself raises P(tumour); report P(tumour) drops, ratios and deletion curves; the
    randomised-weights sanity check.

Without --run, trains the cpu-default config for --epochs epochs on hcd first (a few minutes on 2 cores).

Run: python benchmarks/bench_explain.py [--run RUN | --keep DIR] [--epochs 4] [--maps 5000] [--every 500]
     [--faith 200] [--parts memory,speed,faith] [--picture PNG]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import rss_mb, shared_or_exit
from histoscan.bundle import ModelBundle, build_model, save_weights
from histoscan.data.ingest import ingest
from histoscan.data.store import PatchStore
from histoscan.explain import Explainer
from histoscan.explain.faithfulness import STRATEGIES, Deletion, Fill, deletion_curve, model_view, rank_correlation
from histoscan.runfolder import RunFolder
from histoscan.system import release_free_memory
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


def untrained_run(work: Path, architecture: str, like: ModelBundle, seed: int = 0) -> Path:
    """A run folder of ``architecture`` with fresh (seeded) weights and the given bundle's preprocessing.

    For the bundle's own architecture its ``model_args`` are kept too: the randomised-weights check
    must compare the same network (cpu-default's nas_cnn has batch norm, widths and kernels of its own).
    """
    model_args = dict(like.model_args) if architecture == like.architecture else {}
    bundle = ModelBundle(architecture, like.classes, dataclasses.replace(like.preprocessing), model_args)
    run = work / f"{architecture}-untrained"
    run.mkdir(parents=True, exist_ok=True)
    bundle.save(run)
    torch.manual_seed(seed)
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


def memory(
    run: Path, images: np.ndarray, total: int, batch: int, every: int, trim: bool
) -> list[tuple[int, float, int]]:
    """(maps done, RSS in MB, live Python objects) after a warm-up batch and every ``every`` maps up to ``total``.

    With ``trim``, glibc's free heap is handed back (``malloc_trim(0)``) before each reading, so the
    reading counts memory in use rather than memory the allocator keeps for later: growth that
    survives the trim is a leak, growth that a trim removes is retention.
    """
    e = Explainer(run, batch_size=batch)
    e.explain(images[:batch])

    def reading(done: int) -> tuple[int, float, int]:
        gc.collect()
        if trim:
            release_free_memory()
        return done, rss_mb(), len(gc.get_objects())

    samples = [reading(0)]
    done = 0
    while done < total:
        start = done % len(images)
        chunk = images[start : start + batch]
        e.explain(chunk)
        done += len(chunk)
        if done // every > samples[-1][0] // every:
            samples.append(reading(done))
    return samples


def report_memory(samples: list[tuple[int, float, int]], label: str) -> None:
    """First and last reading, the range, and the trend (least-squares slope over the second half)."""
    done = np.array([s[0] for s in samples], float)
    rss = np.array([s[1] for s in samples])
    half = samples[len(samples) // 2 :]
    x, y = np.array([s[0] for s in half], float), np.array([s[1] for s in half])
    slope = float(np.polyfit(x, y, 1)[0]) * 1000 if len(half) > 1 else float("nan")
    print(
        f"    {label}: RSS {rss[0]:.0f} MB after warm-up, {rss[-1]:.0f} MB after {int(done[-1]):,} more maps "
        f"(growth {rss[-1] - rss[0]:+.0f} MB; range {rss.min():.0f}-{rss.max():.0f} MB); trend over the last "
        f"{int(x[-1] - x[0]):,} maps {slope:+.2f} MB per 1,000 maps; live Python objects {samples[0][2]:,} -> "
        f"{samples[-1][2]:,}"
    )
    print("      RSS series (maps: MB): " + ", ".join(f"{int(d):,}: {r:.0f}" for d, r in zip(done, rss)))


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


def print_curve(curve: list[Deletion], fill: str) -> Deletion:
    """One fill's deletion curve, and the 20% point's drops, ratios and per-image wins (returned)."""
    print(f"    deletion by {fill}: mean P(tumour) after (before: {float(curve[0].before.mean()):.3f})")
    print("    fraction " + " ".join(f"{s:>8s}" for s in STRATEGIES))
    for d in curve:
        print(f"    {d.fraction:8.2f} " + " ".join(f"{float(d.after[s].mean()):8.3f}" for s in STRATEGIES))
    a = next(d for d in curve if abs(d.fraction - 0.2) < 1e-9)
    print(
        f"    at 20% ({fill}): mean drop map {float(a.drop('map').mean()):+.3f}, "
        + ", ".join(f"{k} {float(a.drop(k).mean()):+.3f}" for k in STRATEGIES[1:])
        + "; ratio map/baseline: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in a.ratios().items())
        + "; images where the map wins: "
        + ", ".join(f"{k} {v:.0%}" for k, v in a.wins().items())
    )
    return a


def fill_check(e: Explainer, negatives: np.ndarray, fill: Fill, donors: np.ndarray) -> None:
    """Does the fill itself look like tumour? P(tumour) of true negatives before and after random deletion."""
    zeros = np.zeros(negatives.shape[:3], np.float32)
    d = deletion_curve(e, negatives, zeros, 1, [0.2, 1.0], fill=fill, donors=donors)
    print(
        f"    fill {fill}: on {len(negatives)} test-split negatives the model calls negative, mean P(tumour) "
        f"{float(d[0].before.mean()):.3f} -> with 20% of the crop deleted as random pixels "
        f"{float(d[0].after['random'].mean()):.3f}, a random block {float(d[0].after['block'].mean()):.3f}, "
        f"the centre blob {float(d[0].after['centre'].mean()):.3f}; all of the crop {float(d[1].after['random'].mean()):.3f}"
    )


def faithfulness(run: Path, work: Path, n: int) -> None:
    """Deletion curves and ratios on held-out real tumour patches the run calls positive; randomised weights."""
    r = RunFolder(run)
    store, split = r.select_patches(r.data_store(), "test")
    tumour, normal = np.flatnonzero(store.labels == 1), np.flatnonzero(store.labels == 0)
    images = store.batch(tumour[: 4 * n])
    e = Explainer(run, batch_size=64)
    ex = e.explain_batch(images)
    keep = np.flatnonzero(ex.predicted == 1)[:n]
    images, maps = images[keep], np.stack(ex.maps)[keep]
    print(f"\n(c) faithfulness: {len(keep)} {split}-split tumour patches the run calls positive (of {len(tumour)})")
    # true negatives the run calls negative: half are the patches the fills are checked on, half the donors of
    # the "normal" fill (never a patch's own pixels)
    negatives = store.batch(normal[: 4 * n])
    negatives = negatives[e.predictor.predict_batch(negatives).predicted == 0][: 2 * n]
    checked, donors = negatives[0::2], negatives[1::2]
    fills: tuple[Fill, ...] = ("grey", "blur", "normal")
    for fill in fills:
        fill_check(e, checked, fill, donors)
    fractions = [0.05, 0.1, 0.2, 0.3, 0.5]
    at20 = {
        fill: print_curve(deletion_curve(e, images, maps, 1, fractions, fill=fill, donors=donors), fill)
        for fill in fills
    }
    rand = untrained_run(work, e.bundle.architecture, e.bundle)
    rmaps = np.stack(Explainer(rand, batch_size=64).explain_batch(images).maps)
    # inside the crop the model sees: outside it both maps are zero by construction, which would inflate the correlation
    rows, cols = model_view(e.pre)
    corr = np.array([rank_correlation(a[rows, cols], b[rows, cols]) for a, b in zip(maps, rmaps)])
    flat = np.array([m.max() == m.min() for m in rmaps])
    shaped = f"{np.mean(corr[~flat]):.2f}" if (~flat).any() else "n/a"
    print(
        f"    randomised weights (seed 0): Spearman rank correlation with the trained maps inside the crop, mean "
        f"{np.mean(corr):.2f} (median {np.median(corr):.2f}; {int(flat.sum())} of {len(rmaps)} random maps are flat, "
        f"mean over the others {shaped})"
    )
    for fill in fills:
        d_rand = deletion_curve(e, images, rmaps, 1, [0.2], fill=fill, donors=donors)[0]
        print(
            f"      {fill}: deleting the random maps' top 20% drops the trained model's P(tumour) by "
            f"{float(d_rand.drop('map').mean()):+.3f} (its own maps' top 20%: {float(at20[fill].drop('map').mean()):+.3f}; "
            f"random pixels {float(at20[fill].drop('random').mean()):+.3f})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="An existing trained cpu-default run on hcd (default: train one)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--maps", type=int, default=5000)
    ap.add_argument("--every", type=int, default=500, help="Read RSS every this many maps")
    ap.add_argument("--faith", type=int, default=200)
    ap.add_argument("--n", type=int, default=512, help="Images per throughput measurement")
    ap.add_argument("--keep", type=Path, help="Keep the trained run (and its store) in this folder")
    ap.add_argument("--picture", type=Path, help="Write an example panel PNG here")
    ap.add_argument("--parts", default="memory,speed,faith", help="Comma-separated parts to run: memory, speed, faith")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as tmp:
        work = args.keep or Path(tmp)
        t = time.perf_counter()
        run = args.run or train_default(work, args.epochs)
        if not args.run:
            print(f"trained cpu-default for {args.epochs} epochs on hcd in {time.perf_counter() - t:.0f} s")
        store = PatchStore(RunFolder(run).data_store())
        images = store.batch(np.arange(min(args.n, len(store))))
        if "memory" in parts:  # first: a fresh process, this model only
            arena = os.environ.get("MALLOC_ARENA_MAX", "unset")
            print(f"(b) memory over {args.maps:,} maps in batches of 100 (MALLOC_ARENA_MAX {arena}):")
            for trim in (False, True):
                t = time.perf_counter()
                samples = memory(run, images, args.maps, 100, args.every, trim)
                label = "after malloc_trim(0) at each reading" if trim else "as the allocator leaves it"
                report_memory(samples, f"{label} ({args.maps / (time.perf_counter() - t):.0f} maps/s)")
        if "speed" in parts:
            bundle = Explainer(run).bundle
            print(
                f"(a) throughput on {len(images)} real 96 px patches, Grad-CAM vs prediction (torch backend, same model):"
            )
            for name, r, batch in [("cpu-default", run, 64), ("resnet18", untrained_run(work, "resnet18", bundle), 32)]:
                maps, preds = throughput(r, images if name == "cpu-default" else images[:128], batch)
                print(f"    {name:12s} {maps:8.1f} maps/s  {preds:8.1f} predictions/s  ratio {maps / preds:.2f}")
        if "faith" in parts:
            faithfulness(run, work, args.faith)
        if args.picture:
            picture(run, args.picture)


if __name__ == "__main__":
    main()
