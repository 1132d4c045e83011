"""Class sub-folders: ``<class>/<file>`` (LC25000) or ``<group>/<class>/<file>`` (IDC: patient/label)."""

from __future__ import annotations

from pathlib import Path

from histoscan.data.imageio import is_image_file
from histoscan.data.sources.base import Entry, Listing, Source, natural_key, unique_ids
from histoscan.errors import DataError


def _image_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*") if p.is_file() and is_image_file(p)), key=lambda p: natural_key(str(p)))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: natural_key(p.name)
    )


class ClassFolderSource(Source):
    """Images under one folder per class; the folder name is the class name."""

    layout = "folders"

    def __init__(self, root: str | Path, class_names: list[str] | None = None) -> None:
        super().__init__(root)
        self.class_names = class_names

    def _pairs(self) -> list[tuple[Path, str, str | None]]:
        """(file, class name, group) for every image."""
        pairs: list[tuple[Path, str, str | None]] = []
        for cdir in _subdirs(self.root):
            for f in _image_files(cdir):
                pairs.append((f, cdir.name, None))
        return pairs

    def scan(self) -> Listing:
        """List ``<class>/<image>`` files as entries labelled by folder name."""
        pairs = self._pairs()
        if not pairs:
            raise DataError(f"{self.root}: no image files found in class sub-folders")
        found = sorted({c for _, c, _ in pairs}, key=natural_key)
        classes = list(self.class_names) if self.class_names else found
        unknown = [c for c in found if c not in classes]
        if unknown:
            example = next(f for f, c, _ in pairs if c == unknown[0])
            raise DataError(f"{example}: class folder {unknown[0]!r} is not a known class {classes}")
        ids = unique_ids([f for f, _, _ in pairs], self.root)
        entries = [Entry(i, str(f), classes.index(c), g) for i, (f, c, g) in zip(ids, pairs)]
        return Listing(entries, classes)


class GroupedClassFolderSource(ClassFolderSource):
    """``<group>/<class>/<file>``: the group (patient or slide) keeps splits honest."""

    layout = "grouped-folders"

    def _pairs(self) -> list[tuple[Path, str, str | None]]:
        pairs: list[tuple[Path, str, str | None]] = []
        for gdir in _subdirs(self.root):
            for cdir in _subdirs(gdir):
                for f in _image_files(cdir):
                    pairs.append((f, cdir.name, gdir.name))
        return pairs
