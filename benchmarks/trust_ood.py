"""Out of distribution, measured apart: each candidate score's detection AUROC on the pre-registered suite.

    python benchmarks/ood_suite.py --run RUN --out SUITE
    python benchmarks/trust_ood.py --run RUN --suite SUITE --json benchmarks/results/trust_ood.json

The run is copied (never changed). On the copy the tissue check and the detector's arrays are fitted as
``histoscan calibrate RUN --tissue-check --ood`` fits them (training split); every image of the suite is then
run once through the Predictor under all 8 dihedral views, and every candidate score (1 - max probability,
energy, the TTA spread, Mahalanobis and kNN distances of the pooled features) is read from that pass. Per shift:
each score's detection AUROC against ``hcd_test`` (the run's untouched test split), the model's accuracy and
AUROC where the shift keeps labels (next to the same rows clean), and the share flagged (answered ``not
tissue`` or ``out of distribution``) by the tissue check and the chosen detector together. The score is chosen
as pre-registered (the highest mean AUROC over the not-tissue and damaged shifts); each score's threshold is
its 99th percentile on the run's validation rows. Finally the chosen detector is stored in the copy with
``fit_run_ood`` and the Predictor's own answers on ``hcd_test`` are counted, end to end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, add_json_option
from histoscan.bundle import read_bundle
from histoscan.errors import HistoscanError
from histoscan.inference.predictor import Predictor
from histoscan.inference.settings import PredictorSettings
from histoscan.rules.answers import ANSWER_KINDS
from histoscan.runfolder import RunFolder
from histoscan.trust.ood import QUANTILE, ScoredRows, fit_run_ood, score_images
from histoscan.trust.tissue import fit_run_tissue_check
from ood_suite import DAMAGED, NOT_TISSUE, OTHER_ORGANS, REFERENCE, load_shift

ALL_VIEWS = list(range(8))
TARGETED = (*NOT_TISSUE, *DAMAGED)
BOOTSTRAP = 200  # resamples for the 95% intervals


def _resamples(n_ref: int, n_shift: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Bootstrap draws of the reference and the shifted images, shared by every score (paired)."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, n_ref, n_ref), rng.integers(0, n_shift, n_shift)) for _ in range(BOOTSTRAP)]


def _interval(values: list[float]) -> list[float]:
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def _detection_auroc(reference: np.ndarray, shifted: np.ndarray) -> float:
    """AUROC of a score (higher: out of distribution) separating shifted images from the reference."""
    labels = np.r_[np.zeros(len(reference)), np.ones(len(shifted))]
    return float(roc_auc_score(labels, np.r_[reference, shifted]))


def _quality(predictor: Predictor, images: Any) -> list[str]:
    out: list[str] = []
    for s in range(0, len(images), predictor.batch_size):
        out += predictor.quality(images[s : s + predictor.batch_size])
    return out


def _model_figures(scored: ScoredRows, labels: np.ndarray, threshold: float) -> dict[str, float | None]:
    if labels.min() < 0:
        return {"accuracy": None, "model_auroc": None}
    p = scored.probabilities[:, 1]
    acc = float(((p >= threshold).astype(int) == labels).mean())
    both = len(np.unique(labels)) == 2
    return {"accuracy": acc, "model_auroc": float(roc_auc_score(labels, p)) if both else None}


def ood_results(run: str | Path, suite_dir: str | Path, threads: int | None = None) -> dict[str, Any]:
    """``{SHIFT: {SCORE: auroc, "accuracy": acc or None, "flagged": share}}`` on a run that already has ``trust.ood``.

    ``run`` must hold the detector's arrays (``fit_run_ood``) and, for the ``flagged`` shares to count the
    colour check too, the tissue check. Scores read the first view; the spread reads all 8 views. Each score's
    threshold is its ``QUANTILE`` on the run's validation rows; the chosen score is the one with the highest
    mean AUROC over the targeted shifts (``_chosen``), and ``flagged`` is the tissue check or that score above
    its threshold. Extra keys per shift: ``flagged_tissue_check``, ``flagged_detector``, ``clean_accuracy``
    (the same hcd rows untouched), ``model_auroc``, ``clean_model_auroc``, ``count``.
    """
    suite_dir = Path(suite_dir)
    predictor = Predictor(run, "torch", threads=threads)
    threshold = predictor.threshold
    rf = RunFolder(run)
    val, _ = rf.select_patches(rf.data_store(), "val")
    on_val = score_images(predictor, val.batch(np.arange(len(val))), ALL_VIEWS)
    thresholds = {name: float(np.quantile(v, QUANTILE)) for name, v in on_val.scores.items()}

    ref_images, ref_labels, _ = load_shift(suite_dir / f"{REFERENCE}.npz")
    ref = score_images(predictor, ref_images, ALL_VIEWS)
    ref_quality = _quality(predictor, ref_images)
    shifts: dict[str, tuple[ScoredRows, np.ndarray, np.ndarray | None, list[str]]] = {}
    for name in (*TARGETED, *OTHER_ORGANS):
        images, labels, rows = load_shift(suite_dir / f"{name}.npz")
        shifts[name] = (score_images(predictor, images, ALL_VIEWS), labels, rows, _quality(predictor, images))

    names = list(ref.scores)
    mean_auroc = {
        n: float(np.mean([_detection_auroc(ref.scores[n], shifts[s][0].scores[n]) for s in TARGETED])) for n in names
    }
    chosen = max(names, key=lambda n: mean_auroc[n])
    # paired bootstrap: the same draws of images for every score, per shift
    draws = {s: _resamples(len(ref_labels), len(shifts[s][1]), k) for k, s in enumerate(shifts)}
    boot = {
        s: {
            n: np.array([_detection_auroc(ref.scores[n][i], shifts[s][0].scores[n][j]) for i, j in draws[s]])
            for n in names
        }
        for s in shifts
    }
    mean_boot = {n: np.mean([boot[s][n] for s in TARGETED], axis=0) for n in names}
    out: dict[str, Any] = {
        "_chosen": {
            "score": chosen,
            "mean_auroc_targeted": mean_auroc,
            "thresholds_val": thresholds,
            # 95% paired bootstrap interval of (chosen - other) mean AUROC over the targeted shifts
            "difference_ci": {n: _interval(list(mean_boot[chosen] - mean_boot[n])) for n in names if n != chosen},
        },
    }

    def flags(scored: ScoredRows, quality: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tissue = np.array([q not in ("ok", "unchecked") for q in quality])
        return tissue, scored.scores[chosen] > thresholds[chosen]

    tissue, det = flags(ref, ref_quality)
    out[REFERENCE] = {
        "count": len(ref_labels),
        **{n: None for n in names},
        **_model_figures(ref, ref_labels, threshold),
        "flagged": float((tissue | det).mean()),
        "flagged_tissue_check": float(tissue.mean()),
        "flagged_detector": float(det.mean()),
    }
    for name, (scored, labels, rows, quality) in shifts.items():
        tissue, det = flags(scored, quality)
        entry: dict[str, Any] = {"count": len(labels)}
        entry.update({n: _detection_auroc(ref.scores[n], scored.scores[n]) for n in names})
        entry[f"{chosen}_ci"] = _interval(list(boot[name][chosen]))
        entry.update(_model_figures(scored, labels, threshold))
        if rows is not None and labels.min() >= 0:
            clean = ScoredRows({}, ref.probabilities[rows], ref.features[rows])
            base = _model_figures(clean, ref_labels[rows], threshold)
            entry["clean_accuracy"], entry["clean_model_auroc"] = base["accuracy"], base["model_auroc"]
        entry.update(
            flagged=float((tissue | det).mean()),
            flagged_tissue_check=float(tissue.mean()),
            flagged_detector=float(det.mean()),
        )
        out[name] = entry
    return out


def aims(results: dict[str, Any]) -> dict[str, Any]:
    """The pre-registered aims of docs/guide/trust.md ("Out of distribution"), each met or missed."""
    chosen = results["_chosen"]["score"]
    return {
        "every_not_tissue_flagged": {s: results[s]["flagged"] for s in NOT_TISSUE},
        "every_not_tissue_flagged_met": all(results[s]["flagged"] == 1.0 for s in NOT_TISSUE),
        "out_of_focus_auroc": results["out_of_focus"][chosen],
        "pen_ink_auroc": results["pen_ink"][chosen],
        "focus_and_ink_met": results["out_of_focus"][chosen] >= 0.9 and results["pen_ink"][chosen] >= 0.9,
        "other_organs_flagged": {s: results[s]["flagged"] for s in OTHER_ORGANS},
        "other_organs_met": all(results[s]["flagged"] <= 0.05 for s in OTHER_ORGANS),
        "hcd_test_flagged": results[REFERENCE]["flagged"],
        "hcd_test_met": results[REFERENCE]["flagged"] <= 0.01,
    }


def measure(source: Path, run: Path, suite: Path, threads: int | None) -> tuple[dict[str, Any], Any, float]:
    """Copy ``source`` to ``run``, fit both checks there, measure the suite, store the chosen detector, count answers."""
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("last.ckpt", "tensorboard", "eval", "*.onnx"))
    try:
        if read_bundle(run).trust.tissue_check is None:  # new runs fit it at the end of training
            fit_run_tissue_check(run)
        fit_run_ood(run, settings=PredictorSettings(threads=threads))  # the arrays; the score is chosen below
        results = ood_results(run, suite, threads)
        chosen = results["_chosen"]["score"]
        spec = fit_run_ood(run, score=chosen, settings=PredictorSettings(threads=threads, tta=chosen == "spread"))
        images, _, _ = load_shift(suite / f"{REFERENCE}.npz")
        answers = Predictor(run, "torch", threads=threads).predict_batch(images).answers or []
    except HistoscanError as exc:
        sys.exit(f"error: {exc}")
    withheld = float(np.mean([a in ANSWER_KINDS and a != "refer" for a in answers]))
    print(f"  chosen {chosen}; aims {aims(results)}")
    return results, spec, withheld


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--run",
        type=Path,
        required=True,
        action="append",
        help="a run trained on an hcd store (copied, not changed); repeat for seeds: the first is the one reported in full",
    )
    ap.add_argument("--suite", type=Path, required=True, help="the folder benchmarks/ood_suite.py wrote")
    ap.add_argument("--threads", type=int, default=None)
    add_json_option(ap)
    args = ap.parse_args()
    rec = Recorder("trust_ood", "Out of distribution, measured apart (issue 38)", args.json)
    with tempfile.TemporaryDirectory() as tmp:
        per_run = {}
        for source in args.run:
            print(f"{source}:")
            per_run[source.name] = measure(source, Path(tmp) / source.name, args.suite, args.threads)
    first = args.run[0].name
    results, spec, withheld = per_run[first]
    chosen = results["_chosen"]["score"]
    met = aims(results)
    rec.figures = {"ood": {k: v for k, v in results.items() if not k.startswith("_")}, "chosen": results["_chosen"]}
    rec.figures["aims"] = met
    rec.figures["end_to_end"] = {"score": spec.score, "threshold": spec.threshold, "hcd_test_withheld": withheld}
    rec.figures["runs"] = {
        name: {
            "chosen": r["_chosen"]["score"],
            "mean_auroc_targeted": r["_chosen"]["mean_auroc_targeted"],
            "aims": aims(r),
            "end_to_end_hcd_test_withheld": w,
            "ood": {k: v for k, v in r.items() if not k.startswith("_")},
        }
        for name, (r, _, w) in per_run.items()
    }
    rec.tables["Each run (seed): the chosen score, its AUROC on out_of_focus and pen_ink, shares flagged"] = [
        {
            "run": name,
            "chosen": r["_chosen"]["score"],
            **{f"mean AUROC {n}": v for n, v in r["_chosen"]["mean_auroc_targeted"].items()},
            "out_of_focus": aims(r)["out_of_focus_auroc"],
            "pen_ink": aims(r)["pen_ink_auroc"],
            "hcd_test flagged": r[REFERENCE]["flagged"],
            "lc25000_lung flagged": r["lc25000_lung"]["flagged"],
            "idc_breast flagged": r["idc_breast"]["flagged"],
            "not tissue flagged (least)": min(r[s]["flagged"] for s in NOT_TISSUE),
            "lc25000_lung flagged by detector": r["lc25000_lung"]["flagged_detector"],
            "idc_breast flagged by detector": r["idc_breast"]["flagged_detector"],
        }
        for name, (r, _, _) in per_run.items()
    ]
    scores = list(results["_chosen"]["mean_auroc_targeted"])
    rec.tables["Detection AUROC against hcd_test, accuracy and share flagged per shift"] = [
        {
            "shift": name,
            "n": r["count"],
            **{s: r[s] for s in scores},
            f"{chosen} 95% CI": r.get(f"{chosen}_ci"),
            "accuracy": r["accuracy"],
            "clean accuracy": r.get("clean_accuracy"),
            "model AUROC": r["model_auroc"],
            "clean model AUROC": r.get("clean_model_auroc"),
            "flagged": r["flagged"],
            "by tissue check": r["flagged_tissue_check"],
            "by detector": r["flagged_detector"],
        }
        for name, r in results.items()
        if not name.startswith("_")
    ]
    rec.tables["Mean detection AUROC over the targeted shifts (the choice)"] = [
        {
            "score": s,
            "mean AUROC": a,
            f"{chosen} minus this, 95% paired CI": results["_chosen"]["difference_ci"].get(s),
            "threshold (99% of val)": results["_chosen"]["thresholds_val"][s],
        }
        for s, a in results["_chosen"]["mean_auroc_targeted"].items()
    ]
    print(f"chosen score: {chosen} (threshold {spec.threshold:.4g} on val)")
    for row in rec.tables["Detection AUROC against hcd_test, accuracy and share flagged per shift"]:
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(f"aims: {met}")
    print(f"end to end: {withheld:.4f} of hcd_test withheld (not tissue / out of distribution) by the Predictor")
    rec.write()


if __name__ == "__main__":
    main()
