"""Grad-CAM faithfulness against baselines that could beat it, speed beside prediction, and memory.

(faith) On held-out tumour patches (the run's test split) that the run calls positive: ROAD most- and
    least-relevant-first at 10-50% removed and their combination (pytorch-grad-cam's ROAD metrics), and
    deletion / insertion AUC with the neutral fill (the same pixels of a held-out normal patch the run
    calls negative), for the map and for six baselines: random pixels, a random block, a centred disc,
    another image's map (shuffled), the mean of the other maps, and a nuclei-density map (haematoxylin
    optical density by colour deconvolution: no model). Per baseline: the paired per-image difference
    map - baseline (oriented so that > 0 favours the map), its 95% bootstrap interval and the per-image win
    rate. Pre-registered aim (docs/guide/explain.md): the map beats every baseline's ROAD combined score
    with an interval that excludes zero.
(speed) maps/s against plain predictions/s of the same model on the same real patches (torch backend),
    for each run and for untrained timm families at the first run's preprocessing (--speed-archs).
(memory) RSS over --maps maps, as the allocator leaves it and after malloc_trim(0) (growth that survives
    the trim is a leak).

Run: python benchmarks/bench_explain.py --run RUN [--run RUN ...] [--n 150] [--n-timm 80]
     [--parts faith,speed] [--speed-archs resnet18,...] [--json OUT] [--picture PNG]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, add_json_option, rss_mb
from histoscan.bundle import ModelBundle, build_model, save_weights
from histoscan.data.store import PatchStore
from histoscan.explain import Explainer
from histoscan.explain.road import (
    BASELINES,
    FRACTIONS,
    ProbabilityTarget,
    baseline_maps,
    deletion_insertion_auc,
    paired_interval,
    rank_maps,
    road,
    view_nuclei_maps,
)
from histoscan.models.registry import registered
from histoscan.runfolder import RunFolder
from histoscan.system import release_free_memory


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
    caption = [
        f"held-out hcd tumour patch, P(tumour) = {ex.probabilities[i, 1]:.3f} ({e.method}, {e.bundle.architecture})"
    ]
    geometry = Geometry.from_preprocessing(pre.image_size, pre.label_size, pre.crop)
    path.write_bytes(png_bytes(panel(images[i], ex.maps[i], float(ex.maps[i].max()), caption, geometry)))
    print(f"picture: {path}")


# (metric, what it is per image, True when higher is more faithful)
METRICS = (
    ("ROAD combined", "mean over 10-50% of (LeRF - MoRF) / 2", True),
    ("ROAD MoRF", "change of P(tumour), most relevant removed first, mean over 10-50%", False),
    ("ROAD LeRF", "change of P(tumour), least relevant removed first, mean over 10-50%", True),
    ("deletion AUC", "P(tumour) as the top pixels become normal tissue, 0-100%", False),
    ("insertion AUC", "P(tumour) as the top pixels are put into normal tissue, 0-100%", True),
)


def held_out(run: Path, n: int) -> tuple[Explainer, np.ndarray, np.ndarray, str, int]:
    """The explainer, up to ``n`` test-split tumour patches it calls positive, normal donors it calls negative."""
    r = RunFolder(run)
    store, split = r.select_patches(r.data_store(), "test")
    e = Explainer(run, batch_size=32)
    tumour, normal = np.flatnonzero(store.labels == 1), np.flatnonzero(store.labels == 0)
    cand = store.batch(tumour[: 3 * n])
    images = cand[e.predictor.predict_batch(cand).predicted == 1][:n]
    norm = store.batch(normal[: 2 * n])
    donors = norm[e.predictor.predict_batch(norm).predicted == 0]
    return e, images, donors, split, len(tumour)


def faithfulness(run: Path, n: int, boot: int, seed: int, rec: Recorder) -> dict[str, Any]:
    """ROAD and deletion / insertion AUC of the map and every baseline; paired intervals; per-image wins."""
    name = run.name
    t0 = time.perf_counter()
    e, images, donors, split, tumours = held_out(run, n)
    rng = np.random.default_rng(seed)
    maps, x, _ = e.input_maps(images)
    fill = e.pre(e.pre.fit_batch(donors[rng.integers(0, len(donors), len(images))]), "cpu", 0).float()
    candidates = {"map": maps, **baseline_maps(maps, view_nuclei_maps(e, images), rng)}
    ranks = {k: rank_maps(v, rng) for k, v in candidates.items()}
    target = ProbabilityTarget(1, e.bundle.temperature)
    print(
        f"\n[{name}] {e.bundle.architecture}, {e.method} on {e.choice.name!r} ({e.choice.grid[0]} x "
        f"{e.choice.grid[1]} grid, input {e.pre.input_size} px): {len(images)} {split}-split tumour patches it calls "
        f"positive (of {tumours}); {len(donors)} normal donors it calls negative"
    )
    scores: dict[str, dict[str, np.ndarray]] = {}
    fraction_rows = []
    for k, rm in ranks.items():
        rd = road(e.model, x, rm, target, FRACTIONS, seed=seed)
        dele, ins = deletion_insertion_auc(e.model, x, fill, rm, target)
        scores[k] = {
            "ROAD combined": rd.combined,
            "ROAD MoRF": rd.morf.mean(axis=0),
            "ROAD LeRF": rd.lerf.mean(axis=0),
            "deletion AUC": dele,
            "insertion AUC": ins,
        }
        row: dict[str, Any] = {"model": name, "map": k}
        row.update({f"MoRF {round(f * 100)}%": float(v.mean()) for f, v in zip(FRACTIONS, rd.morf)})
        row.update({f"LeRF {round(f * 100)}%": float(v.mean()) for f, v in zip(FRACTIONS, rd.lerf)})
        fraction_rows.append(row)
        print(
            f"  {k:9s} ROAD combined {float(rd.combined.mean()):+.4f}  MoRF {float(rd.morf.mean()):+.4f}  "
            f"LeRF {float(rd.lerf.mean()):+.4f}  deletion AUC {float(dele.mean()):.4f}  insertion AUC {float(ins.mean()):.4f}"
        )
    rows, figures = [], {}
    for metric, _, higher in METRICS:
        for b in BASELINES:
            sign = 1.0 if higher else -1.0
            diff = sign * (scores["map"][metric] - scores[b][metric])
            mean, lo, hi = paired_interval(diff, boot, seed)
            rows.append(
                {
                    "model": name,
                    "metric": metric,
                    "baseline": b,
                    "map": float(scores["map"][metric].mean()),
                    "baseline score": float(scores[b][metric].mean()),
                    "map better by": mean,
                    "95% low": lo,
                    "95% high": hi,
                    "map wins (images)": float((diff > 0).mean()),
                }
            )
            if metric == "ROAD combined":
                figures[b] = {"difference": mean, "ci_low": lo, "ci_high": hi, "win_rate": float((diff > 0).mean())}
    missed = [b for b in BASELINES if not figures[b]["ci_low"] > 0]
    print(f"  map better by (ROAD combined; 95% interval; images won), n = {len(images)}:")
    for b in BASELINES:
        f = figures[b]
        print(f"    vs {b:9s} {f['difference']:+.4f} [{f['ci_low']:+.4f}, {f['ci_high']:+.4f}]  {f['win_rate']:.0%}")
    verdict = "met" if not missed else f"missed (interval does not exclude zero against: {', '.join(missed)})"
    print(f"  pre-registered aim (beat every baseline's ROAD combined score): {verdict}")
    rec.tables.setdefault("map minus baseline (> 0 favours the map; paired 95% bootstrap intervals)", []).extend(rows)
    rec.tables.setdefault("ROAD: mean change of P(tumour) at each fraction removed", []).extend(fraction_rows)
    return {
        "architecture": e.bundle.architecture,
        "method": e.method,
        "layer": e.choice.name,
        "grid": list(e.choice.grid),
        "input_size": e.pre.input_size,
        "n": len(images),
        "aim_met": not missed,
        "road_combined_map": float(scores["map"]["ROAD combined"].mean()),
        "road_combined_vs": figures,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def speed(runs: list[Path], archs: list[str], work: Path, n: int, rec: Recorder) -> dict[str, Any]:
    """maps/s and predictions/s per architecture, same model and images (torch backend, batches of 32)."""
    store = PatchStore(RunFolder(runs[0]).data_store())
    images = store.batch(np.arange(min(n, len(store))))
    like = Explainer(runs[0]).bundle
    subjects = [(r.name, r) for r in runs] + [(f"{a} (untrained)", untrained_run(work, a, like)) for a in archs]
    out: dict[str, Any] = {}
    print(f"\n(speed) {len(images)} real patches, batches of 32, torch backend on {torch.get_num_threads()} threads:")
    for name, run in subjects:
        e = Explainer(run, batch_size=32)
        maps, preds = throughput(run, images, 32)
        row = {
            "model": name,
            "architecture": e.bundle.architecture,
            "method": e.method,
            "input px": e.pre.input_size,
            "maps/s": maps,
            "predictions/s": preds,
            "ratio": maps / preds,
        }
        rec.tables.setdefault("speed: maps/s beside plain prediction", []).append(row)
        out[name] = {"maps_per_s": maps, "predictions_per_s": preds, "ratio": maps / preds}
        print(f"  {name:32s} {maps:8.1f} maps/s  {preds:8.1f} predictions/s  ratio {maps / preds:.2f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, action="append", required=True, help="A trained run on hcd (repeatable)")
    ap.add_argument("--n", type=int, default=150, help="Held-out tumour patches per histoscan model")
    ap.add_argument("--n-timm", type=int, default=80, help="Held-out tumour patches per timm model (slower)")
    ap.add_argument("--boot", type=int, default=2000, help="Bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--faith-threads",
        type=int,
        default=1,
        help="Torch threads for the faithfulness part (1: on a shared, oversubscribed machine 2 threads were slower)",
    )
    ap.add_argument("--parts", default="faith,speed", help="Comma-separated: faith, speed, memory")
    ap.add_argument("--speed-archs", default="", help="Untrained architectures to time too, comma-separated")
    ap.add_argument("--speed-n", type=int, default=64, help="Images per throughput measurement")
    ap.add_argument("--maps", type=int, default=5000, help="Maps for the memory part")
    ap.add_argument("--every", type=int, default=500, help="Read RSS every this many maps")
    ap.add_argument("--picture", type=Path, help="Write an example panel PNG of the first run here")
    ap.add_argument(
        "--append",
        action="store_true",
        help="Merge into the existing --json file: its other runs' sections are kept, its command listed in the notes",
    )
    add_json_option(ap)
    args = ap.parse_args()
    rec = Recorder("bench_explain", "Grad-CAM faithfulness against baselines, and speed", args.json)
    rec.tee()
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as tmp:
        if "faith" in parts:
            threads = torch.get_num_threads()
            torch.set_num_threads(args.faith_threads)  # not a timing figure: only the wall time of the run
            for run in args.run:
                arch = json.loads((run / "model.json").read_text())["architecture"]
                n = args.n if registered(arch) is not None else args.n_timm
                rec.figures.setdefault("faithfulness", {})[run.name] = faithfulness(run, n, args.boot, args.seed, rec)
            torch.set_num_threads(threads)
        if "speed" in parts:
            archs = [a for a in args.speed_archs.split(",") if a]
            rec.figures["speed"] = speed(args.run, archs, Path(tmp), args.speed_n, rec)
        if "memory" in parts:
            run = args.run[0]
            images = PatchStore(RunFolder(run).data_store()).batch(np.arange(256))
            arena = os.environ.get("MALLOC_ARENA_MAX", "unset")
            print(f"\n(memory) over {args.maps:,} maps in batches of 100 (MALLOC_ARENA_MAX {arena}):")
            for trim in (False, True):
                samples = memory(run, images, args.maps, 100, args.every, trim)
                report_memory(samples, "after malloc_trim(0) at each reading" if trim else "as the allocator leaves it")
        if args.picture:
            picture(args.run[0], args.picture)
    rec.notes.append(
        "Faithfulness: every map (the CAM map and each baseline) is ranked, ties broken at random, before ROAD "
        "thresholds it; ROAD uses pytorch-grad-cam's noisy linear imputation; P(tumour) uses the run's temperature."
    )
    if args.append and args.json is not None and args.json.is_file():
        merge_earlier(rec, json.loads(args.json.read_text()))
    rec.write()


def merge_earlier(rec: Recorder, earlier: dict[str, Any]) -> None:
    """Keep an earlier file's sections that this run did not measure again (one file, per-model sections).

    A section is replaced only where this run wrote the same part (figures) or table rows of the same model.
    """
    for part, models in earlier.get("figures", {}).items():
        mine = rec.figures.setdefault(part, {})
        for name, figures in models.items():
            mine.setdefault(name, figures)
    for title, rows in earlier.get("tables", {}).items():
        measured = {r.get("model") for r in rec.tables.get(title, [])}
        rec.tables[title] = [r for r in rows if r.get("model") not in measured] + rec.tables.get(title, [])
    rec.output = [*earlier.get("output", []), *rec.output]
    source = (
        f"Earlier sections from: {earlier.get('command')} (commit {earlier.get('commit')}, {earlier.get('date')}, "
        f"machine {'quiet' if earlier.get('quiet') else 'busy'})."
    )
    rec.notes = list(dict.fromkeys([*earlier.get("notes", []), source, *rec.notes]))


if __name__ == "__main__":
    main()
