"""Statistics of a store, streamed in chunks so a 220,000-patch store never sits in memory as floats.

Per-image brightness, contrast and sharpness are computed for every patch (cheap, exact counts of
blank, dark and blurry patches); mean images and colour histograms use a sample per class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from histoscan.data.store import PatchStore

# thresholds on the 0-255 grey scale, named so the report can say what they mean (defined in histoscan.thresholds)
from histoscan.thresholds import BLANK_MEAN, BLANK_STD, BLURRY_SHARPNESS, DARK_MEAN

CHUNK = 2048
_GREY = (0.299, 0.587, 0.114)
_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


@dataclass
class PatchStats:
    """Per-patch statistics over the whole view (grey scale 0-255)."""

    brightness: np.ndarray  # mean grey level
    contrast: np.ndarray  # std of grey levels
    sharpness: np.ndarray  # variance of the Laplacian of the grey image

    @property
    def blank(self) -> np.ndarray:
        """Near-white background: bright and flat."""
        return (self.brightness >= BLANK_MEAN) & (self.contrast <= BLANK_STD)

    @property
    def dark(self) -> np.ndarray:
        """Patches whose mean brightness is at or below the dark limit."""
        return self.brightness <= DARK_MEAN

    @property
    def blurry(self) -> np.ndarray:
        """Little fine detail (and not simply blank)."""
        return (self.sharpness < BLURRY_SHARPNESS) & ~self.blank


def _grey(batch: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(batch)).float()
    return (x @ torch.tensor(_GREY)).unsqueeze(1)  # N x 1 x H x W


def patch_stats(store: PatchStore, progress: Callable[[int], None] | None = None) -> PatchStats:
    """Brightness, contrast and sharpness of every patch of ``store``."""
    n = len(store)
    out = np.zeros((3, n), np.float32)
    for start in range(0, n, CHUNK):
        pos = np.arange(start, min(n, start + CHUNK))
        g = _grey(store.batch(pos))
        flat = g.flatten(1)
        out[0, pos] = flat.mean(1).numpy()
        out[1, pos] = flat.std(1).numpy()
        out[2, pos] = F.conv2d(g, _LAPLACE).flatten(1).var(1).numpy()
        if progress:
            progress(len(pos))
    return PatchStats(*out)


@dataclass
class ClassSample:
    """Mean image, RGB and grey-level histograms (normalised densities) of a sample of one class."""

    count: int
    mean_image: np.ndarray  # H x W x 3 uint8
    rgb_density: np.ndarray  # 3 x 256
    grey_density: np.ndarray  # 256


def class_sample(store: PatchStore, positions: np.ndarray) -> ClassSample:
    """Statistics of the patches at ``positions`` (read in chunks)."""
    h, w = store.image_size
    total = np.zeros((h, w, 3), np.float64)
    rgb = np.zeros((3, 256), np.int64)
    grey = np.zeros(256, np.int64)
    for start in range(0, len(positions), CHUNK):
        batch = store.batch(positions[start : start + CHUNK])
        total += batch.sum(axis=0, dtype=np.float64)
        for c in range(3):
            rgb[c] += np.bincount(batch[..., c].ravel(), minlength=256)
        g = _grey(batch).round_().clamp_(0, 255).to(torch.uint8).numpy()
        grey += np.bincount(g.ravel(), minlength=256)
    n = max(1, len(positions))
    return ClassSample(
        len(positions),
        (total / n).round().astype(np.uint8),
        rgb / np.maximum(rgb.sum(axis=1, keepdims=True), 1),
        grey / max(1, grey.sum()),
    )


def sample_positions(labels: np.ndarray, per_class: int, seed: int = 0) -> dict[int, np.ndarray]:
    """Up to ``per_class`` random positions of each class, sorted (sequential reads)."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out[int(c)] = np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    return out
