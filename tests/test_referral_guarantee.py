"""Referral with a guarantee (issue 38): Learn-then-Test on scores of known risk, the stored rule, AURC on crafted scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histoscan.errors import ConfigError, DataError
from histoscan.metrics import aurc, excess_aurc, optimal_aurc, selective_risks
from histoscan.rules.provenance import fitted_notices
from histoscan.rules.referral import describe, refer_mask
from histoscan.runfolder import FitRecord, FittedRecords, FittedUnder, ReferralRule, TrustPolicy
from histoscan.trust.guarantee import binomial_p_value, certify, coverage_margin
from histoscan.trust.referral import fit_referral
from histoscan.trust.scoring import trust_metrics

TOP = 6.0  # margins are uniform on [0, TOP] logits


def _risk(t: np.ndarray | float) -> np.ndarray:
    """The true selective risk at margin >= t when P(wrong | margin m) = 0.5 exp(-m), m ~ U(0, TOP)."""
    t = np.asarray(t, dtype=np.float64)
    return 0.5 * (np.exp(-t) - np.exp(-TOP)) / np.maximum(TOP - t, 1e-12)


def _known_risk(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Binary probabilities and labels whose error rate at each calibrated margin is known (``_risk``).

    The predicted class is a fair coin, so among tumour images the miss rate at a margin is the error rate too.
    """
    m = rng.uniform(0, TOP, n)
    called = rng.integers(0, 2, n)
    wrong = rng.random(n) < 0.5 * np.exp(-m)
    p1 = 1 / (1 + np.exp(-np.where(called == 1, m, -m)))
    labels = np.where(wrong, 1 - called, called)
    return np.stack([1 - p1, p1], axis=1), labels


@pytest.mark.parametrize("ask", ["target_accuracy", "target_sensitivity"])
def test_the_guarantee_holds_in_at_least_95_percent_of_simulated_calibration_sets(ask: str) -> None:
    rng = np.random.default_rng(38)
    target, delta, sets = 0.95, 0.05, 200
    held, chosen, refused = [], [], 0
    for _ in range(sets):
        probs, labels = _known_risk(1000, rng)
        try:
            rule = fit_referral(probs, labels, None, threshold=0.5, tta=[0], delta=delta, **{ask: target})
        except DataError:  # nothing certified: the tool refuses to store a rule, so no wrong promise is made
            refused += 1
            continue
        assert rule.method == "learn-then-test" and rule.margin is not None
        held.append(_risk(rule.margin) <= 1 - target)
        chosen.append(rule.margin)
    assert (sum(held) + refused) / sets >= 1 - delta
    assert refused <= 0.05 * sets
    # not vacuous: the certified margins sit near the smallest margin that truly reaches the target
    grid = np.linspace(0, TOP - 0.01, 6000)
    best = grid[np.argmax(_risk(grid) <= 1 - target)]
    assert best < np.median(chosen) < best + 1.0


def test_the_test_sees_violations_that_an_unguaranteed_choice_makes() -> None:
    """The same check on the plain empirical choice (the largest coverage whose fitted accuracy reaches the target)
    fails far more often: the simulation can tell a guarantee from its absence."""
    rng = np.random.default_rng(1)
    broken = 0
    for _ in range(200):
        probs, labels = _known_risk(600, rng)
        margin = np.abs(np.log(probs[:, 1] / probs[:, 0]))
        wrong = (probs[:, 1] >= 0.5) != labels
        order = np.argsort(-margin)
        acc = 1 - np.cumsum(wrong[order]) / np.arange(1, len(order) + 1)
        k = int(np.flatnonzero(acc >= 0.95)[-1])
        broken += bool(_risk(margin[order][k]) > 0.05)
    assert broken / 200 > 0.2


def test_certify_on_a_generic_score_and_its_p_values() -> None:
    assert binomial_p_value(0, 0, 0.05) == 1.0
    assert float(binomial_p_value(0, 59, 0.05)) == pytest.approx(0.95**59)
    rng = np.random.default_rng(0)
    doubt = rng.random(2000)
    wrong = rng.random(2000) < 0.2 * doubt  # selective risk at limit lam: 0.1 lam
    limits = np.linspace(0, 1, 201)
    found = certify(doubt, wrong, limits, alpha=0.05, delta=0.05, starts=[10, 40, 80])
    assert found.limit is not None and 0.2 < found.limit <= 0.5 and found.p_value <= 0.05 / 3
    nothing = certify(doubt, np.ones(2000, bool), limits, alpha=0.05, delta=0.05, starts=[10, 40])
    assert nothing.limit is None
    assert coverage_margin(691, 0.05) == pytest.approx(np.sqrt(np.log(40) / 1382))


def test_a_target_no_margin_reaches_is_one_clear_error() -> None:
    probs, labels = _known_risk(300, np.random.default_rng(2))
    with pytest.raises(DataError, match=r"no referral limit reaches sensitivity 0\.999 with confidence 0\.95 on 300"):
        fit_referral(probs, labels, None, threshold=0.5, tta=[0], target_sensitivity=0.999)
    with pytest.raises(ConfigError, match="exactly one of --refer-coverage, --target-accuracy and --refer-sens"):
        fit_referral(probs, labels, None, threshold=0.5, tta=[0], target_accuracy=0.9, target_sensitivity=0.9)
    with pytest.raises(ConfigError, match="--delta must be between 0 and 1"):
        fit_referral(probs, labels, None, threshold=0.5, tta=[0], target_accuracy=0.9, delta=0)
    three = np.full((300, 3), 1 / 3)
    with pytest.raises(ConfigError, match="--refer-sensitivity applies to binary models"):
        fit_referral(three, labels, None, threshold=0.5, tta=[0], target_sensitivity=0.9)


