"""Quality of the CPU default on real patches, under a wall-clock budget.

Trains the shipped ``cpu-default`` config (or --config) from scratch on ../shared/data/hcd with a
fixed split (split seed 0, 80/10/10, the same for every --seed) under a time budget (default 20
minutes: the schedule is re-planned each epoch to end annealed at the deadline), then prints, for
the saved best weights, validation and held-out test AUROC with 95% bootstrap intervals, with and
without 8-way dihedral TTA, the epochs completed against the plan and the last learning rate.
Aim (issue 18): test AUROC >= 0.955 with TTA, mean of 3 seeds, 20 minutes each on 2 cores.

Run: python benchmarks/quality_hcd.py [--minutes 20] [--seed 0] [--config cpu-default] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, add_json_option, finish, shared_or_exit
from histoscan.bundle import read_bundle
from histoscan.data.ingest import ingest
from histoscan.data.splits import split_store
from histoscan.data.store import PatchStore
from histoscan.inference.predictor import Predictor
from histoscan.metrics import auroc, bootstrap_interval
from histoscan.runfolder import RunFolder
from histoscan.training.config import TrainConfig, resolve_config_path
from histoscan.training.fit import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0, help="training seed (the split stays seed 0)")
    ap.add_argument("--config", default="cpu-default")
    ap.add_argument("--store", default=None, help="reuse an ingested hcd store")
    ap.add_argument("--out", default=None, help="where to keep the run (default: a temporary folder)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value (YAML values)")
    add_json_option(ap)
    args = ap.parse_args()
    Recorder("quality_hcd", "Quality of the CPU default on real patches under a time budget", args.json).tee()
    tmp = tempfile.TemporaryDirectory(prefix="histoscan-quality-")
    work = Path(args.out or tmp.name)
    store_path = Path(args.store) if args.store else ingest(shared_or_exit("hcd"), work / "store").store
    store = PatchStore(store_path)
    parts, split_path = split_store(store, val=0.1, test=0.1, seed=0)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    overrides.update(
        data=str(store_path),
        out=str(work / "runs"),
        name=f"quality-s{args.seed}-{int(time.time())}",
        seed=args.seed,
        split_file=str(split_path),
        max_time=f"{args.minutes:g}m",
        progress=False,
    )
    cfg = TrainConfig.from_yaml(resolve_config_path(args.config), overrides)
    print(f"config: {args.config} + {overrides}")
    result = train(cfg)
    rows = RunFolder(result.run_dir).read_metrics()
    bundle = read_bundle(result.run_dir)
    last = rows[-1]
    print(
        f"epochs: {len(rows)} in {result.seconds / 60:.1f} min (plan at the end: {last['planned_epochs']}); "
        f"last lr {float(last['lr']):.2e} (peak {cfg.lr:.2e}); mean train throughput "
        f"{np.mean([float(r['images_per_s']) for r in rows]):.0f} img/s; precision {bundle.training.get('precision')}"
    )
    print(f"best epoch {bundle.best_metric.get('epoch')} ({bundle.best_metric.get('weights')} weights)")
    predictor = Predictor(result.run_dir, backend="torch")
    for split in ("val", "test"):
        part = parts[split]
        for tta in (False, True):
            p = predictor.predict_store(part, tta).probabilities
            lo, hi = bootstrap_interval(part.labels, p, n_boot=1000, seed=0)
            acc = float(((p[:, 1] >= 0.5) == (part.labels == 1)).mean())
            print(
                f"{split:4s} ({len(part)} patches) {'TTA x8' if tta else 'no TTA'}: AUROC {auroc(part.labels, p):.4f} "
                f"[{lo:.4f}, {hi:.4f}], accuracy {acc:.4f}"
            )
    print(f"run folder: {result.run_dir}")


if __name__ == "__main__":
    main()
    finish()
