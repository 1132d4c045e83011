"""The packed store: ``images.npy`` (uint8 NHWC, read by memory map), ``index.csv`` and ``meta.json``.

Only the data layer writes a store (``StoreWriter``); every other part opens it
with ``PatchStore``, which never loads the whole image array into memory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from histoscan import __version__
from histoscan.data.sources.base import Sample
from histoscan.enums import FIT_POLICIES, FitPolicy
from histoscan.errors import DataError

IMAGES_FILE = "images.npy"
INDEX_FILE = "index.csv"
META_FILE = "meta.json"
REPORT_FILE = "validation.json"
SPLITS_DIR = "splits"
STORE_FORMAT = "histoscan-store"
STORE_FORMAT_VERSION = 1
INDEX_COLUMNS = ["id", "label", "group", "source"]


class PatchStore:
    """A packed store opened by memory map; ``subset`` gives views without copying images."""

    def __init__(self, path: str | Path, indices: np.ndarray | None = None) -> None:
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise DataError(f"{self.path}: not a histoscan store (no {META_FILE}; run 'histoscan ingest' first)")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta_path}: invalid JSON ({exc})") from exc
        if self.meta.get("format") != STORE_FORMAT:
            raise DataError(f"{meta_path}: not a histoscan store meta file")
        self._images = _open_images(self.path / IMAGES_FILE, self.meta, meta_path)
        self._index = _read_index(self.path / INDEX_FILE)
        if len(self._index) != self._images.shape[0]:
            raise DataError(
                f"{self.path}: {INDEX_FILE} has {len(self._index)} rows but {IMAGES_FILE} holds {self._images.shape[0]} images"
            )
        self._full = indices is None
        self._indices = np.arange(len(self._index)) if indices is None else np.asarray(indices, dtype=np.int64)

    # ---- what the store holds -------------------------------------------------
    def __len__(self) -> int:
        return int(self._indices.shape[0])

    @property
    def class_names(self) -> list[str]:
        """The class names, in label order."""
        return list(self.meta["classes"])

    @property
    def num_classes(self) -> int:
        """How many classes the store has."""
        return len(self.meta["classes"])

    @property
    def image_size(self) -> tuple[int, int]:
        """Image height and width in pixels."""
        h, w = self.meta["image_size"]
        return int(h), int(w)

    @property
    def fit(self) -> FitPolicy:
        """How ingest brought images of another size to ``image_size`` (``Preprocessing.fit``)."""
        # Stores written before ingest recorded its policy were white-padded at the edges: "pad-edges".
        value = self.meta.get("fit", "pad-edges")
        if value not in FIT_POLICIES:
            raise DataError(f"{self.path / META_FILE}: fit {value!r} is not one of {list(FIT_POLICIES)}")
        return cast(FitPolicy, value)

    @property
    def mpp(self) -> float | None:
        """Micrometres per pixel of the stored patches, or None when the source did not say."""
        value = self.meta.get("mpp")
        return float(value) if value is not None else None

    @property
    def label_size(self) -> int | None:
        """Side (px) of the centred square each label describes; None when a label is about the whole image."""
        value = self.meta.get("label_size")
        return int(value) if value is not None else None

    @property
    def indices(self) -> np.ndarray:
        """Rows of the full store that this view covers."""
        return self._indices

    @property
    def ids(self) -> np.ndarray:
        """Patch ids of the rows in view."""
        return self._index["id"].to_numpy()[self._indices]

    @property
    def labels(self) -> np.ndarray:
        """Class index per patch; -1 where unlabelled."""
        col = pd.to_numeric(self._index["label"], errors="coerce").fillna(-1).astype(np.int64).to_numpy()
        return col[self._indices]

    @property
    def labelled(self) -> bool:
        """Whether the store's patches have labels."""
        return bool(self.meta.get("labelled", False))

    @property
    def groups(self) -> np.ndarray | None:
        """Group (patient / slide) per patch, or None when the source gave none."""
        if not self.meta.get("has_groups"):
            return None
        return self._index["group"].to_numpy()[self._indices]

    @property
    def source_splits(self) -> np.ndarray | None:
        """The source's own split per patch (PCam's train/val/test), or None."""
        if "source_split" not in self._index.columns:
            return None
        return self._index["source_split"].to_numpy()[self._indices]

    @property
    def images(self) -> np.ndarray:
        """The images of this view: the memory map itself for a full store, else a copy read at once."""
        if self._full:
            return self._images
        return self.batch(np.arange(len(self)))

    def batch(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images at view positions as one uint8 NHWC array.

        Rows are read with ``pread`` straight into the result rather than through the
        memory map, so streaming a large store does not grow the process's resident memory.
        """
        rows = self._indices[np.asarray(positions, dtype=np.int64)]
        out = np.empty((len(rows), *self._images.shape[1:]), dtype=np.uint8)
        if len(rows) == 0:
            return out
        fd = self._fd()
        row_bytes = int(np.prod(self._images.shape[1:]))
        base = int(self._images.offset)  # type: ignore[attr-defined]  # np.memmap: numpy stubs lose the subclass
        order = np.argsort(rows, kind="stable")
        flat = out.reshape(len(rows), row_bytes)
        start = 0
        sorted_rows = rows[order]
        while start < len(rows):  # coalesce runs of consecutive rows into one read
            end = start + 1
            while end < len(rows) and sorted_rows[end] == sorted_rows[end - 1] + 1 and order[end] == order[end - 1] + 1:
                end += 1
            first = int(sorted_rows[start])
            if end - start > 1:
                target = flat[order[start] : order[start] + (end - start)]
                n = os.preadv(fd, [memoryview(target.data).cast("B")], base + first * row_bytes)
            else:
                n = os.preadv(fd, [memoryview(flat[order[start]].data).cast("B")], base + first * row_bytes)
            if n != (end - start) * row_bytes:
                raise DataError(f"{self.path / IMAGES_FILE}: short read at row {first} (file truncated?)")
            start = end
        return out

    def _fd(self) -> int:
        if getattr(self, "_fd_pid", None) != os.getpid():
            self._file_fd = os.open(self.path / IMAGES_FILE, os.O_RDONLY)
            self._fd_pid = os.getpid()
        return self._file_fd

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the memory map or file descriptor (DataLoader workers reopen them)."""
        state = self.__dict__.copy()
        for key in ("_images", "_file_fd", "_fd_pid"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._images = np.load(self.path / IMAGES_FILE, mmap_mode="r")

    def __getitem__(self, pos: int) -> Sample:
        row = int(self._indices[pos])
        label = int(self.labels[pos])
        groups = self.groups
        return Sample(
            str(self._index["id"].iat[row]),
            np.asarray(self._images[row]),
            label if label >= 0 else None,
            str(groups[pos]) if groups is not None else None,
        )

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def subset(self, positions: Sequence[int] | np.ndarray) -> PatchStore:
        """A view on some positions of this view, sharing the memory map."""
        view = object.__new__(PatchStore)
        view.path, view.meta, view._images, view._index = self.path, self.meta, self._images, self._index
        view._indices = self._indices[np.asarray(positions, dtype=np.int64)]
        view._full = False
        return view

    def counts(self) -> dict[str, int]:
        """Patches per class name in this view (unlabelled under "unlabelled")."""
        labels = self.labels
        out = {name: int((labels == i).sum()) for i, name in enumerate(self.class_names)}
        if (labels < 0).any():
            out["unlabelled"] = int((labels < 0).sum())
        return out

    def report(self) -> dict[str, Any] | None:
        """The validation report written at ingest, if present."""
        p = self.path / REPORT_FILE
        return json.loads(p.read_text()) if p.is_file() else None


def _open_images(path: Path, meta: dict[str, Any], meta_path: Path) -> np.ndarray:
    """The memory map of images.npy, checked against meta.json (dtype, shape, image size)."""
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{meta_path}: 'classes' must be a non-empty list of class names, got {classes!r}")
    size = meta.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise DataError(f"{meta_path}: 'image_size' must be [height, width], got {size!r}")
    if not path.is_file():
        raise DataError(f"{path}: missing (the store is incomplete; run 'histoscan ingest' again)")
    try:
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({type(exc).__name__})") from exc
    want = (size[0], size[1], 3)
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise DataError(
            f"{path}: holds {images.dtype} images of shape {tuple(images.shape[1:])}, but {META_FILE} says uint8 "
            f"{want[0]}x{want[1]}x3"
        )
    return images


def _read_index(path: Path) -> pd.DataFrame:
    """index.csv, with the columns every reader needs."""
    if not path.is_file():
        raise DataError(f"{path}: missing (the store is incomplete; run 'histoscan ingest' again)")
    try:
        index = pd.read_csv(path, dtype={"id": str, "group": str, "source_split": str}, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: unreadable CSV ({type(exc).__name__})") from exc
    missing = [c for c in ("id", "label") if c not in index.columns]
    if missing:
        raise DataError(f"{path}: no {' or '.join(repr(c) for c in missing)} column")
    return index


def clean_stale_partials(out: Path) -> list[Path]:
    """Remove ``.<name>.partial-PID`` / ``.old-PID`` folders left next to ``out`` by processes that are gone."""
    removed = []
    for tmp in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = tmp.name[len(out.name) + 2 :].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or not tmp.is_dir() or _alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier, failed attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class StoreWriter:
    """Writes a store into a temporary folder and renames it into place on ``commit``.

    An interrupted ingest leaves only a ``.<name>.partial-PID`` folder that no
    reader accepts, removed by the next ingest to the same place once that process is
    gone; an existing store is replaced only when ``force`` is set.
    """

    def __init__(self, out: str | Path, count: int, size: tuple[int, int], force: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not force:
            raise DataError(f"{self.out}: already exists; pass --force to replace it")
        if self.out.exists() and not (self.out / META_FILE).is_file() and any(self.out.iterdir()):
            raise DataError(f"{self.out}: exists and is not a histoscan store; refusing to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_partials(self.out)  # what an interrupted ingest left behind
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self.tmp.mkdir()
        self.count, self.size = count, size
        self.images_path = self.tmp / IMAGES_FILE
        self.images = np.lib.format.open_memmap(
            self.images_path, mode="w+", dtype=np.uint8, shape=(max(count, 1), size[0], size[1], 3)
        )

    def commit(self, keep: np.ndarray, index: pd.DataFrame, meta: dict[str, Any], report: dict[str, Any]) -> Path:
        """Drop rows not in ``keep``, write index, meta and report, and move the store into place."""
        keep = np.asarray(keep, dtype=bool)
        n = int(keep.sum())
        self.images.flush()
        if n != self.images.shape[0]:
            compact = np.lib.format.open_memmap(
                self.tmp / (IMAGES_FILE + ".compact"), mode="w+", dtype=np.uint8, shape=(n, *self.images.shape[1:])
            )
            rows = np.flatnonzero(keep)
            for start in range(0, n, 4096):
                chunk = rows[start : start + 4096]
                compact[start : start + len(chunk)] = self.images[chunk]
            compact.flush()
            del compact
            del self.images
            os.replace(self.tmp / (IMAGES_FILE + ".compact"), self.images_path)
        else:
            del self.images
        index.to_csv(self.tmp / INDEX_FILE, index=False)
        (self.tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
        full_meta = {
            "format": STORE_FORMAT,
            "format_version": STORE_FORMAT_VERSION,
            "histoscan_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "image_size": list(self.size),
            "count": n,
            **meta,
        }
        (self.tmp / META_FILE).write_text(json.dumps(full_meta, indent=2))  # written last: marks the store complete
        if self.out.exists():
            trash = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, trash)
            os.replace(self.tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        """Remove the temporary folder."""
        self.images = None  # type: ignore[assignment]
        shutil.rmtree(self.tmp, ignore_errors=True)
