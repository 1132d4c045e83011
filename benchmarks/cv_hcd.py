"""Cross-validation and a fold ensemble of the CPU default on real patches.

Ingests ../shared/data/hcd into a temporary store, holds out one test split (split seed 0, 10%),
trains ``cpu-default`` on K folds of the other rows (``train --folds K``, each fold under a
wall-clock budget of --minutes-per-fold), and prints: the out-of-fold AUROC; on the held-out
test split, the K-member ensemble against the best single member chosen by its out-of-fold AUROC
(not its test score), with a paired bootstrap of the AUROC difference (95% interval), without and
with 8-way TTA; the error-detection AUROC of the ensemble's uncertainty against 1 - max probability,
and accuracy at 90% coverage against full coverage; wall time; and, with --serve-seconds, served
throughput of the ensemble against the best single member (bench_serve's client).

Run: python benchmarks/cv_hcd.py [--folds 5] [--minutes-per-fold 3] [--serve-seconds 10] [--store STORE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, add_json_option, finish, shared_or_exit
from histoscan.data.ingest import ingest
from histoscan.data.store import PatchStore
from histoscan.inference.predictor import Predictor
from histoscan.metrics import auroc
from histoscan.runfolder import RunFolder
from histoscan.training.config import TrainConfig, resolve_config_path
from histoscan.training.cv import ENSEMBLE_DIR, OOF_FILE, fold_dir, train_folds


def paired_bootstrap(labels: np.ndarray, a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0) -> tuple:
    """AUROC(a) - AUROC(b) on the same patches, and its 95% percentile interval over paired resamples."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[idx])) < 2:
            continue
        diffs.append(auroc(labels[idx], a[idx]) - auroc(labels[idx], b[idx]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return auroc(labels, a) - auroc(labels, b), float(lo), float(hi)


def error_detection(labels: np.ndarray, probs: np.ndarray, unc: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC of the uncertainty and of 1 - max probability for finding the errors; accuracy at 90% and 100% coverage."""
    from sklearn.metrics import roc_auc_score

    wrong = ((probs[:, 1] >= threshold).astype(int) != labels).astype(int)
    out = {"errors": float(wrong.sum())}
    if 0 < wrong.sum() < len(wrong):
        out["auroc_uncertainty"] = float(roc_auc_score(wrong, unc))
        out["auroc_1_minus_maxprob"] = float(roc_auc_score(wrong, 1 - probs.max(axis=1)))
    keep = np.argsort(unc, kind="stable")[: round(0.9 * len(unc))]
    out["accuracy_90"] = float(1 - wrong[keep].mean())
    out["accuracy_100"] = float(1 - wrong.mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--minutes-per-fold", type=float, default=3.0)
    ap.add_argument("--config", default="cpu-default")
    ap.add_argument("--store", default=None, help="reuse an ingested hcd store")
    ap.add_argument("--out", default=None, help="where to keep the runs (default: a temporary folder)")
    ap.add_argument("--serve-seconds", type=float, default=0.0, help="served throughput per model (0: skip)")
    add_json_option(ap)
    args = ap.parse_args()
    Recorder("cv_hcd", "Cross-validation and a fold ensemble of the CPU default on real patches", args.json).tee()
    started = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="histoscan-cv-")
    work = Path(args.out or tmp.name)
    store_path = Path(args.store) if args.store else ingest(shared_or_exit("hcd"), work / "store").store
    cfg = TrainConfig.from_yaml(
        resolve_config_path(args.config),
        {
            "data": str(store_path),
            "out": str(work / "runs"),
            "name": "cv",
            "folds": args.folds,
            "val": 0.1,
            "test": 0.1,
            "seed": 0,
            "max_time": f"{args.minutes_per_fold:g}m",
            "progress": False,
        },
    )
    result = train_folds(cfg, printer=lambda line: print(line) if line.startswith(("fold", "run ")) else None)
    trained = time.perf_counter() - started
    cv = result.cv_dir
    oof = pd.read_csv(cv / OOF_FILE)
    per_fold = {
        i: auroc(np.array([1 if v == "tumor" else 0 for v in f["label"]]), f[["prob_normal", "prob_tumor"]].to_numpy())
        for i, f in oof.groupby("fold")
    }
    best = max(per_fold, key=lambda i: per_fold[i])
    print(f"out-of-fold AUROC {result.summary['oof']['auroc']:.4f} on {len(oof)} patches (TTA x8)")
    print("per-fold OOF AUROC: " + ", ".join(f"{i}: {v:.4f}" for i, v in per_fold.items()) + f"; best member: {best}")
    ens_dir = cv / ENSEMBLE_DIR
    test, _ = RunFolder(ens_dir).select_patches(store_path, "test")
    ens, single = Predictor(ens_dir, backend="torch"), Predictor(fold_dir(cv, best), backend="torch")
    for tta in (False, True):
        pe, ps = ens.predict_store(test, tta), single.predict_store(test, tta)
        d, lo, hi = paired_bootstrap(test.labels, pe.probabilities, ps.probabilities)
        print(
            f"test ({len(test)} patches) {'TTA x8' if tta else 'no TTA'}: ensemble AUROC {auroc(test.labels, pe.probabilities):.4f}, "
            f"best member {auroc(test.labels, ps.probabilities):.4f}; difference {d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        )
        if pe.uncertainty is not None:
            e = error_detection(test.labels, pe.probabilities, pe.uncertainty, ens.threshold)
            print(
                f"  ensemble uncertainty ({args.folds} members x {8 if tta else 1} views): error-detection AUROC "
                f"{e.get('auroc_uncertainty', float('nan')):.4f} (1 - max prob: {e.get('auroc_1_minus_maxprob', float('nan')):.4f}); "
                f"accuracy at 90% coverage {e['accuracy_90']:.4f} vs {e['accuracy_100']:.4f} at full coverage "
                f"({int(e['errors'])} errors, threshold {ens.threshold:.4f})"
            )
    print(
        f"wall time: {trained / 60:.1f} min to train and collect, {(time.perf_counter() - started) / 60:.1f} min in all"
    )
    if args.serve_seconds > 0:
        from bench_serve import free_port, multipart_request, serve_and_load

        hcd = shared_or_exit("hcd")
        paths = sorted((hcd / "train").glob("*.tif"))[:256]
        for name, run in (("ensemble", ens_dir), (f"fold-{best}", fold_dir(cv, best))):
            port = free_port()
            requests = [multipart_request(port, p.name, p.read_bytes()) for p in paths]
            for clients, rate, p50, p99, errors, _ in serve_and_load(run, port, requests, args.serve_seconds, (16,)):
                print(
                    f"served {name}: {clients} clients, {rate:.1f} img/s, p50 {p50:.0f} ms, p99 {p99:.0f} ms, {errors} errors"
                )
    print(f"store {PatchStore(store_path).path}; runs {cv}")


if __name__ == "__main__":
    main()
    finish()
