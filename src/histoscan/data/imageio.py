"""Decode one image file into 8-bit RGB, saying what had to be converted."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from histoscan.enums import FIT_POLICIES
from histoscan.errors import DataError

IMAGE_SUFFIXES = frozenset({".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


class ImageReadError(DataError):
    """The file could not be decoded; the message says why (a DataError: the CLI prints it as one line)."""


class ImageTooLarge(ImageReadError):
    """The file declares more pixels, pages or decoded bytes than the budget allows (nothing was decoded)."""


UPLOAD_FORMATS = ("TIFF", "PNG", "JPEG", "BMP")  # what decode_bytes lets Pillow open; nothing exotic


@dataclass(frozen=True)
class DecodeBudget:
    """Limits checked from a file's header, before a single pixel is decoded.

    ``max_pixels`` counts the declared height x width; ``max_decoded_bytes`` counts what the
    decoder would allocate (pixels x samples x bytes per sample x depth of the level that is
    decoded); ``max_pages`` counts the pages (TIFF) of the file; ``max_samples`` the samples per
    pixel (more than RGBA cannot be an RGB patch). None switches a check off.
    """

    max_pixels: int | None = None
    max_decoded_bytes: int | None = None
    max_pages: int | None = None
    max_samples: int = 4

    def check(self, name: str, h: int, w: int, nbytes: int, samples: int = 1, pages: int = 1) -> None:
        """Raise ImageTooLarge naming the figure over its limit (ImageReadError for too many samples)."""
        if self.max_pages is not None and pages > self.max_pages:
            raise ImageTooLarge(f"{name}: image too large ({pages} pages; the limit is {self.max_pages})")
        if self.max_pixels is not None and h * w > self.max_pixels:
            raise ImageTooLarge(f"{name}: image too large ({w}x{h} pixels; the limit is {self.max_pixels:,})")
        if self.max_decoded_bytes is not None and nbytes > self.max_decoded_bytes:
            raise ImageTooLarge(
                f"{name}: image too large ({nbytes:,} bytes once decoded; the limit is {self.max_decoded_bytes:,})"
            )
        if samples > self.max_samples:
            raise ImageReadError(f"{name}: {samples} samples per pixel; at most {self.max_samples} (RGBA) are read")


@dataclass
class DecodedImage:
    """An 8-bit RGB image with the facts the validation report counts."""

    pixels: np.ndarray  # uint8 HxWx3
    original_size: tuple[int, int]  # (height, width) as stored in the file
    conversions: list[str] = field(default_factory=list)  # e.g. ["grayscale", "16-bit"]


def is_image_file(path: Path) -> bool:
    """True when the suffix is one histoscan reads."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def to_rgb8(array: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Convert a decoded array (gray, gray+alpha, RGB, RGBA; 8 or 16 bit) to uint8 HxWx3."""
    conversions: list[str] = []
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 2, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (CxHxW) TIFF
    if a.dtype == np.uint16 or a.dtype == np.int32 or a.dtype == np.int16:
        conversions.append("16-bit")
        if a.dtype != np.uint16:
            a = a.clip(0, 65535).astype(np.uint16)
        a = (a >> 8).astype(np.uint8) if a.max(initial=0) > 255 else a.astype(np.uint8)
    elif a.dtype == np.bool_:
        conversions.append("1-bit")
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        conversions.append("float")
        if not np.isfinite(a).all():
            raise ImageReadError("image has non-finite values (NaN or Inf); refusing to guess their colour")
        scale = 255.0 if float(np.nanmax(a, initial=0.0)) <= 1.0 else 1.0
        a = np.nan_to_num(a * scale).clip(0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageReadError(f"unsupported pixel type {a.dtype}")
    if a.ndim == 2:
        conversions.append("grayscale")
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 1:
        conversions.append("grayscale")
        a = np.repeat(a, 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 2:
        conversions.append("grayscale")
        a = _over_white(np.repeat(a[:, :, :1], 3, axis=2), a[:, :, 1])
    elif a.ndim == 3 and a.shape[2] == 4:
        conversions.append("rgba")
        a = _over_white(a[:, :, :3], a[:, :, 3])
    elif not (a.ndim == 3 and a.shape[2] == 3):
        raise ImageReadError(f"unsupported image shape {tuple(a.shape)}")
    return np.ascontiguousarray(a), conversions


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite onto white: transparent slide background is white glass, not black."""
    if alpha.min() == 255:
        return rgb
    a = alpha.astype(np.uint16)[:, :, None]  # integer maths: half the memory of float32 for the same result
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _read_pillow(path: Path) -> tuple[np.ndarray, list[str]]:
    with Image.open(path) as im:
        im.load()  # raises on truncated data instead of padding with grey
        notes: list[str] = []
        if im.mode in ("P", "PA"):
            im = im.convert("RGBA")
            notes.append("palette")
        elif im.mode == "CMYK" or im.mode == "YCbCr" or im.mode == "LAB" or im.mode == "HSV":
            im = im.convert("RGB")
        elif im.mode == "1":
            im = im.convert("L")
        elif im.mode.startswith("I;16"):
            arr = np.asarray(im, dtype=np.uint16)
            rgb, conv = to_rgb8(arr)
            return rgb, notes + conv
        elif im.mode == "I":
            arr = np.asarray(im, dtype=np.int32).clip(0, 65535).astype(np.uint16)
            rgb, conv = to_rgb8(arr)
            return rgb, notes + conv
        arr = np.asarray(im)
    rgb, conv = to_rgb8(arr)
    return rgb, notes + conv


def _read_tiff(path: Path) -> tuple[np.ndarray, list[str]]:
    with tifffile.TiffFile(path) as tif:
        if not tif.pages:
            raise ImageReadError("TIFF has no pages")
        page = tif.pages[0]
        arr = page.asarray()
    return to_rgb8(arr)


_DATETIME_TAG = 306


class TiffTemplate:
    """The parsed layout of one uncompressed, single-strip 8-bit TIFF, reused for files laid out identically.

    Datasets such as Kaggle HCD are 220,000 TIFFs written by one program: every byte
    outside the pixel strip is the same except the DateTime value. A file whose
    size and every other non-pixel byte match the template has, byte for byte, the
    same tags, so its pixels are read straight from the strip without re-parsing.
    Anything else returns None and goes through tifffile.
    """

    def __init__(
        self, header: bytes, size: int, offset: int, shape: tuple[int, ...], ignore: list[tuple[int, int]]
    ) -> None:
        self.size, self.offset, self.shape = size, offset, shape
        self.nbytes = int(np.prod(shape))
        # byte ranges that must match: everything but the pixel strip and the ignored values
        skip = sorted([(offset, offset + self.nbytes), *ignore])
        ranges, pos = [], 0
        for lo, hi in skip:
            if lo > pos:
                ranges.append((pos, lo))
            pos = max(pos, hi)
        if pos < size:
            ranges.append((pos, size))
        self._ranges = [(lo, hi, header[lo:hi]) for lo, hi in ranges]

    @classmethod
    def learn(cls, data: bytes) -> TiffTemplate | None:
        """A template from the bytes of one TIFF when it qualifies, else None."""
        import io

        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                if len(tif.pages) != 1:
                    return None
                page = tif.pages[0]
                if (
                    page.compression != 1
                    or page.dtype != np.uint8
                    or len(page.dataoffsets) != 1
                    or page.planarconfig != 1
                    or page.shape[-1:] not in ((3,),)
                    or page.photometric != 2
                ):
                    return None
                offset, count = int(page.dataoffsets[0]), int(page.databytecounts[0])
                if count != int(np.prod(page.shape)):
                    return None
                ignore = []
                tag = page.tags.get(_DATETIME_TAG)
                if tag is not None:
                    ignore.append((int(tag.valueoffset), int(tag.valueoffset) + int(tag.count)))
                return cls(data, len(data), offset, tuple(page.shape), ignore)
        except Exception:
            return None

    def match(self, data: bytes) -> np.ndarray | None:
        """Pixels of ``data`` when it has the template's layout, else None."""
        if len(data) != self.size:
            return None
        for lo, hi, ref in self._ranges:
            if data[lo:hi] != ref:
                return None
        return np.frombuffer(data, dtype=np.uint8, count=self.nbytes, offset=self.offset).reshape(self.shape).copy()


class FastTiffReader:
    """``read_image`` with a TiffTemplate fast path for runs of identically laid-out TIFFs."""

    def __init__(self) -> None:
        self.template: TiffTemplate | None = None
        self.hits = 0

    def fast(self, data: bytes) -> np.ndarray | None:
        """Pixels of ``data`` when it is a TIFF laid out like the learned one, else None."""
        if self.template is None or data[:4] not in TIFF_MAGICS:
            return None
        pixels = self.template.match(data)
        if pixels is not None:
            self.hits += 1
        return pixels

    def learn(self, data: bytes) -> None:
        """Take ``data``'s layout as the template when it qualifies (else keep the current one)."""
        if data[:4] in TIFF_MAGICS:
            self.template = TiffTemplate.learn(data) or self.template

    def __call__(self, path: str | Path) -> DecodedImage:
        """Decode one image file, fast for TIFFs laid out like the last one read."""
        p = Path(path)
        if p.suffix.lower() not in TIFF_SUFFIXES:
            return read_image(p)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise ImageReadError(f"{type(exc).__name__}: {exc}") from exc
        px = self.fast(data)
        if px is not None:
            return DecodedImage(px, (px.shape[0], px.shape[1]), [])
        img = read_image(p)
        self.learn(data)
        return img


def read_image(path: str | Path) -> DecodedImage:
    """Decode ``path`` into uint8 RGB; raise ImageReadError with the reason when it cannot."""
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            raise ImageReadError("empty file (0 bytes)")
        if p.suffix.lower() in TIFF_SUFFIXES:
            try:
                pixels, conv = _read_tiff(p)
            except ImageReadError:
                raise
            except Exception as tiff_exc:
                try:
                    pixels, conv = _read_pillow(p)
                except Exception:
                    raise ImageReadError(f"unreadable TIFF: {tiff_exc}") from tiff_exc
        else:
            pixels, conv = _read_pillow(p)
    except ImageReadError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageReadError("not an image file Pillow can identify") from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"image too large (decompression bomb guard): {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError) as exc:
        raise ImageReadError(f"{type(exc).__name__}: {exc}") from exc
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageReadError("image has zero width or height")
    return DecodedImage(pixels=pixels, original_size=(int(pixels.shape[0]), int(pixels.shape[1])), conversions=conv)


def decode_bytes(
    data: bytes,
    name: str = "upload",
    max_pixels: int | None = None,
    *,
    budget: DecodeBudget | None = None,
    target: tuple[int, int] | None = None,
) -> DecodedImage:
    """Decode an in-memory image (an upload); same conversions as ``read_image``.

    The budget (``max_pixels`` alone, or a full DecodeBudget) is checked against the file's
    header before any pixel is decoded, so a small file that claims a huge image (a
    decompression bomb: many pixels, samples, bits or pages) costs milliseconds.
    With ``target`` (height, width), an image larger than it is decoded at a reduced
    resolution that is still at least ``target`` where the codec allows: JPEG DCT scaling
    (1/2, 1/4, 1/8) or a TIFF's reduced levels. The caller still fits the result to size
    with the shared fit function; against fitting the full decode, the difference is within
    the tolerance ``tests/test_hostile.py`` states (mean absolute difference under 2 grey levels).
    ``original_size`` is always the size stored in the file.
    """
    import io

    budget = budget or DecodeBudget(max_pixels=max_pixels)
    if not data:
        raise ImageReadError(f"{name}: empty file (0 bytes)")
    buf = io.BytesIO(data)
    try:
        if data[:4] in TIFF_MAGICS:
            try:
                return _decode_tiff(buf, name, budget, target)
            except ImageReadError:
                raise
            except Exception:  # tifffile could not parse it: Pillow gets one try, under the same budget
                buf.seek(0)
        return _decode_pillow(buf, name, budget, target)
    except ImageReadError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{name}: not an image file (TIFF, PNG or JPEG expected)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name}: image too large (decompression bomb guard)") from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, MemoryError, RecursionError) as exc:
        raise ImageReadError(f"{name}: unreadable image ({type(exc).__name__})") from exc


def _decode_tiff(buf: Any, name: str, budget: DecodeBudget, target: tuple[int, int] | None) -> DecodedImage:
    with tifffile.TiffFile(buf) as tif:
        pages = tif.pages
        count = len(pages)  # walks the IFD chain only (tifffile stops at a loop)
        if count == 0:
            raise ImageReadError(f"{name}: TIFF has no pages")
        budget.check(name, 0, 0, 0, pages=count)
        page = pages.first
        full = (int(page.imagelength), int(page.imagewidth))
        samples = int(page.samplesperpixel)
        level = _tiff_level(page, [pages[i] for i in range(1, count)], target) if target else page
        nbytes = int(level.size) * (np.dtype(level.dtype).itemsize if level.dtype is not None else 1)
        budget.check(name, full[0], full[1], nbytes, samples=samples, pages=count)
        arr = level.asarray()
    try:
        pixels, conv = to_rgb8(arr)
    except ImageReadError as exc:
        raise ImageReadError(f"{name}: {exc}") from exc
    if level is not page:
        conv.append("reduced level")
    return _checked(pixels, full, conv, name)


def _tiff_level(page: Any, others: list[Any], target: tuple[int, int]) -> Any:
    """The smallest stored resolution level of ``page`` that is still at least ``target``."""
    th, tw = target
    h, w = int(page.imagelength), int(page.imagewidth)
    levels = [*(getattr(page, "pages", None) or []), *(p for p in others if getattr(p, "is_reduced", False))]
    best = page
    for lv in levels:
        lh, lw = int(lv.imagelength), int(lv.imagewidth)
        same_aspect = abs(lh * w - lw * h) <= max(h, w)  # a thumbnail of another aspect is not a level
        if lh >= th and lw >= tw and same_aspect and lh * lw < int(best.imagelength) * int(best.imagewidth):
            best = lv
    return best


_MODE_BYTES = {"1": 1, "L": 1, "P": 4, "LA": 2, "PA": 4, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3, "I": 4, "F": 4}


def _decode_pillow(buf: Any, name: str, budget: DecodeBudget, target: tuple[int, int] | None) -> DecodedImage:
    with Image.open(buf, formats=UPLOAD_FORMATS) as im:
        full = (int(im.size[1]), int(im.size[0]))
        frames = int(getattr(im, "n_frames", 1)) if im.format == "TIFF" else 1
        conv: list[str] = []
        if target and im.format == "JPEG" and full[0] > target[0] and full[1] > target[1]:
            im.draft(None, (target[1], target[0]))  # DCT scaling: decodes at 1/2..1/8, never below target
            if im.size != (full[1], full[0]):
                conv.append("reduced level")
        per_pixel = _MODE_BYTES.get(im.mode, 2 * len(im.getbands()) if "16" in im.mode else 4)
        budget.check(name, full[0], full[1], im.size[0] * im.size[1] * per_pixel, len(im.getbands()), frames)
        im.load()  # raises on truncated data instead of padding with grey
        out: Image.Image = im
        if im.mode in ("P", "PA"):
            out = im.convert("RGBA")
        elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            out = im.convert("RGB")
        if out.mode.startswith("I;16"):
            arr = np.asarray(out, dtype=np.uint16)
        elif out.mode == "I":
            arr = np.asarray(out, dtype=np.int32).clip(0, 65535).astype(np.uint16)
        else:
            arr = np.asarray(out)
    try:
        pixels, more = to_rgb8(arr)
    except ImageReadError as exc:
        raise ImageReadError(f"{name}: {exc}") from exc
    return _checked(pixels, full, conv + more, name)


def _checked(pixels: np.ndarray, full: tuple[int, int], conv: list[str], name: str) -> DecodedImage:
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageReadError(f"{name}: image has zero width or height")
    return DecodedImage(pixels, full, conv)


def resize_rgb(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 HxWx3 to (height, width) with Pillow's bilinear filter (antialiased when shrinking)."""
    h, w = size
    if pixels.shape[0] == h and pixels.shape[1] == w:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR))


