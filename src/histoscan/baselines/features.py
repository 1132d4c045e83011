"""Feature extractors for the classical baselines, streamed over a store in chunks.

``pixels``: the image shrunk to ``size x size`` (area averaging) and flattened, on [0, 1] (the
seeds' flattened-pixel baselines; full 96 px would be 27,648 features for a linear model).
``colour``: per-channel histograms and statistics of the whole patch and of its centre third
(where the HCD label lives), plus simple texture measures of the grey image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from histoscan.data.store import PatchStore
from histoscan.errors import ConfigError

HIST_BINS = 16
CHUNK = 1024


def pixel_features(images: np.ndarray, size: int = 32) -> np.ndarray:
    """uint8 NHWC -> N x (size*size*3) float32 in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.adaptive_avg_pool2d(x, size)
    return x.permute(0, 2, 3, 1).reshape(len(images), -1).numpy()


def _region_stats(x: np.ndarray) -> np.ndarray:
    """Mean, std and 10/50/90th percentiles per channel of N x H x W x 3 floats."""
    flat = x.reshape(len(x), -1, 3)
    q = np.percentile(flat, [10, 50, 90], axis=1).transpose(1, 0, 2).reshape(len(x), -1)
    return np.concatenate([flat.mean(axis=1), flat.std(axis=1), q], axis=1)


def _histograms(images: np.ndarray) -> np.ndarray:
    """Normalised 16-bin histogram per channel (N x 48)."""
    n = len(images)
    bins = (images.reshape(n, -1, 3) >> 4).astype(np.int64)  # 256 / 16 levels per bin
    out = np.empty((n, 3 * HIST_BINS), np.float32)
    offsets = np.arange(n)[:, None] * HIST_BINS
    for c in range(3):
        counts = np.bincount((bins[:, :, c] + offsets).ravel(), minlength=n * HIST_BINS).reshape(n, HIST_BINS)
        out[:, c * HIST_BINS : (c + 1) * HIST_BINS] = counts / bins.shape[1]
    return out


def _texture(grey: np.ndarray) -> np.ndarray:
    """Laplacian variance (focus), gradient magnitude mean/std, dark and white pixel fractions."""
    lap = grey[:, 1:-1, 1:-1] * 4 - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]
    gy = np.abs(np.diff(grey, axis=1))[:, :, :-1]
    gx = np.abs(np.diff(grey, axis=2))[:, :-1, :]
    mag = gx + gy
    n = len(grey)
    flat = grey.reshape(n, -1)
    return np.stack(
        [
            lap.reshape(n, -1).var(axis=1),
            mag.reshape(n, -1).mean(axis=1),
            mag.reshape(n, -1).std(axis=1),
            (flat < 0.4).mean(axis=1),
            (flat > 0.85).mean(axis=1),
        ],
        axis=1,
    )


def colour_features(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> N x 83 colour and texture features."""
    x = images.astype(np.float32) / 255.0
    h, w = x.shape[1:3]
    centre = x[:, h // 3 : h - h // 3, w // 3 : w - w // 3]
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.concatenate(
        [_histograms(images), _region_stats(x), _region_stats(centre), _texture(grey)], axis=1
    ).astype(np.float32)


FEATURES: dict[str, Callable[..., np.ndarray]] = {"pixels": pixel_features, "colour": colour_features}


def extract(store: PatchStore, kind: str, pixel_size: int = 32) -> np.ndarray:
    """Features of every patch of a store view, read in chunks (never the whole set as floats at once)."""
    if kind not in FEATURES:
        raise ConfigError(f"feature set {kind!r} is not one of {list(FEATURES)}")
    parts = []
    for start in range(0, len(store), CHUNK):
        batch = store.batch(np.arange(start, min(len(store), start + CHUNK)))
        parts.append(pixel_features(batch, pixel_size) if kind == "pixels" else colour_features(batch))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
