"""Architecture search on real patches: TPE + Hyperband pruning against random search without pruning.

Runs the shipped ``nas`` space on ../shared/data/hcd (fixed split, seed 0) for ``--minutes`` of wall
clock with TPE sampling and Hyperband pruning, then spends the same budget on random search with no
pruning, and prints trials completed / pruned / failed and the best validation AUROC of each, side by side.

Run: python benchmarks/tune_hcd.py [--minutes 30] [--set max_epochs=6 ...] [--store STORE] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, add_json_option, finish, shared_or_exit
from histoscan.data.ingest import ingest
from histoscan.tuning.study import TuneSettings, tune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="budget per strategy")
    ap.add_argument("--space", default="nas")
    ap.add_argument("--store", default=None, help="reuse an ingested hcd store")
    ap.add_argument("--out", default=None, help="keep the studies here (default: a temporary folder)")
    ap.add_argument("--set", nargs="*", default=[], help="training overrides key=value (YAML values)")
    add_json_option(ap)
    args = ap.parse_args()
    Recorder("tune_hcd", "Tuning: TPE + Hyperband against random search", args.json).tee()
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        store = Path(args.store) if args.store else ingest(shared_or_exit("hcd"), root / "hcd-store", force=True).store
        rows = []
        for label, sampler, pruner in (
            ("TPE + Hyperband", "tpe", "hyperband"),
            ("random, no pruning", "random", "none"),
        ):
            started = time.perf_counter()
            r = tune(
                TuneSettings(
                    data=str(store),
                    space=args.space,
                    trials=10_000,
                    timeout=f"{args.minutes:g}m",
                    study=f"{sampler}-{pruner}",
                    out=str(root / "studies"),
                    sampler=sampler,
                    pruner=pruner,
                    overrides=overrides,
                ),
                printer=print,
            )
            rows.append((label, r, time.perf_counter() - started))
        print(f"\n{args.space} space on {store} ({args.minutes:g} minutes each, 2 cores):")
        for label, r, seconds in rows:
            print(
                f"  {label:20s} complete {r.counts['complete']:3d}  pruned {r.counts['pruned']:3d}  failed {r.counts['fail']:2d}  "
                f"best val AUROC {r.best_value if r.best_value is not None else float('nan'):.4f}  ({seconds / 60:.1f} min)"
            )


if __name__ == "__main__":
    main()
    finish()
