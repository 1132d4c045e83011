"""``histoscan explain``: maps for every image of the inputs, one PNG each, explain.csv and explain.html.

Two passes keep memory flat on any number of images and still draw every picture on one scale:
the first computes maps batch by batch and parks each batch (patches and maps) in a temporary
file under ``--out``; the second, knowing the largest map value, draws the pictures.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histoscan.data.sources.kaggle import read_id_table
from histoscan.data.store import META_FILE
from histoscan.errors import DataError
from histoscan.explain.explainer import Explainer
from histoscan.explain.gallery import Item, keep_top, outcome, write_gallery
from histoscan.explain.render import Geometry, overlay_png, panel, png_bytes
from histoscan.explain.settings import ExplainSettings
from histoscan.inference.inputs import Batch, input_batches, store_input_batches
from histoscan.inference.predict import InputStainGroups
from histoscan.inference.tta import tta_views
from histoscan.runfolder import RunFolder
from histoscan.system import available_cores, release_free_memory


@dataclass
class ExplainResult:
    """What ``explain_inputs`` wrote."""

    out: Path
    count: int
    scale: float
    gallery: Path
    table: Path
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    errors: Path | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Labelled:
    batch: Batch
    labels: list[int | None]
    groups: np.ndarray | None = None  # per-group stain models: each image's stain group


def _wanted_ids(ids: str | None) -> set[str] | None:
    if not ids:
        return None
    p = Path(ids)
    if p.is_file():
        return {line.strip() for line in p.read_text().splitlines() if line.strip()}
    return {s.strip() for s in ids.split(",") if s.strip()}


def _batches(path: Path, explainer: Explainer, s: ExplainSettings, label_of: dict[str, int]) -> Iterator[_Labelled]:
    """Batches of one input with their true labels (None where unknown), filtered by ``--ids``."""
    wanted = _wanted_ids(s.ids)
    if path.is_dir() and (path / META_FILE).is_file():
        store, _ = RunFolder(s.run_dir).select_patches(path, s.split)
        if wanted is not None:
            store = store.subset(np.flatnonzero(np.isin(store.ids.astype(str), list(wanted))))
        labels = store.labels
        names = explainer.pre.estimate_store_groups(store)  # per-group stain models: the patches' groups
        start = 0
        for b in store_input_batches(store, s.batch_size):
            stop = start + len(b.ids)
            groups = names[start:stop] if names is not None else None
            yield _Labelled(b, [int(v) if v >= 0 else None for v in labels[start:stop]], groups)
            start = stop
        return
    if s.split:
        raise DataError(f"{path}: --split applies to a packed store, not to image files")
    workers = s.workers if s.workers is not None else available_cores()
    one = InputStainGroups(None) if explainer.pre.per_group else None  # loose images: one group, as in predict
    for b in input_batches(path, explainer.pre, s.batch_size, workers):
        if wanted is not None:
            keep = [i for i, pid in enumerate(b.ids) if pid in wanted]
            b = Batch([b.ids[i] for i in keep], b.images[keep] if keep else b.images[:0], b.failures)
        groups = one.of(b, explainer.predictor) if one is not None and b.ids else None
        yield _Labelled(b, [label_of.get(pid, label_of.get(Path(pid).stem)) for pid in b.ids], groups)


def _safe(pid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", pid)


def _prepare_out(s: ExplainSettings, inputs: Sequence[str | Path]) -> Path:
    out = Path(s.out)
    for given in [s.run_dir, *inputs]:
        g = Path(given).resolve()
        if out.resolve() == g or g in out.resolve().parents:
            raise DataError(f"{out}: is inside an input of this command ({given}); choose another --out")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file; --out names a folder")
    if out.is_dir() and any(out.iterdir()) and not s.force:
        raise DataError(f"{out}: already exists and is not empty; pass --force to write into it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def explain_inputs(
    settings: ExplainSettings,
    inputs: Sequence[str | Path],
    explainer: Explainer | None = None,
    progress: Callable[[int], None] | None = None,
) -> ExplainResult:
    """Explain every image of ``inputs`` (files, folders, stores, PCam files) into ``settings.out``."""
    s = settings
    if not inputs:
        raise DataError("explain: give at least one INPUT (an image, a folder or a store)")
    for given in inputs:
        if not Path(given).exists():
            raise DataError(f"{given}: no such file or folder")
    ex = explainer or Explainer(s.run_dir, s.method, s.target, s.device, s.batch_size, s.layer, s.finer)
    warnings = slow_warning(ex, s.slow_seconds)
    label_of = (
        {pid: int(lab) for pid, lab, _ in read_id_table(Path(s.labels), True)[0] if lab is not None} if s.labels else {}
    )
    out = _prepare_out(s, inputs)
    parked = out / ".explain-tmp"
    shutil.rmtree(parked, ignore_errors=True)
    parked.mkdir()
    failures: list[tuple[str, str, str]] = []
    vmax, count, parts = 0.0, 0, 0
    try:
        for path in inputs:
            for lb in _batches(Path(path), ex, s, label_of):
                failures.extend(lb.batch.failures)
                if progress:
                    progress(len(lb.batch.ids) + len(lb.batch.failures))
                if not lb.batch.ids:
                    continue
                e = ex.explain_batch(lb.batch.images, s.tta, lb.groups)
                maps = np.stack(e.maps)
                vmax = max(vmax, float(maps.max()))
                np.savez(
                    parked / f"{parts:06d}.npz",
                    images=ex.pre.fit_batch(lb.batch.images),
                    maps=maps,
                    probabilities=e.probabilities,
                    predicted=e.predicted,
                    labels=np.array([-1 if v is None else v for v in lb.labels]),
                    ids=np.array(lb.batch.ids, dtype=object),
                    targets=np.array(e.targets, dtype=object),
                )
                parts += 1
                count += len(lb.batch.ids)
                release_free_memory()  # keeps RSS flat over thousands of maps (glibc keeps freed heap otherwise)
        if not count:
            first = f" (first failure: {failures[0][1]}: {failures[0][2]})" if failures else ""
            raise DataError(f"{', '.join(map(str, inputs))}: no readable images{first}")
        table, gallery = _draw(out, parked, ex, s, vmax)
    finally:
        shutil.rmtree(parked, ignore_errors=True)
    errors = None
    if failures:
        errors = out / "errors.csv"
        with errors.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "path", "reason"])
            w.writerows(failures)
    (out / "explain.json").write_text(
        json.dumps(
            {
                "run": str(s.run_dir),
                "method": ex.method,
                "layer": ex.choice.name,
                "grid": list(ex.choice.grid),
                "target": s.target,
                "tta": len(tta_views(ex.bundle, s.tta, "explain")) > 1,
                "scale": s.scale,
                "global_max": vmax,
                "count": count,
                "unreadable": len(failures),
            },
            indent=2,
        )
    )
    return ExplainResult(out, count, vmax, gallery, table, failures, errors, warnings)


def slow_warning(ex: Explainer, limit: float) -> list[str]:
    """A warning (the explanation still runs) when one map took longer than ``limit`` seconds on the first image."""
    took = ex.seconds_per_image
    if not took > limit:
        return []
    return [
        f"{ex.method} on model {ex.bundle.architecture!r} at input size {ex.pre.input_size}: {took:.1f} s for one map "
        f"(more than {limit:g} s); expect a long run, or use fewer images, --method gradcam, or a GPU (--device)"
    ]


def _draw(out: Path, parked: Path, ex: Explainer, s: ExplainSettings, vmax: float) -> tuple[Path, Path]:
    """Second pass: the PNGs, explain.csv and explain.html, every picture on the scale ``vmax``."""
    pre, classes = ex.pre, ex.bundle.classes
    geometry = Geometry.from_preprocessing(pre.image_size, pre.label_size, pre.crop)
    images_dir = out / "images"
    images_dir.mkdir(exist_ok=True)
    if s.save_maps:
        (out / "maps").mkdir(exist_ok=True)
    table = out / "explain.csv"
    items: list[Item] = []
    counts: dict[str, int] = {}
    pos = 1 if len(classes) == 2 else None
    with table.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["id", *[f"prob_{c}" for c in classes], "predicted", "label", "target", "map_max", "map_mean", "png"]
        )
        for part in sorted(parked.glob("*.npz")):
            with np.load(part, allow_pickle=True) as z:
                batch = {k: z[k] for k in z.files}
            for i, pid in enumerate(batch["ids"]):
                pid = str(pid)
                m, img = batch["maps"][i], batch["images"][i]
                probs, pred, lab = batch["probabilities"][i], int(batch["predicted"][i]), int(batch["labels"][i])
                label = None if lab < 0 else lab
                scale = vmax if s.scale == "global" else float(m.max())
                name = _safe(pid)
                p = float(probs[pos]) if pos is not None else float(probs[pred])
                caption = [
                    f"{pid}",
                    f"P({classes[pos] if pos is not None else classes[pred]}) = {p:.3f}, predicted {classes[pred]}"
                    + (f", true {classes[label]}" if label is not None else "")
                    + f"; map of {batch['targets'][i]} ({ex.method})",
                ]
                png = images_dir / f"{name}.png"
                png.write_bytes(png_bytes(panel(img, m, scale, caption, geometry)))
                if s.save_maps:
                    np.save(out / "maps" / f"{name}.npy", m.astype(np.float32))
                w.writerow(
                    [
                        pid,
                        *[f"{v:.6f}" for v in probs],
                        classes[pred],
                        "" if label is None else classes[label],
                        batch["targets"][i],
                        f"{float(m.max()):.6g}",
                        f"{float(m.mean()):.6g}",
                        png.relative_to(out),
                    ]
                )
                group = outcome(label, pred, classes)
                counts[group] = counts.get(group, 0) + 1
                items.append(Item(pid, p, group, overlay_png(img, m, scale, geometry), f"{pid}: {caption[1]}"))
            items = keep_top(items, s.gallery_limit)
    notes = [
        f"{ex.method} maps of run {Path(s.run_dir).name}, colour scale "
        + (f"0 .. {vmax:.3g} for every picture (one scale)" if s.scale == "global" else "each picture its own maximum")
        + "; green box: the labelled centre; blue box: the crop the model sees (the map is zero outside it)."
    ]
    gallery = write_gallery(
        out / "explain.html", f"Explanations: {Path(s.run_dir).name}", items, s.gallery_limit, notes, counts
    )
    return table, gallery
