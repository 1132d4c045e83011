"""Pictures of a map: heat colours on one scale, the overlay, and the patch | map | overlay panel.

Drawn with Pillow and a matplotlib colour map (no figure per image: thousands of panels stay fast).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from histoscan.geometry import centre_box

PANEL = 192  # px per panel in the saved PNGs
LABEL_COLOUR = (0, 230, 0)
CROP_COLOUR = (0, 200, 255)


@dataclass(frozen=True)
class Geometry:
    """Boxes drawn on every panel, in image pixels: the labelled centre and the crop the model sees."""

    label_box: tuple[int, int, int, int] | None = None
    crop_box: tuple[int, int, int, int] | None = None

    @classmethod
    def from_preprocessing(cls, image_size: list[int], label_size: int | None, crop: int | None) -> Geometry:
        """Centred boxes for ``label_size`` (the labelled centre) and ``crop`` on an ``image_size`` patch."""
        h, w = (int(v) for v in image_size)

        def box(side: int | None) -> tuple[int, int, int, int] | None:
            if not side or side >= min(h, w):
                return None
            return centre_box(h, w, side)

        return cls(box(label_size), box(crop))

    def scaled(self, sx: float, sy: float) -> Geometry:
        """The same geometry with every box scaled by ``sx`` and ``sy``."""

        def s(b: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
            return None if b is None else (round(b[0] * sx), round(b[1] * sy), round(b[2] * sx), round(b[3] * sy))

        return Geometry(s(self.label_box), s(self.crop_box))


def heat(m: np.ndarray, vmax: float) -> np.ndarray:
    """A map as uint8 RGB colours (``inferno``), 0 black .. ``vmax`` and above pale yellow."""
    from matplotlib import colormaps

    scaled = np.clip(m / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(m)
    return (colormaps["inferno"](scaled)[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, m: np.ndarray, vmax: float, alpha: float = 0.6) -> np.ndarray:
    """The patch under the heat colours, each pixel's opacity following its map value (zero: the patch alone)."""
    a = (np.clip(m / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(m))[..., None] * alpha
    return (image.astype(np.float32) * (1 - a) + heat(m, vmax).astype(np.float32) * a).astype(np.uint8)


def _box(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int] | None, colour: tuple[int, int, int]) -> None:
    if box is not None:
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=colour, width=2)


def _scaled(img: np.ndarray, geometry: Geometry, side: int) -> Image.Image:
    h, w = img.shape[:2]
    pic = Image.fromarray(img).resize((side, round(side * h / w)), Image.Resampling.NEAREST)
    g = geometry.scaled(pic.width / w, pic.height / h)
    draw = ImageDraw.Draw(pic)
    _box(draw, g.crop_box, CROP_COLOUR)
    _box(draw, g.label_box, LABEL_COLOUR)
    return pic


def panel(image: np.ndarray, m: np.ndarray, vmax: float, caption: list[str], geometry: Geometry) -> np.ndarray:
    """Patch, map and overlay side by side with the boxes, a caption above and the scale below."""
    pics = [_scaled(x, geometry, PANEL) for x in (image, heat(m, vmax), overlay(image, m, vmax))]
    height = pics[0].height
    lines = [*caption, f"scale 0 .. {vmax:.3g} (green: labelled centre; blue: crop the model sees, zero outside)"]
    top = 14 * len(lines) + 6
    out = Image.new("RGB", (3 * PANEL + 8, height + top), "white")
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((4, 3 + 14 * i), line, fill=(0, 0, 0))
    for i, pic in enumerate(pics):
        out.paste(pic, (i * (PANEL + 4), top))
    return np.asarray(out)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 RGB as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def overlay_png(image: np.ndarray, m: np.ndarray, vmax: float, geometry: Geometry, side: int = PANEL) -> bytes:
    """The overlay with the boxes, as PNG bytes (the API's and the gallery's picture)."""
    return png_bytes(np.asarray(_scaled(overlay(image, m, vmax), geometry, side)))