def fit_to_size(pixels: np.ndarray, size: tuple[int, int], policy: str = "pad-edges") -> tuple[np.ndarray, str | None]:
    """Bring an image to ``size`` under a fit policy; the one fit function of the project.

    ``pad-edges``: an edge patch (full in one direction, short in the other, as where a slide
    tiling runs off the slide) is padded with white on its bottom/right, anything else is resized.
    ``resize``: always resize (``resize_rgb``: bilinear, antialiased when shrinking).

    Returns the pixels and "padded", "resized" or None (already at ``size``).
    """
    if policy not in FIT_POLICIES:
        from histoscan.errors import ConfigError  # imported here: the decoders above need no errors module

        raise ConfigError(f"fit policy {policy!r} is not one of {list(FIT_POLICIES)}")
    h, w = pixels.shape[:2]
    th, tw = size
    kind = fit_kind((h, w), size, policy)
    if kind is None:
        return pixels, None
    if kind == "padded":
        out = np.full((th, tw, 3), 255, dtype=np.uint8)
        out[:h, :w] = pixels
        return out, "padded"
    return resize_rgb(pixels, size), "resized"


def fit_kind(shape: tuple[int, int], size: tuple[int, int], policy: str) -> str | None:
    """How ``fit_to_size`` brings an image of ``shape`` (rows, columns) to ``size``: "padded", "resized" or None.

    "padded" means white on the bottom/right, the image's own pixels kept at the top-left (what maps
    computed on the fitted image must be cropped back to); the one place the rule is written.
    """
    h, w = (int(v) for v in shape)
    th, tw = (int(v) for v in size)
    if (h, w) == (th, tw):
        return None
    if policy == "pad-edges" and h <= th and w <= tw and (h == th or w == tw):
        return "padded"
    return "resized"


def probe_size(path: str | Path) -> tuple[int, int] | None:
    """(height, width) from the file header without decoding pixels; None when unreadable."""
    try:
        with Image.open(path) as im:
            return int(im.size[1]), int(im.size[0])
    except Exception:
        return None
