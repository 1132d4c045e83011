"""Quality of the CPU default on real patches.

Trains the shipped ``cpu-default`` config (or --config) from scratch on ../shared/data/hcd with a
fixed split (seed 0, 80/10/10) under a wall-clock budget (default 20 minutes), then prints the best
validation AUROC and accuracy and the held-out test AUROC of the best weights.
Aim: validation AUROC >= 0.95 on this 2-core machine.

Run: python benchmarks/quality_hcd.py [--minutes 20] [--config cpu-default] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from sklearn.metrics import accuracy_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import shared_or_exit
from histoscan.data.ingest import ingest
from histoscan.data.splits import read_split
from histoscan.data.store import PatchStore
from histoscan.inference.predictor import Predictor
from histoscan.training.config import TrainConfig, resolve_config_path
from histoscan.training.fit import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--config", default="cpu-default")
    ap.add_argument("--store", default=None, help="reuse an ingested hcd store")
    ap.add_argument("--out", default=None, help="where to keep the run (default: a temporary folder)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value (YAML values)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="histoscan-quality-")
    work = Path(args.out or tmp.name)
    store_path = Path(args.store) if args.store else ingest(shared_or_exit("hcd"), work / "store").store
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    overrides.update(
        data=str(store_path),
        out=str(work / "runs"),
        name=f"quality-{int(time.time())}",
        seed=0,
        val=0.1,
        test=0.1,
        max_time=f"{args.minutes:g}m",
        progress=False,
    )
    cfg = TrainConfig.from_yaml(resolve_config_path(args.config), overrides)
    print(f"config: {args.config} + {overrides}")
    result = train(cfg)
    with (result.run_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    best = max(rows, key=lambda r: float(r["val_auroc"]))
    store = PatchStore(store_path)
    split = read_split(result.run_dir / "split.csv", store)
    test = store.subset(np.flatnonzero(split == "test"))
    probs = Predictor(result.run_dir, backend="torch").predict_store(test).probabilities[:, 1]
    print(
        f"epochs: {len(rows)} in {result.seconds / 60:.1f} min; mean train throughput "
        f"{np.mean([float(r['images_per_s']) for r in rows]):.0f} img/s"
    )
    print(
        f"best epoch {best['epoch']}: val AUROC {float(best['val_auroc']):.4f}, val accuracy {float(best['val_acc']):.4f}"
    )
    print(
        f"test (held out, {len(test)} patches): AUROC {roc_auc_score(test.labels, probs):.4f}, "
        f"accuracy {accuracy_score(test.labels, probs >= 0.5):.4f}"
    )
    print(f"run folder: {result.run_dir}")


if __name__ == "__main__":
    main()
