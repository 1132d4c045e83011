"""Is the image unlike what the model learned? Applying the stored out-of-distribution detector (``trust.ood``).

Every score is computed from the pass that predicts (higher: further from the training data):

- ``msp``: 1 - the largest class probability of the first view;
- ``energy``: minus the log-sum-exp of the first view's logits (Liu et al., 2020); a binary model's single
  logit z is read as the symmetric pair (-z/2, z/2), so the score depends on |z| alone and ranks images as
  ``msp`` does;
- ``spread``: the spread of P(positive) over the TTA views (the Predictor's ``uncertainty``);
- ``mahalanobis``: the smallest Mahalanobis distance of the first view's pooled features to a class mean of the
  training split under one shared covariance (Lee et al., 2018);
- ``knn``: the distance of the L2-normalised pooled features to their k-th nearest normalised training feature
  (Sun et al., 2022).

Written by hand rather than taken from pytorch-ood: its detectors keep their fitted state as torch modules that
call the model themselves, whereas here the scores must read features the Predictor already computed and the
fitted arrays must live in a checksummed side file of the run folder; each score is a few lines of numpy.
Fitting (the arrays, the threshold on validation rows) is ``histoscan.trust.ood``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoscan.errors import ConfigError
from histoscan.runfolder import MODEL_FILE, OodDetector

SCORES = ("msp", "energy", "spread", "mahalanobis", "knn")
FEATURE_SCORES = ("mahalanobis", "knn")  # the scores that read the network's pooled features
OOD = "out of distribution"
_OK = ("ok", "unchecked")  # quality flags the detector may overrule (a tissue-check flag stays as it is)


@dataclass
class OodArrays:
    """The detector's fitted arrays: class means (C x D), shared precision (D x D), normalised feature bank (N x D)."""

    means: np.ndarray
    precision: np.ndarray
    bank: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays by name, as the side file holds them."""
        return {"means": self.means, "precision": self.precision, "bank": self.bank}


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_arrays(run_dir: str | Path, spec: OodDetector) -> OodArrays:
    """The detector's side file, checked against model.json: one ConfigError line naming the file when it lies."""
    path = Path(run_dir) / spec.file
    if not path.is_file():
        raise ConfigError(
            f"{path}: missing; {MODEL_FILE} trust.ood needs it (refit with 'histoscan calibrate RUN --ood')"
        )
    if sha256_of(path) != spec.sha256:
        raise ConfigError(
            f"{path}: its sha256 does not match {MODEL_FILE} trust.ood.sha256 (changed after fitting); "
            "refit with 'histoscan calibrate RUN --ood'"
        )
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path}: not a readable safetensors file ({exc})") from None
    missing = [k for k in ("means", "precision", "bank") if k not in arrays]
    if missing:
        raise ConfigError(f"{path}: no {', '.join(missing)} array")
    d = spec.features
    means, precision, bank = arrays["means"], arrays["precision"], arrays["bank"]
    if means.ndim != 2 or means.shape[1] != d or precision.shape != (d, d) or bank.ndim != 2 or bank.shape[1] != d:
        raise ConfigError(
            f"{path}: arrays of shapes {means.shape}, {precision.shape}, {bank.shape} do not fit "
            f"{d} features ({MODEL_FILE} trust.ood.features)"
        )
    return OodArrays(means.astype(np.float64), precision.astype(np.float64), bank.astype(np.float32))


def msp_score(probabilities: np.ndarray) -> np.ndarray:
    """1 - max class probability."""
    return 1.0 - np.asarray(probabilities, np.float64).max(axis=1)


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """-logsumexp(logits / T); a single binary logit z counts as the pair (-z/2, z/2)."""
    z = np.asarray(logits, np.float64) / temperature
    if z.shape[1] == 1:
        z = np.concatenate([-z / 2, z / 2], axis=1)
    top = z.max(axis=1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(z - top).sum(axis=1)))


def mahalanobis_score(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """The smallest Mahalanobis distance of each row to a class mean, under one shared precision matrix."""
    f = np.asarray(features, np.float64)
    d = np.stack([np.einsum("ij,jk,ik->i", f - mu, precision, f - mu) for mu in means], axis=1)
    return np.sqrt(np.maximum(d.min(axis=1), 0.0))


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (the kNN score's space)."""
    f = np.asarray(features, np.float32)
    return f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-8)


def knn_score(features: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Distance of each normalised row to its k-th nearest row of ``bank`` (normalised training features)."""
    q = normalise(features)
    k = min(k, len(bank))
    out = np.empty(len(q))
    for s in range(0, len(q), 512):  # 512 x N cosine similarities at a time
        sim = q[s : s + 512] @ bank.T
        kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1]
        out[s : s + 512] = np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
    return out


def all_scores(
    arrays: OodArrays | None,
    k: int,
    probabilities: np.ndarray,
    logits: np.ndarray,
    spread: np.ndarray | None,
    features: np.ndarray | None,
    temperature: float = 1.0,
) -> dict[str, np.ndarray]:
    """Every candidate score that the inputs allow (``spread`` needs several views, the feature scores ``arrays``)."""
    names = ["msp", "energy"] + (["spread"] if spread is not None else [])
    names += list(FEATURE_SCORES) if arrays is not None and features is not None else []
    return {n: score_of(n, arrays, k, probabilities, logits, spread, features, temperature) for n in names}


def score_of(
    name: str,
    arrays: OodArrays | None,
    k: int,
    probabilities: np.ndarray,
    logits: np.ndarray,
    spread: np.ndarray | None,
    features: np.ndarray | None,
    temperature: float = 1.0,
) -> np.ndarray:
    """One score (see the module docstring); ConfigError when this prediction lacks what it reads."""
    if name == "msp":
        return msp_score(probabilities)
    if name == "energy":
        return energy_score(logits, temperature)
    if name == "spread" and spread is not None:
        return np.asarray(spread, np.float64)
    if name in FEATURE_SCORES and arrays is not None and features is not None:
        if name == "mahalanobis":
            return mahalanobis_score(features, arrays.means, arrays.precision)
        return knn_score(features, arrays.bank, k)
    raise ConfigError(f"{MODEL_FILE}: trust.ood.score {name!r} cannot be computed for this prediction")


def needs_features(spec: OodDetector | None) -> bool:
    """Whether a stored detector reads the network's pooled features (which only the torch backend gives)."""
    return spec is not None and spec.score in FEATURE_SCORES


def check_views(spec: OodDetector, tta: Sequence[int], source: str = MODEL_FILE) -> None:
    """ConfigError when the stored score is the TTA spread and the prediction runs other views than it was fitted under."""
    if spec.score == "spread" and sorted(spec.tta) != sorted(int(k) for k in tta):
        raise ConfigError(
            f"{source}: trust.ood scores the spread over TTA views {spec.tta}, but {list(tta)} were asked; "
            "leave the TTA option out to predict under its views"
        )


def with_ood(quality: Sequence[str], flags: np.ndarray) -> list[str]:
    """The quality flags with ``out of distribution`` where the detector fired and the tissue check had not."""
    return [OOD if f and q in _OK else q for q, f in zip(quality, flags)]
