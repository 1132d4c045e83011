"""Referral: which images are answered ``refer`` instead of a class, chosen on fitting predictions.

A *doubt* score orders images from the surest to the least sure. Two are candidates:

- ``probability``: for a binary model, how close P(positive) is to the decision threshold (in logit
  units), so the referred images form a band of probability around the threshold; for a multi-class
  model, 1 - the top probability;
- ``uncertainty``: the spread of the probability over TTA views (and ensemble members).

``fit_referral`` takes arrays (probabilities, labels, uncertainty) so that its caller decides where they
come from (the calibration rows scored by the deployed predictor, else out-of-fold or validation
predictions), refers by the calibrated margin unless told otherwise (``auto``: the candidate that finds the
model's errors best there), and sets its limit so that the answered images reach the coverage asked for,
or, for a target accuracy or sensitivity, with a finite-sample guarantee (``histoscan.trust.guarantee``). The
rule is stored in ``model.json`` (``trust.referral``) with the TTA policy it was fitted under.
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


def _limits(by: str, binary: bool) -> tuple[np.ndarray, list[int]]:
    """The grid of doubt limits a target is tested over, most conservative first, and its chains' starts."""
    from histoscan.trust import guarantee as g

    starts: tuple[float, ...]
    if by == "uncertainty":
        grid, starts = g.UNCERTAINTY_GRID, g.UNCERTAINTY_STARTS
    elif binary:
        grid, starts = -g.MARGIN_GRID, tuple(-m for m in g.MARGIN_STARTS)
    else:
        grid, starts = g.TOP_PROBABILITY_GRID, g.TOP_PROBABILITY_STARTS
    return grid, g.start_indices(grid, starts)


def _check_request(
    coverage: float | None, target_accuracy: float | None, target_sensitivity: float | None, delta: float
) -> tuple[str, float]:
    asked = {"coverage": coverage, "accuracy": target_accuracy, "sensitivity": target_sensitivity}
    given = {k: v for k, v in asked.items() if v is not None}
    if len(given) != 1:
        raise ConfigError("give exactly one of --refer-coverage, --target-accuracy and --refer-sensitivity")
    ((ask, target),) = given.items()
    if not 0 < target < 1:
        raise ConfigError(
            f"the coverage, accuracy or sensitivity asked for must be between 0 and 1 (exclusive), got {target}"
        )
    if not 0 < delta < 1:
        raise ConfigError(f"--delta must be between 0 and 1 (exclusive), got {delta}")
    return ask, float(target)


def fit_referral(
    probabilities: np.ndarray,
    labels: np.ndarray,
    uncertainty: np.ndarray | None,
    *,
    threshold: float,
    tta: Sequence[int],
    coverage: float | None = None,
    target_accuracy: float | None = None,
    target_sensitivity: float | None = None,
    delta: float = 0.05,
    by: str = "probability",
    fitted_on: str = "val",
) -> ReferralRule:
    """The referral rule reaching ``coverage``, ``target_accuracy`` or ``target_sensitivity``.

    ``coverage``: the fraction answered (the empirical quantile of the doubt; its lower bound at 1 - ``delta``
    by Dvoretzky-Kiefer-Wolfowitz). ``target_accuracy`` (of the answered images) or ``target_sensitivity``
    (among the answered tumour images, binary models): the most images answered whose limit Learn-then-Test
    certifies at confidence 1 - ``delta`` (``histoscan.trust.guarantee``); DataError when no limit is certified.
    ``by`` is ``probability`` (the calibrated margin: distance of P(positive) from the threshold in logits),
    ``uncertainty`` or ``auto`` (the one with the higher error-detection AUROC on these predictions: chosen on
    the same rows, so a target's guarantee then holds only approximately).
    """
    from histoscan.metrics import classify
    from histoscan.trust.guarantee import EMPIRICAL, LEARN_THEN_TEST, certify, coverage_margin

    ask, target = _check_request(coverage, target_accuracy, target_sensitivity, delta)
    if by not in REFER_BY:
        raise ConfigError(f"--refer-by {by!r} is not one of {list(REFER_BY)}")
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    binary = probabilities.shape[1] == 2
    if ask == "sensitivity" and not binary:
        raise ConfigError("--refer-sensitivity applies to binary models (the tumour class); use --target-accuracy")
    n = len(labels)
    if n < 10:
        raise DataError(f"a referral rule needs at least 10 labelled predictions to fit on, got {n}")
    scores = candidates(probabilities, threshold, uncertainty)
    if by == "uncertainty" and "uncertainty" not in scores:
        raise ConfigError("--refer-by uncertainty needs a TTA policy of at least 2 views (--tta)")
    wrong = classify(probabilities, threshold) != labels
    aurocs = {name: error_auroc(d, wrong) for name, d in scores.items()}
    if by == "auto":
        finite = {k: v for k, v in aurocs.items() if np.isfinite(v)}
        by = max(finite, key=lambda k: finite[k]) if finite else "probability"
    doubt = scores[by]
    p_value, method = None, EMPIRICAL
    if ask == "coverage":
        order = np.argsort(doubt, kind="stable")  # surest first
        keep = int(np.clip(round(target * n), 1, n))
        sorted_doubt = doubt[order]
        # between the last answered and the first referred
        limit = float(sorted_doubt[-1] if keep == n else (sorted_doubt[keep - 1] + sorted_doubt[keep]) / 2)
    else:
        counted = labels == 1 if ask == "sensitivity" else np.ones(n, bool)
        grid, starts = _limits(by, binary)
        found = certify(doubt[counted], wrong[counted], grid, 1.0 - target, delta, starts)
        if found.limit is None:
            raise DataError(
                f"no referral limit reaches {ask} {target:g} with confidence {1 - delta:.2f} on {n} predictions "
                f"({fitted_on}); lower the target, raise --delta or fit on more rows"
            )
        limit, p_value, method = found.limit, found.p_value, LEARN_THEN_TEST
    band, max_unc, margin = None, None, None
    if by == "uncertainty":
        max_unc = max(limit, 0.0)
    elif binary:
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
        asked=ask,  # type: ignore[arg-type]
        target=target,
        fitted_on=fitted_on,
        count=n,
        coverage=0.0,
        accuracy=0.0,
        error_auroc={k: float(v) for k, v in aurocs.items() if np.isfinite(v)},
        margin=margin,
        method=method,  # type: ignore[arg-type]
        delta=float(delta),
        p_value=p_value,
    )
    answered = ~refer_mask(rule, probabilities, uncertainty)
    rule.coverage = float(answered.mean())
    rule.accuracy = float((~wrong)[answered].mean()) if answered.any() else 0.0
    if binary:
        tumour = answered & (labels == 1)
        rule.sensitivity = float((~wrong)[tumour].mean()) if tumour.any() else None
    rule.bound = target if ask != "coverage" else max(0.0, rule.coverage - coverage_margin(n, delta))
    return rule
