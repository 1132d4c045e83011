"""Matplotlib figures without pyplot: no global state, no interactive backend, fixed pixel sizes.

Every figure is a ``matplotlib.figure.Figure`` drawn on the Agg canvas, so plotting never
opens a window and works on a headless server. ``save_png`` writes it at exactly
``width x height`` pixels (``FIG_DPI`` dots per inch), which tests check.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

FIG_DPI = 100
DEFAULT_SIZE = (640, 480)


def new_figure(size: tuple[int, int] = DEFAULT_SIZE, rows: int = 1, cols: int = 1) -> tuple[Figure, np.ndarray]:
    """A figure of ``size`` pixels and a ``rows x cols`` array of axes."""
    fig = Figure(figsize=(size[0] / FIG_DPI, size[1] / FIG_DPI), dpi=FIG_DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG of its exact pixel size (no tight bounding box)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png", dpi=FIG_DPI)
    return p


def image_grid(
    images: np.ndarray,
    titles: Sequence[str],
    path: str | Path,
    *,
    cols: int = 8,
    suptitle: str = "",
    outline: tuple[int, int] | None = None,
    cell: int = 110,
) -> Path:
    """A grid of uint8 RGB images with a title under each; ``outline=(top, side)`` draws a centre box."""
    from matplotlib.patches import Rectangle

    n = max(1, len(images))
    rows = (n + cols - 1) // cols
    fig, axes = new_figure((cols * cell, rows * cell + (30 if suptitle else 0)), rows, cols)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= len(images):
            continue
        ax.imshow(images[i], interpolation="nearest")
        title = titles[i] if len(titles[i]) <= 14 else titles[i][:12] + "…"  # Kaggle ids are 40-character hashes
        ax.set_title(title, fontsize=7)
        if outline is not None:
            top, side = outline
            ax.add_patch(Rectangle((top - 0.5, top - 0.5), side, side, fill=False, edgecolor="lime", linewidth=1.2))
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return save_png(fig, path)
