"""Ingest: decode a source in parallel, validate it, and write a packed store."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoscan.data.imageio import FastTiffReader, ImageReadError, fit_to_size, probe_size
from histoscan.data.sources import Entry, Source, open_source
from histoscan.data.store import StoreWriter
from histoscan.enums import FIT_POLICIES
from histoscan.errors import ConfigError, DataError
from histoscan.system import available_cores

PROBE_LIMIT = 256
CHUNK = 64

ProgressFn = Callable[[int], None]


@dataclass
class DecodeResult:
    """What decoding one entry told us (pixels are already in the store)."""

    pos: int
    ok: bool
    original_size: tuple[int, int] | None = None
    conversions: tuple[str, ...] = ()
    digest: str | None = None
    error: str | None = None


@dataclass
class IngestResult:
    """Where the store went and the validation report."""

    store: Path
    report: dict[str, Any]


def dominant_size(source: Source, entries: list[Entry]) -> tuple[int, int]:
    """The most common (height, width), from file headers of up to PROBE_LIMIT evenly spaced entries."""
    if not source.decodes_files:
        first = source.load_block(entries[:1])[0]
        return first.original_size
    step = max(1, len(entries) // PROBE_LIMIT)
    sizes = Counter(s for s in (probe_size(e.ref) for e in entries[::step]) if s is not None)
    if not sizes:
        return (96, 96)  # nothing probed; decoding reports each unreadable file
    return sizes.most_common(1)[0][0]


# ---- decoding into the memory map (runs in worker processes) ------------------
_worker_state: dict[str, Any] = {}


def _init_worker(images_path: str, size: tuple[int, int], fit: str) -> None:
    _worker_state["images"] = np.load(images_path, mmap_mode="r+")
    _worker_state["size"] = size
    _worker_state["fit"] = fit
    _worker_state["reader"] = FastTiffReader()


def _decode_into(items: list[tuple[int, str]]) -> list[DecodeResult]:
    images, size, read, fit = (_worker_state[k] for k in ("images", "size", "reader", "fit"))
    out = []
    for pos, ref in items:
        try:
            img = read(ref)
        except ImageReadError as exc:
            out.append(DecodeResult(pos, False, error=str(exc)))
            continue
        px = img.pixels
        digest = hashlib.blake2b(px.tobytes(), digest_size=16).hexdigest()
        conv = list(img.conversions)
        px, fitted = fit_to_size(px, size, fit)
        if fitted:
            conv.append(fitted)
        images[pos] = px
        out.append(DecodeResult(pos, True, img.original_size, tuple(conv), digest))
    return out


def _decode_files(
    entries: list[Entry],
    images_path: Path,
    size: tuple[int, int],
    fit: str,
    workers: int,
    progress: ProgressFn | None,
) -> list[DecodeResult]:
    items = [(i, e.ref) for i, e in enumerate(entries)]
    chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
    results: list[DecodeResult] = []
    if workers <= 1:
        _init_worker(str(images_path), size, fit)
        try:
            for chunk in chunks:
                results.extend(_decode_into(chunk))
                if progress:
                    progress(len(chunk))
        finally:
            _worker_state.clear()
        return results
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(images_path), size, fit)) as pool:
        for part in pool.imap_unordered(_decode_into, chunks):
            results.extend(part)
            if progress:
                progress(len(part))
    return results


def _decode_arrays(
    source: Source,
    entries: list[Entry],
    images: np.ndarray,
    size: tuple[int, int],
    fit: str,
    progress: ProgressFn | None,
) -> list[DecodeResult]:
    results = []
    block = 1024
    for start in range(0, len(entries), block):
        part = entries[start : start + block]
        for k, img in enumerate(source.load_block(part)):
            px, conv = img.pixels, list(img.conversions)
            digest = hashlib.blake2b(px.tobytes(), digest_size=16).hexdigest()
            px, fitted = fit_to_size(px, size, fit)
            if fitted:
                conv.append(fitted)
            images[start + k] = px
            results.append(DecodeResult(start + k, True, img.original_size, tuple(conv), digest))
        if progress:
            progress(len(part))
    return results


# ---- label geometry and resolution ---------------------------------------------
def label_geometry(
    source: Source,
    source_size: tuple[int, int],
    target: tuple[int, int],
    mpp: float | None = None,
    label_size: int | None = None,
) -> tuple[float | None, int | None]:
    """The store's (mpp, label_size) at the stored size ``target``.

    The user's ``mpp`` / ``label_size`` describe the source images (at their dominant size
    ``source_size``); without them the layout's own declaration is used (Kaggle and PCam: 32 px
    labelled centre of 96 px patches at 0.972 um/px), else None. Either is scaled to ``target``
    when ingest resizes.
    """
    if mpp is not None and not mpp > 0:
        raise ConfigError(f"mpp must be a positive number of micrometres per pixel, got {mpp}")
    if label_size is not None and not 0 < label_size <= min(source_size):
        raise ConfigError(f"label_size {label_size} must lie between 1 and the image side {min(source_size)} px")
    user_scale = target[0] / source_size[0]
    layout_scale = target[0] / source.native_size if source.native_size else 1.0
    out_mpp: float | None = mpp / user_scale if mpp is not None else (source.mpp / layout_scale if source.mpp else None)
    if label_size is not None:
        out_label: float | None = label_size * user_scale
    else:
        out_label = source.label_size * layout_scale if source.label_size else None
    return (
        round(out_mpp, 5) if out_mpp is not None else None,
        max(1, min(round(out_label), min(target))) if out_label is not None else None,
    )


# ---- the report ----------------------------------------------------------------
def build_report(
    source: Source, entries: list[Entry], results: list[DecodeResult], size: tuple[int, int]
) -> dict[str, Any]:
    """The validation report: counts, sizes, conversions, unreadable files, duplicates, label mismatches."""
    listing = source.listing
    ok = [r for r in results if r.ok]
    sizes = Counter(f"{r.original_size[0]}x{r.original_size[1]}" for r in ok if r.original_size)
    conversions = Counter(c for r in ok for c in r.conversions)
    by_digest: dict[str, list[str]] = {}
    for r in ok:
        by_digest.setdefault(r.digest or "", []).append(entries[r.pos].id)
    dup_groups = [ids for ids in by_digest.values() if len(ids) > 1]
    labels = [entries[r.pos].label for r in ok]
    per_class = Counter(listing.class_names[label] for label in labels if label is not None)
    return {
        "source": str(source.root.resolve()),
        "layout": source.layout,
        "listed": len(entries),
        "stored": len(ok),
        "image_size": list(size),
        "counts_per_class": {c: per_class.get(c, 0) for c in listing.class_names} if listing.labelled else {},
        "sizes_seen": dict(sizes.most_common()),
        "conversions": dict(conversions),
        "unreadable": [
            {"id": entries[r.pos].id, "path": entries[r.pos].ref, "reason": r.error} for r in results if not r.ok
        ],
        "duplicate_ids": listing.duplicate_ids,
        "labels_without_image": listing.labels_without_image,
        "images_without_label": listing.images_without_label,
        "duplicate_content": dup_groups,
    }


def _index_frame(entries: list[Entry], keep: np.ndarray) -> pd.DataFrame:
    rows = [e for e, k in zip(entries, keep) if k]
    df = pd.DataFrame(
        {
            "id": [e.id for e in rows],
            "label": pd.array([e.label for e in rows], dtype="Int64"),
            "group": [e.group or "" for e in rows],
            "source": [e.ref for e in rows],
        }
    )
    if any(e.source_split for e in rows):
        df["source_split"] = [e.source_split or "" for e in rows]
    return df


def ingest(
    source_path: str | Path,
    out: str | Path,
    *,
    size: int | None = None,
    workers: int | None = None,
    force: bool = False,
    layout: str | None = None,
    class_names: list[str] | None = None,
    mpp: float | None = None,
    label_size: int | None = None,
    fit: str = "pad-edges",
    progress: Callable[[int], ProgressFn] | None = None,
) -> IngestResult:
    """Decode ``source_path``, validate it and write a packed store at ``out``.

    Args:
        source_path: a folder or CSV manifest in one of the supported layouts.
        out: the store folder to create (replaced only with ``force``).
        size: square side to resize to; default the dominant size of the source.
        workers: decoding processes; default one per core.
        layout: force a layout instead of detecting it.
        class_names: the known classes for folder / manifest sources (others are an error).
        mpp: micrometres per pixel of the source images (default: the layout's, Kaggle / PCam
            0.972, else unknown); scaled when ``size`` resizes.
        label_size: side in px of the centred square a label describes in the source images
            (default: the layout's, Kaggle / PCam 32; else None, the whole image); scaled with ``size``.
        fit: how an image of another size is brought to the store's size: ``pad-edges``
            (white-pad edge patches, resize the rest) or ``resize``; recorded in ``meta.json``.
        progress: ``progress(total)`` returns a callback taking how many entries were just done.
        force: replace ``out`` when it already exists (never when it is not a store).
    """
    out = Path(out)
    if fit not in FIT_POLICIES:
        raise ConfigError(f"fit {fit!r} is not one of {list(FIT_POLICIES)}")
    if out.exists() and not force:
        raise DataError(f"{out}: already exists; pass --force to replace it")
    with open_source(source_path, layout, class_names) as source:
        entries = source.listing.entries
        if not entries:
            raise DataError(f"{source_path}: zero images found ({source.layout} layout)")
        source_size = dominant_size(source, entries)
        target = (size, size) if size else source_size
        store_mpp, store_label = label_geometry(source, source_size, target, mpp, label_size)
        writer = StoreWriter(out, len(entries), target, force=force)
        try:
            tick = progress(len(entries)) if progress else None
            if source.decodes_files:
                results = _decode_files(entries, writer.images_path, target, fit, workers or available_cores(), tick)
            else:
                results = _decode_arrays(source, entries, writer.images, target, fit, tick)
            results.sort(key=lambda r: r.pos)
            keep = np.array([r.ok for r in results], dtype=bool)
            report = build_report(source, entries, results, target)
            if not keep.any():
                first = report["unreadable"][0]
                raise DataError(
                    f"{source_path}: zero readable images (first failure: {first['path']}: {first['reason']})"
                )
            index = _index_frame(entries, keep)
            kept_labels = [e.label for e, k in zip(entries, keep) if k]
            meta = {
                "classes": source.listing.class_names,
                "labelled": any(lbl is not None for lbl in kept_labels),
                "has_groups": any(e.group for e, k in zip(entries, keep) if k),
                "counts_per_class": report["counts_per_class"],
                "layout": source.layout,
                "source": report["source"],
                "fit": fit,
                "mpp": store_mpp,
                "label_size": store_label,
            }
            store = writer.commit(keep, index, meta, report)
        except BaseException:
            writer.abort()
            raise
    return IngestResult(store, report)
