"""What the stain of a patch says about its label on HCD, and whether the stain-aware models give it up.

On ../shared/data/hcd every stain-aware model of ``stain_hcd.py`` scores below the baseline on clean
test patches. Two readings: the stain carries real tissue signal (a patch full of tumour nuclei takes
up more haematoxylin), or it carries a shortcut (HCD's patches come from a few hundred slides, a random
split puts patches of one slide on both sides, and slides differ both in stain and in how many tumour
patches they hold). Augmentation and normalisation remove some of either. This script measures, on
the split ``stain_hcd.py`` used:

1. **Stain-only classifiers.** Per patch, the Macenko stain matrix (the directions of haematoxylin and
   eosin in optical density; 6 numbers) and the white point (the 99th percentile of each RGB channel).
   A k-nearest-neighbour classifier and a gradient-boosted one, trained on the training split, scored
   on the test split (95% bootstrap intervals).
2. **Does the stain add to a model?** With ``--results`` holding ``stain_hcd_probabilities.npz``: on
   the test patches, a logistic regression of the label on a model's logit, with and without the
   stain-only score (gradient boosting, both feature sets), cross-fitted (5 folds, 20 shuffles: every
   AUROC is of held-out predictions). A stain-aware model that gave the stain's information up gains
   more from it than the baseline does.
3. **A control with patients** (``--idc``): HCD gives no slide ids, so the two readings cannot be told
   apart there. ../shared/data/idc gives the patient: the same stain-only classifier is scored on
   patches of held-out patients (tissue signal only) and on a random split of patches (tissue signal
   and the patient shortcut), 20% held out, 5 draws each.

Run: python benchmarks/stain_shortcut.py --results DIR [--idc]   (DIR holds store/, split.csv and
stain_hcd_probabilities.npz from ``stain_hcd.py --out DIR``; the IDC store is ingested into DIR/idc-store)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, add_json_option, finish, shared_or_exit
from histoscan.data.ingest import ingest
from histoscan.data.splits import read_split
from histoscan.data.store import META_FILE, PatchStore
from histoscan.metrics import auroc, bootstrap_interval
from histoscan.stain.colour import optical_density
from histoscan.stain.estimate import macenko, sample_pixels

#: patches per estimation batch
BATCH = 512


def stain_features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (a memory map is read one batch at a time): the Macenko stain matrix (6 numbers) and the white point (3); and the estimate's validity."""
    feats, ok = [], []
    for start in range(0, len(images), BATCH):
        pixels = sample_pixels(torch.from_numpy(np.array(images[start : start + BATCH]))).float()
        est = macenko(optical_density(pixels))
        white = torch.quantile(pixels, 0.99, dim=1) / 255.0
        feats.append(torch.cat([est.stain_matrix.reshape(len(pixels), 6), white], dim=1).numpy())
        ok.append(est.ok.numpy())
    return np.concatenate(feats), np.concatenate(ok)


def as_probabilities(scores: np.ndarray) -> np.ndarray:
    """Scores of class 1 as the N x 2 layout histoscan's metrics take (any monotone score ranks the same)."""
    return np.column_stack([-scores, scores])


def logit(p: np.ndarray) -> np.ndarray:
    """Log-odds, clipped away from 0 and 1."""
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def cross_fitted_auroc(labels: np.ndarray, x: np.ndarray, repeats: int = 20) -> float:
    """Mean AUROC of held-out logistic-regression predictions (5 folds, ``repeats`` shuffles)."""
    values = []
    for r in range(repeats):
        held_out = np.empty(len(labels))
        for fit_rows, test_rows in StratifiedKFold(5, shuffle=True, random_state=r).split(x, labels):
            model = LogisticRegression().fit(x[fit_rows], labels[fit_rows])
            held_out[test_rows] = model.decision_function(x[test_rows])
        values.append(auroc(labels, as_probabilities(held_out)))
    return float(np.mean(values))


