"""Many slides: list files and folders, split them into shards, skip finished ones, gather slides.csv.

Each slide writes its own folder (and a failure note when it fails); ``slides.csv`` is assembled
from those files by one process only, so job-array shards never write it concurrently.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from histoscan.errors import ConfigError, HistoscanError
from histoscan.wsi import outputs
from histoscan.wsi.reader import SLIDE_SUFFIXES
from histoscan.wsi.scan import Progress, ScanSettings, SlideResult, scan_slide

SLIDES_FILE = "slides.csv"
FAILED_DIR = "_failed"
SLIDE_COLUMNS = [
    "slide",
    "status",
    "max_probability",
    "topk_mean_probability",
    "mean_probability",
    "tumour_mm2",
    "tissue_mm2",
    "tiles",
    "seconds",
    "path",
    "error",
]


@dataclass
class BatchResult:
    """What a ``histoscan slide`` call did."""

    scanned: list[SlideResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    slides_csv: Path | None = None

    def summary_lines(self, run: str | Path, out: str | Path, sharded: bool) -> list[str]:
        """What the command tells the user at the end."""
        lines = [
            f"{len(self.scanned)} scanned, {len(self.skipped)} already done (--force redoes them), {len(self.failed)} failed"
        ]
        lines += [f"{name}: {error}" for name, error in self.failed.items()]
        if self.slides_csv is not None:
            lines.append(f"slides: {self.slides_csv}")
        elif not sharded:
            lines.append(f"no slides given and {out} holds no scans")
        else:
            lines.append(f"shard done; gather slides.csv once all shards finish: histoscan slide {run} --out {out}")
        return lines


def list_slides(inputs: Sequence[str | Path]) -> list[Path]:
    """Slide files from files and folders, sorted, each once; missing inputs are an error.

    Folders are searched recursively for slide formats (TIFF included); PNG and JPEG images are
    scanned only when named, so masks and thumbnails kept beside the slides are not taken for slides.
    """
    found: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.update(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES)
        elif p.is_file():
            found.add(p)
        else:
            raise ConfigError(f"{p}: no such slide file or folder")
    slides = sorted(found)
    names: dict[str, Path] = {}
    for s in slides:
        if s.stem in names:
            raise ConfigError(f"{names[s.stem]} and {s} would both write OUT/{s.stem}/; rename one")
        names[s.stem] = s
    return slides


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'I/N' -> (I, N) with 0 <= I < N."""
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError as exc:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/4") from exc
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def in_shard(slide: Path, shard: tuple[int, int] | None) -> bool:
    """Whether a slide belongs to a shard: a stable hash of its name (the same on every machine and list)."""
    if shard is None:
        return True
    return zlib.crc32(slide.stem.encode()) % shard[1] == shard[0]


def is_done(out: Path, name: str) -> bool:
    """A slide is finished when its folder holds summary.json (written last, published by one rename)."""
    return (out / name / outputs.SUMMARY_FILE).is_file()


def run_slides(
    predictor_factory: Callable[[], object],
    inputs: Sequence[str | Path],
    out: str | Path,
    settings: ScanSettings,
    progress: Callable[[str], Progress] | None = None,
    printer: Callable[[str], None] = print,
) -> BatchResult:
    """Scan every slide of this shard not already done; one slide's failure never stops the others.

    ``predictor_factory`` builds the Predictor once, only when a slide needs scanning. slides.csv
    is gathered at the end unless this is one shard of several.
    """
    out = Path(out)
    shard = parse_shard(settings.shard)
    slides = [s for s in list_slides(inputs) if in_shard(s, shard)]
    result = BatchResult()
    predictor = None
    for i, slide in enumerate(slides, start=1):
        name = slide.stem
        if is_done(out, name) and not settings.force:
            result.skipped.append(name)
            continue
        printer(f"[{i}/{len(slides)}] {slide}")
        try:
            if predictor is None:
                predictor = predictor_factory()
            r = scan_slide(predictor, slide, out, settings, progress(name) if progress else None)  # type: ignore[arg-type]
        except HistoscanError as exc:
            result.failed[name] = str(exc)
            _write_failure(out, name, slide, str(exc))
            printer(f"  failed: {exc}")
            continue
        _clear_failure(out, name)
        result.scanned.append(r)
        printer(
            f"  read {r.summary['resolution']}; {r.summary['tiles']} tiles in {r.summary['seconds']:.1f} s, "
            f"max P {r.summary['max_probability']:.3f}"
        )
    if shard is None and (slides or out.exists()):
        result.slides_csv = collect(out)
    return result


def _write_failure(out: Path, name: str, slide: Path, error: str) -> None:
    folder = out / FAILED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.json.tmp"
    tmp.write_text(json.dumps({"slide": name, "path": str(slide), "status": "failed", "error": error}))
    os.replace(tmp, folder / f"{name}.json")


def _clear_failure(out: Path, name: str) -> None:
    (out / FAILED_DIR / f"{name}.json").unlink(missing_ok=True)


def collect(out: str | Path) -> Path:
    """Gather every slide's summary (and failure note) under ``out`` into ``out/slides.csv``, atomically."""
    out = Path(out)
    rows = []
    for summary in sorted(out.glob(f"*/{outputs.SUMMARY_FILE}")):
        rows.append(json.loads(summary.read_text()))
    done = {r["slide"] for r in rows}
    for note in sorted((out / FAILED_DIR).glob("*.json")):
        failure = json.loads(note.read_text())
        if failure["slide"] not in done:
            rows.append(failure)
    frame = pd.DataFrame(rows).reindex(columns=SLIDE_COLUMNS)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{SLIDES_FILE}.tmp"
    frame.to_csv(tmp, index=False)
    os.replace(tmp, out / SLIDES_FILE)
    return out / SLIDES_FILE
