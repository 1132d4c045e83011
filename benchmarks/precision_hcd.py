"""fp32 against bf16 on a trained run's test split: AUROC with a paired bootstrap interval, agreement, speed.

Takes a trained run (``--run``, e.g. the CPU default trained on an hcd store) and scores the held-out test
split of the store it trained on twice in one process, through the Predictor with the torch backend and the
run's deployed TTA views: once in fp32 and once under bf16 autocast. Prints and writes (``--json OUT``):

- ``auroc``: ``fp32``, ``bf16``, ``diff`` (bf16 - fp32) and ``ci``, the 95% paired bootstrap interval of the
  difference (the same resampled rows scored both ways);
- ``max_abs_prob_diff``: the largest difference of any probability between the two;
- ``agreement``: the share of images given the same class at the run's threshold;
- ``img_per_s``: the test split's images per second under each precision (best of ``--repeats``).

bf16 is what ``precision="auto"`` picks where the hardware computes it natively (``native_bf16``); on
hardware without it the figures still compare the numerics, but bf16 is emulated and slow.

Run: python benchmarks/precision_hcd.py --run RUN [--json OUT.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, add_json_option
from histoscan.inference.backends import native_bf16
from histoscan.inference.predictor import Predictor
from histoscan.inference.tta import tta_views
from histoscan.metrics import auroc, bootstrap_statistic
from histoscan.runfolder import RunFolder
from histoscan.system import hardware_id

PRECISIONS = ("fp32", "bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="a trained run (its test split is scored)")
    ap.add_argument("--data", default=None, help="the store (default: the one the run trained on)")
    ap.add_argument("--split", default=None, help="default: test on the run's own store")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per precision (the best counts)")
    ap.add_argument("--batch", type=int, default=256)
    add_json_option(ap)
    args = ap.parse_args()
    rec = Recorder("precision_hcd", "fp32 against bf16 on the default run's test split", args.json)
    run = RunFolder(args.run)
    part, split = run.select_patches(run.data_store(args.data), args.split)
    labels = part.labels

    probs: dict[str, np.ndarray] = {}
    rates: dict[str, float] = {}
    predictors: dict[str, Predictor] = {}
    for precision in PRECISIONS:
        predictors[precision] = Predictor(args.run, backend="torch", batch_size=args.batch, precision=precision)
    ks = tta_views(predictors["fp32"].bundle, None, "evaluate")  # the deployed views, the same for both
    for _ in range(args.repeats):  # interleaved, so a busy machine slows both alike
        for precision, predictor in predictors.items():
            started = time.perf_counter()
            probs[precision] = predictor.predict_store(part, ks).probabilities
            rate = len(part) / (time.perf_counter() - started)
            rates[precision] = max(rates.get(precision, 0.0), rate)

    a32, a16 = probs["fp32"], probs["bf16"]

    def paired(idx: np.ndarray) -> float:
        if len(np.unique(labels[idx])) < a32.shape[1]:
            return float("nan")  # a resample lacking a class has no AUROC
        return auroc(labels[idx], a16[idx]) - auroc(labels[idx], a32[idx])

    lo, hi = bootstrap_statistic(paired, len(labels), args.n_boot, seed=0)
    p = predictors["fp32"]
    same = float(np.mean(p.classify(a32) == p.classify(a16)))
    auc32, auc16 = auroc(labels, a32), auroc(labels, a16)
    figures = {
        "run": str(args.run),
        "split": split,
        "count": len(part),
        "tta_views": len(ks),
        "hardware": hardware_id("cpu"),
        "native_bf16": native_bf16(torch.device("cpu")),
        "auroc": {
            "fp32": round(auc32, 5),
            "bf16": round(auc16, 5),
            "diff": round(auc16 - auc32, 5),
            "ci": [round(lo, 5), round(hi, 5)],
        },
        "max_abs_prob_diff": round(float(np.abs(a16 - a32).max()), 5),
        "agreement": round(same, 5),
        "img_per_s": {k: round(v, 1) for k, v in rates.items()},
    }
    print(
        f"{args.run} {split} split ({len(part)} patches, {len(ks)} TTA views, {figures['hardware']}, native bf16 "
        f"{figures['native_bf16']}):\n"
        f"  AUROC fp32 {auc32:.4f}  bf16 {auc16:.4f}  bf16 - fp32 {auc16 - auc32:+.4f} "
        f"(95% paired bootstrap {lo:+.4f} .. {hi:+.4f})\n"
        f"  largest probability difference {figures['max_abs_prob_diff']:.4f}; same class for {same:.2%} of images\n"
        f"  images/s: fp32 {rates['fp32']:.0f}, bf16 {rates['bf16']:.0f} (bf16 / fp32 {rates['bf16'] / rates['fp32']:.2f})"
    )
    rec.figures.update(figures)
    rec.write()


if __name__ == "__main__":
    main()
