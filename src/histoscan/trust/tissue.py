"""Fitting the tissue check: the acceptance region of the training patches' statistics, saved in ``model.json``.

Applying it (the statistics, the distance, the flags) is ``histoscan.rules.tissue``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histoscan.data.store import PatchStore
from histoscan.errors import DataError
from histoscan.preprocessing import Preprocessing
from histoscan.rules.tissue import FEATURE_NAMES, mahalanobis, tissue_features
from histoscan.runfolder import TissueCheck

MAX_PATCHES = 2000  # training patches sampled to fit the region
MIN_PATCHES = 20  # fewer cannot estimate a 13-dimensional covariance
QUANTILE, MARGIN, TRIM = 0.995, 1.6, 0.02  # chosen on hcd (own lab) against idc and LC25000 (other labs)


def fit_tissue_check(
    features: np.ndarray,
    quantile: float = QUANTILE,
    margin: float = MARGIN,
    trim: float = TRIM,
    ridge: float = 1e-3,
) -> TissueCheck:
    """The acceptance region of training features: mean, covariance and a threshold on the distance.

    The Gaussian is fitted robustly (twice refitted without the ``trim`` fraction of farthest patches, so
    the few blank or out-of-focus training patches do not stretch it); the threshold is ``margin`` times
    the ``quantile`` of all training patches' distances. The margin leaves room for other labs' H&E
    (another scanner and stain), which is not out of distribution.
    """
    if len(features) < MIN_PATCHES:
        raise DataError(f"a tissue check needs at least {MIN_PATCHES} training patches, got {len(features)}")
    core = features
    for _ in range(3):
        mean = core.mean(axis=0)
        cov = np.cov(core, rowvar=False) + ridge * np.eye(features.shape[1])
        diff = features - mean
        d = np.einsum("ij,jk,ik->i", diff, np.linalg.inv(cov), diff)
        core = features[d <= np.quantile(d, 1 - trim)]
    check = TissueCheck(
        features=list(FEATURE_NAMES),
        mean=[float(v) for v in mean],
        covariance=[[float(v) for v in row] for row in cov],
        threshold=1.0,
        quantile=quantile,
        margin=margin,
        count=len(features),
    )
    d = mahalanobis(check, features)
    check.threshold = float(np.quantile(d, quantile) * margin)
    return check


def store_features(
    store: PatchStore, preprocessing: Preprocessing, max_patches: int = 5000, seed: int = 0, batch: int = 256
) -> np.ndarray:
    """Features of up to ``max_patches`` random patches of a store (or view)."""
    rng = np.random.default_rng(seed)
    n = len(store)
    pick = np.sort(rng.choice(n, size=min(n, max_patches), replace=False))
    parts = [
        tissue_features(preprocessing.prepare(store.batch(pick[s : s + batch]))) for s in range(0, len(pick), batch)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, len(FEATURE_NAMES)))


def save_tissue_check(run_dir: str | Path, part: PatchStore, max_patches: int = MAX_PATCHES) -> TissueCheck:
    """Fit the tissue check on ``part`` (the run's training patches) and save it in the run's ``model.json``."""
    from histoscan.bundle import read_bundle

    bundle = read_bundle(run_dir)
    check = fit_tissue_check(store_features(part, bundle.preprocessing, max_patches))
    bundle.trust.tissue_check = check
    bundle.save(run_dir)
    return check


def fit_run_tissue_check(
    run_dir: str | Path, data: str | Path | None = None, max_patches: int = MAX_PATCHES
) -> TissueCheck:
    """Fit the tissue check of an existing run on the training split of its store (or ``data``) and save it."""
    from histoscan.runfolder import RunFolder

    run = RunFolder(run_dir)
    part, _ = run.select_patches(run.data_store(data), "train")
    return save_tissue_check(run_dir, part, max_patches)
