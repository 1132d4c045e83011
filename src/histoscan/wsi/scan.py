"""The scan engine: one slide -> tissue mask -> tiles read by background workers -> Predictor -> outputs.

Memory stays bounded whatever the slide size: tiles are read block by block (a block is up to
``block`` x ``block`` cells with their context margin, read once and sliced), at most ``prefetch``
blocks wait in the queue, and every output lives at the grid's resolution.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from histoscan import __version__
from histoscan.errors import ConfigError
from histoscan.inference.predictor import Predictor
from histoscan.inference.tta import tta_views
from histoscan.stain.groups import sample_positions
from histoscan.training.config import doc
from histoscan.wsi import outputs
from histoscan.wsi.grid import SlideGrid, TileSpec
from histoscan.wsi.provenance import file_digest, identity_key, model_fingerprint
from histoscan.wsi.reader import SlideError, SlideReader, open_slide
from histoscan.wsi.resolution import choose_level, model_mpp, slide_resolution
from histoscan.wsi.tissue import MASK_MAX_SIDE, MASK_SUFFIXES, TissueMask, detect_tissue, load_mask

Progress = Callable[[int], Callable[[int], None]]  # start(total) -> advance(n), as the CLI's progress bars


@dataclass
class ScanSettings:
    """How slides are scanned; every field is a ``histoscan slide`` option (the text is its help)."""

    min_tissue: float = doc("Scan a tile when its labelled centre holds at least this fraction of tissue.", 0.5)
    mask: str | None = doc(
        "Tissue mask instead of detection: a PNG (slide's aspect ratio) or QuPath GeoJSON, or a folder of "
        "<slide>.png / <slide>.geojson for many slides.",
        None,
    )
    model_mpp: float | None = doc("The model's resolution in um/px when model.json does not state it.", None)
    slide_mpp: float | None = doc(
        "Level-0 resolution in um/px for slides whose metadata lacks it or states a default dpi tag "
        "(credible stated ones win).",
        None,
    )
    slide_mpp_override: float | None = doc(
        "Level-0 resolution in um/px for every slide, winning over its metadata (a slide that states a wrong one).",
        None,
    )
    tile: int | None = doc("Tile side in model px (must be the model's input size; default: that size).", None)
    stride: int | None = doc("Step between tiles in model px (default: the labelled centre, e.g. 32 for PCam).", None)
    overlap: int | None = doc("Overlap of neighbouring tiles in model px (tile - stride), instead of --stride.", None)
    positive_class: str | None = doc("Class whose probability is mapped (default: the second of a binary model).", None)
    threshold: float | None = doc("Probability above which cells form tumour regions (default: the run's).", None)
    geojson_tiles: bool = doc("Also write one GeoJSON 'tile' object per heatmap cell with its probability.", False)
    tta: bool | None = doc(
        "Average the 8 flips/rotations; tiles.csv gains an uncertainty column (default: off, "
        "histoscan.inference.tta's default for slides).",
        None,
        cli=False,
    )
    backend: str = doc(
        "torch, onnx, or auto (whichever export timed faster on this hardware, else torch).", "auto", cli=False
    )
    device: str = doc("Torch device (cpu, cuda, mps).", "cpu", cli=False)
    batch_size: int = doc("Tiles per forward pass.", 256, cli=False)
    workers: int = doc("Workers reading and decoding the inputs in parallel (here: threads reading tiles).", 2)
    prefetch: int = doc("Blocks of tiles read ahead at most (bounds memory).", 8)
    threads: int | None = doc("CPU threads for the model (default: all cores).", None, cli=False)
    top_k: int = doc("Slide score: mean of the k highest tile probabilities (and the max).", 10)
    force: bool = doc(
        "Scan slides again even when their outputs exist (outputs made by another model or settings are redone anyway).",
        False,
    )
    shard: str | None = doc("I/N: scan only shard I (0-based) of N of the slide list (job arrays).", None)
    explain_top: int = doc(
        "Also write Grad-CAM overlays of the K most suspicious tiles into <slide>/explain/ (needs best.safetensors).",
        0,
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"--min-tissue must be in [0, 1], got {self.min_tissue}")
        for name in ("batch_size", "workers", "prefetch", "top_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.explain_top < 0:
            raise ConfigError(f"--explain-top must be at least 0, got {self.explain_top}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.slide_mpp is not None and self.slide_mpp_override is not None:
            raise ConfigError("give --slide-mpp (fills in missing values) or --slide-mpp-override (wins), not both")
        for name in ("slide_mpp", "slide_mpp_override", "model_mpp"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value} um/px")


@dataclass
class SlideResult:
    """What one scan produced."""

    slide: str
    folder: Path
    summary: dict[str, Any]


def positive_index(predictor: Predictor, name: str | None) -> int:
    """Index of the mapped class: ``name``, or the second class of a binary model."""
    classes = predictor.classes
    if name is not None:
        if name not in classes:
            raise ConfigError(f"--positive-class {name!r} is not one of the model's classes {classes}")
        return classes.index(name)
    if len(classes) != 2:
        raise ConfigError(f"the model has {len(classes)} classes {classes}; name the one to map with --positive-class")
    return 1


def plan_grid(reader: SlideReader, predictor: Predictor, settings: ScanSettings) -> SlideGrid:
    """The grid for a slide: resolutions (or a one-line error), level choice and tile geometry."""
    pre = predictor.bundle.preprocessing
    target = model_mpp(predictor.run_dir, pre.mpp, settings.model_mpp)
    res = slide_resolution(
        reader.path, reader.mpp, settings.slide_mpp, settings.slide_mpp_override, reader.objective_power
    )
    spec = TileSpec.for_model(pre, settings.tile, settings.stride, settings.overlap)
    level = choose_level(target, res.mpp, reader.level_downsamples)
    source = f"{res.source} ({res.note})" if res.note else res.source
    grid = SlideGrid.over(spec, reader.bounds, level, res.mpp, source)
    grid.check_budget(reader.path)
    return grid


def check_settings(predictor: Predictor, settings: ScanSettings, slides: list[Path] | None = None) -> None:
    """Refuse settings that cannot work with this model or these slides, before any slide is read."""
    from histoscan.bundle import EnsembleBundle
    from histoscan.runfolder import RunFolder

    if settings.explain_top:
        if isinstance(predictor.bundle, EnsembleBundle):
            raise ConfigError(
                f"--explain-top: {predictor.run_dir} is an ensemble; Grad-CAM explains one model: give a member's run"
            )
        if not RunFolder(predictor.run_dir).weights_path.is_file():
            raise ConfigError(
                f"--explain-top: {predictor.run_dir} has no best.safetensors (Grad-CAM needs the torch weights, "
                "not model.onnx alone)"
            )
    positive_index(predictor, settings.positive_class)
    if settings.mask:
        m = Path(settings.mask)
        if not m.exists():
            raise ConfigError(f"--mask {m}: no such file or folder")
        if m.is_file() and m.suffix.lower() not in MASK_SUFFIXES:
            raise ConfigError(f"--mask {m}: a mask is a PNG or a QuPath GeoJSON ({', '.join(MASK_SUFFIXES)})")
        for slide in slides or []:
            mask_for(m, slide)


def scan_identity(predictor: Predictor, settings: ScanSettings, slide: Path) -> dict[str, Any]:
    """What decides a slide's outputs: the model's files, the predictor settings, and the scan settings.

    Settings that only change speed (workers, batch size, threads, device) are left out.
    """
    members = getattr(predictor.bundle, "member_dirs", [])
    mask: str | None = None
    if settings.mask:
        m = mask_for(settings.mask, slide)
        mask = f"{m.name}:{file_digest(m)[:16]}"
    threshold = settings.threshold if settings.threshold is not None else float(predictor.threshold)
    return {
        "model": model_fingerprint(predictor.run_dir, members),
        "predictor": {
            "backend": predictor.backend.name,
            "tta": settings.tta,
            "precision": str(getattr(predictor.backend, "precision", "")),
        },
        "threshold": threshold,
        "positive_class": predictor.classes[positive_index(predictor, settings.positive_class)],
        "scan": {
            "min_tissue": settings.min_tissue,
            "mask": mask,
            "model_mpp": settings.model_mpp,
            "slide_mpp": settings.slide_mpp,
            "slide_mpp_override": settings.slide_mpp_override,
            "tile": settings.tile,
            "stride": settings.stride,
            "overlap": settings.overlap,
            "top_k": settings.top_k,
            "geojson_tiles": settings.geojson_tiles,
            "explain_top": settings.explain_top,
        },
    }


def tissue_mask(reader: SlideReader, grid: SlideGrid, settings: ScanSettings) -> tuple[TissueMask, np.ndarray]:
    """The mask (detected or the user's) and the thumbnail it was drawn on; a cell spans 2+ mask px (1024-4096 px)."""
    w, h = reader.dimensions
    side = int(min(MASK_MAX_SIDE, max(1024, 2 * max(w, h) / grid.cell_px)))
    thumb = reader.thumbnail(side)
    if settings.mask:
        return load_mask(mask_for(settings.mask, reader.path), reader, side), thumb
    return detect_tissue(reader, grid.slide_mpp, side, thumb), thumb


def mask_for(mask: str | Path, slide: Path) -> Path:
    """The mask file for a slide: ``mask`` itself, or ``<mask>/<slide stem>.geojson|.png`` for a folder."""
    m = Path(mask)
    if not m.is_dir():
        return m
    for suffix in (".geojson", ".json", ".png"):
        if (m / f"{slide.stem}{suffix}").is_file():
            return m / f"{slide.stem}{suffix}"
    raise SlideError(f"{m}: no mask for {slide.name} (expected {slide.stem}.geojson or {slide.stem}.png)")


def _read_block(reader: SlideReader, grid: SlideGrid, block: tuple[int, int, int, int]) -> np.ndarray:
    """One block of cells with its context margin, at the model's resolution (uint8 HxWx3)."""
    x, y, lw, lh, mw, mh = grid.block_region(*block)
    img = reader.read(x, y, grid.level.level, lw, lh)
    if (lw, lh) != (mw, mh):  # Pillow's resize filters with the scale's support, so shrinking is antialiased
        img = np.asarray(Image.fromarray(img).resize((mw, mh), Image.Resampling.BILINEAR))
    return img


class TileReader:
    """Background threads reading blocks into a bounded queue, consumed in any order by the scan loop."""

    def __init__(
        self, reader: SlideReader, grid: SlideGrid, blocks: list[tuple[int, int, int, int]], workers: int, depth: int
    ) -> None:
        self._reader, self._grid = reader, grid
        self._blocks = list(enumerate(blocks))
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[int, np.ndarray | BaseException]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(min(workers, len(blocks)))]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if not self._blocks:
                    return
                i, block = self._blocks.pop(0)
            try:
                item: np.ndarray | BaseException = _read_block(self._reader, self._grid, block)
            except BaseException as exc:  # handed to the consumer, which raises it
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put((i, item), timeout=0.2)
                    break
                except queue.Full:
                    continue

    def get(self) -> tuple[int, np.ndarray]:
        """The next block read (its index and pixels); re-raises a reader's error."""
        i, item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return i, item

    def close(self) -> None:
        """Stop the threads (after an error or at the end)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)


def block_size(spec: TileSpec) -> int:
    """Cells per block side: a block is about 768 model px wide, so each pixel is decoded about once."""
    return max(1, 768 // spec.stride)


def scan_slide(
    predictor: Predictor,
    path: str | Path,
    out: str | Path,
    settings: ScanSettings,
    progress: Progress | None = None,
    name: str | None = None,
) -> SlideResult:
    """Scan one slide into ``out/<name>/`` (written atomically); raises a HistoscanError on bad input."""
    started = time.perf_counter()
    path = Path(path)
    name = name or path.stem
    out = Path(out)
    check_settings(predictor, settings, [path])
    identity = scan_identity(predictor, settings, path)
    reader = open_slide(path)
    try:
        grid = plan_grid(reader, predictor, settings)
        pos = positive_index(predictor, settings.positive_class)
        mask, thumb = tissue_mask(reader, grid, settings)
        mask_seconds = time.perf_counter() - started
        frac_grid = tissue_fractions(grid, mask)
        scanned = frac_grid.ravel() >= max(settings.min_tissue, 1e-9)
        rows, cols = np.divmod(np.flatnonzero(scanned), grid.cols)
        frac = frac_grid.ravel()[scanned]
        if not scanned.any():
            raise SlideError(
                f"{path}: no tissue found (no tile has {settings.min_tissue:.0%} tissue in its centre); "
                "check the slide, or give --mask or a lower --min-tissue"
            )
        stain_key, stain_sample = slide_stain(reader, grid, predictor, scanned)
        probs, unc, answers = _infer(
            reader, grid, predictor, settings, scanned.reshape(grid.rows, grid.cols), pos, progress, stain_key
        )
        infer_seconds = time.perf_counter() - started - mask_seconds
        prob_grid = np.full((grid.rows, grid.cols), np.nan, np.float32)
        prob_grid.ravel()[scanned] = probs
        tiles = outputs.tiles_frame(grid, rows, cols, frac, probs, unc, answers)
        threshold = settings.threshold if settings.threshold is not None else float(predictor.threshold)
        out.mkdir(parents=True, exist_ok=True)
        tmp = outputs.scratch_folder(out, name)
        try:
            _write_outputs(tmp, grid, prob_grid, tiles, threshold, predictor.classes[pos], settings, thumb, mask)
            if settings.explain_top:
                from histoscan.explain.slides import explain_top_tiles

                r_s, c_s = rows, cols
                explain_top_tiles(
                    predictor.run_dir,
                    lambda r, c: _read_block(reader, grid, (r, r + 1, c, c + 1)),
                    r_s,
                    c_s,
                    probs,
                    grid.tile_boxes(r_s, c_s),
                    settings.explain_top,
                    tmp,
                    settings.device,
                    stain_sample,
                )
        except Exception:  # any failure: discard what was written (a kill leaves it, removed by the next scan)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        times = (time.perf_counter() - started, mask_seconds, infer_seconds)
        summary = _summary(path, name, predictor, settings, grid, mask, probs, threshold, times)
        summary["identity"] = identity
        summary["identity_key"] = identity_key(identity)
        summary["model"] = identity["model"]
        summary["referred_tiles"] = int((answers == "refer").sum())  # under the rule fitted for these settings
        # answered 'out of distribution' by the tissue check or by the stored detector (trust.ood)
        summary["out_of_distribution_tiles"] = int((answers == "out of distribution").sum())
        if stain_key is not None:  # per-group stain model: the slide's one estimate, and whether it was usable
            summary["stain_group_passed_through"] = (
                stain_key in predictor.bundle.preprocessing.stain_groups.passed_through()
            )
        outputs.write_json(tmp / outputs.SUMMARY_FILE, summary)  # last: its presence marks a finished slide
        folder = outputs.publish(tmp, out / name)
        return SlideResult(name, folder, summary)
    finally:
        reader.close()


def tissue_fractions(grid: SlideGrid, mask: TissueMask, chunk_cells: int = 1_000_000) -> np.ndarray:
    """Tissue fraction of every cell's labelled centre (float32 rows x cols), a band of rows at a time.

    Bands keep the per-cell temporaries (coordinates, boxes, integral look-ups) to ``chunk_cells`` cells.
    """
    out = np.empty((grid.rows, grid.cols), np.float32)
    band = max(1, chunk_cells // grid.cols)
    cols = np.arange(grid.cols)
    for r0 in range(0, grid.rows, band):
        r1 = min(grid.rows, r0 + band)
        rr = np.repeat(np.arange(r0, r1), grid.cols)
        cc = np.tile(cols, r1 - r0)
        out[r0:r1] = mask.fraction(grid.label_boxes(rr, cc)).reshape(r1 - r0, grid.cols)
    return out


def _write_outputs(
    tmp: Path,
    grid: SlideGrid,
    prob_grid: np.ndarray,
    tiles: pd.DataFrame,
    threshold: float,
    class_name: str,
    settings: ScanSettings,
    thumb: np.ndarray,
    mask: TissueMask,
) -> None:
    """Every output but the summary, into the scratch folder."""
    outputs.write_probabilities(tmp, grid, prob_grid)
    tiles.to_csv(tmp / outputs.TILES_FILE, index=False)
    geo = outputs.regions_geojson(grid, prob_grid, threshold, class_name, tiles if settings.geojson_tiles else None)
    outputs.write_json(tmp / outputs.REGIONS_FILE, geo)
    outputs.write_heatmap(tmp, grid, prob_grid, thumb, mask)


def slide_stain(
    reader: SlideReader, grid: SlideGrid, predictor: Predictor, scanned: np.ndarray
) -> tuple[str | None, np.ndarray | None]:
    """Per-group stain models: the slide is one group, its stain estimated once from its tissue tiles.

    The sample is ``GROUP_SAMPLE`` scanned tiles evenly spaced in row-major order. Returns the
    slide's group name and the sample (for the explanations of its tiles); (None, None) for other models.
    """
    pre = predictor.bundle.preprocessing
    if not pre.per_group:
        return None, None
    t = grid.spec.tile
    cells = sample_positions(np.flatnonzero(scanned.ravel()))
    sample = np.stack(
        [_read_block(reader, grid, (r, r + 1, c, c + 1))[:t, :t] for r, c in zip(*divmod(cells, grid.cols))]
    )
    key = f"slide:{reader.path.resolve()}"
    pre.estimate_stain_groups(np.full(len(sample), key), lambda p: sample[p])
    return key, sample


def _infer(
    reader: SlideReader,
    grid: SlideGrid,
    predictor: Predictor,
    settings: ScanSettings,
    scanned: np.ndarray,
    pos: int,
    progress: Progress | None,
    stain_group: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """P(positive), TTA spread and answer of every scanned cell, in row-major order of the scanned cells.

    The answer is the Predictor's (``refer`` under the referral rule fitted for these settings, a tissue-check
    flag, else the class), as every other command gives it.

    ``stain_group``: the slide's stain group (per-group stain models), estimated before.
    """
    spec = grid.spec
    blocks = [b for b in grid.blocks(block_size(spec)) if scanned[b[0] : b[1], b[2] : b[3]].any()]
    order = np.full(scanned.shape, -1, np.int64)
    order[scanned] = np.arange(int(scanned.sum()))
    n = int(scanned.sum())
    probs = np.empty(n, np.float32)
    views = tta_views(predictor.bundle, settings.tta, "slide")
    unc = np.empty(n, np.float32) if len(views) > 1 else None
    answers = np.empty(n, object)
    advance = progress(n) if progress else None
    batch = np.empty((settings.batch_size, spec.tile, spec.tile, 3), np.uint8)
    where = np.empty(settings.batch_size, np.int64)
    filled = 0

    def flush() -> None:
        nonlocal filled
        if not filled:
            return
        groups = np.full(filled, stain_group) if stain_group is not None else None
        pred = predictor.predict_batch(batch[:filled], tta=views, groups=groups)
        probs[where[:filled]] = pred.probabilities[:, pos]
        if unc is not None and pred.uncertainty is not None:
            unc[where[:filled]] = pred.uncertainty
        if pred.answers is not None:
            answers[where[:filled]] = pred.answers
        if advance:
            advance(filled)
        filled = 0

    tile_reader = TileReader(reader, grid, blocks, settings.workers, settings.prefetch)
    try:
        for _ in range(len(blocks)):
            i, img = tile_reader.get()
            r0, r1, c0, c1 = blocks[i]
            rr, cc = np.nonzero(scanned[r0:r1, c0:c1])
            s, t = spec.stride, spec.tile
            for r, c in zip(rr, cc, strict=True):
                batch[filled] = img[r * s : r * s + t, c * s : c * s + t]
                where[filled] = order[r0 + r, c0 + c]
                filled += 1
                if filled == settings.batch_size:
                    flush()
        flush()
    finally:
        tile_reader.close()
    return probs, unc, answers


def _summary(
    path: Path,
    name: str,
    predictor: Predictor,
    settings: ScanSettings,
    grid: SlideGrid,
    mask: TissueMask,
    probs: np.ndarray,
    threshold: float,
    times: tuple[float, float, float],
) -> dict[str, Any]:
    """summary.json: what was read, found and how long it took (total, mask, tiles through the model)."""
    seconds, mask_seconds, infer_seconds = times
    cell_mm2 = (grid.cell_um / 1000.0) ** 2
    top = np.sort(probs)[::-1][: settings.top_k]
    return {
        "slide": name,
        "path": str(path),
        "status": "done",
        "slide_mpp": grid.slide_mpp,
        "slide_mpp_source": grid.mpp_source,
        "model_mpp": grid.model_mpp,
        "level": grid.level.level,
        "level_downsample": grid.level.downsample,
        "resample_factor": grid.level.factor,
        "resolution": grid.level.describe(),
        "tile_px": grid.spec.tile,
        "label_px": grid.spec.label,
        "stride_px": grid.spec.stride,
        "grid": [grid.rows, grid.cols],
        "cell_um": grid.cell_um,
        "bounds": asdict(grid.bounds),
        "mask": mask.source,
        "tissue_mm2": round(mask.area_mm2(grid.slide_mpp), 4),
        "tumour_mm2": round(float((probs >= threshold).sum()) * cell_mm2, 4),
        "threshold": threshold,
        "max_probability": float(probs.max()),
        "mean_probability": float(probs.mean()),
        "topk_mean_probability": float(top.mean()),
        "top_k": settings.top_k,
        "tiles": len(probs),
        "tta": len(tta_views(predictor.bundle, settings.tta, "slide")) > 1,
        "backend": predictor.backend.name,
        "seconds": round(seconds, 3),
        "mask_seconds": round(mask_seconds, 3),
        "tile_seconds": round(infer_seconds, 3),
        "tiles_per_second": round(len(probs) / max(infer_seconds, 1e-9), 1),
        "run": str(predictor.run_dir),
        "histoscan_version": __version__,
    }
