"""How well a model knows when not to answer: the trust part of ``histoscan evaluate``.

From labels, probabilities, the uncertainty (when there are several views) and the stored referral
rule: the risk-coverage curve with its area (AURC) and the area above a perfect ranking's (E-AURC), the
error-detection AUROC of the uncertainty next to the plain baseline 1 - max probability, accuracy at fixed
coverages, and what the referral rule achieves: its coverage against the coverage asked for, the accuracy of
the answered, the sensitivity among the answered tumour images and each class's coverage, each with a
bootstrap interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histoscan.metrics import aurc, bootstrap_statistic, classify, excess_aurc
from histoscan.rules.referral import refer_mask
from histoscan.runfolder import ReferralRule
from histoscan.trust.referral import baseline_doubt, error_auroc, probability_doubt

COVERAGES = (0.8, 0.9, 0.95)


def accuracy_at_coverage(doubt: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    """Accuracy of the ``coverage`` fraction of images with the least doubt."""
    keep = max(1, round(coverage * len(doubt)))
    order = np.argsort(doubt, kind="stable")[:keep]
    return float(correct[order].mean())


def risk_coverage(doubt: np.ndarray, correct: np.ndarray, points: int = 101) -> dict[str, list[float]]:
    """Error rate of the answered images as more of the least sure are referred (coverage 1 -> 1/points)."""
    order = np.argsort(doubt, kind="stable")
    cum_err = np.cumsum(~correct[order]) / np.arange(1, len(order) + 1)
    cov = np.linspace(1.0, 1.0 / points, points)
    idx = np.clip(np.round(cov * len(order)).astype(int) - 1, 0, len(order) - 1)
    return {"coverage": [float(c) for c in cov], "risk": [float(cum_err[i]) for i in idx]}


def _error_auroc_of(doubt: np.ndarray, wrong: np.ndarray) -> Callable[[np.ndarray], float]:
    return lambda i: error_auroc(doubt[i], wrong[i])


def _accuracy_at_of(doubt: np.ndarray, correct: np.ndarray, coverage: float) -> Callable[[np.ndarray], float]:
    return lambda i: accuracy_at_coverage(doubt[i], correct[i], coverage)


def trust_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    uncertainty: np.ndarray | None,
    *,
    threshold: float,
    rule: ReferralRule | None,
    views: int,
    classes: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The ``trust`` section of ``metrics.json`` (see the module docstring)."""
    labels = np.asarray(labels)
    correct = classify(probabilities, threshold) == labels
    wrong = ~correct
    n = len(labels)
    doubts = {
        "baseline_1_minus_max_probability": baseline_doubt(probabilities),
        "probability_margin": probability_doubt(probabilities, threshold),
    }
    if uncertainty is not None:
        doubts["uncertainty"] = np.asarray(uncertainty, dtype=np.float64)
    detection, areas = {}, {}
    for name, d in doubts.items():
        lo, hi = bootstrap_statistic(_error_auroc_of(d, wrong), n, n_boot, seed)
        detection[name] = {"auroc": error_auroc(d, wrong), "ci95": [lo, hi]}
        areas[name] = {
            "aurc": aurc(d, wrong),
            "ci95": list(bootstrap_statistic(_aurc_of(d, wrong), n, n_boot, seed)),
            "e_aurc": excess_aurc(d, wrong),
        }
    ranking = "uncertainty" if uncertainty is not None else "probability_margin"
    if rule is not None:
        ranking = "uncertainty" if rule.by == "uncertainty" else "probability_margin"
    doubt = doubts[ranking]
    at = {}
    for c in COVERAGES:
        lo, hi = bootstrap_statistic(_accuracy_at_of(doubt, correct, c), n, n_boot, seed)
        at[f"{c:g}"] = {"accuracy": accuracy_at_coverage(doubt, correct, c), "ci95": [lo, hi]}
    lo, hi = bootstrap_statistic(lambda i: float(correct[i].mean()), n, n_boot, seed)
    out: dict[str, Any] = {
        "views": views,
        "errors": int(wrong.sum()),
        "error_detection": detection,
        "aurc": areas,
        "ranked_by": ranking,
        "accuracy_full_coverage": {"accuracy": float(correct.mean()), "ci95": [lo, hi]},
        "accuracy_at_coverage": at,
        "risk_coverage": {name: risk_coverage(d, correct) for name, d in doubts.items()},
    }
    if rule is not None:
        if rule.by == "uncertainty" and uncertainty is None:
            out["referral"] = {"applied": False, "why": "the rule is by uncertainty and this evaluation has one view"}
            return out
        refer = refer_mask(rule, probabilities, uncertainty)
        answered = ~refer

        out["referral"] = {
            "applied": True,
            "by": rule.by,
            "asked": rule.asked,
            "target": rule.target,
            "method": rule.method,
            "delta": rule.delta,
            "bound": rule.bound,
            "coverage_fitted": rule.coverage,
            **rule_achieved(answered, correct, labels, classes=classes, n_boot=n_boot, seed=seed),
            "referred": int(refer.sum()),
        }
    return out


