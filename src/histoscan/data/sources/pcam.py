"""PatchCamelyon HDF5: ``camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`` (optionally .gz) and ``*_meta.csv``."""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from histoscan.data.imageio import DecodedImage
from histoscan.data.sources.base import BINARY_CLASSES, Entry, Listing, Source
from histoscan.errors import DataError

PCAM_PREFIX = "camelyonpatch_level_2_split_"
PCAM_SPLITS = {"train": "train", "valid": "val", "test": "test"}
# PCam patches are 96 x 96 px and their label is about the centre 32 x 32 px. The Camelyon16 slides
# they come from were scanned with a 40x objective at 0.243 um/px and undersampled to 10x for the
# patches (https://github.com/basveeling/pcam, README "Patch selection"; Veeling et al., "Rotation
# Equivariant CNNs for Digital Pathology", MICCAI 2018), so a patch pixel is 4 x 0.243 = 0.972 um.
# The Kaggle HCD patches are PCam's (duplicates removed) and share this geometry.
PCAM_SIZE = 96
PCAM_LABEL_SIZE = 32
PCAM_MPP = 0.972


def pcam_file(split: str, kind: str) -> str:
    """Official file name, e.g. ``camelyonpatch_level_2_split_valid_x.h5``."""
    return f"{PCAM_PREFIX}{split}_{kind}.h5" if kind in ("x", "y") else f"{PCAM_PREFIX}{split}_meta.csv"


def find_pcam_splits(root: Path) -> list[str]:
    """Official split names whose x file is present (plain or gzipped)."""
    return [
        s for s in PCAM_SPLITS if (root / pcam_file(s, "x")).exists() or (root / (pcam_file(s, "x") + ".gz")).exists()
    ]


class PCamSource(Source):
    """The official PCam files in one folder; the official split is kept as ``source_split``."""

    layout = "pcam"
    decodes_files = False
    native_size, label_size, mpp = PCAM_SIZE, PCAM_LABEL_SIZE, PCAM_MPP

    def __init__(self, root: str | Path, workdir: str | Path | None = None) -> None:
        super().__init__(root)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._workdir = Path(workdir) if workdir else None
        self._files: dict[str, tuple[Path, Path]] = {}
        self._handles: dict[str, h5py.File] = {}

    def _plain(self, name: str) -> Path:
        """Path of an .h5 file, gunzipping ``name.gz`` into a work folder when needed."""
        plain = self.root / name
        if plain.exists():
            return plain
        gz = self.root / (name + ".gz")
        if not gz.exists():
            raise DataError(f"{plain}: missing (neither {name} nor {name}.gz found)")
        if self._workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="histoscan-pcam-")
            self._workdir = Path(self._tmp.name)
        out = self._workdir / name
        if not out.exists():
            try:
                with gzip.open(gz, "rb") as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 22)
            except (OSError, EOFError) as exc:
                out.unlink(missing_ok=True)
                raise DataError(f"{gz}: cannot decompress ({exc})") from exc
        return out

    def _h5(self, path: Path) -> h5py.File:
        key = str(path)
        if key not in self._handles:
            try:
                self._handles[key] = h5py.File(path, "r")
            except OSError as exc:
                raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc
        return self._handles[key]

    def scan(self) -> Listing:
        """List the patches of every PCam split file found."""
        splits = find_pcam_splits(self.root)
        if not splits:
            raise DataError(f"{self.root}: no PCam files ({PCAM_PREFIX}<split>_x.h5[.gz])")
        entries: list[Entry] = []
        for split in splits:
            xpath, ypath = self._plain(pcam_file(split, "x")), self._plain(pcam_file(split, "y"))
            x, y = self._h5(xpath), self._h5(ypath)
            if "x" not in x:
                raise DataError(f"{xpath}: no dataset 'x'")
            if "y" not in y:
                raise DataError(f"{ypath}: no dataset 'y'")
            xs, ys = x["x"], y["y"]
            if xs.ndim != 4 or xs.shape[3] != 3 or xs.dtype != np.uint8:
                raise DataError(f"{xpath}: dataset 'x' has shape {xs.shape} {xs.dtype}, expected N x H x W x 3 uint8")
            if ys.shape[0] != xs.shape[0]:
                raise DataError(f"{ypath}: {ys.shape[0]} labels for {xs.shape[0]} images in {xpath.name}")
            labels = np.asarray(ys[:]).reshape(ys.shape[0], -1)[:, 0]
            bad = np.flatnonzero((labels != 0) & (labels != 1))
            if bad.size:
                raise DataError(f"{ypath}: label {labels[bad[0]]!r} at row {bad[0]} is not 0 or 1")
            groups = self._groups(split, xs.shape[0])
            self._files[split] = (xpath, ypath)
            tag = PCAM_SPLITS[split]
            entries.extend(
                Entry(f"{tag}_{i:06d}", f"{xpath}#{i}", int(labels[i]), groups[i] if groups else None, tag)
                for i in range(xs.shape[0])
            )
        return Listing(entries, list(BINARY_CLASSES))

    def _groups(self, split: str, n: int) -> list[str] | None:
        meta = self.root / pcam_file(split, "meta")
        if not meta.exists():
            return None
        try:
            df = pd.read_csv(meta)
        except Exception as exc:
            raise DataError(f"{meta}: unreadable CSV ({exc})") from exc
        if "wsi" not in df.columns:
            raise DataError(f"{meta}: no 'wsi' column (columns: {list(df.columns)})")
        if len(df) != n:
            raise DataError(f"{meta}: {len(df)} rows for {n} images")
        return df["wsi"].astype(str).tolist()

    def load(self, entry: Entry) -> DecodedImage:
        """Read one patch from its HDF5 file."""
        return self.load_block([entry])[0]

    def load_block(self, entries: list[Entry]) -> list[DecodedImage]:
        """Read rows of one or more x files, in contiguous slices where possible."""
        out: list[DecodedImage | None] = [None] * len(entries)
        by_file: dict[str, list[tuple[int, int]]] = {}
        for pos, e in enumerate(entries):
            path, _, row = e.ref.rpartition("#")
            by_file.setdefault(path, []).append((pos, int(row)))
        for path, items in by_file.items():
            ds = self._h5(Path(path))["x"]
            rows = sorted({r for _, r in items})
            lo, hi = rows[0], rows[-1] + 1
            if hi - lo <= 2 * len(rows):  # nearly contiguous: one slice read
                block, where = ds[lo:hi], {r: r - lo for r in rows}
            else:
                block, where = ds[np.asarray(rows)], {r: k for k, r in enumerate(rows)}
            for pos, r in items:
                px = np.ascontiguousarray(block[where[r]])
                out[pos] = DecodedImage(px, (px.shape[0], px.shape[1]), [])
        return [o for o in out if o is not None]

    def close(self) -> None:
        """Close the open HDF5 files."""
        for h in self._handles.values():
            h.close()
        self._handles.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
