"""The answer each image gets: a class name, ``refer``, ``not tissue`` or ``out of distribution``.

The tissue check comes first (a flagged image never gets a class, let alone a tumour call); then the
referral rule, applied only when the prediction ran under the TTA policy the rule was fitted under;
then the class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from histoscan.errors import ConfigError
from histoscan.rules.referral import REFER, refer_mask
from histoscan.rules.tissue import answers_for
from histoscan.runfolder import TrustPolicy

UNCHECKED = "unchecked"  # the quality flag of a run without a tissue check (model.json predates it)
ANSWER_KINDS = ("refer", "not tissue", "out of distribution")


def policy_views(trust: TrustPolicy, tta: Sequence[int]) -> bool:
    """Whether a prediction under dihedral elements ``tta`` is one the referral rule applies to."""
    return trust.referral is not None and sorted(trust.referral.tta) == sorted(tta)


def check_policy(trust: TrustPolicy, tta: Sequence[int], source: str = "model.json") -> None:
    """ConfigError when a referral rule exists and the prediction asks for other TTA views than it was fitted under."""
    rule = trust.referral
    if rule is not None and sorted(rule.tta) != sorted(tta):
        raise ConfigError(
            f"{source}: trust.referral was fitted under TTA views {rule.tta}, but {list(tta)} were asked; "
            "leave the TTA option out to predict under the referral's policy"
        )


def answer_images(
    trust: TrustPolicy,
    classes: Sequence[str],
    probabilities: np.ndarray,
    predicted: np.ndarray,
    uncertainty: np.ndarray | None,
    quality: Sequence[str],
    tta: Sequence[int],
) -> list[str]:
    """One answer per image (see the module docstring)."""
    answers: list[str] = [classes[int(k)] for k in predicted]
    if policy_views(trust, tta) and trust.referral is not None:
        for j in np.flatnonzero(refer_mask(trust.referral, probabilities, uncertainty)):
            answers[int(j)] = REFER
    for i, flagged in enumerate(answers_for([q if q != UNCHECKED else "ok" for q in quality])):
        if flagged is not None:
            answers[i] = flagged
    return answers
