"""The served folder of scanned slides: an index built from its summaries, and the files of each slide.

A slide is reached only through this index: its id is the name of a slide folder that holds a
summary.json, found by listing the served folder. No string from a request is ever joined into a
path, so ``..``, separators (plain or percent-encoded) and absolute paths name no slide at all.
Every file read is resolved and must lie inside the served folder, so a symlink pointing out of it
is refused. The slide image itself is opened where its summary says it is (that is the design of
``histoscan slide``: the outputs are kept apart from the slides).

Summaries are read defensively: a key missing from an older or newer summary.json is None, never
an error, so the viewer works across the summary layouts of different histoscan versions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoscan.errors import ConfigError

log = logging.getLogger("histoscan.serve")

SUMMARY_FILE = "summary.json"  # the names histoscan slide writes (wsi/outputs.py)
PROB_FILE = "probabilities.tif"
PROB_META_FILE = "probabilities.json"
REGIONS_FILE = "regions.geojson"
FAILED_DIR = "_failed"


class SlideFolderError(ConfigError):
    """The folder given to serve or view is not a folder of scanned slides."""


@dataclass
class SlideEntry:
    """One scanned (or failed) slide of the served folder."""

    name: str
    folder: Path | None  # the slide's output folder (None: a failure note only)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """Whether the slide's scan failed."""
        return self.folder is None or self.summary.get("status") == "failed"

    def get(self, key: str, default: Any = None) -> Any:
        """A summary value, or ``default`` when this summary does not have it."""
        value = self.summary.get(key, default)
        return default if value is None else value

    def number(self, key: str) -> float | None:
        """A numeric summary value (None when absent or not a finite number)."""
        value = self.summary.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)

    def slide_path(self, root: Path) -> Path | None:
        """Where the slide file is now, or None when it no longer exists.

        Where the slide file is now: the summary's path (absolute, or relative to the current folder or the
        served folder's parent); None when no such file exists any more.
        """
        raw = self.summary.get("path") or self.summary.get("slide_path")
        if not isinstance(raw, str) or not raw:
            return None
        p = Path(raw)
        candidates = [p] if p.is_absolute() else [Path.cwd() / p, root.parent / p, root / p]
        return next((c for c in candidates if c.is_file()), None)

    def slide_file_name(self) -> str:
        """The slide file's name, as the scan recorded it."""
        raw = self.summary.get("path") or self.summary.get("slide_path") or self.name
        return Path(str(raw)).name


class SlideLibrary:
    """The index of a folder of scanned slides, rebuilt when the folder changes.

    The index of a folder of scanned slides, rebuilt when the folder changes (a new slide is published
    into it by one rename, which changes the folder's modification time).
    """

    def __init__(self, folder: str | Path) -> None:
        root = Path(folder)
        if not root.is_dir():
            raise SlideFolderError(
                f"{folder}: no such folder of scanned slides (the --out folder of 'histoscan slide')"
            )
        self.root = root.resolve()
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._entries: dict[str, SlideEntry] = {}
        self._order: list[str] = []

    # ---- the index -----------------------------------------------------------------------
    def _current_stamp(self) -> tuple[int, int]:
        failed = self.root / FAILED_DIR
        a = self.root.stat().st_mtime_ns
        b = failed.stat().st_mtime_ns if failed.is_dir() else 0
        return a, b

    def refresh(self) -> None:
        """Re-read the summaries when the folder changed since the last look (one stat when it did not)."""
        stamp = self._current_stamp()
        with self._lock:
            if stamp == self._stamp:
                return
            entries = self._scan()
            self._entries = entries
            self._order = sorted(entries, key=str.lower)
            self._stamp = stamp

    def _scan(self) -> dict[str, SlideEntry]:
        entries: dict[str, SlideEntry] = {}
        with os.scandir(self.root) as it:
            children = sorted(it, key=lambda e: e.name)
        for child in children:
            if child.name.startswith((".", "_")) or not child.is_dir():
                continue
            folder = Path(child.path)
            summary_file = self.inside(folder / SUMMARY_FILE)
            if summary_file is None or not self.inside(folder):
                if child.is_symlink():
                    log.warning("slides: %s points outside the served folder; not served", folder)
                continue
            summary = _read_json(summary_file)
            if summary is None:
                continue
            entries[child.name] = SlideEntry(child.name, folder, summary)
        failed = self.root / FAILED_DIR
        if failed.is_dir():
            for note in sorted(failed.glob("*.json")):
                if note.stem in entries or self.inside(note) is None:
                    continue
                data = _read_json(note)
                if data is not None:
                    entries[note.stem] = SlideEntry(note.stem, None, {**data, "status": "failed"})
        return entries

    def inside(self, path: Path) -> Path | None:
        """``path`` resolved (symlinks followed), when it exists and lies inside the served folder; else None."""
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        return real if real == self.root or real.is_relative_to(self.root) else None

    def names(self) -> list[str]:
        """Every slide id, sorted (case-insensitively)."""
        self.refresh()
        return list(self._order)

    def page(self, offset: int, limit: int, query: str = "") -> tuple[int, list[SlideEntry]]:
        """The number of slides matching ``query`` (a substring of the name) and the page of them asked for."""
        self.refresh()
        with self._lock:
            names = self._order
            if query:
                q = query.lower()
                names = [n for n in names if q in n.lower()]
            return len(names), [self._entries[n] for n in names[offset : offset + limit]]

    def entry(self, name: str) -> SlideEntry | None:
        """The slide with this id, or None: ids are looked up in the index, never used as paths."""
        self.refresh()
        with self._lock:
            return self._entries.get(name)

    def output(self, entry: SlideEntry, file_name: str) -> Path | None:
        """One of the slide's output files (a constant name), resolved inside the served folder, or None."""
        if entry.folder is None:
            return None
        return self.inside(entry.folder / file_name)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("slides: %s is not readable JSON (%s); left out", path, exc)
        return None
    return data if isinstance(data, dict) else None