def test_a_coverage_rule_reaches_its_coverage_with_a_dkw_bound() -> None:
    probs, labels = _known_risk(1000, np.random.default_rng(3))
    rule = fit_referral(probs, labels, None, threshold=0.5, tta=[0], coverage=0.8)
    assert rule.method == "empirical" and rule.coverage == pytest.approx(0.8, abs=0.002)
    assert rule.bound == pytest.approx(rule.coverage - coverage_margin(1000, 0.05))
    assert rule.sensitivity is not None and rule.margin is not None and rule.margin > 0


def test_the_stored_rule_round_trips_with_its_guarantee() -> None:
    probs, labels = _known_risk(1500, np.random.default_rng(4))
    rule = fit_referral(probs, labels, None, threshold=0.5, tta=list(range(8)), target_sensitivity=0.95, delta=0.1)
    policy = TrustPolicy(referral=rule)
    back = TrustPolicy.model_validate(json.loads(json.dumps(policy.model_dump(mode="json"))), strict=True)
    assert back == policy and back.referral is not None
    assert (back.referral.asked, back.referral.delta, back.referral.bound) == ("sensitivity", 0.1, 0.95)
    assert (refer_mask(back.referral, probs, None) == refer_mask(rule, probs, None)).all()
    line = describe(back.referral)
    assert "guaranteed: sensitivity at least 0.950 with confidence 0.90 (Learn-then-Test" in line
    older = {k: v for k, v in rule.model_dump(mode="json").items() if k not in ("method", "delta", "bound", "p_value")}
    assert ReferralRule.model_validate(older, strict=True).method is None  # rules fitted before the guarantee read


def test_a_rule_fitted_under_other_settings_gets_the_notice() -> None:
    fitted = FittedRecords(referral=FitRecord(under=FittedUnder(tta=list(range(8))), split="calibration", rows=691))
    lines = fitted_notices(
        fitted, FittedUnder(tta=[0]), threshold=0.5, temperature=1.0, has_referral=True, source="run/model.json"
    )
    assert lines == [
        "run/model.json: the referral was fitted under 8 TTA views [0, 1, 2, 3, 4, 5, 6, 7], 1 member on 691 "
        "calibration rows; this prediction runs 1 view (no TTA), 1 member, so it may not hold: predict as it was "
        "fitted, or refit under these settings with 'histoscan calibrate'"
    ]
    same = fitted_notices(
        fitted, FittedUnder(tta=list(range(8))), threshold=0.5, temperature=1.0, has_referral=True, source="m"
    )
    assert same == []


def test_aurc_on_crafted_scores() -> None:
    wrong = np.array([False] * 90 + [True] * 10)
    perfect = np.arange(100, dtype=float)  # every error after every correct answer
    assert excess_aurc(perfect, wrong) == pytest.approx(0.0, abs=1e-15)
    assert aurc(perfect, wrong) == pytest.approx(optimal_aurc(wrong))
    assert aurc(-perfect, wrong) > aurc(np.zeros(100), wrong) > aurc(perfect, wrong)  # worst > ties > perfect
    assert selective_risks(np.zeros(100), wrong) == pytest.approx(np.full(100, 0.1))  # ties: the expected order
    assert aurc(np.zeros(100), wrong) == pytest.approx(0.1)
    assert optimal_aurc(np.zeros(5, bool)) == 0.0 and optimal_aurc(np.ones(5, bool)) == 1.0


def test_evaluate_reports_aurc_and_what_the_rule_achieves_per_class() -> None:
    probs, labels = _known_risk(2000, np.random.default_rng(5))
    rule = fit_referral(probs[:1000], labels[:1000], None, threshold=0.5, tta=[0], coverage=0.9)
    trust = trust_metrics(
        labels[1000:], probs[1000:], None, threshold=0.5, rule=rule, views=1, classes=["normal", "tumor"], n_boot=50
    )
    margin, msp = trust["aurc"]["probability_margin"], trust["aurc"]["baseline_1_minus_max_probability"]
    assert margin["aurc"] == pytest.approx(msp["aurc"])  # one ranking for a binary model at threshold 0.5
    assert margin["ci95"][0] <= margin["aurc"] <= margin["ci95"][1] and margin["e_aurc"] > 0
    ref = trust["referral"]
    assert ref["coverage_achieved"] == pytest.approx(0.9, abs=0.03)
    assert set(ref["coverage_per_class"]) == {"normal", "tumor"}
    answered = ~refer_mask(rule, probs[1000:], None)
    tumour = labels[1000:] == 1
    assert ref["coverage_per_class"]["tumor"]["coverage"] == pytest.approx(answered[tumour].mean())
    called = (probs[1000:, 1] >= 0.5).astype(int)
    assert ref["sensitivity_answered"] == pytest.approx((called == 1)[answered & tumour].mean())
    lo, hi = ref["sensitivity_answered_ci95"]
    assert lo <= ref["sensitivity_answered"] <= hi
