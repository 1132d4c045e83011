"""The tissue check's statistics, computed from 8-bit lookup tables, against the float implementation they replaced.

Bundles in the field store acceptance regions (means and covariances) of these statistics, so the fast
``tissue_features`` must give the same numbers as the float torch implementation it replaced, up to float32
rounding: ``_reference_features`` below is that implementation, kept verbatim as the test's oracle.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from histoscan.data.imageio import read_image
from histoscan.data.synthetic import NOT_HE_KINDS, not_he_patch, synth_batch
from histoscan.preprocessing import Preprocessing
from histoscan.rules.tissue import _HE_NORMAL, FEATURE_NAMES, PLAIN_FLAGS, flag, judge, tissue_features
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
from tests.conftest import shared

_EPS = 1e-3
_LOG_256 = float(np.log(256.0))
# float32 rounding of statistics of 9,216 pixels: the two implementations sum in different orders
TOLERANCE = {"rtol": 1e-5, "atol": 2e-5}


def _reference_features(x: torch.Tensor) -> np.ndarray:
    """The float implementation (histoscan 0.1, issue 34's first part), verbatim: the oracle."""
    x = x.float().clamp(0, 1).contiguous()
    od = _LOG_256 - torch.log1p(x * 255.0)
    od_sum = od.sum(dim=1)
    tissue = (od_sum > TISSUE_OD).float()
    grey = x.mean(dim=1)
    chroma = x.amax(dim=1) - x.amin(dim=1)
    dx = (grey[:, :, 1:] - grey[:, :, :-1]).abs().mean(dim=(1, 2))
    dy = (grey[:, 1:, :] - grey[:, :-1, :]).abs().mean(dim=(1, 2))
    contrast = grey.std(dim=(1, 2))
    od_mean = od.mean(dim=(2, 3))
    od_total = od_mean.sum(dim=1, keepdim=True) + _EPS
    hue = od_mean / od_total
    coarse = torch.nn.functional.avg_pool2d(grey[:, None], 4).flatten(1).std(dim=1)
    normal = [float(v) for v in _HE_NORMAL]
    length = (od[:, 0] ** 2 + od[:, 1] ** 2 + od[:, 2] ** 2).sqrt()
    off = (od[:, 0] * normal[0] + od[:, 1] * normal[1] + od[:, 2] * normal[2]) / (length + _EPS)
    off = torch.where(tissue > 0, off, torch.nan).flatten(1)
    off_plane = torch.nan_to_num(torch.nanquantile(off, 0.9, dim=1), nan=0.0)
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
            torch.log(coarse / (contrast + _EPS) + _EPS),
            off_plane,
            torch.logit(brown.clamp(0.005, 0.995)),
        ],
        dim=1,
    )
    return feats.double().numpy()


def _reference_flag(row: np.ndarray) -> str:
    """``flag`` as it was, one image at a time."""
    f = dict(zip(FEATURE_NAMES, row))
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    if f["brightness"] < logit(FLAG_DARK_GREY):
        return "dark"
    if f["tissue_fraction"] < logit(FLAG_BLANK_TISSUE):
        return "blank"
    if f["contrast"] < np.log(FLAG_UNIFORM_CONTRAST + _EPS):
        return "uniform"
    if f["chroma"] < np.log(FLAG_GRAYSCALE_CHROMA + _EPS):
        return "grayscale"
    if f["smoothness"] < np.log(FLAG_NOISE_SMOOTHNESS):
        return "noise"
    return "out of distribution"


def _reference_judge(check: TissueCheck, features: np.ndarray) -> list[str]:
    """The per-image loop ``judge`` ran before it was vectorised."""
    diff = features - np.asarray(check.mean)
    d = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", diff, np.linalg.inv(np.asarray(check.covariance)), diff), 0))
    out = []
    for i, row in enumerate(features):
        what = _reference_flag(row)
        out.append(what if d[i] > check.threshold or what in PLAIN_FLAGS else "ok")
    return out


def _as_float(u: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u).permute(0, 3, 1, 2).float().div_(255.0)


def _same(u: np.ndarray) -> None:
    """The fast features of uint8 ``u`` (and of its float form) equal the reference's up to float32 rounding."""
    ref = _reference_features(_as_float(u))
    fast = tissue_features(u)
    assert fast.shape == (len(u), len(FEATURE_NAMES)) and fast.dtype == np.float64
    for j, name in enumerate(FEATURE_NAMES):
        np.testing.assert_allclose(fast[:, j], ref[:, j], **TOLERANCE, err_msg=name)
    np.testing.assert_array_equal(tissue_features(_as_float(u)), fast)  # the float form reads the same 8-bit grid
    np.testing.assert_array_equal(tissue_features(torch.from_numpy(u)), fast)


