"""Which test-time augmentation views a prediction runs: decided here, once, for every use.

A view is an element of the dihedral group (0..7, ``data.transforms.dihedral``); several views are averaged
and their spread is the prediction's uncertainty. Callers say what they asked (``tta``: None for "not
said", a bool, or the elements) and what the prediction is for (``use``, a ``histoscan.enums.TtaUse``);
``tta_views`` answers. Only ``default_views`` decides what "not said" means, so changing a default is
a change to that one function.

The deployed predictor comes first: when ``model.json``'s ``inference.tta`` is set (every fitting command
sets it to the views it fitted the threshold, temperature or referral rule under), every use but ``explain``
runs those views, so what was fitted is what answers. Without it (a run nothing was fitted on yet):

- ``evaluate``, ``fit`` (calibration, referral rules, thresholds and out-of-fold predictions) and
  ``submission`` (a Kaggle submission): the model's own policy: its referral rule's views when it has one,
  else model.json's ``inference.tta``, else all 8 views for a binary model and none for a multi-class one;
- ``predict`` (batch prediction and the HTTP service): the referral rule's views when the model has one
  (a rule is only applied under the policy it was fitted under), else none;
- ``slide`` and ``explain``: none (a slide scans thousands of tiles; a map is drawn from the plain view).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from histoscan.enums import TTA_USES, TtaUse
from histoscan.errors import ConfigError

if TYPE_CHECKING:
    from histoscan.bundle import ModelBundle

ALL_VIEWS = tuple(range(8))


def parse_tta(tta: bool | Sequence[int] | None) -> list[int]:
    """The dihedral elements to average: [0] without TTA, all 8 with ``True``, or a chosen subset."""
    if not tta:
        return [0]
    if tta is True:
        return list(ALL_VIEWS)
    ks = sorted({int(k) for k in tta})
    if not ks or any(k < 0 or k > 7 for k in ks):
        raise ConfigError(f"TTA elements must be in 0..7, got {list(tta)}")
    return ks


def default_views(bundle: ModelBundle, use: TtaUse) -> list[int]:
    """The views a prediction for ``use`` runs when its caller does not say (see the module docstring)."""
    if use not in TTA_USES:
        raise ConfigError(f"TTA use {use!r} is not one of {', '.join(TTA_USES)}")
    if use == "explain":
        return [0]  # a map is drawn from the plain view
    if bundle.inference.tta is not None:
        return parse_tta(bundle.inference.tta)  # the deployed predictor's views
    rule = bundle.trust.referral
    if use in ("evaluate", "fit", "submission"):
        if rule is not None:
            return list(rule.tta)
        return parse_tta(bundle.task == "binary")
    if use == "predict":
        return list(rule.tta) if rule is not None else [0]
    return [0]  # slide, explain


def tta_views(bundle: ModelBundle, tta: bool | Sequence[int] | None, use: TtaUse) -> list[int]:
    """The views to run: ``tta`` as asked, or with None the default for ``use`` (``default_views``)."""
    return default_views(bundle, use) if tta is None else parse_tta(tta)
