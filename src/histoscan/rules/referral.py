"""Applying a stored referral rule: which images it answers ``refer``, and a line saying what it refers.

Fitting the rule (choosing its doubt score and limit on fitting predictions) is ``histoscan.trust.referral``.
"""

from __future__ import annotations

import numpy as np

from histoscan.errors import ConfigError
from histoscan.runfolder import ReferralRule

REFER = "refer"


def refer_mask(rule: ReferralRule, probabilities: np.ndarray, uncertainty: np.ndarray | None) -> np.ndarray:
    """True where the rule refers the image."""
    if rule.by == "uncertainty":
        if uncertainty is None:
            raise ConfigError("the referral rule is by uncertainty, but the prediction has none (a single view)")
        return np.asarray(uncertainty) > float(rule.max_uncertainty or 0.0)
    lo, hi = rule.band or (0.0, 0.0)
    if probabilities.shape[1] == 2:
        p = probabilities[:, 1]
        return (p > lo) & (p < hi)
    return probabilities.max(axis=1) < hi


def describe(rule: ReferralRule) -> str:
    """One line saying what the rule refers."""
    if rule.by == "uncertainty":
        what = f"uncertainty above {rule.max_uncertainty:.4f}"
    elif rule.band is not None and rule.band[0] > 0:
        what = f"P(positive) between {rule.band[0]:.4f} and {rule.band[1]:.4f}"
    else:
        what = f"top probability below {(rule.band or [0, 0])[1]:.4f}"
    if rule.margin is not None:
        what += f" (a calibrated margin under {rule.margin:.2f} logits)"
    asked = f"coverage {rule.target:.2f}" if rule.asked == "coverage" else f"{rule.asked} {rule.target:.3f}"
    sens = f", sensitivity among the answered tumours {rule.sensitivity:.4f}" if rule.sensitivity is not None else ""
    line = (
        f"refer images with {what} (asked: {asked}; on {rule.count} predictions, {rule.fitted_on}: "
        f"coverage {rule.coverage:.3f}, accuracy of the answered {rule.accuracy:.4f}{sens}; TTA views {rule.tta})"
    )
    if rule.method == "learn-then-test" and rule.delta is not None:
        line += (
            f"; guaranteed: {rule.asked} at least {rule.target:.3f} with confidence {1 - rule.delta:.2f} "
            f"(Learn-then-Test, fixed sequence, binomial p-value {rule.p_value:.3g})"
        )
    elif rule.bound is not None and rule.delta is not None:
        line += f"; coverage at least {rule.bound:.3f} with confidence {1 - rule.delta:.2f} (DKW)"
    return line
