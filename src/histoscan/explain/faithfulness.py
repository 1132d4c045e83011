"""Is the map true to the model? Deletion checks against baselines that know nothing of the model.

Delete the fraction of pixels a map ranks highest and measure how far P(target) falls; do the
same with pixels chosen at random, a random contiguous block of the same area, and a centred
Gaussian blob of the same area (a fixed centre blob must not pass for an explanation). A
faithful map makes the probability fall further than every baseline. Deletion happens where the
model looks: inside its centre crop, on the stain-normalised colours it is given.

Three fills: ``grey`` (the model's mean colour, zero after normalisation), ``blur`` (the same
pixels of a Gaussian-blurred copy: the nuclei's detail goes, the colour stays) and ``normal``
(the same pixels of a patch of normal tissue the model calls negative). A deletion must not
itself add evidence: a flat grey or smooth area is unlike any training patch, and a model that
reads fine nuclear texture as "normal" takes it for tumour, so P(tumour) can rise whatever is
removed. Check a fill on true negatives first: deleting from them must leave P(tumour) where it
was. On hcd, for the cpu-default, only ``normal`` passed, and only for contiguous deletions (the
map's, a block, the centre blob): pixels scattered at random make a speckle that raises P(tumour)
whatever the fill (benchmarks/bench_explain.py measures it; docs/guide/explain.md, "Is the map true to the model?").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from histoscan.enums import DeletionFill
from histoscan.errors import ConfigError
from histoscan.explain.explainer import Explainer
from histoscan.geometry import centre_slices
from histoscan.preprocessing import Preprocessing

STRATEGIES = ("map", "random", "block", "centre")
Fill = DeletionFill


def grey_value(explainer: Explainer) -> np.ndarray:
    """The model's mean colour as uint8 RGB (zero input after normalisation; taken after stain normalisation)."""
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
    """P(target) before and after deleting ``fraction`` of the pixels, per strategy (arrays over images)."""

    fraction: float
    before: np.ndarray
    after: dict[str, np.ndarray]

    def drop(self, strategy: str) -> np.ndarray:
        """Drop in P(tumour) per image when deleting by ``strategy``."""
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


def fill_images(
    explainer: Explainer, images: np.ndarray, fill: Fill, donors: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """The fill that deleted pixels are replaced with.

    What deleted pixels become: the mean colour, a Gaussian-blurred copy of each image (sigma 4 px),
    or, for ``normal``, a patch of ``donors`` (normal tissue, in the model's colours) drawn at random per image.
    """
    if fill == "grey":
        return np.broadcast_to(grey_value(explainer), images.shape)
    if fill == "normal":
        if donors is None or len(donors) == 0:
            raise ConfigError("fill 'normal' needs donor patches of normal tissue")
        rng = np.random.default_rng([seed, 1])
        return donors[rng.integers(0, len(donors), len(images))]
    from scipy.ndimage import gaussian_filter

    return np.stack([gaussian_filter(img, sigma=(4, 4, 0)) for img in images])


def model_view(pre: Preprocessing) -> tuple[slice, slice]:
    """The rows and columns of the fitted image that the model sees: its centre crop, or all of it."""
    h, w = (int(v) for v in pre.image_size)
    return centre_slices(h, w, pre.crop)


def model_colours(explainer: Explainer, images: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The fitted images in the colours the model sees, and a scorer (logits) that does not normalise them again.

    Stain normalisation estimates each patch's stains from all its pixels, so deleting before it
    would also recolour the pixels that were kept; deletion is done after it instead.
    """
    pre, predictor = explainer.pre, explainer.predictor
    images = pre.fit_batch(images)
    if pre.stain is None:
        return images, lambda x: predictor.logits(x)
    stained = pre.normalise_stain(torch.from_numpy(np.ascontiguousarray(images))).numpy()
    plain = dataclasses.replace(pre, stain=None)
    return stained, lambda x: predictor.backend.logits(plain(x, predictor.device))


def deleted_images(
    explainer: Explainer,
    images: np.ndarray,
    maps: np.ndarray,
    fraction: float,
    seed: int = 0,
    fill: Fill = "grey",
    donors: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """Images with part of the model's view deleted, per deletion strategy.

    The images in the model's colours, the same with ``fraction`` of the model's view deleted per strategy,
    and the scorer (logits) they must be given to.

    Every strategy deletes inside the model's view (the centre crop), ``fraction`` of its area: a
    pixel outside the crop cannot change the prediction, so a baseline that spends part of its
    budget there (as a random pick over the whole 96 px patch does, 56% of it outside a 64 px crop)
    would be handicapped against the map, which is zero there.
    """
    rng = np.random.default_rng(seed)
    images, logits = model_colours(explainer, images)
    rows, cols = model_view(explainer.pre)
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    count = round(fraction * shape[0] * shape[1])
    if donors is not None:
        donors = model_colours(explainer, donors)[0]
    filler = fill_images(explainer, images, fill, donors, seed)
    makers = {
        "map": lambda i: top_mask(maps[i][rows, cols], count, rng),
        "random": lambda i: random_mask(shape, count, rng),
        "block": lambda i: block_mask(shape, count, rng),
        "centre": lambda i: centre_mask(shape, count, rng),
    }
    out = {}
    for name, make in makers.items():
        deleted = images.copy()
        for i in range(len(images)):
            mask = make(i)
            deleted[i, rows, cols][mask] = filler[i, rows, cols][mask]
        out[name] = deleted
    return images, out, logits


def deletion(
    explainer: Explainer,
    images: np.ndarray,
    maps: np.ndarray,
    target: int,
    fraction: float = 0.2,
    seed: int = 0,
    fill: Fill = "grey",
    donors: np.ndarray | None = None,
) -> Deletion:
    """Delete ``fraction`` of the pixels the model sees under every strategy (``fill``); score P(class ``target``)."""
    originals, deleted, logits = deleted_images(explainer, images, maps, fraction, seed, fill, donors)

    def prob(x: np.ndarray) -> np.ndarray:
        step = explainer.batch_size
        out = [logits(x[i : i + step]) for i in range(0, len(x), step)]
        return explainer.predictor.probabilities_from_logits(np.concatenate(out))[:, target]

    return Deletion(fraction, prob(originals), {name: prob(x) for name, x in deleted.items()})


def deletion_curve(
    explainer: Explainer,
    images: np.ndarray,
    maps: np.ndarray,
    target: int,
    fractions: Sequence[float],
    seed: int = 0,
    fill: Fill = "grey",
    donors: np.ndarray | None = None,
) -> list[Deletion]:
    """``deletion`` at each fraction (the deletion curve of every strategy)."""
    return [deletion(explainer, images, maps, target, f, seed, fill, donors) for f in fractions]


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
