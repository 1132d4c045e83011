"""How well a model knows when not to answer: the trust part of ``histoscan evaluate``.

From labels, probabilities, the uncertainty (when there are several views) and the stored referral
rule: the risk-coverage curve, the error-detection AUROC of the uncertainty next to the plain
baseline 1 - max probability, accuracy at fixed coverages, and the coverage the referral rule
actually achieves against the coverage asked for, each with a bootstrap interval.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from histoscan.metrics import bootstrap_statistic, classify
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
    detection = {}
    for name, d in doubts.items():
        lo, hi = bootstrap_statistic(_error_auroc_of(d, wrong), n, n_boot, seed)
        detection[name] = {"auroc": error_auroc(d, wrong), "ci95": [lo, hi]}
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

        def acc(i: np.ndarray) -> float:
            a = answered[i]
            return float(correct[i][a].mean()) if a.any() else float("nan")

        out["referral"] = {
            "applied": True,
            "by": rule.by,
            "asked": rule.asked,
            "target": rule.target,
            "coverage_fitted": rule.coverage,
            "coverage_achieved": float(answered.mean()),
            "coverage_ci95": list(bootstrap_statistic(lambda i: float(answered[i].mean()), n, n_boot, seed)),
            "accuracy_answered": acc(np.arange(n)),
            "accuracy_answered_ci95": list(bootstrap_statistic(acc, n, n_boot, seed)),
            "referred": int(refer.sum()),
        }
    return out


def trust_lines(trust: dict[str, Any]) -> list[str]:
    """Printable lines of the trust section."""
    det = trust["error_detection"]
    lines = []
    for name, d in det.items():
        lo, hi = d["ci95"]
        lines.append(f"  error-detection AUROC, {name:34s} {d['auroc']:.4f} [{lo:.4f}, {hi:.4f}]")
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
        lines.append(
            f"  referral ({ref['by']}): coverage achieved {ref['coverage_achieved']:.3f} [{lo:.3f}, {hi:.3f}] "
            f"(fitted {ref['coverage_fitted']:.3f}), accuracy of the answered {ref['accuracy_answered']:.4f}"
        )
    elif ref:
        lines.append(f"  referral not scored: {ref['why']}")
    return lines


def risk_coverage_png(trust: dict[str, Any], path: Path) -> Path:
    """The risk-coverage curve: error rate of the answered images against the fraction answered."""
    from histoscan.reports.figures import new_figure, save_png

    fig, ax = new_figure((640, 420))
    a = ax[0, 0]
    for name, curve in trust["risk_coverage"].items():
        a.plot(curve["coverage"], curve["risk"], label=f"referring by {name.replace('_', ' ')}")
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
        rep.key_values(
            {
                "referral rule": f"by {ref['by']}, {ref['asked']} {ref['target']:g} asked",
                "coverage on fitting data": ref["coverage_fitted"],
                "coverage achieved here": f"{ref['coverage_achieved']:.4f} [{lo:.4f}, {hi:.4f}]",
                "accuracy of the answered": f"{ref['accuracy_answered']:.4f} [{alo:.4f}, {ahi:.4f}]",
                "referred": ref["referred"],
            }
        )
    tissue = trust.get("tissue_check")
    if tissue is not None:
        rep.paragraph(
            "Tissue check: absent (model.json predates it; add it with 'histoscan calibrate RUN --tissue-check')."
            if not tissue["checked"]
            else f"Tissue check: {tissue['flagged']} of {tissue['count']} patches flagged {tissue['flags']}."
        )
