"""Kaggle "Histopathologic Cancer Detection": train/<id>.tif + train_labels.csv; test/ + sample_submission.csv."""

from __future__ import annotations

import csv
from pathlib import Path

from histoscan.data.sources.base import BINARY_CLASSES, Entry, Listing, Source
from histoscan.data.sources.pcam import PCAM_LABEL_SIZE, PCAM_MPP, PCAM_SIZE
from histoscan.errors import DataError

LABELS_FILE = "train_labels.csv"
SUBMISSION_FILE = "sample_submission.csv"


def read_id_table(path: Path, need_label: bool) -> tuple[list[tuple[str, int | None, int]], list[str]]:
    """Read an ``id,label`` CSV; return (rows of (id, label, line), duplicate ids).

    Labels must be 0 or 1; anything else is a DataError naming the file and line.
    """
    rows: list[tuple[str, int | None, int]] = []
    seen: set[str] = set()
    duplicates: list[str] = []
    try:
        with path.open(newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file, expected a header 'id,label'")
            cols = [c.strip().lower() for c in header]
            if "id" not in cols or (need_label and "label" not in cols):
                want = "id,label" if need_label else "id"
                raise DataError(f"{path}:1: header {header!r} lacks the columns '{want}'")
            i_id = cols.index("id")
            i_label = cols.index("label") if "label" in cols else None
            for line, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(cols):
                    raise DataError(f"{path}:{line}: expected {len(cols)} fields, found {len(row)}")
                pid = row[i_id].strip()
                if not pid:
                    raise DataError(f"{path}:{line}: empty id")
                label: int | None = None
                if need_label and i_label is not None:
                    raw = row[i_label].strip()
                    if raw not in ("0", "1"):
                        raise DataError(f"{path}:{line}: label {raw!r} for id {pid!r} is not 0 or 1")
                    label = int(raw)
                if pid in seen:
                    duplicates.append(pid)
                    continue
                seen.add(pid)
                rows.append((pid, label, line))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text CSV file ({exc})") from exc
    return rows, duplicates


class KaggleSource(Source):
    """The competition's training folder with its labels (binary: normal / tumor)."""

    layout = "kaggle"
    native_size, label_size, mpp = PCAM_SIZE, PCAM_LABEL_SIZE, PCAM_MPP  # PCam's patches: see sources/pcam.py

    def __init__(self, root: str | Path, labels: str | Path | None = None, images: str = "train") -> None:
        super().__init__(root)
        self.labels_path = Path(labels) if labels else self.root / LABELS_FILE
        self.image_dir = self.root / images

    def scan(self) -> Listing:
        """List ``train/<id>.tif`` files with their labels from ``train_labels.csv``."""
        if not self.labels_path.is_file():
            raise DataError(f"{self.labels_path}: labels file not found")
        if not self.image_dir.is_dir():
            raise DataError(f"{self.image_dir}: image folder not found (expected {self.root}/train/<id>.tif)")
        rows, duplicates = read_id_table(self.labels_path, need_label=True)
        on_disk = {p.stem: p for p in self.image_dir.iterdir() if p.suffix.lower() in (".tif", ".tiff")}
        entries: list[Entry] = []
        missing: list[str] = []
        for pid, label, _line in rows:
            path = on_disk.get(pid)
            if path is None:
                missing.append(pid)
                continue
            entries.append(Entry(pid, str(path), label))
        labelled = {r[0] for r in rows}
        unlabelled = sorted(pid for pid in on_disk if pid not in labelled)
        return Listing(entries, list(BINARY_CLASSES), duplicates, missing, unlabelled)


class UnlabelledFolderSource(Source):
    """A flat folder of images without labels (e.g. the Kaggle ``test/`` folder).

    When a ``sample_submission.csv`` sits beside the folder (or is given), its
    order is kept, and ids it lists without an image are reported.
    """

    layout = "unlabelled"

    def __init__(self, root: str | Path, order_file: str | Path | None = None) -> None:
        super().__init__(root)
        if order_file is None:
            candidate = self.root.parent / SUBMISSION_FILE
            order_file = candidate if candidate.is_file() else None
        self.order_file = Path(order_file) if order_file else None

    def scan(self) -> Listing:
        """List the folder's images, in ``sample_submission.csv`` order when there is one."""
        from histoscan.data.imageio import is_image_file
        from histoscan.data.sources.base import natural_key

        files = sorted(
            (p for p in self.root.iterdir() if p.is_file() and is_image_file(p)), key=lambda p: natural_key(p.name)
        )
        by_stem = {p.stem: p for p in files}
        if self.order_file is None:
            entries = [Entry(p.stem, str(p), None) for p in files]
            return Listing(entries, list(BINARY_CLASSES))
        rows, duplicates = read_id_table(self.order_file, need_label=False)
        entries, missing = [], []
        for pid, _label, _line in rows:
            if pid in by_stem:
                entries.append(Entry(pid, str(by_stem[pid]), None))
            else:
                missing.append(pid)
        listed = {r[0] for r in rows}
        extra = [p.stem for p in files if p.stem not in listed]
        entries.extend(Entry(pid, str(by_stem[pid]), None) for pid in extra)
        return Listing(entries, list(BINARY_CLASSES), duplicates, missing, [])
