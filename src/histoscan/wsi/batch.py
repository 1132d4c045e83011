"""Many slides: list files and folders, split them into shards, skip finished ones, gather slides.csv.

Each slide writes its own folder (and a failure note when it fails); ``slides.csv`` is assembled
from those files by one process only, so job-array shards never write it concurrently.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pandas as pd

from histoscan.errors import ConfigError, HistoscanError
from histoscan.inference.tta import tta_views
from histoscan.wsi import outputs
from histoscan.wsi.provenance import identity_key
from histoscan.wsi.reader import SLIDE_SUFFIXES
from histoscan.wsi.scan import Progress, ScanSettings, SlideResult, check_settings, scan_identity, scan_slide

if TYPE_CHECKING:
    from histoscan.inference.predictor import Predictor

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
    "slide_mpp",
    "slide_mpp_source",
    "threshold",
    "model",
    "identity_key",
    "run",
    "path",
    "error",
]


@dataclass
class BatchResult:
    """What a ``histoscan slide`` call did."""

    scanned: list[SlideResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)  # had outputs made by another model or settings
    failed: dict[str, str] = field(default_factory=dict)
    slides_csv: Path | None = None

    def summary_lines(self, run: str | Path, out: str | Path, sharded: bool) -> list[str]:
        """What the command tells the user at the end."""
        lines = [
            f"{len(self.scanned)} scanned, {len(self.skipped)} already done (--force redoes them), {len(self.failed)} failed"
        ]
        if self.recomputed:
            lines.append(
                f"{len(self.recomputed)} rescanned because their outputs were made by another model or settings: "
                + ", ".join(self.recomputed[:5])
                + (" ..." if len(self.recomputed) > 5 else "")
            )
        lines += [f"{name}: {error}" for name, error in self.failed.items()]
        if self.slides_csv is not None:
            lines.append(f"slides: {self.slides_csv}")
        elif not sharded:
            lines.append(f"no slides given and {out} holds no scans")
        else:
            lines.append(f"shard done; gather slides.csv once all shards finish: histoscan slide {run} --out {out}")
        return lines


def _is_scan_output(folder: Path) -> bool:
    """A folder histoscan wrote: one slide's outputs, the failure notes, or a hidden scratch folder."""
    return folder.name == FAILED_DIR or folder.name.startswith(".") or (folder / outputs.SUMMARY_FILE).is_file()


def _slide_files(folder: Path) -> Iterator[Path]:
    """Slide-format files under ``folder``, never descending into histoscan's own scan outputs."""
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not _is_scan_output(Path(root) / d))
        yield from (Path(root) / f for f in files if Path(f).suffix.lower() in SLIDE_SUFFIXES)


def list_slides(inputs: Sequence[str | Path]) -> list[Path]:
    """Slide files from files and folders, sorted, each once; missing inputs are an error.

    Folders are searched recursively for slide formats (TIFF included), skipping the output folders of
    earlier scans (their probabilities.tif is no slide); PNG and JPEG images are scanned only when named,
    so masks and thumbnails kept beside the slides are not taken for slides.
    """
    found: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.update(_slide_files(p))
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


def is_done(out: Path, name: str, key: str | None = None) -> bool:
    """A slide is finished when its folder holds summary.json (written last, published by one rename).

    With ``key`` (an identity key), only a summary made by that same model and settings counts.
    """
    path = out / name / outputs.SUMMARY_FILE
    if not path.is_file():
        return False
    if key is None:
        return True
    try:
        return json.loads(path.read_text()).get("identity_key") == key
    except (OSError, ValueError, AttributeError):
        return False


def one_line(slide: Path, exc: BaseException) -> str:
    """A failure as one line naming the slide (HistoscanErrors already name it)."""
    if isinstance(exc, HistoscanError):
        text = str(exc)
    elif isinstance(exc, MemoryError):
        text = f"{slide}: out of memory ({exc or 'MemoryError'}); check its resolution or scan with a larger --stride"
    else:
        text = f"{slide}: {type(exc).__name__}: {exc}"
    return " ".join(text.split())


def run_slides(
    predictor_factory: Callable[[], object],
    inputs: Sequence[str | Path],
    out: str | Path,
    settings: ScanSettings,
    progress: Callable[[str], Progress] | None = None,
    printer: Callable[[str], None] = print,
) -> BatchResult:
    """Scan every slide of this shard not already done; one slide's failure never stops the others.

    ``predictor_factory`` builds the Predictor once, when there are slides; the settings are checked
    against it and the slides before any slide is read. A slide whose outputs exist is skipped only when
    they were made by the same model, predictor settings and scan settings (its summary's identity);
    otherwise it is rescanned. Any exception inside one slide (out of memory included) becomes that
    slide's failed row. slides.csv is gathered at the end unless this is one shard of several.
    """
    out = Path(out)
    shard = parse_shard(settings.shard)
    slides = [s for s in list_slides(inputs) if in_shard(s, shard)]
    result = BatchResult()
    if not slides:
        if shard is None and out.exists():
            result.slides_csv = collect(out)
        return result
    predictor = cast("Predictor", predictor_factory())
    check_settings(predictor, settings, slides)
    for line in predictor.fitted_notices(tta_views(predictor.bundle, settings.tta, "slide")):
        printer(line)  # a threshold fitted under another predictor is said before the regions are drawn with it
    for i, slide in enumerate(slides, start=1):
        name = slide.stem
        error: str | None = None
        try:
            key: str | None = identity_key(scan_identity(predictor, settings, slide))
        except Exception as exc:  # e.g. an unreadable mask file: this slide's failed row
            key, error = None, one_line(slide, exc)
        rescan = ""
        if error is None and not settings.force and is_done(out, name):
            if is_done(out, name, key):
                result.skipped.append(name)
                continue
            result.recomputed.append(name)
            rescan = " (its outputs were made by another model or settings: rescanning)"
        printer(f"[{i}/{len(slides)}] {slide}{rescan}")
        try:
            if error is not None:
                raise ConfigError(error)
            r = scan_slide(predictor, slide, out, settings, progress(name) if progress else None)
        except Exception as exc:  # any error of one slide (MemoryError included) becomes its failed row
            message = one_line(slide, exc)
            result.failed[name] = message
            _write_failure(out, name, slide, message)
            printer(f"  failed: {message}")
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
    rows: dict[str, dict[str, object]] = {}
    written: dict[str, float] = {}
    for summary in sorted(out.glob(f"*/{outputs.SUMMARY_FILE}")):
        row = json.loads(summary.read_text())
        rows[row["slide"]], written[row["slide"]] = row, summary.stat().st_mtime
    for note in sorted((out / FAILED_DIR).glob("*.json")):
        failure = json.loads(note.read_text())
        # a failure newer than the slide's outputs (a rescan by another model failed) is what stands
        if failure["slide"] not in rows or note.stat().st_mtime >= written[failure["slide"]]:
            rows[failure["slide"]] = failure
    frame = pd.DataFrame(list(rows.values())).reindex(columns=SLIDE_COLUMNS)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{SLIDES_FILE}.tmp"
    frame.to_csv(tmp, index=False)
    os.replace(tmp, out / SLIDES_FILE)
    return out / SLIDES_FILE
