"""Referral: which images are answered ``refer`` instead of a class, chosen on fitting predictions.

A *doubt* score orders images from the surest to the least sure. Two are candidates:

- ``probability``: for a binary model, how close P(positive) is to the decision threshold (in logit
  units), so the referred images form a band of probability around the threshold; for a multi-class
  model, 1 - the top probability;
- ``uncertainty``: the spread of the probability over TTA views (and ensemble members).

``fit_referral`` takes arrays (probabilities, labels, uncertainty) so that its caller decides where they
come from (validation or out-of-fold predictions), picks the candidate that finds the model's errors
best on them (error-detection AUROC) unless told which, and sets its limit so that the answered
images reach the coverage or the accuracy asked for. The rule is stored in ``model.json``
(``trust.referral``) with the TTA policy it was fitted under.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from histoscan.enums import REFER_BY
from histoscan.errors import ConfigError, DataError
from histoscan.rules.referral import refer_mask
from histoscan.runfolder import ReferralRule

_CLIP = 1e-6


def _logit(p: np.ndarray | float) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), _CLIP, 1 - _CLIP)
    return np.log(q / (1 - q))


def probability_doubt(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Binary: minus the distance of P(positive) from the threshold in logits; multi-class: 1 - top probability."""
    if probabilities.shape[1] == 2:
        return -np.abs(_logit(probabilities[:, 1]) - _logit(threshold))
    return 1.0 - probabilities.max(axis=1)


def baseline_doubt(probabilities: np.ndarray) -> np.ndarray:
    """The plain baseline: 1 - the top probability."""
    return 1.0 - probabilities.max(axis=1)


def error_auroc(doubt: np.ndarray, wrong: np.ndarray) -> float:
    """How well ``doubt`` ranks the model's errors above its correct answers (NaN without both)."""
    from sklearn.metrics import roc_auc_score  # scikit-learn only where rules are fitted or scored

    if wrong.all() or not wrong.any():
        return float("nan")
    return float(roc_auc_score(wrong.astype(int), doubt))


def candidates(probabilities: np.ndarray, threshold: float, uncertainty: np.ndarray | None) -> dict[str, np.ndarray]:
    """The doubt scores a rule can refer by (``uncertainty`` only when there are several views)."""
    out = {"probability": probability_doubt(probabilities, threshold)}
    if uncertainty is not None:
        out["uncertainty"] = np.asarray(uncertainty, dtype=np.float64)
    return out


def fit_referral(
    probabilities: np.ndarray,
    labels: np.ndarray,
    uncertainty: np.ndarray | None,
    *,
    threshold: float,
    tta: Sequence[int],
    coverage: float | None = None,
    target_accuracy: float | None = None,
    by: str = "auto",
    fitted_on: str = "val",
) -> ReferralRule:
    """The referral rule reaching ``coverage`` (fraction answered) or ``target_accuracy`` (of the answered).

    ``by`` is ``probability``, ``uncertainty`` or ``auto`` (the one with the higher error-detection AUROC
    on these predictions). With a target accuracy the rule answers as many images as it can while the
    answered ones reach it; DataError when no non-empty answered set does.
    """
    if (coverage is None) == (target_accuracy is None):
        raise ConfigError("give exactly one of --refer-coverage and --target-accuracy")
    target = float(coverage if coverage is not None else target_accuracy)  # type: ignore[arg-type]
    if not 0 < target < 1:
        raise ConfigError(f"the coverage or accuracy asked for must be between 0 and 1 (exclusive), got {target}")
    if by not in REFER_BY:
        raise ConfigError(f"--refer-by {by!r} is not one of {list(REFER_BY)}")
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    n = len(labels)
    if n < 10:
        raise DataError(f"a referral rule needs at least 10 labelled predictions to fit on, got {n}")
    scores = candidates(probabilities, threshold, uncertainty)
    if by == "uncertainty" and "uncertainty" not in scores:
        raise ConfigError("--refer-by uncertainty needs a TTA policy of at least 2 views (--tta)")
    from histoscan.metrics import classify

    wrong = classify(probabilities, threshold) != labels
    aurocs = {name: error_auroc(d, wrong) for name, d in scores.items()}
    if by == "auto":
        finite = {k: v for k, v in aurocs.items() if np.isfinite(v)}
        by = max(finite, key=lambda k: finite[k]) if finite else "probability"
    doubt = scores[by]
    order = np.argsort(doubt, kind="stable")  # surest first
    correct_sorted = (~wrong)[order]
    if coverage is not None:
        keep = int(np.clip(round(coverage * n), 1, n))
    else:
        cum_acc = np.cumsum(correct_sorted) / np.arange(1, n + 1)
        reach = np.flatnonzero(cum_acc >= target)
        if len(reach) == 0:
            raise DataError(f"no set of answered images reaches accuracy {target:.3f} on {n} predictions ({fitted_on})")
        keep = int(reach[-1]) + 1
    sorted_doubt = doubt[order]
    limit = (
        float(sorted_doubt[keep - 1])
        if keep == n
        else float(
            (sorted_doubt[keep - 1] + sorted_doubt[keep]) / 2
        )  # between the last answered and the first referred
    )
    band, max_unc = None, None
    if by == "uncertainty":
        max_unc = max(limit, 0.0)
    elif probabilities.shape[1] == 2:
        margin = max(-limit, 0.0)
        lo, hi = _logit(threshold) - margin, _logit(threshold) + margin
        band = [float(1 / (1 + np.exp(-lo))), float(1 / (1 + np.exp(-hi)))]
    else:
        band = [0.0, float(np.clip(1.0 - limit, 0.0, 1.0))]
    rule = ReferralRule(
        by=by,  # type: ignore[arg-type]
        band=band,
        max_uncertainty=max_unc,
        tta=sorted({int(k) for k in tta}),
        asked="coverage" if coverage is not None else "accuracy",
        target=target,
        fitted_on=fitted_on,
        count=n,
        coverage=0.0,
        accuracy=0.0,
        error_auroc={k: float(v) for k, v in aurocs.items() if np.isfinite(v)},
    )
    refer = refer_mask(rule, probabilities, uncertainty)
    rule.coverage = float(1 - refer.mean())
    rule.accuracy = float((~wrong)[~refer].mean()) if (~refer).any() else 0.0
    return rule
