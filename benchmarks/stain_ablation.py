"""Which op of the stain-medium preset costs the clean AUROC, and which buys the robustness? One op at a time.

``stain-medium`` re-stains each patch with three ops on top of ``light``: HED jitter (scale and shift),
noise on the patch's unit stain vectors, and a scale on its stain concentrations. This trains the
cpu-default of ``stain_hcd.py`` (same store, fixed split and time budget) with ``stain-medium`` reduced
to one op at a time (``hed``, ``matrix``, ``conc``: that op at medium strength, the others at zero),
and scores each run on the validation split, clean and under the stain-shift suite (IDC and LC25000
as stain donors), and on the test split, clean. Decisions belong on validation; the test figure is
printed to compare with ``stain_hcd.py``'s tables. ``--reference RUN ...`` scores finished runs
(for example ``stain_hcd.py``'s ``baseline-seed0`` and ``stain-aug-seed0``) the same way. Finished
runs in ``--out`` are reused, so a rerun only scores.

Run: python benchmarks/stain_ablation.py [--minutes 14] [--seeds 0] [--ops hed matrix conc]
     [--store STORE] [--out DIR] [--reference RUN ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, add_json_option, finish, shared_or_exit
from histoscan.inference.predictor import Predictor
from histoscan.metrics import auroc
from histoscan.runfolder import RunFolder
from histoscan.stain import augment
from histoscan.stain.shift import shift_suite, shifted_probabilities
from histoscan.training.fit import train
from stain_hcd import prepare, read_done, run_config

MEDIUM = augment.STAIN_STRENGTHS["medium"]
#: stain-medium reduced to one op: that op at medium strength, the others at zero
ONE_OP = {
    "hed": augment.StainStrength(MEDIUM.hed_scale, MEDIUM.hed_shift, 0.0, 0.0),
    "matrix": augment.StainStrength(0.0, 0.0, MEDIUM.matrix, 0.0),
    "conc": augment.StainStrength(0.0, 0.0, 0.0, MEDIUM.concentration),
}


@contextmanager
def medium_as(strength: augment.StainStrength) -> Iterator[None]:
    """Let the ``stain-medium`` preset mean ``strength`` while one run trains (in this process only)."""
    # the presets' strengths are a fixed table by design; an ablation is the one place that swaps a row
    augment.STAIN_STRENGTHS["medium"] = strength
    try:
        yield
    finally:
        augment.STAIN_STRENGTHS["medium"] = MEDIUM


def score(run: Path, store: Path, suite: list) -> dict[str, Any]:
    """Validation AUROC clean and per shift (with the worst in- and out-of-family drop), test AUROC clean."""
    predictor = Predictor(run)

    def predict(b: np.ndarray) -> np.ndarray:
        return predictor.predict_batch(b).probabilities

    val, _ = RunFolder(run).select_patches(store, "val")
    test, _ = RunFolder(run).select_patches(store, "test")
    clean = auroc(val.labels, shifted_probabilities(predict, val, None))
    drops = {s.name: clean - auroc(val.labels, shifted_probabilities(predict, val, s)) for s in suite}
    worst = {}
    for fam in ("in", "out"):
        name = max((s.name for s in suite if s.family == fam), key=lambda n: drops[n])
        worst[fam] = {"shift": name, "drop": drops[name]}
    rows = RunFolder(run).read_metrics()
    return {
        "val_clean": clean,
        "val_drop": drops,
        "val_worst_drop": worst,
        "test_clean": auroc(test.labels, shifted_probabilities(predict, test, None)),
        "epochs": len(rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=14.0, help="wall-clock budget per training run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--ops", nargs="*", default=list(ONE_OP), choices=list(ONE_OP), help="none: only score --reference")
    ap.add_argument("--store", default=None, help="reuse an ingested hcd store")
    ap.add_argument("--out", default="/tmp/stain-ablation", help="where runs and results go")
    ap.add_argument("--reference", nargs="*", default=[], help="finished runs to score alongside")
    add_json_option(ap)
    args = ap.parse_args()
    Recorder("stain_ablation", "Which stain-augmentation op costs the clean AUROC", args.json).tee()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store, split = prepare(out, args.store)
    suite = shift_suite([shared_or_exit("idc"), shared_or_exit("lc25000-lung")])
    runs = [Path(r) for r in args.reference]
    for seed in args.seeds:
        for op in args.ops:
            name = f"{op}-only-seed{seed}"
            run = out / name
            if not (run / "model.json").is_file() or not read_done(run):
                cfg = run_config({"augment": "stain-medium"}, store, out, name, seed, split, args.minutes)
                with medium_as(ONE_OP[op]):
                    train(cfg, printer=lambda line, n=name: print(f"[{n}] {line}", flush=True))
            runs.append(run)
    results = {}
    for run in runs:
        r = results[run.name] = score(run, store, suite)
        w = r["val_worst_drop"]
        print(
            f"{run.name:24s} val clean {r['val_clean']:.4f}  worst out-of-family drop {w['out']['drop']:+.4f} "
            f"({w['out']['shift']})  worst in-family {w['in']['drop']:+.4f} ({w['in']['shift']})  "
            f"test clean {r['test_clean']:.4f}  {r['epochs']} epochs",
            flush=True,
        )
        print("    val drops: " + "  ".join(f"{k} {v:+.3f}" for k, v in r["val_drop"].items()), flush=True)
    (out / "stain_ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out / 'stain_ablation.json'}")


if __name__ == "__main__":
    main()
    finish()
