"""Is the map true to the model? Deletion checks against baselines that know nothing of the model.

Grey out the fraction of pixels a map ranks highest and measure how far P(target) falls; do the
same with pixels chosen at random, a random contiguous block of the same area, and a centred
Gaussian blob of the same area (a fixed centre blob must not pass for an explanation). A
faithful map makes the probability fall further than every baseline.

Two fills: ``grey`` (the model's mean colour, zero after normalisation) and ``blur`` (the same
pixels of a Gaussian-blurred copy: the nuclei's detail goes, the colour stays). A flat grey area
is itself unlike any training patch and can raise P(tumour) whatever is removed; blur removes
the detail without adding a new pattern.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from histoscan.explain.explainer import Explainer

STRATEGIES = ("map", "random", "block", "centre")
Fill = Literal["grey", "blur"]


def grey_value(explainer: Explainer) -> np.ndarray:
    """The model's mean colour as uint8 RGB (zero input after normalisation)."""
    return np.clip(np.round(np.asarray(explainer.pre.mean) * 255), 0, 255).astype(np.uint8)


def top_mask(m: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """The ``count`` highest pixels of ``m`` (ties broken at random)."""
    order = np.lexsort((rng.random(m.size), -m.ravel()))
    mask = np.zeros(m.size, bool)
    mask[order[:count]] = True
    return mask.reshape(m.shape)


def block_mask(shape: tuple[int, int], count: int, rng: np.random.Generator) -> np.ndarray:
    """A square block of about ``count`` pixels at a random place."""
    h, w = shape
    side = min(h, w, round(float(np.sqrt(count))))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    mask = np.zeros(shape, bool)
    mask[top : top + side, left : left + side] = True
    return mask


def centre_mask(shape: tuple[int, int], count: int, rng: np.random.Generator) -> np.ndarray:
    """The ``count`` highest pixels of a centred Gaussian: a centred disc of that area."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    blob = np.exp(-(((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (2 * (min(h, w) / 4) ** 2)))
    return top_mask(blob.astype(np.float32), count, rng)


def random_mask(shape: tuple[int, int], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` pixels chosen at random."""
    mask = np.zeros(shape[0] * shape[1], bool)
    mask[rng.choice(mask.size, count, replace=False)] = True
    return mask.reshape(shape)


@dataclass
class Deletion:
    """P(target) before and after greying ``fraction`` of the pixels, per strategy (arrays over images)."""

    fraction: float
    before: np.ndarray
    after: dict[str, np.ndarray]

    def drop(self, strategy: str) -> np.ndarray:
        return self.before - self.after[strategy]

    def ratios(self) -> dict[str, float]:
        """Mean drop of the map's pixels over the mean drop of each baseline (NaN unless both drops are > 0)."""
        d = float(self.drop("map").mean())
        out = {}
        for s in STRATEGIES[1:]:
            base = float(self.drop(s).mean())
            out[s] = d / base if d > 0 and base > 0 else float("nan")
        return out

    def margins(self) -> dict[str, float]:
        """Mean of (map's drop - baseline's drop) per baseline: > 0 when the map's pixels matter more."""
        return {s: float((self.drop("map") - self.drop(s)).mean()) for s in STRATEGIES[1:]}

    def wins(self) -> dict[str, float]:
        """Fraction of images where the map's pixels lower P(target) more than each baseline's."""
        return {s: float((self.drop("map") > self.drop(s)).mean()) for s in STRATEGIES[1:]}


def fill_images(explainer: Explainer, images: np.ndarray, fill: Fill) -> np.ndarray:
    """What deleted pixels become: the mean colour, or a Gaussian-blurred copy of each image (sigma 4 px)."""
    if fill == "grey":
        return np.broadcast_to(grey_value(explainer), images.shape)
    from scipy.ndimage import gaussian_filter

    return np.stack([gaussian_filter(img, sigma=(4, 4, 0)) for img in images])


def deletion(
    explainer: Explainer,
    images: np.ndarray,
    maps: np.ndarray,
    target: int,
    fraction: float = 0.2,
    seed: int = 0,
    fill: Fill = "grey",
) -> Deletion:
    """Delete ``fraction`` of each image's pixels under every strategy (``fill``) and score P(class ``target``)."""
    rng = np.random.default_rng(seed)
    images = explainer.pre.fit_batch(images)
    shape = (int(images.shape[1]), int(images.shape[2]))
    count = round(fraction * shape[0] * shape[1])
    filler = fill_images(explainer, images, fill)
    prob = lambda x: explainer.predictor.predict_batch(x).probabilities[:, target]  # noqa: E731
    makers = {
        "map": lambda i: top_mask(maps[i], count, rng),
        "random": lambda i: random_mask(shape, count, rng),
        "block": lambda i: block_mask(shape, count, rng),
        "centre": lambda i: centre_mask(shape, count, rng),
    }
    after = {}
    for name, make in makers.items():
        greyed = images.copy()
        for i in range(len(images)):
            mask = make(i)
            greyed[i][mask] = filler[i][mask]
        after[name] = prob(greyed)
    return Deletion(fraction, prob(images), after)


def deletion_curve(
    explainer: Explainer,
    images: np.ndarray,
    maps: np.ndarray,
    target: int,
    fractions: Sequence[float],
    seed: int = 0,
    fill: Fill = "grey",
) -> list[Deletion]:
    """``deletion`` at each fraction (the deletion curve of every strategy)."""
    return [deletion(explainer, images, maps, target, f, seed, fill) for f in fractions]


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two maps' pixel values, ties (the zeros a ReLU leaves) sharing their rank.

    For the randomised-weights sanity check; 0 when either map is constant.
    """
    from scipy.stats import spearmanr

    x, y = a.ravel(), b.ravel()
    if x.min() == x.max() or y.min() == y.max():
        return 0.0
    return float(spearmanr(x, y).statistic)


def centre_mass(maps: np.ndarray, low: float = 0.25, high: float = 0.75) -> np.ndarray:
    """Fraction of each map's mass inside the centred square from ``low`` to ``high`` of each side."""
    h, w = maps.shape[1:3]
    inner = maps[:, int(low * h) : int(high * h), int(low * w) : int(high * w)].sum(axis=(1, 2))
    return inner / np.maximum(maps.sum(axis=(1, 2)), 1e-12)
