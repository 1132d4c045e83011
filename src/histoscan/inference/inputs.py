"""Turn whatever the user points at (image, folder, store, PCam file) into id-labelled uint8 batches."""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histoscan.data.imageio import FastTiffReader, ImageReadError, is_image_file
from histoscan.data.sources.base import unique_ids
from histoscan.data.store import META_FILE, PatchStore
from histoscan.errors import DataError
from histoscan.preprocessing import Preprocessing


@dataclass
class Batch:
    """Decoded images with their ids; files that failed are listed, not dropped."""

    ids: list[str]
    images: np.ndarray
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (id, path, reason)


def list_images(path: Path) -> list[Path]:
    """One image file, or every image file under a folder (recursively), in path order."""
    if path.is_file():
        if not is_image_file(path):
            raise DataError(f"{path}: not an image file this tool reads (tif, png, jpg, bmp)")
        return [path]
    files: list[Path] = []
    for folder, _dirs, names in os.walk(path, followlinks=True):
        files.extend(Path(folder) / n for n in names if is_image_file(Path(n)))
    files.sort()
    if not files:
        raise DataError(f"{path}: no image files found (tif, png, jpg, bmp)")
    return files


FitFn = Callable[[np.ndarray], np.ndarray]


def _decode(chunk: list[tuple[str, str]], fit: FitFn, read: FastTiffReader) -> Batch:
    ids, images, failures = [], [], []
    for pid, path in chunk:
        try:
            images.append(fit(read(path).pixels))
            ids.append(pid)
        except ImageReadError as exc:
            failures.append((pid, path, str(exc)))
    if not images:
        return Batch(ids, np.zeros((0, 0, 0, 3), np.uint8), failures)
    return Batch(ids, np.stack(images), failures)


def file_batches(paths: list[Path], root: Path, fit: FitFn, batch_size: int, workers: int) -> Iterator[Batch]:
    """Decode files in ``workers`` threads, a few batches ahead of the consumer, in order.

    ``fit`` brings each decoded image to the model's size (``Preprocessing.fit_image``), so a
    folder of mixed sizes is fitted exactly as the model's training data was.

    Threads, not processes: Pillow and file reads release the GIL, and decoded batches need no
    pickling. At most ``workers + 1`` batches are in flight, so memory stays flat on any folder size.
    """
    ids = unique_ids(paths, root if root.is_dir() else root.parent)
    items = [(i, str(p)) for i, p in zip(ids, paths)]
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    local = threading.local()

    def work(chunk: list[tuple[str, str]]) -> Batch:
        if not hasattr(local, "read"):
            local.read = FastTiffReader()
        return _decode(chunk, fit, local.read)

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="histoscan-decode") as pool:
        pending: deque[Future[Batch]] = deque()
        queue = iter(chunks)
        for chunk in queue:
            pending.append(pool.submit(work, chunk))
            if len(pending) > max(1, workers):
                break
        while pending:
            batch = pending.popleft().result()
            nxt = next(queue, None)
            if nxt is not None:
                pending.append(pool.submit(work, nxt))
            yield batch


def store_input_batches(store: PatchStore, batch_size: int) -> Iterator[Batch]:
    """Consecutive batches of a packed store (or view), in order, with their ids."""
    ids = store.ids
    for start in range(0, len(store), batch_size):
        stop = min(len(store), start + batch_size)
        yield Batch(list(ids[start:stop]), store.batch(np.arange(start, stop)))


def h5_batches(path: Path, batch_size: int) -> Iterator[Batch]:
    """A PCam ``*_x.h5`` (or .h5.gz) file's images, ids ``<stem>_<row>``."""
    import h5py

    if path.name.endswith(".gz"):
        import gzip
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory(prefix="histoscan-h5-") as tmp:
            plain = Path(tmp) / path.name.removesuffix(".gz")
            with gzip.open(path, "rb") as src, plain.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            yield from h5_batches(plain, batch_size)
        return
    stem = path.name.removesuffix(".h5")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc
    with fh:
        if "x" not in fh or fh["x"].ndim != 4 or fh["x"].shape[-1] != 3:
            raise DataError(f"{path}: expected a dataset 'x' of N x H x W x 3 images")
        xs = fh["x"]
        for start in range(0, xs.shape[0], batch_size):
            stop = min(xs.shape[0], start + batch_size)
            yield Batch([f"{stem}_{i}" for i in range(start, stop)], np.asarray(xs[start:stop], dtype=np.uint8))


def input_batches(path: str | Path, pre: Preprocessing, batch_size: int, workers: int) -> Iterator[Batch]:
    """Batches for any supported input: a store, a PCam x file or folder, an image, a folder of images.

    Decoded files are fitted to the model's size here (``pre.fit_image``); batches of stores and
    PCam files keep their own size and are fitted by the Predictor.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir() and (p / META_FILE).is_file():
        return store_input_batches(PatchStore(p), batch_size)
    if p.is_file() and (p.name.endswith("_x.h5") or p.name.endswith("_x.h5.gz") or p.suffix == ".h5"):
        return h5_batches(p, batch_size)
    if p.is_dir():
        from histoscan.data.sources.pcam import PCAM_PREFIX

        xs = sorted(p.glob(f"{PCAM_PREFIX}*_x.h5")) or sorted(p.glob(f"{PCAM_PREFIX}*_x.h5.gz"))
        if xs:
            return (b for x in xs for b in h5_batches(x, batch_size))
    return file_batches(list_images(p), p, pre.fit_image, batch_size, workers)
