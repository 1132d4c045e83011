"""Faithfulness against baselines that could beat the map: ROAD, deletion and insertion AUC, paired intervals.

A map is faithful when removing what it ranks highest changes the model's answer more than removing
what a map that knows nothing of this model and this image ranks highest. The baselines:

* ``random``: random pixels; ``block``: a square growing around a random point; ``centre``: a disc
  growing from the centre (a fixed centre blob must not pass for an explanation);
* ``shuffled``: another image's map (right for the model, wrong for the image); ``mean``: the mean of
  the other images' maps (what the model looks at on average);
* ``nuclei``: haematoxylin optical density from colour deconvolution (``skimage.color.rgb2hed``),
  smoothed: where the nuclei are, with no model at all.

ROAD (remove and debias, Rong et al. 2022; ``pytorch_grad_cam.metrics.road``) replaces removed pixels
by noisy linear imputation from their neighbours, so the removal itself is not an artefact the model
reacts to (scattered grey or donor pixels are). Deletion / insertion AUC replace pixels by the same
pixels of a normal patch the model calls negative (the neutral fill of ``faithfulness``).

Every map is turned into ranks (ties broken at random) before use: a ReLU'd map has many equal zeros,
and the package thresholds at a percentile with ``<``, which would remove all of them at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from histoscan.explain.cam import upsample
from histoscan.explain.explainer import Explainer
from histoscan.inference.probabilities import probabilities

BASELINES = ("random", "block", "centre", "shuffled", "mean", "nuclei")
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)


def rank_maps(maps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each map's pixels as ranks scaled to [0, 1] (float32), ties broken at random."""
    n, h, w = maps.shape
    out = np.empty((n, h * w), np.float32)
    for i, m in enumerate(maps.reshape(n, -1)):
        order = np.lexsort((rng.random(m.size), m))
        out[i, order] = np.arange(m.size, dtype=np.float32) / max(m.size - 1, 1)
    return out.reshape(n, h, w)


