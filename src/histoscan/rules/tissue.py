"""Is it tissue at all? Colour and texture statistics of a patch, judged against a stored acceptance region.

Every patch (after the bundle's stain normalisation, as the model sees it) is described by a few
optical-density and texture statistics (``FEATURE_NAMES``). The acceptance region is a Gaussian fitted to
those of the training patches: a patch whose Mahalanobis distance lies above the threshold (a high
quantile of the training distances, widened by a margin) is flagged, and its most deviating statistic
names the problem (``quality``). Only the means, the covariance and the threshold are stored in
``model.json`` (``trust.tissue_check``), never data. Fitting the region is ``histoscan.trust.tissue``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from histoscan.preprocessing import Images, Preprocessing
from histoscan.runfolder import TissueCheck
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


def tissue_features(x: torch.Tensor) -> np.ndarray:
    """N x len(FEATURE_NAMES) statistics of float [0, 1] NCHW RGB patches (see ``FEATURE_NAMES``)."""
    x = x.float().clamp(0, 1).contiguous()  # per-channel planes (to_float gives a channels-last view)
    od = _LOG_256 - torch.log1p(x * 255.0)  # optical density per channel: -log((255 x + 1) / 256)
    od_sum = od.sum(dim=1)  # N H W
    tissue = (od_sum > TISSUE_OD).float()
    grey = x.mean(dim=1)
    chroma = x.amax(dim=1) - x.amin(dim=1)
    dx = (grey[:, :, 1:] - grey[:, :, :-1]).abs().mean(dim=(1, 2))
    dy = (grey[:, 1:, :] - grey[:, :-1, :]).abs().mean(dim=(1, 2))
    contrast = grey.std(dim=(1, 2))
    od_mean = od.mean(dim=(2, 3))  # N 3
    od_total = od_mean.sum(dim=1, keepdim=True) + _EPS
    hue = od_mean / od_total  # the colour of the absorbed light, independent of how much
    coarse = torch.nn.functional.avg_pool2d(grey[:, None], 4).flatten(1).std(dim=1)
    # the cosine of each pixel's OD vector with the plane's normal; written out per channel because
    # torch's vector norm over the channel dimension of NCHW is several times slower than this
    normal = [float(v) for v in _HE_NORMAL]
    length = (od[:, 0] ** 2 + od[:, 1] ** 2 + od[:, 2] ** 2).sqrt()
    off = (od[:, 0] * normal[0] + od[:, 1] * normal[1] + od[:, 2] * normal[2]) / (length + _EPS)
    off = torch.where(tissue > 0, off, torch.nan).flatten(1)
    off_plane = torch.nan_to_num(torch.nanquantile(off, 0.9, dim=1), nan=0.0)  # the most off-plane tenth of tissue
    stained = od_sum > STAINED_OD
    blue_first = (stained & (od[:, 2] > od[:, 1]) & (od[:, 2] > od[:, 0])).float().sum(dim=(1, 2))
    brown = (blue_first + 1.0) / (stained.float().sum(dim=(1, 2)) + 2.0)
    feats = torch.stack(
        [
            torch.logit(tissue.mean(dim=(1, 2)).clamp(0.01, 0.99)),
            torch.logit(grey.mean(dim=(1, 2)).clamp(0.01, 0.99)),
            torch.log(contrast + _EPS),
            torch.log(chroma.mean(dim=(1, 2)) + _EPS),
            torch.log((dx + dy) / 2 / (contrast + _EPS) + _EPS),
            torch.log(od_mean[:, 0] + _EPS),
            torch.log(od_mean[:, 1] + _EPS),
            torch.log(od_mean[:, 2] + _EPS),
            hue[:, 0],
            hue[:, 2],
            torch.log(coarse / (contrast + _EPS) + _EPS),  # white noise loses its variance when pooled; tissue keeps it
            off_plane,
            torch.logit(brown.clamp(0.005, 0.995)),
        ],
        dim=1,
    )
    return feats.double().numpy()


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
    quality = []
    for i in range(len(features)):
        what = flag(features[i])  # a patch that is plainly not tissue is flagged even inside the region
        quality.append(what if d[i] > check.threshold or what in PLAIN_FLAGS else OK)
    return TissueVerdict(d, quality)


def flag(row: np.ndarray) -> str:
    """What a rejected image looks like, from its statistics (the region decides *whether*; this names *why*)."""
    f = dict(zip(FEATURE_NAMES, row))
    if f["brightness"] < _logit(FLAG_DARK_GREY):
        return "dark"
    if f["tissue_fraction"] < _logit(FLAG_BLANK_TISSUE):
        return "blank"
    if f["contrast"] < np.log(FLAG_UNIFORM_CONTRAST + _EPS):
        return "uniform"
    if f["chroma"] < np.log(FLAG_GRAYSCALE_CHROMA + _EPS):  # no colour at all (R = G = B); faded H&E keeps some
        return "grayscale"
    if f["smoothness"] < np.log(FLAG_NOISE_SMOOTHNESS):  # white noise keeps about 1/4 of its contrast after pooling
        return "noise"
    return "out of distribution"


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def check_images(check: TissueCheck, preprocessing: Preprocessing, images: Images) -> TissueVerdict:
    """Judge uint8 images as the model sees them (fitted to size and stain-normalised)."""
    return judge(check, tissue_features(preprocessing.to_float(images)))


def answers_for(quality: Sequence[str]) -> list[str | None]:
    """The answer a flagged image gets instead of a class (None for ``ok``)."""
    return [None if q == OK else ("not tissue" if q in NOT_TISSUE_FLAGS else "out of distribution") for q in quality]
