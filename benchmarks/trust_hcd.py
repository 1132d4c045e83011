"""Referral with a guarantee on real patches: AURC against 1 - max probability, coverage, the guarantee over re-splits.

For each hcd run given (``--run``, repeatable: one per training seed; each is copied, never changed), on its
held-out rows (the split's ``calibration`` and ``test`` rows; a run needs a split with calibration rows:
``histoscan split STORE --calibration 0.1``):

- predictions are computed ONCE per predictor: the deployed one (the model's 8-view TTA) and the single-view
  model, over the calibration and the test rows; everything below re-splits them in memory;
- **aurc**: on the test rows, the AURC of the deployed predictor's calibrated margin (temperature fitted on the
  calibration rows; distance of P(tumour) from the threshold in logits) against the single-view model's
  1 - max probability, each on its own errors, with a paired bootstrap interval of the difference (same rows),
  the relative reduction and E-AURC;
- **coverage**: a rule for ``--coverage`` fitted on the calibration rows, scored on the test rows: coverage
  achieved (95% bootstrap interval), accuracy of the answered, sensitivity among the answered tumour patches,
  coverage per class;
- **guarantee**: ``--resplits`` random re-splits of the pooled held-out rows, half to fit (temperature and
  rule) and half to check: the fraction where a ``--target-accuracy`` rule at confidence 1 - ``--delta``
  reached its target on the checking half (and, apart, a ``--target-sensitivity`` rule), and where a
  ``--coverage`` rule landed within +-0.02 of the coverage asked;
- **tool**: the same through the tool, as a user runs it: ``calibrate`` (temperature and the coverage rule)
  and ``evaluate`` on the copy, whose AURC and achieved coverage should match the in-memory figures.

- **ood** (with ``--ood-suite DIR``, the suite ``benchmarks/ood_suite.py`` wrote): on a copy of each run, the
  out-of-distribution detector fitted and measured as ``benchmarks/trust_ood.py`` does (``measure``):
  ``{SHIFT: {SCORE: detection AUROC against the hcd test split, "accuracy": ..., "flagged": ...}}``.

``referral_results(run, ...)`` returns one run's figures as a dict (``{"aurc", "coverage", "guarantee",
"tool"}``); ``ood_figures`` adds the ``"ood"`` key beside them.

Run: python benchmarks/trust_hcd.py --run RUN [--run RUN2 ...] [--ood-suite DIR] [--json benchmarks/results/trust_hcd.json]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, add_json_option, finish
from histoscan.bundle import read_bundle
from histoscan.data.splits import CALIBRATION
from histoscan.errors import DataError
from histoscan.inference.calibration import fit_temperature
from histoscan.inference.probabilities import logits_of, probabilities
from histoscan.inference.settings import PredictorSettings
from histoscan.inference.tta import tta_views
from histoscan.metrics import aurc, bootstrap_statistic, classify, excess_aurc
from histoscan.rules.referral import refer_mask
from histoscan.runfolder import RunFolder
from histoscan.trust.referral import baseline_doubt, fit_referral, probability_doubt
from histoscan.trust.scoring import rule_achieved

COVERAGE_SLACK = 0.02  # the pre-registered aim: achieved coverage within +-0.02 of the asked


def _scaled(probs: np.ndarray, factor: float, threshold: float) -> tuple[np.ndarray, float]:
    """Probabilities at temperature ``factor`` (relative to the stored one), and the threshold making the same calls."""
    scaled = probabilities(logits_of(probs) / factor)
    thr = float(probabilities(logits_of(np.array([[1 - threshold, threshold]])) / factor)[0, 1])
    return scaled, thr


def _calibrated(
    probs: np.ndarray, labels: np.ndarray, fit_rows: np.ndarray, threshold: float
) -> tuple[np.ndarray, float]:
    """Temperature fitted on ``fit_rows`` (as ``histoscan calibrate`` fits it), applied to every row."""
    factor = fit_temperature(logits_of(probs[fit_rows]), labels[fit_rows])
    return _scaled(probs, factor, threshold)


def _paired(
    doubt_a: np.ndarray, wrong_a: np.ndarray, doubt_b: np.ndarray, wrong_b: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any]:
    """AURC of a and b on the same rows, the difference a - b and the relative reduction 1 - a / b, with paired intervals."""
    n = len(doubt_a)
    diff = bootstrap_statistic(lambda i: aurc(doubt_a[i], wrong_a[i]) - aurc(doubt_b[i], wrong_b[i]), n, n_boot, seed)
    rel = bootstrap_statistic(
        lambda i: 1 - aurc(doubt_a[i], wrong_a[i]) / aurc(doubt_b[i], wrong_b[i]), n, n_boot, seed
    )
    a, b = aurc(doubt_a, wrong_a), aurc(doubt_b, wrong_b)
    return {
        "deployed": a,
        "msp_single": b,
        "ci": list(diff),  # of deployed - msp_single
        "difference": a - b,
        "relative_reduction": 1 - a / b,
        "relative_ci": list(rel),
        "e_aurc": {"deployed": excess_aurc(doubt_a, wrong_a), "msp_single": excess_aurc(doubt_b, wrong_b)},
    }


def _resplits(
    probs: np.ndarray,
    labels: np.ndarray,
    unc: np.ndarray | None,
    threshold: float,
    *,
    coverage: float,
    target_accuracy: float,
    target_sensitivity: float,
    delta: float,
    resplits: int,
    seed: int,
) -> dict[str, Any]:
    """Fit on a random half of the pooled rows, check on the other half, ``resplits`` times (see the module text)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    held: dict[str, list[bool]] = {"accuracy": [], "sensitivity": []}
    refused = {"accuracy": 0, "sensitivity": 0}
    achieved: dict[str, list[float]] = {"accuracy": [], "sensitivity": [], "coverage": []}
    coverage_ok: list[bool] = []
    for _ in range(resplits):
        perm = rng.permutation(n)
        fit, check = perm[: n // 2], perm[n // 2 :]
        p, thr = _calibrated(probs, labels, fit, threshold)
        correct = classify(p[check], thr) == labels[check]
        for ask, target in (("accuracy", target_accuracy), ("sensitivity", target_sensitivity)):
            try:
                rule = fit_referral(
                    p[fit], labels[fit], None, threshold=thr, tta=[0], delta=delta, **{f"target_{ask}": target}
                )
            except DataError:  # nothing certified: no rule is stored, so no promise is broken
                refused[ask] += 1
                held[ask].append(True)
                continue
            answered = ~refer_mask(rule, p[check], None)
            among = answered & (labels[check] == 1) if ask == "sensitivity" else answered
            value = float(correct[among].mean()) if among.any() else 1.0
            achieved[ask].append(value)
            held[ask].append(value >= target)
        rule = fit_referral(p[fit], labels[fit], None, threshold=thr, tta=[0], coverage=coverage)
        got = float((~refer_mask(rule, p[check], None)).mean())
        achieved["coverage"].append(got)
        coverage_ok.append(abs(got - coverage) <= COVERAGE_SLACK)

    def of_certified(ask: str) -> float:
        """The fraction held among the re-splits where a rule was certified (NaN when none was)."""
        certified = len(held[ask]) - refused[ask]
        return (sum(held[ask]) - refused[ask]) / certified if certified else float("nan")

    return {
        "target": target_accuracy,
        "delta": delta,
        "resplits": resplits,
        "held_fraction": float(np.mean(held["accuracy"])),
        "refused": refused["accuracy"],
        "held_of_certified": of_certified("accuracy"),
        "achieved_mean": float(np.mean(achieved["accuracy"])) if achieved["accuracy"] else float("nan"),
        "sensitivity": {
            "target": target_sensitivity,
            "held_fraction": float(np.mean(held["sensitivity"])),
            "refused": refused["sensitivity"],
            "held_of_certified": of_certified("sensitivity"),
            "achieved_mean": float(np.mean(achieved["sensitivity"])) if achieved["sensitivity"] else float("nan"),
        },
        "coverage": {
            "asked": coverage,
            "within_0.02_fraction": float(np.mean(coverage_ok)),
            "achieved_mean": float(np.mean(achieved["coverage"])),
            "achieved_sd": float(np.std(achieved["coverage"])),
        },
        "held_fraction_of": "check halves whose accuracy of the answered reached the target (a refusal counts as held)",
        "fit_rows": n // 2,
        "check_rows": n - n // 2,
    }


def referral_results(
    run: str | Path,
    *,
    coverage: float = 0.9,
    target_accuracy: float = 0.95,
    target_sensitivity: float = 0.95,
    delta: float = 0.05,
    resplits: int = 200,
    n_boot: int = 1000,
    seed: int = 0,
    through_tool: bool = True,
    settings: PredictorSettings | None = None,
    keep: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """One run's referral figures (the module text): ``{"aurc", "coverage", "guarantee", "tool", "rows"}``.

    ``run`` is copied to a temporary folder first; the original is never changed. ``keep``: a dict that receives
    the test rows' doubts and errors of both predictors (for an interval across runs).
    """
    from histoscan.evaluation.evaluate import evaluate_run
    from histoscan.trust.calibrate import calibrate_run

    settings = settings or PredictorSettings()
    work = Path(tempfile.mkdtemp(prefix="histoscan-referral-"))
    try:
        copy = Path(shutil.copytree(run, work / Path(run).name, ignore=shutil.ignore_patterns("tensorboard", "*.ckpt")))
        folder = RunFolder(copy)
        bundle = read_bundle(copy)
        if bundle.task != "binary":
            raise DataError(f"{run}: the referral benchmark scores binary (tumour) models")
        store = folder.data_store()
        cal, _ = folder.select_patches(store, CALIBRATION)
        test, _ = folder.select_patches(store, "test")
        predictor = settings.predictor(copy, backend="torch")
        views = tta_views(bundle, None, "fit")  # the deployed predictor's views (8 for a binary patch model)
        dep = [predictor.predict_store(part, views) for part in (cal, test)]
        single = [predictor.predict_store(part, [0]) for part in (cal, test)]
        labels = np.concatenate([cal.labels, test.labels])
        probs = np.concatenate([d.probabilities for d in dep]).astype(np.float64)
        probs1 = np.concatenate([s.probabilities for s in single]).astype(np.float64)
        nc = len(cal)
        cal_rows, test_rows = np.arange(nc), np.arange(nc, len(labels))
        threshold = bundle.threshold

        # the deployed predictor: temperature fitted on the calibration rows; scored on the test rows
        p, thr = _calibrated(probs, labels, cal_rows, threshold)
        wrong_dep = classify(p, thr) != labels
        wrong_one = classify(probs1, threshold) != labels
        scored = (
            probability_doubt(p[test_rows], thr),
            wrong_dep[test_rows],
            baseline_doubt(probs1[test_rows]),
            wrong_one[test_rows],
        )
        if keep is not None:
            keep.update(zip(("doubt_deployed", "wrong_deployed", "doubt_single", "wrong_single"), scored))
        areas = _paired(*scored, n_boot, seed)
        areas["accuracy"] = {
            "deployed": float(1 - wrong_dep[test_rows].mean()),
            "msp_single": float(1 - wrong_one[test_rows].mean()),
        }

        rule = fit_referral(p[cal_rows], labels[cal_rows], None, threshold=thr, tta=views, coverage=coverage)
        answered = ~refer_mask(rule, p[test_rows], None)
        got = rule_achieved(
            answered, ~wrong_dep[test_rows], labels[test_rows], classes=bundle.classes, n_boot=n_boot, seed=seed
        )
        cover = {
            "asked": coverage,
            "achieved": got["coverage_achieved"],
            "ci": got["coverage_ci95"],
            "per_class": {
                k: {"achieved": v["coverage"], "ci": v["ci95"]} for k, v in got["coverage_per_class"].items()
            },
            "accuracy_answered": got["accuracy_answered"],
            "accuracy_answered_ci": got["accuracy_answered_ci95"],
            "sensitivity_answered": got["sensitivity_answered"],
            "sensitivity_answered_ci": got["sensitivity_answered_ci95"],
            "margin_logits": rule.margin,
        }
        guarantee = _resplits(
            probs,
            labels,
            None,
            threshold,
            coverage=coverage,
            target_accuracy=target_accuracy,
            target_sensitivity=target_sensitivity,
            delta=delta,
            resplits=resplits,
            seed=seed,
        )
        out: dict[str, Any] = {
            "aurc": areas,
            "coverage": cover,
            "guarantee": guarantee,
            "rows": {"calibration": nc, "test": len(test), "views": len(views)},
        }
        if through_tool:
            lines = calibrate_run(copy, refer_coverage=coverage, settings=settings)
            r = evaluate_run(copy, backend="torch", n_boot=n_boot, seed=seed, settings=settings)
            trust = r.metrics["trust"]
            ref = trust["referral"]
            for line in lines:
                print(f"  calibrate: {line}")
            out["tool"] = {
                "aurc_probability_margin": trust["aurc"]["probability_margin"]["aurc"],
                "coverage_achieved": ref["coverage_achieved"],
                "coverage_ci": ref["coverage_ci95"],
            }
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mean_figures(per_run: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean across runs of each headline figure (the per-run figures keep their intervals)."""
    runs = list(per_run.values())

    def mean(path: tuple[str, ...]) -> float:
        vals = []
        for r in runs:
            v: Any = r
            for k in path:
                v = v[k]
            vals.append(float(v))
        return float(np.mean(vals))

    classes = list(runs[0]["coverage"]["per_class"])
    return {
        "aurc": {
            "deployed": mean(("aurc", "deployed")),
            "msp_single": mean(("aurc", "msp_single")),
            "relative_reduction": mean(("aurc", "relative_reduction")),
            "ci_excludes_zero_in": sum(r["aurc"]["ci"][1] < 0 or r["aurc"]["ci"][0] > 0 for r in runs),
            "e_aurc": {
                "deployed": mean(("aurc", "e_aurc", "deployed")),
                "msp_single": mean(("aurc", "e_aurc", "msp_single")),
            },
        },
        "coverage": {
            "asked": runs[0]["coverage"]["asked"],
            "achieved": mean(("coverage", "achieved")),
            "per_class": {c: mean(("coverage", "per_class", c, "achieved")) for c in classes},
        },
        "guarantee": {
            "target": runs[0]["guarantee"]["target"],
            "delta": runs[0]["guarantee"]["delta"],
            "resplits": runs[0]["guarantee"]["resplits"],
            "held_fraction": mean(("guarantee", "held_fraction")),
            "sensitivity_held_fraction": mean(("guarantee", "sensitivity", "held_fraction")),
            "refused": sum(r["guarantee"]["refused"] for r in runs),
            "sensitivity_refused": sum(r["guarantee"]["sensitivity"]["refused"] for r in runs),
            "coverage_within_0.02_fraction": mean(("guarantee", "coverage", "within_0.02_fraction")),
        },
        "runs": len(runs),
    }


def _across_runs(kept: list[dict[str, np.ndarray]], n_boot: int, seed: int = 0) -> dict[str, Any]:
    """The mean over runs of AURC deployed - msp single, with a paired bootstrap interval (rows resampled per run)."""
    rng = np.random.default_rng(seed)

    def diff(k: dict[str, np.ndarray], i: np.ndarray) -> float:
        return aurc(k["doubt_deployed"][i], k["wrong_deployed"][i]) - aurc(k["doubt_single"][i], k["wrong_single"][i])

    def rel(k: dict[str, np.ndarray], i: np.ndarray) -> float:
        return 1 - aurc(k["doubt_deployed"][i], k["wrong_deployed"][i]) / aurc(
            k["doubt_single"][i], k["wrong_single"][i]
        )

    draws = [[rng.integers(0, len(k["wrong_single"]), len(k["wrong_single"])) for k in kept] for _ in range(n_boot)]
    d = [float(np.mean([diff(k, i) for k, i in zip(kept, idx)])) for idx in draws]
    r = [float(np.mean([rel(k, i) for k, i in zip(kept, idx)])) for idx in draws]
    return {
        "ci": [float(v) for v in np.quantile(d, [0.025, 0.975])],
        "relative_ci": [float(v) for v in np.quantile(r, [0.025, 0.975])],
    }


def _row(name: str, r: dict[str, Any]) -> dict[str, Any]:
    a, c, g = r["aurc"], r["coverage"], r["guarantee"]
    return {
        "run": name,
        "AURC deployed": a["deployed"],
        "AURC msp single": a["msp_single"],
        "reduction": a["relative_reduction"],
        "reduction 95% CI": a["relative_ci"],
        "difference 95% CI": a["ci"],
        "E-AURC deployed": a["e_aurc"]["deployed"],
        "E-AURC msp single": a["e_aurc"]["msp_single"],
        "coverage asked": c["asked"],
        "coverage achieved": c["achieved"],
        "coverage 95% CI": c["ci"],
        **{f"coverage {k}": v["achieved"] for k, v in c["per_class"].items()},
        "accuracy held": g["held_fraction"],
        "accuracy refused": g["refused"],
        "sensitivity held": g["sensitivity"]["held_fraction"],
        "sensitivity refused": g["sensitivity"]["refused"],
        "coverage within 0.02": g["coverage"]["within_0.02_fraction"],
    }


def ood_figures(run: Path, suite: Path, threads: int | None) -> dict[str, Any]:
    """The out-of-distribution suite on a copy of ``run``, measured as ``benchmarks/trust_ood.py`` does.

    Returns ``{SHIFT: {SCORE: auroc, "accuracy": ..., "flagged": ...}}`` plus ``"chosen"`` (the score chosen
    on the suite) and ``"hcd_test_withheld"`` (the share of the hcd test split the stored checks withhold).
    """
    from trust_ood import measure  # the OOD script's imports only when the suite is asked for

    with tempfile.TemporaryDirectory(prefix="histoscan-trust-ood-") as work:
        results, spec, withheld = measure(run, Path(work) / run.name, suite, threads)
    out: dict[str, Any] = {k: v for k, v in results.items() if not k.startswith("_")}
    out["chosen"] = spec.score
    out["hcd_test_withheld"] = withheld
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, action="append", help="an hcd run with calibration rows (repeatable)")
    ap.add_argument("--coverage", type=float, default=0.9)
    ap.add_argument("--target-accuracy", type=float, default=0.95)
    ap.add_argument("--target-sensitivity", type=float, default=0.95)
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--resplits", type=int, default=200)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--no-tool", action="store_true", help="skip the calibrate + evaluate pass through the tool")
    ap.add_argument("--ood-suite", type=Path, help="the out-of-distribution suite (benchmarks/ood_suite.py --out)")
    ap.add_argument("--threads", type=int, help="CPU threads for the out-of-distribution pass")
    add_json_option(ap)
    args = ap.parse_args()
    rec = Recorder("trust_hcd", "Referral with a guarantee (issue 38): AURC, coverage, the guarantee", args.json)
    rec.tee()
    per_run, kept = {}, []
    for run in args.run:
        kept.append({})
        name = Path(run).name
        r = referral_results(
            run,
            coverage=args.coverage,
            target_accuracy=args.target_accuracy,
            target_sensitivity=args.target_sensitivity,
            delta=args.delta,
            resplits=args.resplits,
            n_boot=args.bootstrap,
            through_tool=not args.no_tool,
            keep=kept[-1],
        )
        if args.ood_suite is not None:
            r["ood"] = ood_figures(Path(run), args.ood_suite, args.threads)
        per_run[name] = r
        a, c, g = r["aurc"], r["coverage"], r["guarantee"]
        print(f"{name} ({r['rows']['calibration']} calibration + {r['rows']['test']} test rows):")
        print(
            f"  AURC deployed {a['deployed']:.4f} vs msp single {a['msp_single']:.4f}: reduction "
            f"{a['relative_reduction']:.1%} [{a['relative_ci'][0]:.1%}, {a['relative_ci'][1]:.1%}], difference "
            f"{a['difference']:.4f} [{a['ci'][0]:.4f}, {a['ci'][1]:.4f}]; E-AURC {a['e_aurc']['deployed']:.4f} vs "
            f"{a['e_aurc']['msp_single']:.4f}"
        )
        per_class = ", ".join(f"{k} {v['achieved']:.3f}" for k, v in c["per_class"].items())
        print(
            f"  coverage asked {c['asked']:.2f}, achieved {c['achieved']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}] "
            f"({per_class}); accuracy of the answered {c['accuracy_answered']:.4f}, sensitivity "
            f"{c['sensitivity_answered']:.4f}"
        )
        print(
            f"  guarantee over {g['resplits']} re-splits (delta {g['delta']}): accuracy >= {g['target']} held in "
            f"{g['held_fraction']:.3f} ({g['refused']} refused; {g['held_of_certified']:.3f} of the certified), "
            f"sensitivity >= {g['sensitivity']['target']} held in {g['sensitivity']['held_fraction']:.3f} "
            f"({g['sensitivity']['refused']} refused; {g['sensitivity']['held_of_certified']:.3f} of the certified); "
            f"coverage within 0.02 in {g['coverage']['within_0.02_fraction']:.3f}"
        )
        if "tool" in r:
            t = r["tool"]
            print(
                f"  through the tool (calibrate + evaluate): AURC {t['aurc_probability_margin']:.4f}, coverage "
                f"{t['coverage_achieved']:.3f}"
            )
    rec.figures = per_run[next(iter(per_run))] if len(per_run) == 1 else _mean_figures(per_run)
    if args.ood_suite is not None and "ood" not in rec.figures:  # several runs: the first run's (the default seed)
        rec.figures["ood"] = per_run[next(iter(per_run))]["ood"]
    if len(per_run) > 1:
        rec.figures["aurc"].update(_across_runs(kept, args.bootstrap))
        a = rec.figures["aurc"]
        print(
            f"mean over {len(per_run)} runs: AURC deployed {a['deployed']:.4f} vs msp single {a['msp_single']:.4f}, "
            f"reduction {a['relative_reduction']:.1%} [{a['relative_ci'][0]:.1%}, {a['relative_ci'][1]:.1%}], "
            f"difference 95% CI [{a['ci'][0]:.4f}, {a['ci'][1]:.4f}]"
        )
        rec.figures["per_run"] = per_run
    rec.tables["per run"] = [_row(k, v) for k, v in per_run.items()]
    rec.notes.append(
        "aurc: test rows; deployed = 8-view TTA, temperature fitted on the calibration rows, calibrated margin; "
        "msp_single = one view, 1 - max probability; ci = paired bootstrap interval of deployed - msp_single"
    )
    rec.notes.append("the machine was shared with trainings (2 cores); no timing is reported as a figure")


if __name__ == "__main__":
    main()
    finish()
