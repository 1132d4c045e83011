"""Deep Zoom tiles of the served slides: OpenSlide's DeepZoomGenerator, encoded off the event loop, cached.

Reading and JPEG-encoding a tile takes milliseconds of C code that holds the GIL only in part, so it
runs in a small thread pool; the event loop only looks tiles up in the cache and awaits the pool.
The cache is bounded in bytes (not in tiles: tiles at the edge of a level are smaller), dropping the
least recently used tile first. Work for the pool is admitted as the ``tile`` kind of the server's one
Admission (``--max-tile-queue``): above that limit the request is refused with 503 and Retry-After,
the same answer as a full model queue, and ``/metrics`` and ``/ready`` count it with the rest.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histoscan.serving.admission import Admission

TILE_SIZE = 254  # 254 + 2 x 1 px overlap = 256: the usual Deep Zoom choice (OpenSlide's default)
OVERLAP = 1
JPEG_QUALITY = 80
MAX_OPEN_SLIDES = 16  # slides kept open at once; the least recently used one is dropped (closed when collected)


class TileOutside(LookupError):
    """A tile address outside the slide's pyramid (404)."""


class SlideUnavailable(LookupError):
    """The slide file is gone, or OpenSlide cannot read it (the message says which)."""


class ByteLRU:
    """A least-recently-used cache of byte strings, bounded by the total bytes it holds."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used = max_bytes, 0
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Any) -> bytes | None:
        """The cached bytes of ``key`` (marked as just used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Any, value: bytes) -> None:
        """Cache ``value`` under ``key``, dropping the least recently used entries to stay in budget."""
        if len(value) > self.max_bytes:
            return  # larger than the whole cache: never kept
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.used -= len(old)
            self._items[key] = value
            self.used += len(value)
            while self.used > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.used -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class OpenedSlide:
    """An open slide, its Deep Zoom pyramid and where that pyramid's (0, 0) lies in level-0 pixels."""

    path: Path
    deepzoom: Any  # openslide.deepzoom.DeepZoomGenerator
    offset: tuple[float, float]
    size: tuple[int, int]  # the pyramid's full-resolution width and height


def open_deepzoom(path: Path) -> OpenedSlide:
    """Open a slide with OpenSlide (any format it reads; PNG/JPEG as a one-level image) and its Deep Zoom pyramid.

    ``limit_bounds``: slides that declare their scanned area (MRXS, some TIFFs) show that area only, so
    the pyramid starts at the bounds' corner; ``offset`` says where that is in level-0 pixels.
    """
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    try:
        slide = openslide.open_slide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise SlideUnavailable(f"the slide file {path.name} cannot be read ({type(exc).__name__})") from exc
    props = slide.properties
    offset = (
        float(props.get(openslide.PROPERTY_NAME_BOUNDS_X, 0) or 0),
        float(props.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0) or 0),
    )
    dz = DeepZoomGenerator(slide, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=True)
    w, h = dz.level_dimensions[-1]
    return OpenedSlide(path, dz, offset, (int(w), int(h)))


def encode_jpeg(image: Any, quality: int = JPEG_QUALITY) -> bytes:
    """A PIL image as JPEG bytes."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class TileService:
    """Deep Zoom descriptors and tiles of the slides, read in a thread pool, cached in bounded memory."""

    def __init__(self, cache_bytes: int, workers: int, max_queue: int, admission: Admission | None = None) -> None:
        self.cache = ByteLRU(cache_bytes)
        self.workers, self.max_queue = workers, max_queue
        # the server's Admission once its lifespan starts (histoscan serve); a viewer-only app keeps its own
        self.admission = admission or Admission({"tile": max_queue})
        self._pool: ThreadPoolExecutor | None = None
        self._open: OrderedDict[Path, OpenedSlide] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The threads that read and encode tiles (started on first use)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="histoscan-tiles")
        return self._pool

    def close(self) -> None:
        """Stop the pool and forget the open slides."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        with self._lock:
            self._open.clear()

    def opened(self, path: Path) -> OpenedSlide:
        """The slide at ``path``, opened once and kept among the most recently used (blocking: call in the pool)."""
        with self._lock:
            got = self._open.get(path)
            if got is not None:
                self._open.move_to_end(path)
                return got
        got = open_deepzoom(path)
        with self._lock:
            self._open[path] = got
            while len(self._open) > MAX_OPEN_SLIDES:
                self._open.popitem(last=False)
        return got

    @property
    def waiting(self) -> int:
        """Calls admitted and waiting for (or running in) the pool."""
        return self.admission.used["tile"]

    async def run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the pool, admitted as one ``tile`` (Overloaded, 503, when that kind is full)."""
        with self.admission.slot("tile"):
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def describe(self, path: Path) -> OpenedSlide:
        """The opened slide (its pyramid's size and offset), opened in the pool."""
        result: OpenedSlide = await self.run(self.opened, path)
        return result

    async def dzi(self, path: Path) -> str:
        """The Deep Zoom descriptor (XML) of the slide."""
        opened = await self.describe(path)
        return str(opened.deepzoom.get_dzi("jpeg"))

    async def tile(self, path: Path, level: int, col: int, row: int) -> bytes:
        """One JPEG tile, from the cache or read and encoded in the pool; TileOutside when it does not exist."""
        key = (path, level, col, row)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        data: bytes = await self.run(self._read_tile, path, level, col, row)
        self.cache.put(key, data)
        return data

    def _read_tile(self, path: Path, level: int, col: int, row: int) -> bytes:
        dz = self.opened(path).deepzoom
        if not 0 <= level < dz.level_count:
            raise TileOutside(f"level {level} is outside the pyramid (levels 0 to {dz.level_count - 1})")
        cols, rows = dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileOutside(
                f"tile {col}_{row} is outside level {level} (columns 0 to {cols - 1}, rows 0 to {rows - 1})"
            )
        return encode_jpeg(dz.get_tile(level, (col, row)))