def nuclei_maps(rgb: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Haematoxylin optical density of uint8 RGB images (N, H, W, 3), Gaussian-smoothed: a nuclei-density map."""
    from scipy.ndimage import gaussian_filter
    from skimage.color import rgb2hed

    return np.stack([gaussian_filter(rgb2hed(img)[..., 0], sigma) for img in rgb]).astype(np.float32)


def view_nuclei_maps(explainer: Explainer, images: np.ndarray) -> np.ndarray:
    """Nuclei-density maps of what the model sees (its crop, stain-normalised colours), at its input size."""
    from histoscan.explain.faithfulness import model_colours, model_view

    coloured, _ = model_colours(explainer, images)
    rows, cols = model_view(explainer.pre)
    nuclei = nuclei_maps(coloured[:, rows, cols])
    s = explainer.pre.input_size
    return upsample(nuclei, (s, s)).astype(np.float32)


def baseline_maps(maps: np.ndarray, nuclei: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The baselines' maps for ``maps`` (N, s, s), with the images' nuclei-density maps (``view_nuclei_maps``)."""
    n, h, w = maps.shape
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    centres = rng.uniform([0, 0], [h, w], size=(n, 2))
    block = -np.maximum(np.abs(yy[None] - centres[:, :1, None]), np.abs(xx[None] - centres[:, 1:, None]))
    centre = -np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
    perm = rng.permutation(n)
    other = np.empty(n, int)
    other[perm] = np.roll(perm, 1)  # a derangement: never an image's own map
    total = maps.sum(axis=0)
    return {
        "random": rng.random((n, h, w)).astype(np.float32),
        "block": block.astype(np.float32),
        "centre": np.broadcast_to(centre, (n, h, w)).astype(np.float32),
        "shuffled": maps[other],
        "mean": ((total[None] - maps) / max(n - 1, 1)).astype(np.float32),  # the others' mean, not its own
        "nuclei": nuclei,
    }


class ProbabilityTarget:
    """P(class ``index``) of one output row, with the run's temperature (for the package's metrics)."""

    def __init__(self, index: int, temperature: float = 1.0) -> None:
        self.index, self.temperature = index, temperature

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        """P(class) of one output row (or of each row of a batch)."""
        rows = output if output.ndim == 2 else output[None]
        p = probabilities(rows.float(), self.temperature)[:, self.index]
        return p if output.ndim == 2 else p[0]


@dataclass
class Road:
    """ROAD on each image: change of P(target) when removing a fraction most (MoRF) or least (LeRF) relevant first."""

    fractions: tuple[float, ...]
    morf: np.ndarray  # (fractions, images): P(after) - P(before), lower is more faithful
    lerf: np.ndarray  # (fractions, images): higher (nearer 0) is more faithful

    @property
    def combined(self) -> np.ndarray:
        """Per image, the package's ROADCombined formula, mean over fractions of (LeRF - MoRF) / 2: higher is better."""
        return ((self.lerf - self.morf) / 2).mean(axis=0)


def road(
    model: nn.Module,
    x: torch.Tensor,
    maps: np.ndarray,
    target: ProbabilityTarget,
    fractions: Sequence[float] = FRACTIONS,
    batch: int = 50,
    seed: int = 0,
) -> Road:
    """ROAD MoRF and LeRF at each removed fraction, on network inputs ``x`` (N, 3, s, s) and rank maps (N, s, s)."""
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst

    torch.manual_seed(seed)  # the imputation's noise
    with torch.no_grad():
        before = np.concatenate([target(model(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])
    morf: list[np.ndarray] = []
    lerf: list[np.ndarray] = []
    for f in fractions:
        most = ROADMostRelevantFirst(percentile=round(100 * (1 - f)))  # keeps what lies below the percentile
        least = ROADLeastRelevantFirst(percentile=round(100 * f))
        for metric, out in ((most, morf), (least, lerf)):
            after = []
            for start in range(0, len(x), batch):
                sl = slice(start, start + batch)
                # return_diff=False: the unperturbed score is the same for every call, computed once above
                after.append(metric(x[sl], maps[sl], [target] * len(x[sl]), model, return_diff=False))
            out.append(np.concatenate(after) - before)
    return Road(tuple(fractions), np.asarray(morf, np.float32), np.asarray(lerf, np.float32))


def deletion_insertion_auc(
    model: nn.Module,
    x: torch.Tensor,
    fill: torch.Tensor,
    maps: np.ndarray,
    target: ProbabilityTarget,
    steps: int = 5,
    batch: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the areas under P(target) of deletion and insertion (the top-ranked pixels first).

    Deletion replaces the top-ranked pixels by ``fill`` (lower is better); insertion puts them back into
    ``fill`` (higher is better); at 0, 1/steps, ..., 1 of the pixels.
    """
    n, _, h, w = x.shape
    flat = torch.from_numpy(maps.reshape(n, -1))
    deletion, insertion = np.zeros((steps + 1, n), np.float32), np.zeros((steps + 1, n), np.float32)
    with torch.no_grad():
        whole = np.concatenate([target(model(x[i : i + batch])).numpy() for i in range(0, n, batch)])
        none = np.concatenate([target(model(fill[i : i + batch])).numpy() for i in range(0, n, batch)])
        deletion[0], deletion[steps], insertion[0], insertion[steps] = whole, none, none, whole
        for k in range(1, steps):
            count = round(k / steps * h * w)
            top = torch.zeros_like(flat, dtype=torch.bool)
            if count:
                top.scatter_(1, flat.topk(count, dim=1).indices, True)
            mask = top.reshape(n, 1, h, w)
            for start in range(0, n, batch):
                sl = slice(start, start + batch)
                deleted = torch.where(mask[sl], fill[sl], x[sl])
                inserted = torch.where(mask[sl], x[sl], fill[sl])
                deletion[k, sl] = target(model(deleted)).numpy()
                insertion[k, sl] = target(model(inserted)).numpy()
    return _trapezoid(deletion) / steps, _trapezoid(insertion) / steps


def _trapezoid(y: np.ndarray) -> np.ndarray:
    return (y[1:] + y[:-1]).sum(axis=0) / 2


def paired_interval(diff: np.ndarray, boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-image differences and its 95% percentile bootstrap interval (images resampled together)."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (boot, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)
