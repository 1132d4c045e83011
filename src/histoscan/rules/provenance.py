"""What is fitted is what answers: each fitted quantity against the predictor that is about to use it.

A threshold, a temperature or a referral rule holds for the predictor it was fitted under (``model.json``'s
``fitted``: TTA views, members, precision) and the rows it was fitted on. ``fitted_notices`` names every
quantity that the predictor about to answer does not match, or whose provenance was never recorded (files
written before schema version 3), one line each, so a command can say so instead of applying it silently.
``check_fitted`` refuses records that cannot describe this bundle at all (a member gone).
"""

from __future__ import annotations

from histoscan.errors import ConfigError
from histoscan.runfolder import FitRecord, FittedRecords, FittedUnder

FITTED_NAMES = ("threshold", "temperature", "referral")


def describe_under(under: FittedUnder) -> str:
    """``8 TTA views, 1 member, bf16`` and the like."""
    views = "1 view (no TTA)" if under.tta == [0] else f"{len(under.tta)} TTA views {under.tta}"
    members = f"{under.members} member{'s' if under.members != 1 else ''}"
    return ", ".join([views, members] + ([under.precision] if under.precision else []))


def matches(fitted: FittedUnder, now: FittedUnder) -> bool:
    """Whether ``now`` is the predictor ``fitted`` describes (a precision not recorded on either side matches)."""
    same_precision = fitted.precision is None or now.precision is None or fitted.precision == now.precision
    return fitted.tta == now.tta and fitted.members == now.members and same_precision


def _is_fitted(name: str, threshold: float, temperature: float, has_referral: bool) -> bool:
    """Whether the bundle holds a fitted value of ``name`` at all (defaults are not fitted)."""
    if name == "threshold":
        return threshold != 0.5
    if name == "temperature":
        return temperature != 1.0
    return has_referral


def fitted_notices(
    fitted: FittedRecords,
    now: FittedUnder,
    *,
    threshold: float,
    temperature: float,
    has_referral: bool,
    source: str,
) -> list[str]:
    """One line per fitted quantity that ``now`` does not match, or whose provenance is unknown."""
    lines = []
    for name in FITTED_NAMES:
        record: FitRecord | None = getattr(fitted, name)
        if record is None:
            if _is_fitted(name, threshold, temperature, has_referral):
                lines.append(
                    f"{source}: the {name} was fitted before histoscan recorded how (unknown provenance: "
                    f"not known to hold for {describe_under(now)}); 'histoscan calibrate' refits it"
                )
            continue
        if not matches(record.under, now):
            lines.append(
                f"{source}: the {name} was fitted under {describe_under(record.under)} on {record.rows} "
                f"{record.split} rows; this prediction runs {describe_under(now)}, so it may not hold: predict "
                f"as it was fitted, or refit under these settings with 'histoscan calibrate'"
            )
    return lines


def check_fitted(fitted: FittedRecords, members: int, source: str) -> None:
    """ConfigError naming the file and field when a record names a predictor this bundle cannot run."""
    for name in FITTED_NAMES:
        record: FitRecord | None = getattr(fitted, name)
        # out-of-fold fits are single-member scores of a CV ensemble by design (an approximation, reported as such)
        single_oof = record is not None and record.split == "oof" and record.under.members == 1
        if record is not None and record.under.members != members and not single_oof:
            raise ConfigError(
                f"{source}: fitted.{name}.under.members is {record.under.members} but the bundle has {members} "
                f"member(s): a member is gone or was added since; refit with 'histoscan calibrate'"
            )
