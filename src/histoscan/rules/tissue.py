"""Is it tissue at all? Colour and texture statistics of a patch, judged against a stored acceptance region.

Every patch (after the bundle's stain normalisation, as the model sees it) is described by a few
optical-density and texture statistics (``FEATURE_NAMES``). The acceptance region is a Gaussian fitted to
those of the training patches: a patch whose Mahalanobis distance lies above the threshold (a high
quantile of the training distances, widened by a margin) is flagged, and its most deviating statistic
names the problem (``quality``). Only the means, the covariance and the threshold are stored in
``model.json`` (``trust.tissue_check``), never data. Fitting the region is ``histoscan.trust.tissue``.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from histoscan.preprocessing import Images, Preprocessing
from histoscan.runfolder import TissueCheck
from histoscan.system import available_cores
from histoscan.thresholds import (
    FLAG_BLANK_TISSUE,
    FLAG_DARK_GREY,
    FLAG_GRAYSCALE_CHROMA,
    FLAG_NOISE_SMOOTHNESS,
    FLAG_UNIFORM_CONTRAST,
    STAINED_OD,
    TISSUE_OD,
)

FEATURE_NAMES = [
    "tissue_fraction",  # logit of the fraction of pixels with optical density above TISSUE_OD (0.3)
    "brightness",  # logit of the mean grey level
    "contrast",  # log standard deviation of the grey level
    "chroma",  # log mean of max - min over the channels
    "roughness",  # log mean neighbour difference relative to the contrast
    "od_red",  # log mean optical density per channel
    "od_green",
    "od_blue",
    "hue_red",  # share of the optical density absorbed in red and in blue
    "hue_blue",
    "smoothness",  # log of the contrast left after 4x4 pooling, relative to the contrast (white noise loses it)
    "off_he_plane",  # 90th percentile of the tissue pixels' optical density off the H&E plane
    "blue_absorbing",  # logit of the share of stained pixels absorbing blue most (DAB brown; never H&E's dyes)
]
# the normal of the plane that haematoxylin and eosin optical densities span (Ruifrok and Johnston's
# vectors): H&E pixels of any lab lie near it, DAB-brown (IHC) and most other dyes and scenes do not
_HE_NORMAL = np.cross([0.65, 0.70, 0.29], [0.07, 0.99, 0.11])
_HE_NORMAL = _HE_NORMAL / np.linalg.norm(_HE_NORMAL)
# flags whose images are not tissue at all (the others are tissue-like but unlike the training store)
NOT_TISSUE_FLAGS = ("blank", "dark", "uniform", "grayscale", "noise")
# flags so plain that they hold inside the region too (blank is left to the region: stores hold some background)
PLAIN_FLAGS = ("dark", "uniform", "grayscale", "noise")
OK = "ok"
_EPS = 1e-3
_LOG_256 = float(np.log(256.0))


def tissue_features(images: Images, threads: int | None = None) -> np.ndarray:
    """N x len(FEATURE_NAMES) statistics of RGB patches (see ``FEATURE_NAMES``).

    ``images``: uint8 N x H x W x 3 (numpy or torch, what ``Preprocessing.prepare`` gives), or float [0, 1]
    N x 3 x H x W (``Preprocessing.to_float``), read on the 8-bit grid it came from. ``threads``: how many
    threads share the work (default: every core this process may use; a Predictor passes its ``threads``).

    Every statistic is a sum over pixels of a function of the pixel's 8-bit values, so it is computed from
    lookup tables (optical density, its square, its projection on the H&E plane's normal, all in float32
    as the pixels' values were before) and exact integer sums, with OpenCV's vectorised array operations:
    torch and numpy have no fused 8-bit lookup and spend most of the time converting dtypes. The values are
    those of ``_reference_features`` up to float32 rounding (tests/test_tissue_features.py holds the old
    float implementation), so acceptance regions already stored in bundles keep their meaning.
    """
    u = _uint8_nhwc(images)
    n, h, w, _ = u.shape
    if n == 0:
        return np.zeros((0, len(FEATURE_NAMES)))
    # a few images at a time: their ~20 intermediate planes then stay in the core's cache (measured 1.5x);
    # the chunks run on ``threads`` threads (OpenCV releases the GIL: 1.5x on 2 cores, tissue_features_threads in
    # benchmarks/bench_predict.py), and their per-image sums become the statistics once, over the whole batch
    step = max(1, _CHUNK_PIXELS // (h * w))
    chunks = [u[i : i + step] for i in range(0, n, step)]
    workers = threads or available_cores()
    sums = list(_pool(workers).map(_sums, chunks)) if len(chunks) > 1 and workers > 1 else [_sums(c) for c in chunks]
    return _finish(np.concatenate(sums), h, w)


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """The ``workers`` threads ``tissue_features`` spreads its chunks over, made on first use in each process.

    Keyed by process id: a forked child (a server's worker, a slide batch's process) inherits the parent's
    executor without its threads, and would wait on it for ever. Made under a lock: a server's request
    threads may ask for it at once.
    """
    key = (os.getpid(), workers)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="histoscan-tissue")
        return _POOLS[key]


#: pixels per chunk of ``tissue_features``: 16 patches of 96 x 96 px (a float32 plane of them, 0.6 MB, fits a
#: core's 1 MB L2; 32 patches measured 2x slower)
_CHUNK_PIXELS = 16 * 96 * 96


def _sums(u: np.ndarray) -> np.ndarray:
    """Per image of a contiguous uint8 NHWC chunk, the sums the statistics are made of (columns of ``_finish``)."""
    import cv2  # imported here: the CLI's start-up does not pay for it

    n, h, w, _ = u.shape
    t = _tables()
    npx = h * w
    planes = cv2.split(u.reshape(n * h, w, 3))  # R, G, B: (n*h) x w uint8 each, one row per image row
    od = [cv2.LUT(c, t.od) for c in planes]
    od_sum = cv2.add(cv2.add(od[0], od[1]), od[2])  # the same float32 sum as the channels' od.sum()
    tissue = (od_sum > np.float32(TISSUE_OD)).reshape(n, npx)
    stained = (od_sum > np.float32(STAINED_OD)).reshape(n, npx)

    # grey statistics on s = R + G + B (3 x 255 x grey), exact in float32 and summed in float64
    s = cv2.add(cv2.add(planes[0], planes[1], dtype=cv2.CV_32F), planes[2], dtype=cv2.CV_32F)
    dy_rows = np.append(_row_sums(cv2.absdiff(s[1:], s[:-1]))[:, 0], 0.0).reshape(n, h)  # last row: next image
    most = cv2.max(cv2.max(planes[0], planes[1]), planes[2])
    least = cv2.min(cv2.min(planes[0], planes[1]), planes[2])

    # the cosine of each pixel's OD vector with the H&E plane's normal, over the tissue pixels
    length = cv2.sqrt(cv2.add(cv2.add(cv2.LUT(planes[0], t.sq), cv2.LUT(planes[1], t.sq)), cv2.LUT(planes[2], t.sq)))
    dot = cv2.add(cv2.add(cv2.LUT(planes[0], t.dot[0]), cv2.LUT(planes[1], t.dot[1])), cv2.LUT(planes[2], t.dot[2]))
    off = np.divide(dot, length + np.float32(_EPS)).reshape(n, npx)

    blue = planes[2]  # optical density falls as the value rises: absorbing blue most = the lowest blue value
    blue_first = (stained & ((blue < planes[1]) & (blue < planes[0])).reshape(n, npx)).sum(axis=1)
    return np.column_stack(
        [
            np.count_nonzero(tissue, axis=1),
            _row_sums(s.reshape(n, npx)),
            _row_sums(cv2.multiply(s, s).reshape(n, npx)),
            _row_sums(cv2.absdiff(s[:, 1:], s[:, :-1]).reshape(n, h * (w - 1))),
            dy_rows[:, : h - 1].sum(axis=1),
            _row_sums(cv2.subtract(most, least).reshape(n, npx)),
            *[_row_sums(c.reshape(n, npx)) for c in od],
            _coarse_std(s, n, h, w),  # 4 x 4 pooled grey: white noise loses its variance, tissue keeps it
            _nan_quantile_rows(off, tissue, 0.9),  # the most off-plane tenth of tissue; 0 without tissue
            blue_first,
            np.count_nonzero(stained, axis=1),
        ]
    )


def _finish(sums: np.ndarray, h: int, w: int) -> np.ndarray:
    """The statistics (``FEATURE_NAMES``) from the per-image sums of ``_sums``."""
    tissue, s1, s2, dx, dy, chroma, od_r, od_g, od_b, coarse, off_plane, blue_first, stained = sums.T
    npx = h * w
    grey_mean = s1 / (765.0 * npx)
    contrast = _std(s1, s2, npx) / 765.0
    dx = dx / (765.0 * h * (w - 1))
    dy = dy / (765.0 * (h - 1) * w)
    od_mean = np.column_stack([od_r, od_g, od_b]) / npx
    hue = od_mean / (od_mean.sum(axis=1, keepdims=True) + _EPS)  # the colour of the absorbed light
    brown = (blue_first + 1.0) / (stained + 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        feats = np.stack(
            [
                _logits(np.clip(tissue / npx, 0.01, 0.99)),
                _logits(np.clip(grey_mean, 0.01, 0.99)),
                np.log(contrast + _EPS),
                np.log(chroma / (255.0 * npx) + _EPS),
                np.log((dx + dy) / 2 / (contrast + _EPS) + _EPS),
                np.log(od_mean[:, 0] + _EPS),
                np.log(od_mean[:, 1] + _EPS),
                np.log(od_mean[:, 2] + _EPS),
                hue[:, 0],
                hue[:, 2],
                np.log(coarse / 765.0 / (contrast + _EPS) + _EPS),
                off_plane,
                _logits(np.clip(brown, 0.005, 0.995)),
            ],
            axis=1,
        )
    return feats.astype(np.float64)


@dataclass(frozen=True)
class _Tables:
    """Per 8-bit value: optical density, its square and its share of the H&E normal (float32, as computed before)."""

    od: np.ndarray
    sq: np.ndarray
    dot: tuple[np.ndarray, np.ndarray, np.ndarray]


@functools.cache
def _tables() -> _Tables:
    # the same float32 operations the float implementation ran on every pixel, run once on the 256 values
    x = torch.arange(256, dtype=torch.float32).div_(255.0)
    od = _LOG_256 - torch.log1p(x * 255.0)  # -log((v + 1) / 256)
    normal = [float(v) for v in _HE_NORMAL]
    dot = tuple((od * c).numpy() for c in normal)
    return _Tables(od.numpy(), (od**2).numpy(), dot)  # type: ignore[arg-type]


def _uint8_nhwc(images: Images) -> np.ndarray:
    """A contiguous uint8 N x H x W x 3 array of ``images`` (float [0, 1] NCHW is rounded to its 8-bit values)."""
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            images = images.detach().float().clamp(0, 1).mul(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1)
        return np.ascontiguousarray(images.cpu().numpy())
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4:
        return np.ascontiguousarray(images)
    return np.ascontiguousarray(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))


def _row_sums(a: np.ndarray) -> np.ndarray:
    """Each row's sum in float64, N x 1 (OpenCV's reduction: several times numpy's on these shapes)."""
    import cv2

    return cv2.reduce(a, 1, cv2.REDUCE_SUM, dtype=cv2.CV_64F)


def _std(s1: np.ndarray, s2: np.ndarray, count: int) -> np.ndarray:
    """Standard deviation (Bessel-corrected, as torch's ``std``) from a sum and a sum of squares."""
    return np.sqrt(np.maximum(s2 - s1 * s1 / count, 0.0) / (count - 1))


def _coarse_std(s: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    """Per image, the standard deviation of ``s`` averaged over 4 x 4 blocks (``avg_pool2d(., 4)``: remainders dropped)."""
    import cv2

    h4, w4 = h // 4, w // 4
    if (h4 * 4, w4 * 4) != (h, w):
        s = np.ascontiguousarray(s.reshape(n, h, w)[:, : h4 * 4, : w4 * 4]).reshape(n * h4 * 4, w4 * 4)
    # INTER_AREA at an integer factor is the exact block mean (sums of 16 integers, times 1/16)
    blocks = cv2.resize(s, (w4, n * h4), interpolation=cv2.INTER_AREA).reshape(n, h4 * w4).astype(np.float64)
    return _std(blocks.sum(axis=1), (blocks * blocks).sum(axis=1), h4 * w4)


def _nan_quantile_rows(values: np.ndarray, keep: np.ndarray, q: float) -> np.ndarray:
    """Per row, the ``q`` quantile of ``values`` where ``keep`` (0 where none), as ``torch.nanquantile`` computes it.

    ``values`` is scratch: it is overwritten.

    The ranks are float32 as torch's, interpolated linearly between the two order statistics. The rows'
    kept values are partitioned to the top of the row (the rest are -inf), so only the top ``1 - q`` of
    each row is sorted: a fraction of the full sort ``nanquantile`` runs.
    """
    count = keep.sum(axis=1)
    ranks = np.float32(q) * (count - 1).astype(np.float32)
    ranks = np.maximum(ranks, np.float32(0.0))
    below = np.floor(ranks).astype(np.int64)
    above = np.ceil(ranks).astype(np.int64)
    weight = ranks - below.astype(np.float32)
    width = values.shape[1]
    k = int(max(1, (count - below).max()))
    np.copyto(values, -np.inf, where=~keep)  # in place: the caller's scratch array
    values.partition(width - k, axis=1)
    top = np.sort(values[:, width - k :], axis=1)  # ascending; the kept values' rank r sits at k - count + r
    rows = np.arange(len(values))
    lo = top[rows, np.clip(k - count + below, 0, k - 1)]
    hi = top[rows, np.clip(k - count + above, 0, k - 1)]
    with np.errstate(invalid="ignore"):  # rows with nothing kept hold -inf here, answered 0 below
        # torch.lerp's formula, in float32
        out = np.where(weight < 0.5, lo + weight * (hi - lo), hi - (hi - lo) * (np.float32(1.0) - weight))
    return np.where(count > 0, out, 0.0).astype(np.float64)


@dataclass
class TissueVerdict:
    """Per image: the Mahalanobis distance and the quality flag (``ok`` or what is wrong)."""

    distance: np.ndarray
    quality: list[str]

    @property
    def accepted(self) -> np.ndarray:
        """Whether each image passed the tissue check."""
        return np.array([q == OK for q in self.quality])


def mahalanobis(check: TissueCheck, features: np.ndarray) -> np.ndarray:
    """Distance of each row of ``features`` from the check's training mean, in its covariance's metric."""
    diff = features - np.asarray(check.mean)
    inv = np.linalg.inv(np.asarray(check.covariance))
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", diff, inv, diff), 0.0))


def judge(check: TissueCheck, features: np.ndarray) -> TissueVerdict:
    """Each image's distance and quality flag: ``ok`` inside the region unless plainly not tissue, else ``flag``."""
    d = mahalanobis(check, features)
    what = flags(features)  # a patch that is plainly not tissue is flagged even inside the region
    quality = np.where((d > check.threshold) | np.isin(what, PLAIN_FLAGS), what, OK)
    return TissueVerdict(d, quality.tolist())


#: what a rejected image looks like, in order: the first statistic below its limit names it. grayscale: no
#: colour at all (R = G = B; faded H&E keeps some); noise: white noise keeps ~1/4 of its contrast after pooling
_FLAG_LIMITS = (
    ("dark", "brightness", float(np.log(FLAG_DARK_GREY / (1 - FLAG_DARK_GREY)))),
    ("blank", "tissue_fraction", float(np.log(FLAG_BLANK_TISSUE / (1 - FLAG_BLANK_TISSUE)))),
    ("uniform", "contrast", float(np.log(FLAG_UNIFORM_CONTRAST + _EPS))),
    ("grayscale", "chroma", float(np.log(FLAG_GRAYSCALE_CHROMA + _EPS))),
    ("noise", "smoothness", float(np.log(FLAG_NOISE_SMOOTHNESS))),
)


def flags(features: np.ndarray) -> np.ndarray:
    """What each rejected image looks like, from its statistics (the region decides *whether*; this names *why*)."""
    features = np.atleast_2d(features)
    below = [features[:, FEATURE_NAMES.index(name)] < limit for _, name, limit in _FLAG_LIMITS]
    return np.select(below, [what for what, _, _ in _FLAG_LIMITS], default="out of distribution")


def flag(row: np.ndarray) -> str:
    """``flags`` of one image's statistics."""
    return str(flags(np.asarray(row)[None])[0])


def _logits(p: np.ndarray) -> np.ndarray:
    return np.asarray(np.log(p / (1.0 - p)))


def check_images(check: TissueCheck, preprocessing: Preprocessing, images: Images) -> TissueVerdict:
    """Judge uint8 images as the model sees them (fitted to size and stain-normalised)."""
    return judge(check, tissue_features(preprocessing.prepare(images)))


def answers_for(quality: Sequence[str]) -> list[str | None]:
    """The answer a flagged image gets instead of a class (None for ``ok``)."""
    return [None if q == OK else ("not tissue" if q in NOT_TISSUE_FLAGS else "out of distribution") for q in quality]
