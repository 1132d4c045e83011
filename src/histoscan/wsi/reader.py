"""One interface over OpenSlide slides and plain large images: regions as RGB, resolution, bounds, background."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from histoscan.errors import DataError

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".tif", ".tiff", ".vms", ".vmu", ".bif", ".svslide", ".dcm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MAX_PLAIN_PIXELS = 400_000_000  # memory guard for plain images held whole (1.2 GB of RGB)
_DEFAULT_DPI = (72.0, 96.0)  # what image writers put in the resolution tag when they know nothing


class SlideError(DataError):
    """A slide is unreadable, unsupported, or lacks something the scan needs."""


@dataclass(frozen=True)
class Bounds:
    """The scanned area in level-0 pixels; QuPath shows a slide cropped to it (MRXS and others)."""

    x: int
    y: int
    width: int
    height: int


class SlideReader(Protocol):
    """What the scan needs from a slide; coordinates are level-0 pixels, as in OpenSlide."""

    path: Path
    dimensions: tuple[int, int]
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None  # as stated by the file (checked by ``resolution.slide_resolution``)
    objective_power: float | None  # the scan's objective magnification, when the file states it
    bounds: Bounds
    background: tuple[int, int, int]

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """uint8 HxWx3 of ``width`` x ``height`` level pixels whose top-left is level-0 (x, y)."""
        ...

    def thumbnail(self, max_side: int) -> np.ndarray:
        """The whole slide as uint8 RGB, its longer side at most ``max_side``."""
        ...

    def close(self) -> None:
        """Release the file."""
        ...


def mpp_from_tiff_tags(xres: str | None, unit: str | None) -> float | None:
    """um/px from a TIFF XResolution and ResolutionUnit; None for a missing or default (72/96 dpi) tag."""
    try:
        value = float(xres) if xres is not None else 0.0
    except ValueError:
        return None
    unit = (unit or "").lower()
    if value <= 0 or unit in ("", "none", "1"):
        return None
    if unit in ("inch", "2"):
        if any(abs(value - d) < 0.5 for d in _DEFAULT_DPI):  # PNG stores dots per metre: 72 dpi reads back as 72.009
            return None
        return 25400.0 / value
    if unit in ("centimeter", "3"):
        return 10000.0 / value
    return None


def composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """RGBA (not premultiplied, as openslide-python returns it) over a background colour -> RGB uint8.

    Only pixels that are not opaque are blended (usually none, or the strip past a slide's edge).
    """
    if rgba.shape[2] == 3:
        return rgba
    rgb = np.ascontiguousarray(rgba[..., :3])
    alpha = rgba[..., 3]
    partial = alpha != 255
    if not partial.any():
        return rgb
    a = alpha[partial].astype(np.float32)[:, None] / 255.0
    bg = np.asarray(background, np.float32)
    rgb[partial] = np.clip(rgb[partial].astype(np.float32) * a + bg * (1.0 - a) + 0.5, 0, 255).astype(np.uint8)
    return rgb


def _hex_colour(text: str | None) -> tuple[int, int, int]:
    if not text or len(text) != 6:
        return (255, 255, 255)
    try:
        return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
    except ValueError:
        return (255, 255, 255)


class OpenSlideReader:
    """A slide through OpenSlide (SVS, NDPI, MRXS, SCN, tiled TIFF, ...)."""

    def __init__(self, path: Path) -> None:
        import openslide

        self.path = path
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(f"{path}: not a slide format OpenSlide reads") from exc
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{path}: corrupt or truncated slide ({exc})") from exc
        props = self._slide.properties
        self.dimensions: tuple[int, int] = (int(self._slide.dimensions[0]), int(self._slide.dimensions[1]))
        self.level_dimensions: list[tuple[int, int]] = [(int(w), int(h)) for w, h in self._slide.level_dimensions]
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        self.mpp = _slide_mpp(props)
        self.objective_power = _positive(props.get("openslide.objective-power"))
        w, h = self.dimensions
        self.bounds = Bounds(
            int(props.get("openslide.bounds-x", 0)),
            int(props.get("openslide.bounds-y", 0)),
            int(props.get("openslide.bounds-width", w)),
            int(props.get("openslide.bounds-height", h)),
        )
        self.background = _hex_colour(props.get("openslide.background-color"))

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Read a region of a level as uint8 RGB, composited on the background."""
        import openslide

        try:
            region = self._slide.read_region((int(x), int(y)), level, (int(width), int(height)))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"{self.path}: unreadable region at ({x}, {y}) ({exc}); the file is corrupt or truncated: "
                "copy it again or re-export it"
            ) from exc
        return composite(np.asarray(region), self.background)

    def thumbnail(self, max_side: int) -> np.ndarray:
        """The whole slide, scaled down to at most ``max_side`` pixels."""
        w, h = self.dimensions
        scale = max(1.0, max(w, h) / max_side)
        level = self._slide.get_best_level_for_downsample(scale)
        lw, lh = self.level_dimensions[level]
        tw, th = max(1, round(w / scale)), max(1, round(h / scale))
        ds = self.level_downsamples[level]
        strip = max(1, 4_000_000 // lw)  # level rows per read: a few MB at a time, whatever the level's size
        parts = []
        for y in range(0, lh, strip):
            rows = min(strip, lh - y)
            part = self.read(0, round(y * ds), level, lw, rows)
            out_rows = round((y + rows) * th / lh) - round(y * th / lh)
            if out_rows > 0:
                parts.append(np.asarray(Image.fromarray(part).resize((tw, out_rows), Image.Resampling.BILINEAR)))
        return np.concatenate(parts, axis=0)

    def close(self) -> None:
        """Close the slide."""
        self._slide.close()


def _positive(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else 0.0
    except ValueError:
        return None
    return value if value > 0 else None


def _slide_mpp(props: object) -> float | None:
    get = props.get  # type: ignore[attr-defined]
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            value = float(get(key, "nan"))
        except ValueError:
            continue
        if value > 0:
            return value
    return mpp_from_tiff_tags(get("tiff.XResolution"), get("tiff.ResolutionUnit"))


class ImageReader:
    """A plain image (PNG, JPEG, untiled TIFF) held whole in memory, one level, under a pixel guard."""

    def __init__(self, path: Path, max_pixels: int = MAX_PLAIN_PIXELS) -> None:
        self.path = path
        mpp: float | None = None
        try:
            if path.suffix.lower() in (".tif", ".tiff"):
                import tifffile

                with tifffile.TiffFile(path) as tf:
                    page = tf.pages[0]
                    h, w = int(page.shape[0]), int(page.shape[1])
                    _guard(path, w, h, max_pixels)
                    tags = page.tags
                    xres = tags.get("XResolution")
                    unit = tags.get("ResolutionUnit")
                    if xres is not None:
                        num, den = xres.value
                        mpp = mpp_from_tiff_tags(str(num / den), str(int(unit.value)) if unit else "2")
                    pixels = page.asarray()
            else:
                with Image.open(path) as im:
                    _guard(path, im.size[0], im.size[1], max_pixels)
                    dpi = im.info.get("dpi")
                    if dpi:
                        mpp = mpp_from_tiff_tags(str(float(dpi[0])), "inch")
                    pixels = np.asarray(im.convert("RGBA"))
        except SlideError:
            raise
        except Exception as exc:  # Pillow and tifffile raise many types for bad files
            raise SlideError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc
        from histoscan.data.imageio import ImageReadError, to_rgb8

        try:
            rgb, _ = to_rgb8(np.asarray(pixels))
        except ImageReadError as exc:
            raise SlideError(f"{path}: {exc}") from exc
        self._pixels = rgb
        h, w = rgb.shape[:2]
        self.dimensions = (w, h)
        self.level_dimensions = [(w, h)]
        self.level_downsamples = [1.0]
        self.mpp = mpp
        self.objective_power: float | None = None
        self.bounds = Bounds(0, 0, w, h)
        self.background = (255, 255, 255)

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Read a region as uint8 RGB (background outside the image)."""
        out = np.empty((height, width, 3), np.uint8)
        out[:] = self.background
        w, h = self.dimensions
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w), min(y + height, h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._pixels[y0:y1, x0:x1]
        return out

    def thumbnail(self, max_side: int) -> np.ndarray:
        """The whole image, scaled down to at most ``max_side`` pixels."""
        w, h = self.dimensions
        scale = max(1.0, max(w, h) / max_side)
        size = (max(1, round(w / scale)), max(1, round(h / scale)))
        return np.asarray(Image.fromarray(self._pixels).resize(size, Image.Resampling.BILINEAR))

    def close(self) -> None:
        """Release the pixels."""
        self._pixels = np.zeros((0, 0, 3), np.uint8)


def _guard(path: Path, w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise SlideError(
            f"{path}: {w}x{h} px is too large to hold as a plain image; save it as a tiled pyramidal TIFF "
            "(e.g. 'vips tiffsave --tile --pyramid') so it is read tile by tile"
        )


def open_slide(path: str | Path) -> SlideReader:
    """A reader for ``path``: OpenSlide when it recognises the file, else a plain image reader."""
    import openslide

    p = Path(path)
    if not p.is_file():
        raise SlideError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise SlideError(f"{p}: empty file")
    try:
        vendor = openslide.OpenSlide.detect_format(str(p))
    except openslide.OpenSlideError:
        vendor = None
    if vendor is not None:
        return OpenSlideReader(p)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return ImageReader(p)
    if p.suffix.lower() in SLIDE_SUFFIXES:
        raise SlideError(
            f"{p}: OpenSlide cannot read it (corrupt, truncated, or an unsupported variant of the format); "
            "compare its size with the original or re-export it"
        )
    raise SlideError(
        f"{p}: not a format histoscan reads (OpenSlide does not recognise it and it is not a PNG, JPEG or TIFF image)"
    )