def _generated() -> np.ndarray:
    """H&E-like patches, every kind of non-H&E patch, and the corner cases of the statistics."""
    he, _ = synth_batch(48, seed=3)
    bad = np.stack([not_he_patch(k, 96, s) for k in NOT_HE_KINDS for s in range(3)])
    rng = np.random.default_rng(0)
    corners = np.stack(
        [
            np.full((96, 96, 3), 255, np.uint8),  # no tissue pixel at all: the quantile over none is 0
            np.zeros((96, 96, 3), np.uint8),  # every pixel stained
            rng.integers(0, 256, (96, 96, 3), dtype=np.uint8),  # noise over the whole range
            np.where(rng.random((96, 96, 1)) < 0.001, 120, 250).astype(np.uint8).repeat(3, axis=2),  # a few tissue px
        ]
    )
    return np.concatenate([he, bad, corners])


def test_features_equal_the_float_implementation_on_generated_patches() -> None:
    _same(_generated())


@pytest.mark.parametrize("size", [(50, 70), (33, 96), (96, 96)])
def test_features_equal_the_float_implementation_at_sizes_the_pooling_does_not_divide(size: tuple[int, int]) -> None:
    h, w = size
    rng = np.random.default_rng(h * w)
    u = np.clip(rng.normal(170, 40, (6, h, w, 3)), 0, 255).astype(np.uint8)
    _same(u)


def test_an_empty_batch_has_no_rows() -> None:
    assert tissue_features(np.zeros((0, 96, 96, 3), np.uint8)).shape == (0, len(FEATURE_NAMES))


@pytest.mark.slow
def test_features_equal_the_float_implementation_on_real_patches() -> None:
    """hcd (the training lab), idc and lc25000 (other labs and sizes, fitted to 96 px as the model sees them)."""
    pre = Preprocessing(image_size=[96, 96])
    for name, n in (("hcd", 96), ("idc", 48), ("lc25000-lung", 24)):
        folder = shared(name)
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif"))
        random.Random(0).shuffle(files)
        _same(pre.fit_batch([read_image(f).pixels for f in files[:n]]))


def test_vectorised_judge_equals_the_per_image_loop() -> None:
    """Every flag, inside and outside the region, on features of generated patches and of random rows."""
    feats = tissue_features(_generated())
    rng = np.random.default_rng(1)
    rows = np.concatenate([feats, feats.mean(axis=0) + rng.normal(0, 3, (400, len(FEATURE_NAMES))) * feats.std(axis=0)])
    check = TissueCheck(
        features=FEATURE_NAMES,
        mean=feats.mean(axis=0).tolist(),
        covariance=np.cov(feats.T).tolist(),
        threshold=6.0,
        quantile=0.99,
        margin=1.0,
        count=len(feats),
    )
    verdict = judge(check, rows)
    assert verdict.quality == _reference_judge(check, rows)
    assert {*verdict.quality} >= {"ok", "dark", "blank", "uniform", "grayscale", "noise", "out of distribution"}
    assert [flag(r) for r in rows] == [_reference_flag(r) for r in rows]


def test_spreading_the_chunks_over_threads_changes_no_value_and_survives_a_fork() -> None:
    """The chunks run on a thread pool: the same rows as one thread; a forked child makes its own pool."""
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    from histoscan.rules import tissue

    u = _generated()
    u = np.concatenate([u] * (40 // len(u) + 1))[:40]  # 40 patches: several chunks
    threaded = tissue_features(u)
    serial = tissue._finish(np.concatenate([tissue._sums(u[i : i + 4]) for i in range(0, 40, 4)]), *u.shape[1:3])
    assert np.array_equal(threaded, tissue_features(u))
    assert np.array_equal(threaded, serial)  # each image's sums do not depend on the chunks
    assert np.array_equal(tissue_features(u, threads=1), threaded)
    assert isinstance(tissue._pool(2), ThreadPoolExecutor)
    ctx = multiprocessing.get_context("fork")  # the parent's pool exists; the child must not wait on it
    with ctx.Pool(1) as child:
        rows = child.apply_async(tissue_features, (u,)).get(timeout=60)
    assert np.array_equal(rows, threaded)
