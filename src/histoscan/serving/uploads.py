"""Check and decode uploaded images; every problem becomes a 4xx with a message, never a 500.

Decoding runs in a bounded pool of worker threads (Pillow, tifffile and numpy release the GIL
while they work), so the event loop keeps answering ``/health`` while uploads decode. Each
image is checked against a DecodeBudget from its header first, decoded at a reduced
resolution where the codec can, and brought to the model's input size at once, so a request
holds small images only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from histoscan.data.imageio import DecodeBudget, FastTiffReader, ImageReadError, ImageTooLarge, decode_bytes
from histoscan.preprocessing import Preprocessing

ALLOWED_TYPES = ("image/tiff", "image/png", "image/jpeg", "image/jpg", "image/x-tiff", "application/octet-stream", "")


@dataclass
class UploadError(Exception):
    """A bad upload: HTTP status and a message naming the problem."""

    status: int
    message: str


def size_message(what: str, size: int, kind: str, limit: int) -> str:
    """'<what> is N bytes, over the <kind> limit of M bytes (X MB)': one unit, the true figures."""
    return f"{what} is {size:,} bytes, over the {kind} limit of {limit:,} bytes ({limit / 1e6:g} MB)"


def check_size(data: bytes, name: str, max_bytes: int) -> None:
    """413 for a file over ``max_bytes``, 400 for an empty one."""
    if len(data) > max_bytes:
        raise UploadError(413, size_message(name, len(data), "upload", max_bytes))
    if not data:
        raise UploadError(400, f"{name}: empty file")


def check_type(name: str, content_type: str | None) -> None:
    """A 415 for a declared type that is not an image (a missing or generic type is let through)."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype not in ALLOWED_TYPES and not ctype.startswith("image/"):
        raise UploadError(415, f"{name}: unsupported type {ctype!r}; send TIFF, PNG or JPEG")


def decode_upload(
    data: bytes, name: str, content_type: str | None, budget: DecodeBudget, target: tuple[int, int] | None = None
) -> np.ndarray:
    """uint8 RGB pixels of an uploaded TIFF / PNG / JPEG (grayscale, RGBA and 16-bit are converted)."""
    check_type(name, content_type)
    try:
        img = decode_bytes(data, name, budget=budget, target=target)
    except ImageTooLarge as exc:
        raise UploadError(413, str(exc)) from exc
    except ImageReadError as exc:
        raise UploadError(400, str(exc)) from exc
    return img.pixels


def model_fit(preprocessing: Preprocessing) -> Callable[[np.ndarray], np.ndarray]:
    """The shared fit-to-size of the model's preprocessing, so served and batch predictions agree."""
    return preprocessing.fit_image


class UploadDecoder:
    """Decode one upload to the model's input size (call it in a worker thread).

    TIFFs laid out like the last one decoded in full take a fast path: clients of one
    dataset send TIFFs written by one program (every Kaggle HCD patch has the same 27 kB
    layout), and the next ones whose every non-pixel byte matches are read straight from
    their pixel strip (see TiffTemplate). Anything else, bad uploads included, goes
    through the full decoder and its budget.
    """

    def __init__(self, budget: DecodeBudget, fit: Callable[[np.ndarray], np.ndarray], target: tuple[int, int]) -> None:
        self.budget, self.fit, self.target = budget, fit, target
        self.tiffs = FastTiffReader()

    @property
    def hits(self) -> int:
        """How many TIFF uploads were read by the fast path."""
        return self.tiffs.hits

    def __call__(self, data: bytes, name: str, content_type: str | None) -> np.ndarray:
        """Decode one upload to uint8 RGB, checking its type and limits first."""
        check_type(name, content_type)
        pixels = self.tiffs.fast(data)
        if pixels is None:
            pixels = decode_upload(data, name, content_type, self.budget, self.target)
            self.tiffs.learn(data)
        return self.fit(pixels)  # at the model's size at once: a request never holds a full-size image


class DecodePool:
    """A bounded pool of decoding threads shared by every request of one server process."""

    def __init__(self, decoder: UploadDecoder, workers: int) -> None:
        self.decoder = decoder
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="histoscan-decode")

    async def decode(self, data: bytes, name: str, content_type: str | None) -> np.ndarray:
        """Pixels at the model's size, decoded off the event loop (UploadError for a bad file)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.decoder, data, name, content_type)

    def close(self) -> None:
        """Shut the decoding threads down."""
        self._pool.shutdown(wait=False, cancel_futures=True)