def patient_control(res: Path, draws: int = 5) -> None:
    """Stain-only AUROC on IDC: held-out patients against a random split of patches."""
    idc = res / "idc-store"
    store = PatchStore(idc if (idc / META_FILE).is_file() else ingest(shared_or_exit("idc"), idc).store)
    if store.groups is None:
        sys.exit(f"{store.path}: no patient groups; the control needs them")
    feats, _ = stain_features(store.images)
    labels, groups = store.labels.astype(int), store.groups
    patients = len(np.unique(groups))
    print(f"\nIDC control: {len(store)} patches of {patients} patients; gradient boosting, both feature sets")
    splitters = {
        "held-out patients": GroupShuffleSplit(draws, test_size=0.2, random_state=0),
        "random patches": ShuffleSplit(draws, test_size=0.2, random_state=0),
    }
    for name, splitter in splitters.items():
        values = []
        by = groups if isinstance(splitter, GroupShuffleSplit) else None
        for fit_rows, test_rows in splitter.split(feats, labels, by):
            model = HistGradientBoostingClassifier(max_iter=200, random_state=0).fit(feats[fit_rows], labels[fit_rows])
            values.append(auroc(labels[test_rows], model.predict_proba(feats[test_rows])))
        print(f"stain-only AUROC, {name:18s} {np.mean(values):.4f} (draws {', '.join(f'{v:.3f}' for v in values)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="the --out folder of stain_hcd.py")
    ap.add_argument("--neighbours", type=int, default=25)
    ap.add_argument("--idc", action="store_true", help="also the patient-split control on ../shared/data/idc")
    add_json_option(ap)
    args = ap.parse_args()
    Recorder("stain_shortcut", "What the stain of a patch says about its label", args.json).tee()
    res = Path(args.results)
    store = PatchStore(res / "store")
    split = read_split(res / "split.csv", store)
    feats, ok = stain_features(store.images)
    labels = store.labels.astype(int)
    train, test = split == "train", split == "test"
    print(f"{len(store)} patches: a stain estimate for {int(ok.sum())}, none for {int((~ok).sum())} (kept as they are)")
    print(f"train {int(train.sum())}, test {int(test.sum())} patches; tumour fraction {labels.mean():.3f}\n")

    models = {
        f"{args.neighbours}-nearest neighbours": make_pipeline(
            StandardScaler(), KNeighborsClassifier(args.neighbours, weights="distance")
        ),
        "gradient boosting": HistGradientBoostingClassifier(max_iter=200, random_state=0),
    }
    scores = {}
    for name, model in models.items():
        for cols, what in ((slice(0, 6), "stain matrix"), (slice(6, 9), "white point"), (slice(0, 9), "both")):
            model.fit(feats[train][:, cols], labels[train])
            s = model.predict_proba(feats[test][:, cols])[:, 1]
            value = auroc(labels[test], as_probabilities(s))
            lo, hi = bootstrap_interval(labels[test], as_probabilities(s))
            print(f"stain-only AUROC, {name:24s} {what:13s} {value:.4f} [{lo:.4f}, {hi:.4f}]")
            scores[(name, what)] = s
    prior = logit(np.clip(scores[("gradient boosting", "both")], 1e-4, 1 - 1e-4))

    if args.idc:
        patient_control(res)
    probs_path = res / "stain_hcd_probabilities.npz"
    if not probs_path.is_file():
        return
    data = np.load(probs_path)
    y = data["labels"].astype(int)
    if len(y) != int(test.sum()) or not np.array_equal(y, labels[test]):
        sys.exit(f"{probs_path}: its test labels do not match {res / 'split.csv'}")
    variants = sorted({k.split("/")[0] for k in data.files if k != "labels"})
    print("\nclean test patches, cross-fitted logistic regression on a model's logit (mean over seeds)")
    print("(the gain is against the model's logit alone, cross-fitted the same way: pooling folds costs a little)")
    print(f"{'variant':16s} {'model':>8s} {'alone':>8s} {'+ stain':>8s} {'gain':>8s}")
    for v in variants:
        seeds = sorted(int(k.split("/")[2]) for k in data.files if k.startswith(f"{v}/clean/"))
        plain, alone, both = [], [], []
        for s in seeds:
            z = logit(data[f"{v}/clean/{s}"][:, 1])
            plain.append(auroc(y, as_probabilities(z)))
            alone.append(cross_fitted_auroc(y, z[:, None]))
            both.append(cross_fitted_auroc(y, np.column_stack([z, prior])))
        m, a, b = (float(np.mean(x)) for x in (plain, alone, both))
        print(f"{v:16s} {m:8.4f} {a:8.4f} {b:8.4f} {b - a:+8.4f}")


if __name__ == "__main__":
    main()
    finish()
