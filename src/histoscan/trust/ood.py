"""Fitting the out-of-distribution detector: pooled-feature statistics of the training split, a threshold on validation.

The arrays (class means and shared precision of the training split's pooled features for the Mahalanobis
score, the normalised features themselves for the kNN score) go into the run's side file ``ood.safetensors``;
``model.json`` (``trust.ood``) names the chosen score, its threshold and the file's sha256. The threshold is
the ``quantile`` (0.99: at most 1% flagged) of the score on the run's validation rows, under the deployed
views. Applying it is ``histoscan.rules.ood``; the Predictor does so in the pass that predicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from histoscan.bundle import EnsembleBundle, read_bundle
from histoscan.data.store import PatchStore
from histoscan.errors import ConfigError, DataError
from histoscan.inference.predictor import Predictor
from histoscan.inference.settings import PredictorSettings
from histoscan.inference.tta import tta_views
from histoscan.rules.ood import SCORES, OodArrays, all_scores, normalise, sha256_of
from histoscan.runfolder import MODEL_FILE, OOD_FILE, OodDetector, RunFolder

# chosen on the pre-registered suite (benchmarks/trust_ood.py on the default run and seeds 1, 2: the highest
# mean detection AUROC over the not-tissue and damaged shifts; docs/guide/trust.md, "Out of distribution")
DEFAULT_SCORE = "mahalanobis"
QUANTILE = 0.99  # at most 1% of in-distribution validation rows flagged
K = 10  # the kNN score's neighbour (Sun et al. use k = 50 for 50,000 training images; a few thousand here)
MAX_BANK = 5000  # training features kept for kNN
MIN_ROWS = 20


class ScoredRows(NamedTuple):
    """Every candidate score of a set of images, with the model's probabilities and pooled features."""

    scores: dict[str, np.ndarray]
    probabilities: np.ndarray
    features: np.ndarray


def fit_arrays(features: np.ndarray, labels: np.ndarray, ridge: float = 1e-6) -> OodArrays:
    """Class means and the shared precision of ``features`` (Lee et al., 2018), and the normalised bank for kNN.

    The shared covariance is the pooled within-class covariance, with a small ridge (relative to its mean
    variance) so a feature that never varies does not make it singular.
    """
    f = np.asarray(features, np.float64)
    classes = np.unique(labels)
    if len(f) < MIN_ROWS:
        raise DataError(f"an out-of-distribution detector needs at least {MIN_ROWS} training patches, got {len(f)}")
    means = np.stack([f[labels == c].mean(axis=0) for c in classes])
    centred = f - means[np.searchsorted(classes, labels)]
    cov = centred.T @ centred / len(f)
    cov += ridge * max(float(np.trace(cov)) / len(cov), 1e-12) * np.eye(len(cov))
    precision = np.linalg.inv(cov)
    return OodArrays(means, (precision + precision.T) / 2, normalise(f))


def score_images(
    predictor: Predictor, images: np.ndarray | Sequence[np.ndarray], ks: Sequence[int], k: int = K
) -> ScoredRows:
    """Every candidate score of ``images``, from the pass that predicts them under views ``ks`` (``k``: kNN's neighbour)."""
    keep = predictor.keep_features
    predictor.keep_features = True  # the feature scores are candidates even when the stored one needs none
    scores: list[dict[str, np.ndarray]] = []
    probs_out, feats_out = [], []
    try:
        for s in range(0, len(images), predictor.batch_size):
            prepared = predictor.prepare(images[s : s + predictor.batch_size])
            probs = predictor.views(prepared, ks)
            spread = probs[:, :, 1].std(axis=0) if len(ks) > 1 and probs.shape[2] == 2 else None
            if len(ks) > 1 and probs.shape[2] != 2:
                picked = probs.mean(axis=0).argmax(axis=1)
                spread = probs[:, np.arange(len(picked)), picked].std(axis=0)
            logits = prepared.first_logits if prepared.first_logits is not None else np.log(probs[0] + 1e-12)
            temperature = predictor.bundle.temperature
            scores.append(all_scores(predictor.ood_arrays, k, probs[0], logits, spread, prepared.features, temperature))
            probs_out.append(probs.mean(axis=0))
            assert prepared.features is not None
            feats_out.append(prepared.features)
    finally:
        predictor.keep_features = keep
    names = scores[0].keys() if scores else ()
    return ScoredRows(
        {n: np.concatenate([s[n] for s in scores]) for n in names},
        np.concatenate(probs_out) if probs_out else np.zeros((0, len(predictor.classes))),
        np.concatenate(feats_out) if feats_out else np.zeros((0, 0)),
    )


