"""Source readers, one per layout, and the detection that picks one for a path."""

from __future__ import annotations

from pathlib import Path

from histoscan.data.imageio import is_image_file
from histoscan.data.sources.base import BINARY_CLASSES, Entry, Listing, Sample, Source
from histoscan.data.sources.folders import ClassFolderSource, GroupedClassFolderSource
from histoscan.data.sources.kaggle import LABELS_FILE, KaggleSource, UnlabelledFolderSource
from histoscan.data.sources.manifest import ManifestSource
from histoscan.data.sources.pcam import PCamSource, find_pcam_splits
from histoscan.errors import DataError

LAYOUTS = {
    "kaggle": KaggleSource,
    "pcam": PCamSource,
    "folders": ClassFolderSource,
    "grouped-folders": GroupedClassFolderSource,
    "manifest": ManifestSource,
    "unlabelled": UnlabelledFolderSource,
}

__all__ = [
    "BINARY_CLASSES",
    "LAYOUTS",
    "ClassFolderSource",
    "Entry",
    "GroupedClassFolderSource",
    "KaggleSource",
    "Listing",
    "ManifestSource",
    "PCamSource",
    "Sample",
    "Source",
    "UnlabelledFolderSource",
    "detect_layout",
    "open_source",
]


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and is_image_file(p) for p in folder.iterdir())


def detect_layout(path: str | Path) -> str:
    """Name the layout of ``path``; DataError when none fits."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() == ".csv":
            return "manifest"
        raise DataError(f"{p}: a file source must be a CSV manifest (path,label[,group]); for PCam give its folder")
    if (p / LABELS_FILE).is_file():
        return "kaggle"
    if find_pcam_splits(p):
        return "pcam"
    subdirs = [d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if _has_images(p) and not subdirs:
        return "unlabelled"
    if subdirs and any(_has_images(d) for d in subdirs):
        return "folders"
    if subdirs and any(_has_images(sd) for d in subdirs for sd in d.iterdir() if sd.is_dir()):
        return "grouped-folders"
    if _has_images(p):
        return "unlabelled"
    raise DataError(
        f"{p}: unknown layout. Expected one of: Kaggle (train/ + {LABELS_FILE}), PCam "
        "(camelyonpatch_level_2_split_*_x.h5[.gz]), class folders (<class>/<image>), grouped class folders "
        "(<group>/<class>/<image>), a flat folder of images, or a CSV manifest (path,label[,group])"
    )


def open_source(path: str | Path, layout: str | None = None, class_names: list[str] | None = None) -> Source:
    """Open ``path`` with the reader for ``layout`` (detected when None)."""
    name = layout or detect_layout(path)
    if name not in LAYOUTS:
        raise DataError(f"unknown layout {name!r}; choose one of {sorted(LAYOUTS)}")
    cls = LAYOUTS[name]
    if class_names is not None and name in ("folders", "grouped-folders", "manifest"):
        return cls(path, class_names=class_names)
    return cls(path)
