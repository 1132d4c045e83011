"""Where the centred square of a patch lies: the one computation of the centre-crop window.

The model's centre crop (``preprocessing.crop``), the labelled centre (``preprocessing.label_size``), the
boxes drawn on explanations and the slices that deletion tests and Grad-CAM maps are put back into all ask
this module, so they can never disagree by a pixel (odd margins put the extra pixel below and right).
It imports nothing from histoscan (bottom layer).
"""

from __future__ import annotations


def centre_window(height: int, width: int, side: int) -> tuple[int, int]:
    """(top, left) of the centred ``side`` x ``side`` square of a ``height`` x ``width`` image.

    Args:
        height: image rows.
        width: image columns.
        side: side of the square, at most ``min(height, width)`` (callers check: their messages differ).
    """
    return (int(height) - int(side)) // 2, (int(width) - int(side)) // 2


def centre_slices(height: int, width: int, side: int | None) -> tuple[slice, slice]:
    """Rows and columns of the centred ``side`` x ``side`` square; the whole image when ``side`` is None or 0."""
    if not side:
        return slice(0, int(height)), slice(0, int(width))
    top, left = centre_window(height, width, side)
    return slice(top, top + int(side)), slice(left, left + int(side))


def centre_box(height: int, width: int, side: int) -> tuple[int, int, int, int]:
    """The centred square as a (left, top, right, bottom) box, as Pillow draws it."""
    top, left = centre_window(height, width, side)
    return left, top, left + int(side), top + int(side)
