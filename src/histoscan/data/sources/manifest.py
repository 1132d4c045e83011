"""A CSV manifest: ``path,label[,group]`` with paths relative to the CSV's folder."""

from __future__ import annotations

import csv
from pathlib import Path

from histoscan.data.sources.base import Entry, Listing, Source, natural_key, unique_ids
from histoscan.errors import DataError


class ManifestSource(Source):
    """Rows of a CSV name the files; labels are class names (or 0/1)."""

    layout = "manifest"

    def __init__(self, root: str | Path, class_names: list[str] | None = None) -> None:
        super().__init__(root)
        self.csv_path = self.root
        self.class_names = class_names

    def scan(self) -> Listing:
        """List the manifest's rows (paths relative to the CSV) as entries."""
        base = self.csv_path.parent
        rows: list[tuple[Path, str | None, str | None, int]] = []
        missing: list[str] = []
        with self.csv_path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
            if "path" not in fields:
                raise DataError(f"{self.csv_path}:1: header {reader.fieldnames!r} lacks the column 'path'")
            reader.fieldnames = fields
            has_label = "label" in fields
            for line, row in enumerate(reader, start=2):
                raw_path = (row.get("path") or "").strip()
                if not raw_path:
                    raise DataError(f"{self.csv_path}:{line}: empty path")
                label = (row.get("label") or "").strip() if has_label else None
                if has_label and not label:
                    raise DataError(f"{self.csv_path}:{line}: empty label for {raw_path!r}")
                group = (row.get("group") or "").strip() or None
                path = Path(raw_path) if Path(raw_path).is_absolute() else base / raw_path
                if not path.is_file():
                    missing.append(raw_path)
                    continue
                rows.append((path, label, group, line))
        if not rows and not missing:
            raise DataError(f"{self.csv_path}: manifest lists no files")
        classes = (
            list(self.class_names)
            if self.class_names
            else sorted({r[1] for r in rows if r[1] is not None}, key=natural_key)
        )
        for _path, label, _g, line in rows:
            if label is not None and label not in classes:
                raise DataError(f"{self.csv_path}:{line}: label {label!r} is not a known class {classes}")
        ids = unique_ids([r[0] for r in rows], base) if rows else []
        seen: set[str] = set()
        duplicates: list[str] = []
        entries = []
        for pid, (path, label, group, _line) in zip(ids, rows):
            if str(path) in seen:
                duplicates.append(pid)
                continue
            seen.add(str(path))
            entries.append(Entry(pid, str(path), classes.index(label) if label is not None else None, group))
        return Listing(entries, classes, duplicates, missing, [])
