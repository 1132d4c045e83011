"""Check and decode uploaded images; every problem becomes a 4xx with a message, never a 500."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histoscan.data.imageio import FastTiffReader, ImageReadError, decode_bytes

ALLOWED_TYPES = ("image/tiff", "image/png", "image/jpeg", "image/jpg", "image/x-tiff", "application/octet-stream", "")
MAX_PIXELS = 50_000_000  # a patch service has no use for gigapixel uploads (decompression-bomb guard)


@dataclass
class UploadError(Exception):
    """A bad upload: HTTP status and a message naming the problem."""

    status: int
    message: str


def check_size(data: bytes, name: str, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise UploadError(413, f"{name}: {len(data) / 1e6:.1f} MB is over the upload limit of {max_bytes / 1e6:.0f} MB")
    if not data:
        raise UploadError(400, f"{name}: empty file")


def decode_upload(data: bytes, name: str, content_type: str | None) -> np.ndarray:
    """uint8 RGB pixels of an uploaded TIFF / PNG / JPEG (grayscale, RGBA and 16-bit are converted)."""
    check_type(name, content_type)
    try:
        img = decode_bytes(data, name, max_pixels=MAX_PIXELS)
    except ImageReadError as exc:
        raise UploadError(413 if "too large" in str(exc) else 400, str(exc)) from exc
    return img.pixels


def check_type(name: str, content_type: str | None) -> None:
    """A 415 for a declared type that is not an image (a missing or generic type is let through)."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype not in ALLOWED_TYPES and not ctype.startswith("image/"):
        raise UploadError(415, f"{name}: unsupported type {ctype!r}; send TIFF, PNG or JPEG")


class UploadDecoder:
    """``decode_upload`` with a fast path for TIFFs laid out like the last one it decoded in full.

    Clients of one dataset send TIFFs written by one program (every Kaggle HCD patch has the
    same 27 kB layout): once such a file has been decoded fully, the next ones whose every
    non-pixel byte matches are read straight from their pixel strip (see TiffTemplate).
    Anything else, bad uploads included, goes through the full decoder and its checks.
    """

    def __init__(self) -> None:
        self.tiffs = FastTiffReader()

    @property
    def hits(self) -> int:
        return self.tiffs.hits

    def __call__(self, data: bytes, name: str, content_type: str | None) -> np.ndarray:
        check_type(name, content_type)
        pixels = self.tiffs.fast(data)
        if pixels is None:
            pixels = decode_upload(data, name, content_type)
            self.tiffs.learn(data)
        return pixels