def _aurc_of(doubt: np.ndarray, wrong: np.ndarray) -> Callable[[np.ndarray], float]:
    return lambda i: aurc(doubt[i], wrong[i])


def _share(hit: np.ndarray, among: np.ndarray) -> Callable[[np.ndarray], float]:
    """``hit``'s share of the ``among`` rows of a resample (NaN when it has none)."""

    def share(i: np.ndarray) -> float:
        a = among[i]
        return float(hit[i][a].mean()) if a.any() else float("nan")

    return share


def rule_achieved(
    answered: np.ndarray,
    correct: np.ndarray,
    labels: np.ndarray,
    *,
    classes: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """What a referral rule achieves on labelled rows, each with a 95% bootstrap interval.

    The coverage, the accuracy of the answered, for a binary model (two ``classes``, or labels 0 and 1 only) the
    sensitivity among the answered tumour images (label 1), and each class's coverage (keyed by class name).
    """
    answered, correct, labels = np.asarray(answered, bool), np.asarray(correct, bool), np.asarray(labels)
    n = len(labels)
    binary = len(classes) == 2 if classes is not None else set(np.unique(labels).tolist()) <= {0, 1}
    parts = [("coverage", answered, np.ones(n, bool)), ("accuracy_answered", correct, answered)]
    if binary:
        parts.append(("sensitivity_answered", correct, answered & (labels == 1)))
    out: dict[str, Any] = {}
    for key, hit, among in parts:
        share = _share(hit, among)
        out["coverage_achieved" if key == "coverage" else key] = share(np.arange(n))
        out[f"{key}_ci95"] = list(bootstrap_statistic(share, n, n_boot, seed))
    per_class = {}
    for k in np.unique(labels):
        share = _share(answered, labels == k)
        name = classes[int(k)] if classes is not None else str(int(k))
        per_class[name] = {"coverage": share(np.arange(n)), "ci95": list(bootstrap_statistic(share, n, n_boot, seed))}
    out["coverage_per_class"] = per_class
    return out


def trust_lines(trust: dict[str, Any]) -> list[str]:
    """Printable lines of the trust section."""
    det = trust["error_detection"]
    lines = []
    for name, d in det.items():
        lo, hi = d["ci95"]
        lines.append(f"  error-detection AUROC, {name:34s} {d['auroc']:.4f} [{lo:.4f}, {hi:.4f}]")
    for name, a in trust.get("aurc", {}).items():
        lo, hi = a["ci95"]
        lines.append(f"  AURC, {name:51s} {a['aurc']:.4f} [{lo:.4f}, {hi:.4f}] (E-AURC {a['e_aurc']:.4f})")
    full = trust["accuracy_full_coverage"]
    lines.append(f"  accuracy at full coverage {full['accuracy']:.4f} [{full['ci95'][0]:.4f}, {full['ci95'][1]:.4f}]")
    for c, a in trust["accuracy_at_coverage"].items():
        lines.append(
            f"  accuracy at {float(c):.0%} coverage ({trust['ranked_by']}) "
            f"{a['accuracy']:.4f} [{a['ci95'][0]:.4f}, {a['ci95'][1]:.4f}]"
        )
    ref = trust.get("referral")
    if ref and ref.get("applied"):
        lo, hi = ref["coverage_ci95"]
        alo, ahi = ref["accuracy_answered_ci95"]
        lines.append(
            f"  referral ({ref['by']}, {ref['asked']} {ref['target']:g} asked{_guarantee(ref)}): coverage achieved "
            f"{ref['coverage_achieved']:.3f} [{lo:.3f}, {hi:.3f}] (fitted {ref['coverage_fitted']:.3f}), accuracy of "
            f"the answered {ref['accuracy_answered']:.4f} [{alo:.4f}, {ahi:.4f}]"
        )
        if "sensitivity_answered" in ref:
            slo, shi = ref["sensitivity_answered_ci95"]
            lines.append(
                f"  referral: sensitivity among the answered tumour images {ref['sensitivity_answered']:.4f} "
                f"[{slo:.4f}, {shi:.4f}]"
            )
        per_class = ", ".join(f"{k} {v['coverage']:.3f}" for k, v in ref.get("coverage_per_class", {}).items())
        if per_class:
            lines.append(f"  referral: coverage per class {per_class}")
    elif ref:
        lines.append(f"  referral not scored: {ref['why']}")
    return lines


def _guarantee(ref: dict[str, Any]) -> str:
    """``, guaranteed at 95% (learn-then-test)`` for a certified target, else nothing."""
    if ref.get("method") == "learn-then-test" and ref.get("delta") is not None:
        return f", guaranteed at {1 - ref['delta']:.0%} (learn-then-test)"
    return ""


def risk_coverage_png(trust: dict[str, Any], path: Path) -> Path:
    """The risk-coverage curve: error rate of the answered images against the fraction answered."""
    from histoscan.reports.figures import new_figure, save_png

    fig, ax = new_figure((640, 420))
    a = ax[0, 0]
    for name, curve in trust["risk_coverage"].items():
        area = trust.get("aurc", {}).get(name)
        label = f"referring by {name.replace('_', ' ')}" + (f" (AURC {area['aurc']:.4f})" if area else "")
        a.plot(curve["coverage"], curve["risk"], label=label)
    ref = trust.get("referral")
    if ref and ref.get("applied"):
        a.axvline(ref["coverage_achieved"], color="black", ls="--", lw=1, label="the stored referral rule")
    a.set(xlabel="coverage (fraction of images answered)", ylabel="error rate of the answered", title="risk-coverage")
    a.set_xlim(0, 1.01)
    a.legend(fontsize=8)
    return save_png(fig, path)


def add_trust_section(rep: Any, trust: dict[str, Any]) -> None:
    """The "Knowing when not to answer" section of the evaluation report."""
    rep.heading("Knowing when not to answer")
    rows = [
        [name.replace("_", " "), d["auroc"], f"[{d['ci95'][0]:.4f}, {d['ci95'][1]:.4f}]"]
        for name, d in trust["error_detection"].items()
    ]
    rep.paragraph(
        f"How well each score finds the model's {trust['errors']} errors (AUROC; 0.5 = no better than chance), "
        f"over {trust['views']} view(s) per image."
    )
    rep.table(["score", "error-detection AUROC", "95% CI"], rows)
    if trust.get("aurc"):
        rep.paragraph(
            "Area under the risk-coverage curve (AURC: the mean error rate of the answered as more are referred; "
            "lower is better) and E-AURC (the AURC above a perfect ranking's at the same accuracy: ranking quality "
            "apart from accuracy; 0 = perfect)."
        )
        rep.table(
            ["score", "AURC", "95% CI", "E-AURC"],
            [
                [name.replace("_", " "), a["aurc"], f"[{a['ci95'][0]:.4f}, {a['ci95'][1]:.4f}]", a["e_aurc"]]
                for name, a in trust["aurc"].items()
            ],
        )
    full = trust["accuracy_full_coverage"]
    cov_rows = [["100%", full["accuracy"], f"[{full['ci95'][0]:.4f}, {full['ci95'][1]:.4f}]"]]
    cov_rows += [
        [f"{float(c):.0%}", a["accuracy"], f"[{a['ci95'][0]:.4f}, {a['ci95'][1]:.4f}]"]
        for c, a in trust["accuracy_at_coverage"].items()
    ]
    rep.table(["coverage", f"accuracy (referring by {trust['ranked_by'].replace('_', ' ')})", "95% CI"], cov_rows)
    ref = trust.get("referral")
    if ref is None:
        rep.paragraph(
            "No referral rule is stored: fit one with 'histoscan calibrate RUN --refer-coverage 0.9'.", note=True
        )
    elif not ref.get("applied"):
        rep.paragraph(f"The stored referral rule was not scored: {ref['why']}.", note=True)
    else:
        lo, hi = ref["coverage_ci95"]
        alo, ahi = ref["accuracy_answered_ci95"]
        values = {
            "referral rule": f"by {ref['by']}, {ref['asked']} {ref['target']:g} asked{_guarantee(ref)}",
            "coverage on fitting data": ref["coverage_fitted"],
            "coverage achieved here": f"{ref['coverage_achieved']:.4f} [{lo:.4f}, {hi:.4f}]",
            "accuracy of the answered": f"{ref['accuracy_answered']:.4f} [{alo:.4f}, {ahi:.4f}]",
        }
        if "sensitivity_answered" in ref:
            slo, shi = ref["sensitivity_answered_ci95"]
            values["sensitivity among the answered tumour images"] = (
                f"{ref['sensitivity_answered']:.4f} [{slo:.4f}, {shi:.4f}]"
            )
        for name, c in ref.get("coverage_per_class", {}).items():
            values[f"coverage of {name}"] = f"{c['coverage']:.4f} [{c['ci95'][0]:.4f}, {c['ci95'][1]:.4f}]"
        values["referred"] = ref["referred"]
        rep.key_values(values)
    tissue = trust.get("tissue_check")
    if tissue is not None:
        rep.paragraph(
            "Tissue check: absent (model.json predates it; add it with 'histoscan calibrate RUN --tissue-check')."
            if not tissue["checked"]
            else f"Tissue check: {tissue['flagged']} of {tissue['count']} patches flagged {tissue['flags']}."
        )
