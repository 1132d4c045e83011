"""Knowing when not to answer, on real patches: error detection, accuracy at coverage, referral, tissue check.

Takes a trained hcd run (``--run``; train one with e.g. ``histoscan train --config cpu-default --max-time 5m``),
fits the referral rule (``--refer-coverage``, default 0.9) and the tissue check on it as
``histoscan calibrate`` does, evaluates its held-out test split through the Predictor under the rule's TTA
policy, and prints: the error-detection AUROC of the uncertainty (spread over the 8 dihedral views) next to
the plain baseline 1 - max probability and the probability margin, accuracy at 80/90/95% coverage against
full coverage, the coverage achieved against the coverage asked for (95% bootstrap intervals), and the
share of hcd test, idc and LC25000 patches the tissue check accepts.

Run: python benchmarks/trust_hcd.py --run RUN [--refer-coverage 0.9] [--refer-by auto]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import shared_or_exit
from histoscan.bundle import read_bundle
from histoscan.data.imageio import read_image
from histoscan.evaluation.evaluate import evaluate_run
from histoscan.rules.referral import describe
from histoscan.rules.tissue import check_images
from histoscan.trust.calibrate import fit_run_referral
from histoscan.trust.scoring import trust_lines
from histoscan.trust.tissue import fit_run_tissue_check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run trained on an hcd store (it is copied, not changed)")
    ap.add_argument("--refer-coverage", type=float, default=0.9)
    ap.add_argument("--refer-by", default="auto")
    ap.add_argument("--others", type=int, default=600, help="idc / LC25000 patches checked by the tissue check")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="histoscan-trust-"))
    run = Path(shutil.copytree(args.run, work / Path(args.run).name))
    started = time.perf_counter()
    rule = fit_run_referral(run, coverage=args.refer_coverage, by=args.refer_by)
    print("error-detection AUROC on validation:", {k: round(v, 4) for k, v in rule.error_auroc.items()})
    print(describe(rule))
    check = fit_run_tissue_check(run)
    print(f"tissue check: {check.count} training patches, distance limit {check.threshold:.2f}")
    r = evaluate_run(run, backend="torch", n_boot=1000)
    trust = r.metrics["trust"]
    print(f"test split of {r.store} ({r.metrics['count']} patches, AUROC {r.metrics['auroc']:.4f}):")
    for line in trust_lines(trust):
        print(line)
    tissue = trust["tissue_check"]
    print(
        f"  tissue check on the hcd test split: {1 - tissue['flagged'] / tissue['count']:.4f} accepted {tissue['flags']}"
    )
    bundle = read_bundle(run)
    for name in ("idc", "lc25000-lung"):
        root = shared_or_exit(name)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        random.Random(0).shuffle(files)
        verdict = check_images(check, bundle.preprocessing, [read_image(f).pixels for f in files[: args.others]])
        print(f"  tissue check on {name} ({len(verdict.quality)} patches): {verdict.accepted.mean():.4f} accepted")
    print(f"wall time {time.perf_counter() - started:.0f} s; report: {r.out / 'report.html'}")


if __name__ == "__main__":
    main()
