"""A hostile-input corpus for ``histoscan serve``, generated in memory in about a second.

Every case is a file an attacker or a careless client might upload, with the status the
service documents for it. The bombs are real files (a decoder that trusted them would
allocate what they declare), written tile by tile or row by row so that generating them
never holds the decoded image. ``tree_rss_mb`` measures what a server process tree holds. Used by tests/test_hostile.py and benchmarks/bench_hostile.py.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


@dataclass(frozen=True)
class Case:
    """One upload and the statuses the service may answer it with."""

    name: str
    data: bytes
    content_type: str
    expect: tuple[int, ...]
    words: str = ""  # a word the error message must contain


def _tiles(shape: tuple[int, ...], tile: tuple[int, int], dtype: str) -> Iterator[np.ndarray]:
    h, w = shape[:2]
    block = np.zeros((*tile, *shape[2:]), dtype)
    for _ in range(-(-h // tile[0]) * -(-w // tile[1])):
        yield block


def tiff_bomb(shape: tuple[int, ...], dtype: str = "uint8", pages: int = 1, **kw: object) -> bytes:
    """A zlib TIFF of zeros: tiny on disk, ``prod(shape) x itemsize x pages`` bytes once decoded."""
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        for _ in range(pages):
            tw.write(
                _tiles(shape, (256, 256), dtype),
                shape=shape,
                dtype=dtype,
                tile=(256, 256),
                compression="zlib",
                **kw,  # type: ignore[arg-type]
            )
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A real PNG of zeros, compressed row by row (color type 2 = RGB, 0 = gray)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\x00" + bytes(width * channels * bit_depth // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_bytes(img: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def jpeg_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A small JPEG whose frame header (SOF0) claims ``width x height``."""
    data = bytearray(jpeg_bytes(np.full((64, 64, 3), 200, np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff_bytes(img: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, img, **kw)  # type: ignore[arg-type]
    return buf.getvalue()


def looping_tiff() -> bytes:
    """A TIFF whose first IFD's next-IFD offset points back at itself."""
    data = bytearray(tiff_bytes(np.zeros((32, 32, 3), np.uint8)))
    first = struct.unpack("<I", data[4:8])[0]
    n = struct.unpack("<H", data[first : first + 2])[0]
    data[first + 2 + 12 * n : first + 6 + 12 * n] = struct.pack("<I", first)
    return bytes(data)


def image_corpus(good_patch: bytes) -> list[Case]:
    """Hostile images for /v1/predict, and one good patch as a control."""
    rng = np.random.default_rng(0)
    nan = rng.random((96, 96, 3), dtype=np.float32)
    nan[10:20, 10:20] = np.nan
    inf = rng.random((96, 96), dtype=np.float32)
    inf[0, 0] = np.inf
    png = png_bomb(96, 96)
    jpg = jpeg_bytes(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    return [
        Case("good.tif", good_patch, "image/tiff", (200,)),
        Case("bomb-16bit.tif", tiff_bomb((7000, 7000, 3), "uint16", photometric="rgb"), "image/tiff", (413,)),
        Case("bomb-64-samples.tif", tiff_bomb((2000, 2000, 64), planarconfig="contig"), "image/tiff", (413,)),
        Case("bomb-64-pages.tif", tiff_bomb((1000, 1000), pages=64), "image/tiff", (413,), "pages"),
        Case("bomb-gray.tif", tiff_bomb((20000, 20000)), "image/tiff", (413,), "too large"),
        Case("bomb.png", png_bomb(12000, 12000, 8, 0), "image/png", (413,), "too large"),
        Case("bomb-16bit.png", png_bomb(6000, 6000, 16, 2), "image/png", (413,), "too large"),
        Case("bomb.jpg", jpeg_bomb(), "image/jpeg", (413,), "too large"),
        Case(
            "five-samples.tif", tiff_bytes(np.zeros((32, 32, 5), np.uint8), planarconfig="contig"), "image/tiff", (400,)
        ),
        Case("truncated.tif", good_patch[: len(good_patch) // 2], "image/tiff", (400,)),
        Case("truncated.png", png[: len(png) // 2], "image/png", (400,)),
        Case("truncated.jpg", jpg[: len(jpg) // 2], "image/jpeg", (400,)),
        Case("header-only.tif", good_patch[:8], "image/tiff", (400,)),
        Case("looping.tif", looping_tiff(), "image/tiff", (200, 400)),
        Case("empty.tif", b"", "image/tiff", (400,), "empty"),
        Case("nan.tif", tiff_bytes(nan, photometric="rgb"), "image/tiff", (400,), "non-finite"),
        Case("inf.tif", tiff_bytes(inf), "image/tiff", (400,), "non-finite"),
        Case("text.png", b"hello, this is text", "image/png", (400,), "not an image"),
        Case("gif.gif", _gif(), "image/gif", (400,), "not an image"),
        Case("script.sh", b"#!/bin/sh\nrm -rf /\n", "text/x-shellscript", (415,)),
    ]


def large_allowed() -> list[Case]:
    """Large uploads just inside the default limits (18 MB PNG and a JPEG of 4000x4000): each must get 200."""
    from histoscan.data.imageio import resize_rgb

    rng = np.random.default_rng(3)
    smooth = resize_rgb(rng.integers(0, 255, (400, 400, 3), dtype=np.uint8), (4000, 4000)) // 4 * 4
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="PNG", compress_level=1)
    png = buf.getvalue()  # about 18 MB, 48 MB once decoded (about 1 s to decode)
    return [
        Case("large.png", png, "image/png", (200,)),
        Case("large.jpg", jpeg_bytes(smooth, quality=95), "image/jpeg", (200,)),
    ]


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


def malformed_multipart() -> list[tuple[str, dict[str, str], bytes]]:
    """(name, headers, body) of broken multipart requests for /v1/predict: each must get a 4xx."""
    part = b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.tif"\r\nContent-Type: image/tiff\r\n\r\n'
    return [
        ("no boundary", {"content-type": "multipart/form-data"}, part + b"data\r\n--XX--\r\n"),
        ("wrong boundary", {"content-type": "multipart/form-data; boundary=YY"}, part + b"data\r\n--XX--\r\n"),
        ("unterminated", {"content-type": "multipart/form-data; boundary=XX"}, part + b"data"),
        ("json body", {"content-type": "application/json"}, b'{"file": "/etc/passwd"}'),
        ("no disposition", {"content-type": "multipart/form-data; boundary=XX"}, b"--XX\r\n\r\nabc\r\n--XX--\r\n"),
        ("garbage", {"content-type": "multipart/form-data; boundary=XX"}, bytes(range(256)) * 4),
    ]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (model process, workers), in MB (Linux /proc)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total