def _store_images(part: PatchStore, max_rows: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    n = len(part)
    pick = np.arange(n)
    if max_rows is not None and n > max_rows:
        pick = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
    return part.batch(pick), np.asarray(part.labels)[pick]


def fit_run_ood(
    run_dir: str | Path,
    data: str | Path | None = None,
    *,
    score: str = DEFAULT_SCORE,
    quantile: float = QUANTILE,
    k: int = K,
    settings: PredictorSettings | None = None,
    max_train: int | None = None,
) -> OodDetector:
    """Fit the detector of ``run_dir`` (its training split's features; the threshold on its validation split) and save it.

    Writes ``ood.safetensors`` into the run folder and ``trust.ood`` into its model.json. The views are the
    deployed ones (the model's TTA policy for predict, or ``settings.tta``).
    """
    from safetensors.numpy import save_file

    if score not in SCORES:
        raise ConfigError(f"out-of-distribution score {score!r} is not one of {', '.join(SCORES)}")
    if not 0.5 <= quantile < 1:
        raise ConfigError(f"quantile must be in [0.5, 1), got {quantile}")
    bundle = read_bundle(run_dir)
    if isinstance(bundle, EnsembleBundle):
        raise ConfigError(f"{Path(run_dir) / MODEL_FILE}: an out-of-distribution detector is fitted on a single run")
    settings = settings or PredictorSettings()
    run = RunFolder(run_dir)
    bundle.trust.ood = None  # refitting: the Predictor must not load the detector being replaced
    bundle.save(run_dir)
    predictor = settings.predictor(run_dir, backend="torch")
    ks = tta_views(bundle, settings.tta, "predict")
    if score == "spread" and len(ks) < 2:
        raise ConfigError("the spread score needs at least 2 TTA views; fit it with --tta")
    store = run.data_store(data)
    train, _ = run.select_patches(store, "train")
    images, labels = _store_images(train, max_train)
    fitted = score_images(predictor, images, [ks[0]])
    arrays = fit_arrays(fitted.features, labels)
    if len(arrays.bank) > MAX_BANK:
        arrays.bank = arrays.bank[np.sort(np.random.default_rng(0).choice(len(arrays.bank), MAX_BANK, replace=False))]
    path = run.path / OOD_FILE
    save_file(arrays.as_dict(), str(path))
    predictor.ood_arrays = arrays
    val, _ = run.select_patches(store, "val")
    val_images, _ = _store_images(val, None)
    if len(val_images) < MIN_ROWS:
        raise DataError(f"{store}: the validation split has {len(val_images)} patches; the threshold needs {MIN_ROWS}")
    on_val = score_images(predictor, val_images, ks, k).scores[score]
    spec = OodDetector(
        score=score,  # type: ignore[arg-type]
        threshold=float(np.quantile(on_val, quantile)),
        quantile=quantile,
        sha256=sha256_of(path),
        features=int(arrays.means.shape[1]),
        k=k,
        train_rows=len(images),
        fitted_on="val",
        rows=len(val_images),
        tta=sorted(int(v) for v in ks),
    )
    bundle = read_bundle(run_dir)
    bundle.trust.ood = spec
    bundle.save(run_dir)
    return spec


def describe(spec: OodDetector) -> str:
    """One line saying what the stored detector is."""
    return (
        f"out-of-distribution detector: {spec.score} above {spec.threshold:.4g} "
        f"(the {spec.quantile:.0%} quantile of {spec.rows} {spec.fitted_on} rows; arrays from {spec.train_rows} "
        f"training patches in {spec.file})"
    )
