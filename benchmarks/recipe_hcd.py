"""Recipe round 3 (issue 40): train the candidates of benchmarks/PROTOCOL.md one at a time and compare them on
validation only; score the test split once, for the chosen recipe.

Every candidate is ``cpu-default`` with a few overrides (CANDIDATES below, as PROTOCOL.md section 2 lists
them), trained on the frozen split (``--store S``: ``S/splits/seed0-val0.1-test0.1-cal0.1.csv``) with
``--max-time`` 20 minutes. Each finished candidate x seed leaves ``OUT/candidates/<name>-s<seed>.json``: its
overrides, run folder, commit, epochs, median img/s, the load average sampled every 30 s (``busy`` when its
mean exceeds the cores + 0.5), and its validation probabilities and AUROC with and without 8-way TTA. A rerun
skips what is done, so the queue resumes after a stop (an interrupted training is set aside and run again:
a partial budget is not comparable).

  queue:    python benchmarks/recipe_hcd.py --store S --out OUT --queue screen      (PROTOCOL section 3)
            python benchmarks/recipe_hcd.py --store S --out OUT --queue finals
            python benchmarks/recipe_hcd.py --store S --out OUT --candidates wd smooth --seeds 0 1 2
  adopt:    python benchmarks/recipe_hcd.py --store S --out OUT --adopt RUN --candidate baseline --seed 0
  define:   python benchmarks/recipe_hcd.py --out OUT --define combo --set crop=96 weight_decay=0.05
  summary:  python benchmarks/recipe_hcd.py --out OUT --summary [--json OUT.json]    (validation rows only)
  final:    python benchmarks/recipe_hcd.py --store S --out OUT --final NAME            (the test split, once)
  retrain:  python benchmarks/recipe_hcd.py --store S --out OUT --retrain NAME --seeds 0  (weights gone: for --final)

A new machine keeps the committed records, not the run folders: ``--final`` needs every seed's weights, and
``--retrain`` trains a recorded candidate x seed again (same recipe, seed and budget) into
``runs/<name>-s<seed>-retrained``, its record in ``candidates/retrained/`` (which no comparison reads: the
decision stays on the original records; both validation figures are reported).

The compute match holds within one CPU model: every record names its ``cpu``, and a candidate's seed is compared
with the ``baseline`` of the same seed on the same CPU (``baseline-ctl`` is a seed-0 baseline); on a machine
with no such baseline the queue trains it first (``candidates/controls/`` when the seed has one elsewhere).

``--set`` adds overrides to every run of this call (e.g. a smoke: ``--minutes 0.5 --set limit_train_batches=3``);
they are recorded, and the summary names any candidate whose seeds ran with different ones.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, _cpu_model, _git_commit, add_json_option, finish, load_average, shared_or_exit
from histoscan.inference.predictor import Predictor
from histoscan.metrics import auroc, bootstrap_interval
from histoscan.runfolder import RunFolder
from histoscan.stain.shift import shift_suite, shifted_probabilities
from histoscan.training.config import TrainConfig, resolve_config_path
from histoscan.training.fit import train

SPLIT = "splits/seed0-val0.1-test0.1-cal0.1.csv"  # PROTOCOL section 1: histoscan split S --calibration 0.1
BASE_CONFIG = "cpu-default"
BASELINE = "baseline"
TTA = list(range(8))  # pinned: 8 dihedral views (other issues change the default)
N_BOOT = 2000
# PROTOCOL section 2, in the screen's order
CANDIDATES: dict[str, dict[str, Any]] = {
    BASELINE: {},
    "randcrop": {"random_crop": True},
    "crop96": {"crop": 96},
    "wd": {"weight_decay": 0.05},
    "smooth": {"label_smoothing": 0.1},
    "mixup": {"mixup": 0.2},
    "cutmix": {"cutmix": 1.0},
    "wider": {"model_args.filter_mult": 3},
    "deeper": {"model_args.num_blocks": 5},
    "stain-consist": {"augment": "stain-medium", "stain_consistency": 12.0},
    # added 2026-12-07 20:10 UTC, before any screen result (PROTOCOL.md, dated section): on a quiet machine
    # cpu-default's 80 epochs end after about 11 of the 20 minutes; this one lets the budget plan the epochs
    "long": {"max_epochs": 200},
}
# the order run (PROTOCOL section 3 and its dated change of 2026-12-07 20:10: randcrop had started; then the
# quiet control, long, the rest of the frozen order, and the drift control)
SCREEN = ["randcrop", BASELINE, "long", *[c for c in CANDIDATES if c not in (BASELINE, "randcrop", "long")],
          "baseline-ctl"]  # fmt: skip
# fields that make a recipe (everything else: where, what, how it is shown)
NOT_RECIPE = {"data", "out", "name", "seed", "split_file", "max_time", "progress", "resume", "num_workers", "threads"}


# ---- the round's folder ----------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(out: Path, store: Path | None) -> dict[str, Any]:
    """The round's manifest (OUT/manifest.json): written on first use, checked on every later use."""
    path = out / "manifest.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if store is not None and sha256(store / SPLIT) != saved["split_sha256"]:
            sys.exit(f"{store / SPLIT} differs from the round's split ({saved['split_file']}): not the frozen split")
        return saved
    if store is None:
        sys.exit(f"{out}: no manifest yet; give --store S (the store of PROTOCOL.md section 1)")
    if not (store / SPLIT).is_file():
        sys.exit(f"{store / SPLIT}: missing; make it with 'histoscan split {store} --calibration 0.1'")
    saved = {
        "store": str(store.resolve()),
        "split_file": str((store / SPLIT).resolve()),
        "split_sha256": sha256(store / SPLIT),
        "base_config": BASE_CONFIG,
        "commit_at_start": _git_commit(),
        "created": _now(),
    }
    out.mkdir(parents=True, exist_ok=True)
    _write(path, saved)
    return saved


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def overrides_of(out: Path, name: str) -> dict[str, Any]:
    """A candidate's overrides: PROTOCOL's list, or one defined for this round (``--define``: combo, fp32)."""
    if name == "baseline-ctl":
        return {}
    if name in CANDIDATES:
        return dict(CANDIDATES[name])
    defined = out / "defined" / f"{name}.json"
    if defined.is_file():
        return dict(json.loads(defined.read_text())["overrides"])
    sys.exit(f"unknown candidate {name!r}: one of {list(CANDIDATES)}, or define it with --define {name} --set ...")


def define(out: Path, name: str, overrides: dict[str, Any]) -> None:
    """Fix a new candidate's overrides once (a second definition must be the same)."""
    if name in CANDIDATES or name == "baseline-ctl":
        sys.exit(f"{name!r} is one of PROTOCOL's candidates; choose another name")
    path = out / "defined" / f"{name}.json"
    if path.is_file():
        if json.loads(path.read_text())["overrides"] != overrides:
            sys.exit(f"{path}: {name} is already defined with other overrides; the round does not redefine")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, {"name": name, "overrides": overrides, "defined": _now(), "commit": _git_commit()})
    print(f"defined {name}: {overrides}")


def config_for(
    name: str, seed: int, out: Path, man: dict[str, Any], minutes: float, extra: dict, run_name: str | None = None
) -> TrainConfig:
    values: dict[str, Any] = yaml.safe_load(resolve_config_path(BASE_CONFIG).read_text())
    for key, value in {**overrides_of(out, name), **extra}.items():
        if key.startswith("model_args."):
            values.setdefault("model_args", {})[key.split(".", 1)[1]] = value
        else:
            values[key] = value
    values.update(
        data=man["store"],
        split_file=man["split_file"],
        seed=seed,
        out=str(out / "runs"),
        name=run_name or f"{name}-s{seed}",
        max_time=f"{minutes:g}m",
        progress=False,
    )
    return TrainConfig.from_dict(values, source=f"candidate {name}")


def record_path(out: Path, name: str, seed: int, retrained: bool = False) -> Path:
    """A candidate x seed's record; ``retrained``: the record of its retraining (PROTOCOL, 2026-12-07 22:45)."""
    return out / "candidates" / ("retrained" if retrained else "") / f"{name}-s{seed}.json"


def weights_of(out: Path, name: str, seed: int, rec: dict[str, Any]) -> Path | None:
    """The finished run folder whose weights stand for ``name`` x ``seed``: the recorded run's, or its retraining's
    when the recorded one is gone (a new machine keeps the committed records, not the weights); None if neither."""
    for run_dir in (Path(rec["run_dir"]), out / "runs" / f"{name}-s{seed}-retrained"):
        if _finished(run_dir):
            return run_dir
    return None


# ---- one candidate x seed ----------------------------------------------------------------------------------
class LoadSampler:
    """The one-minute load average every ``every`` seconds while a run trains (in a thread)."""

    def __init__(self, every: float = 30.0) -> None:
        self.every, self.samples = every, [load_average()]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(load_average())

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(load_average())

    def summary(self) -> dict[str, Any]:
        cores = os.cpu_count() or 1
        mean = float(np.nanmean(self.samples))
        return {"load_mean": round(mean, 2), "load_max": round(float(np.nanmax(self.samples)), 2),
                "load_samples": len(self.samples), "busy": bool(mean > cores + 0.5)}  # fmt: skip


def _finished(run_dir: Path) -> bool:
    model = run_dir / "model.json"
    return model.is_file() and "epochs" in json.loads(model.read_text()).get("training", {})


def score_val(run_dir: Path, store: str) -> dict[str, Any]:
    """Validation AUROC (8-way TTA as pinned, and without) and the probabilities the summary bootstraps."""
    val, _ = RunFolder(run_dir).select_patches(store, "val")
    predictor = Predictor(run_dir, backend="torch", precision="fp32")
    out: dict[str, Any] = {
        "val_count": len(val),
        "val_ids_sha256": hashlib.sha256("\n".join(val.ids).encode()).hexdigest(),
    }
    for key, views in (("tta8", TTA), ("no_tta", [0])):
        p = predictor.predict_store(val, views).probabilities
        out[f"val_auroc_{key}"] = auroc(val.labels, p)
        out[f"val_p1_{key}"] = [round(float(v), 6) for v in p[:, 1]]
    out["val_labels"] = val.labels.astype(int).tolist()
    return out


def run_facts(run_dir: Path) -> dict[str, Any]:
    bundle = json.loads((run_dir / "model.json").read_text())
    rows = RunFolder(run_dir).read_metrics()
    speeds = [float(r["images_per_s"]) for r in rows if r.get("images_per_s")]
    return {
        "epochs": bundle["training"].get("epochs"),
        "train_seconds": bundle["training"].get("seconds"),
        "precision": bundle["training"].get("precision"),
        "best_epoch": bundle.get("best_metric", {}).get("epoch"),
        "best_weights": bundle.get("best_metric", {}).get("weights"),
        "images_per_s_median": round(float(np.median(speeds)), 1) if speeds else None,
        "planned_epochs_at_end": rows[-1].get("planned_epochs") if rows else None,
    }


def cpu_slug(cpu: str) -> str:
    """A CPU model as a file-name part: ``Intel(R) Xeon(R) Processor`` -> ``intel-r-xeon-r-processor``."""
    return re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")[:48] or "cpu"


def ensure_control(seed: int, out: Path, man: dict, minutes: float, busy: bool) -> None:
    """Train ``baseline`` at ``seed`` on this machine first when no baseline of that seed ran on this CPU label
    (PROTOCOL, 2026-12-07 23:53 and 2026-12-08 01:50); its record goes to ``candidates/controls/``."""
    cpu = _cpu_model()
    if busy or (seed, cpu) in controls(out):
        return
    print(f"[baseline-s{seed}] no baseline of seed {seed} on this CPU ({cpu}): training it first")
    if not record_path(out, BASELINE, seed).is_file():  # the seed's first baseline: the usual place
        run_one(BASELINE, seed, out, man, minutes, {}, False)
        return
    slug = cpu_slug(cpu)
    path = out / "candidates" / "controls" / f"{BASELINE}-s{seed}-{slug}.json"
    run_one(BASELINE, seed, out, man, minutes, {}, False, path=path, run_name=f"{BASELINE}-s{seed}-{slug}")


def run_one(
    name: str,
    seed: int,
    out: Path,
    man: dict,
    minutes: float,
    extra: dict,
    busy: bool,
    retrain: bool = False,
    path: Path | None = None,
    run_name: str | None = None,
) -> None:
    """Train ``name`` at ``seed`` and record it; ``retrain``: train a recorded candidate x seed whose weights are
    gone again, for ``--final`` only (its record goes to ``candidates/retrained/``, which no comparison reads).
    ``path`` and ``run_name``: where a control trained on another machine goes (``ensure_control``)."""
    path = path or record_path(out, name, seed, retrained=retrain)
    if path.is_file():
        print(f"[{name}-s{seed}] done already: {path}")
        return
    if not retrain and path == record_path(out, name, seed) and name not in (BASELINE, "baseline-ctl"):
        ensure_control(seed, out, man, minutes, busy)
    original: dict[str, Any] | None = None
    if retrain:
        recorded = record_path(out, name, seed)
        if not recorded.is_file():
            sys.exit(f"{recorded}: {name} seed {seed} was never recorded; train it with --candidates, not --retrain")
        original = json.loads(recorded.read_text())
        if original.get("adopted") or original.get("busy"):
            sys.exit(f"{recorded}: an adopted or busy record is not compared, so it is not retrained for --final")
        here = weights_of(out, name, seed, original)
        if here is not None:
            print(f"[{name}-s{seed}] its weights are here ({here}): no retraining")
            return
        extra = dict(original["extra_overrides"])  # the recorded recipe exactly, whatever this call's --set
        run_name = f"{name}-s{seed}-retrained"
    cfg = config_for(name, seed, out, man, minutes, extra, run_name=run_name)
    run_dir = Path(cfg.out) / str(cfg.name)
    if run_dir.exists() and not _finished(run_dir):  # an interrupted training: a partial budget is not comparable
        aside = run_dir.with_name(f"{run_dir.name}.interrupted-{int(time.time())}")
        run_dir.rename(aside)
        print(f"[{name}-s{seed}] an interrupted run was set aside ({aside}); training again")
    burner = None
    if busy:  # one CPU-bound process competing for the whole run (PROTOCOL section 3, step 5)
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with LoadSampler() as load:
            if not run_dir.exists():
                train(cfg, printer=lambda line: print(f"[{name}-s{seed}] {line}", flush=True))
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    retrains = {}
    if original is not None:
        keep = ("run_dir", "commit", "val_auroc_tta8")
        retrains = {"retrains": {"record": str(record_path(out, name, seed)), **{k: original[k] for k in keep}}}
    record = {
        "candidate": name,
        "seed": seed,
        "overrides": overrides_of(out, name),
        "extra_overrides": extra,
        "minutes": minutes,
        "run_dir": str(run_dir.resolve()),
        "commit": _git_commit(),
        "date": _now(),
        "adopted": False,
        "forced_busy": busy,
        "cpu": _cpu_model(),
        **retrains,
        **load.summary(),
        **run_facts(run_dir),
        **score_val(run_dir, man["store"]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, record)
    print(f"[{name}-s{seed}] val AUROC {record['val_auroc_tta8']:.4f} (TTA x8), {record['val_auroc_no_tta']:.4f} "
          f"(none); {record['epochs']} epochs, {record['images_per_s_median']} img/s, load {record['load_mean']}"
          f"{' BUSY' if record['busy'] else ''} -> {path}")  # fmt: skip


def adopt(run: Path, name: str, seed: int, out: Path, man: dict, minutes: float, busy: bool = False) -> None:
    """Record a run trained elsewhere on the frozen split (the lead's default-s{0,1,2}) as a candidate x seed."""
    path = record_path(out, name, seed)
    if path.is_file():
        sys.exit(f"{path}: {name} seed {seed} is recorded already")
    retired = path.parent / "adopted" / path.name
    if retired.is_file():  # PROTOCOL, 2026-12-07 20:10: adopted runs that were not compute-matched were set aside
        sys.exit(f"{retired}: an adopted {name} seed {seed} was set aside by the protocol; it is not adopted again")
    if not _finished(run):
        sys.exit(f"{run}: not a finished run (no training record in model.json)")
    if sha256(run / "split.csv") != man["split_sha256"]:
        sys.exit(f"{run}: trained on another split than the round's ({man['split_file']})")
    saved = TrainConfig.from_yaml(run / "config.yaml")
    want = config_for(name, seed, out, man, minutes, {})
    if saved.seed != seed:
        sys.exit(f"{run}: trained with seed {saved.seed}, not {seed}")
    differ = {
        k: (v, getattr(want, k)) for k, v in saved.to_dict().items() if k not in NOT_RECIPE and v != getattr(want, k)
    }
    if differ or saved.max_time_seconds != want.max_time_seconds:
        sys.exit(
            f"{run}: not candidate {name}'s recipe at {minutes:g} min: {differ or saved.max_time} (run, candidate)"
        )
    record = {
        "candidate": name,
        "seed": seed,
        "overrides": overrides_of(out, name),
        "extra_overrides": {},
        "minutes": minutes,
        "run_dir": str(run.resolve()),
        "commit": "adopted (trained outside this script)",
        "date": _now(),
        "adopted": True,
        "forced_busy": False,
        "load_mean": None,
        # not sampled here: --busy says the run was trained beside other work; else judge by images_per_s_median
        "busy": True if busy else None,
        **run_facts(run),
        **score_val(run, man["store"]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, record)
    print(f"adopted {run} as {name} seed {seed}: val AUROC {record['val_auroc_tta8']:.4f} (TTA x8) -> {path}")


# ---- the comparison (validation rows only) ------------------------------------------------------------------
def records(out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """Every candidate's records by seed (``candidates/*.json``; not the adopted, retrained or extra controls)."""
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted((out / "candidates").glob("*.json")):
        r = json.loads(path.read_text())
        by.setdefault(r["candidate"], {})[r["seed"]] = r
    return by


def controls(out: Path) -> dict[tuple[int, str], dict[str, Any]]:
    """The plain runs by (seed, CPU model): ``baseline``, ``baseline-ctl`` (a seed-0 baseline) and the baselines
    trained on another machine (``candidates/controls/``). PROTOCOL, 2026-12-07 23:53: a candidate's seed is
    compared with the baseline of the same seed on the same CPU model (the first such record when several)."""
    found: dict[tuple[int, str], dict[str, Any]] = {}
    for path in sorted((out / "candidates").glob("baseline-s*.json")) + sorted(
        (out / "candidates").glob("baseline-ctl-s*.json")
    ) + sorted((out / "candidates" / "controls").glob("*.json")):  # fmt: skip
        r = json.loads(path.read_text())
        if r["candidate"] in (BASELINE, "baseline-ctl") and not r.get("busy"):
            found.setdefault((r["seed"], cpu_of(r)), r)
    return found


def cpu_of(record: dict[str, Any]) -> str:
    """The CPU model a record trained on (PROTOCOL, 2026-12-07 23:53: every compared record names it)."""
    if not record.get("cpu"):
        raise SystemExit(f"{record['candidate']} seed {record['seed']}: the record names no CPU model ('cpu')")
    return str(record["cpu"])


def paired(cand: dict[int, dict], ctl: dict[tuple[int, str], dict]) -> tuple[dict[int, dict], dict[int, dict]]:
    """The candidate's seeds that have a same-machine baseline, and those baselines (by seed)."""
    keep = {s: r for s, r in cand.items() if (s, cpu_of(r)) in ctl}
    return keep, {s: ctl[(s, cpu_of(r))] for s, r in keep.items()}


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUROC of ``scores`` under each row of ``counts`` (bootstrap resamples as counts per row), vectorised.

    The Mann-Whitney form with weights: sum over positive i, negative j of w_i w_j [s_i > s_j] (ties 1/2) over
    the product of the classes' total weights; sorted once, every resample in one pass (2,000 resamples of
    691 rows in well under a second, where a loop over roc_auc_score takes tens of seconds).
    """
    order = np.argsort(scores, kind="mergesort")
    s, y, w = scores[order], labels[order], counts[:, order].astype(np.float64)
    pos, neg = w * (y == 1), w * (y != 1)
    _, start = np.unique(s, return_index=True)  # groups of tied scores
    below = np.concatenate([np.zeros((len(w), 1)), np.cumsum(neg, axis=1)], axis=1)[:, start]
    gpos, gneg = np.add.reduceat(pos, start, axis=1), np.add.reduceat(neg, start, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (gpos * (below + 0.5 * gneg)).sum(1) / (pos.sum(1) * neg.sum(1))


def compare(cand: dict[int, dict], base: dict[int, dict], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any] | None:
    """Paired comparison over the seeds both ran: per-seed differences, t-interval, bootstrap over validation rows."""
    seeds = sorted(set(cand) & set(base))
    if not seeds:
        return None
    labels = np.asarray(base[seeds[0]]["val_labels"])
    if any(cand[s]["val_ids_sha256"] != base[s]["val_ids_sha256"] for s in seeds):
        raise SystemExit("validation rows differ between candidate and baseline: not the frozen split")
    pc = np.array([cand[s]["val_p1_tta8"] for s in seeds])
    pb = np.array([base[s]["val_p1_tta8"] for s in seeds])
    d = np.array([cand[s]["val_auroc_tta8"] - base[s]["val_auroc_tta8"] for s in seeds])
    out: dict[str, Any] = {"seeds": seeds, "per_seed_delta": d.round(5).tolist(), "mean_delta": float(d.mean())}
    if len(seeds) >= 2:
        from scipy import stats

        half = float(stats.t.ppf(0.975, len(seeds) - 1) * d.std(ddof=1) / np.sqrt(len(seeds)))
        out["t_interval"] = [float(d.mean() - half), float(d.mean() + half)]
    counts = np.random.default_rng(seed).multinomial(len(labels), np.full(len(labels), 1 / len(labels)), size=n_boot)
    diffs = np.mean([weighted_auroc(pc[i], labels, counts) - weighted_auroc(pb[i], labels, counts)
                     for i in range(len(seeds))], axis=0)  # fmt: skip
    boots = diffs[np.isfinite(diffs)]  # a resample without one of the classes has no AUROC
    out["bootstrap_interval"] = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]
    return out


def summary(out: Path, json_out: Path | None) -> None:
    rec = Recorder("recipe_hcd", "Recipe round 3: candidates on validation (PROTOCOL.md)", json_out)
    rec.tee()
    by = records(out)
    if BASELINE not in by:
        sys.exit(f"{out}: no baseline recorded yet (the queue trains it first: --queue screen)")
    rows = []
    best = screen_best(by)
    ctl = controls(out)
    print(f"{'candidate':14s} {'seeds':7s} {'val AUROC (TTA x8)':>18s} {'delta':>8s} {'bootstrap 95%':>20s} "
          f"{'t 95% (seeds)':>20s} {'img/s':>6s}  busy  {'same-CPU d0':>11s}  decision")  # fmt: skip
    for name, seeds in sorted(by.items(), key=lambda kv: kv[0] != BASELINE):
        values = [seeds[s]["val_auroc_tta8"] for s in sorted(seeds)]
        same_cpu = compare(*paired(seeds, ctl)) if name not in (BASELINE, "baseline-ctl") else None
        screened = sorted(seeds) == [0] and name in CANDIDATES and name not in (BASELINE, "baseline-ctl")
        # the screen was ranked against baseline seed 0 as written (PROTOCOL, 23:20 and 23:53); the finals pair
        # every seed with the baseline of the same seed on the same CPU model
        cmp_ = compare(seeds, {0: by[BASELINE][0]}) if screened else same_cpu
        unpaired = sorted(set(seeds) - set(same_cpu["seeds"] if same_cpu else []))
        speed = np.median([seeds[s]["images_per_s_median"] or np.nan for s in seeds])
        busy = any(seeds[s].get("busy") for s in seeds)
        extras = {json.dumps(seeds[s]["extra_overrides"], sort_keys=True) for s in seeds}
        decision = decide(name, cmp_, busy, len(extras) > 1, best)
        if unpaired and not screened and name not in (BASELINE, "baseline-ctl"):
            decision += f" (seed(s) {unpaired}: no baseline of that seed on their CPU yet)"
        d0 = same_cpu["per_seed_delta"][same_cpu["seeds"].index(0)] if same_cpu and 0 in same_cpu["seeds"] else None
        rows.append({"candidate": name, "seeds": sorted(seeds), "cpu": sorted({seeds[s].get("cpu") or "?" for s in seeds}),
                     "val_auroc_tta8": values, "val_auroc_mean": float(np.mean(values)), "comparison": cmp_,
                     "same_cpu_d0": d0, "images_per_s": float(speed), "busy": busy, "decision": decision,
                     "val_auroc_no_tta_mean": float(np.mean([seeds[s]["val_auroc_no_tta"] for s in seeds]))})  # fmt: skip
        boot = cmp_["bootstrap_interval"] if cmp_ else None
        t = cmp_.get("t_interval") if cmp_ else None
        print(f"{name:14s} {','.join(map(str, sorted(seeds))):7s} {np.mean(values):18.4f} "
              f"{(cmp_['mean_delta'] if cmp_ else 0):+8.4f} "
              f"{f'[{boot[0]:+.4f}, {boot[1]:+.4f}]' if boot else '-':>20s} "
              f"{f'[{t[0]:+.4f}, {t[1]:+.4f}]' if t else '-':>20s} {speed:6.0f}  {'yes' if busy else 'no ':3s}   "
              f"{f'{d0:+.4f}' if d0 is not None else '-':>11s}  {decision}")  # fmt: skip
    rec.tables["candidates"] = rows
    retrained = [json.loads(q.read_text()) for q in sorted((out / "candidates" / "retrained").glob("*.json"))]
    if retrained:  # weights for --final only; listed so both validation figures are seen
        rec.tables["retrained for --final (not compared)"] = [
            {"candidate": r["candidate"], "seed": r["seed"], "val_auroc_tta8 recorded": r["retrains"]["val_auroc_tta8"],
             "val_auroc_tta8 retrained": r["val_auroc_tta8"], "images_per_s": r["images_per_s_median"],
             "busy": r["busy"]} for r in retrained
        ]  # fmt: skip
    rec.figures["final"] = json.loads((out / "final.json").read_text()) if (out / "final.json").is_file() else None
    rec.notes.append("validation rows only; the test split is scored once, by --final (figures.final)")


def screen_best(by: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """PROTOCOL section 4's screen: the three best candidates by d_0 with d_0 > 0 (stain-consist is not ranked)."""
    screened = []
    for name in CANDIDATES:
        if name in (BASELINE, "stain-consist") or 0 not in by.get(name, {}) or 0 not in by.get(BASELINE, {}):
            continue
        cmp_ = compare({0: by[name][0]}, {0: by[BASELINE][0]})  # as decided at 23:20 (PROTOCOL, 23:53)
        if cmp_ and cmp_["mean_delta"] > 0:
            screened.append((cmp_["mean_delta"], name))
    return [n for _, n in sorted(screened, reverse=True)[:3]]


def decide(name: str, cmp_: dict | None, busy: bool, mixed: bool, best: list[str] | None = None) -> str:
    """PROTOCOL section 4, as a word: what the rule says of this candidate now (``best``: the screen's three)."""
    if name == BASELINE:
        return "control"
    if name == "baseline-ctl":
        return "control (the machine's drift since the baseline)"
    if cmp_ is None:
        return "no paired baseline seed yet"
    if busy:
        return "busy: not compared (rerun quiet)"
    if mixed:
        return "seeds ran with different --set overrides: not compared"
    lo = cmp_["bootstrap_interval"][0]
    n = len(cmp_["seeds"])
    if n == 1 and name not in CANDIDATES:  # combo, fp32: finals-only candidates
        return "finals: 1 of 3 seeds"
    if n == 1:
        if name == "stain-consist":
            return "not ranked: to the finals for the stain aim"
        if cmp_["mean_delta"] <= 0:
            return "screen: stops (delta <= 0)"
        if best is not None and name not in best:
            return "screen: stops (delta > 0, not in the best three)"
        return "screen: advances (delta > 0)"
    if n < 3:
        return f"finals: {n} of 3 seeds"
    return "gain shown" if lo > 0 else "stopped: interval overlaps zero"


# ---- the test split, once ------------------------------------------------------------------------------------
def final(out: Path, name: str, man: dict, n_boot: int = 1000) -> None:
    started, done = out / "final.started", out / "final.json"
    for p in (started, done):
        if p.exists():
            sys.exit(f"{p}: the test split was already scored this round ({p.read_text().strip()[:200]}); "
                     "PROTOCOL section 5 allows it once")  # fmt: skip
    seeds = records(out).get(name, {})
    if len(seeds) < 3:
        sys.exit(f"{name}: {len(seeds)} seed(s) recorded; the test split is scored for a candidate with 3 seeds")
    weights = {s: weights_of(out, name, s, seeds[s]) for s in sorted(seeds)}
    lost = [s for s, w in weights.items() if w is None]
    if lost:  # checked before the test split counts as seen
        sys.exit(f"{name}: the weights of seed(s) {lost} are gone ({[seeds[s]['run_dir'] for s in lost]}); "
                 f"retrain them first: --retrain {name} --seeds {' '.join(map(str, lost))}")  # fmt: skip
    started.write_text(f"{name} {_now()} {_git_commit()}\n")  # from here on the test split counts as seen
    rec = Recorder("recipe_hcd_final", f"Recipe round 3: the test split, once ({name})", out / "final-envelope.json")
    rec.tee()
    result: dict[str, Any] = {"candidate": name, "seeds": sorted(seeds), "date": _now(), "commit": _git_commit(),
                              "run_dirs": {s: str(w) for s, w in weights.items()}}  # fmt: skip
    probs: dict[str, list[np.ndarray]] = {"tta8": [], "no_tta": []}
    shifted: dict[str, list[np.ndarray]] = {}
    suite = shift_suite([shared_or_exit("idc"), shared_or_exit("lc25000-lung")])
    labels = np.empty(0)
    for s in sorted(seeds):
        run_dir = weights[s]
        assert run_dir is not None
        test, _ = RunFolder(run_dir).select_patches(man["store"], "test")
        labels = test.labels
        predictor = Predictor(run_dir, backend="torch", precision="fp32")
        for key, views in (("tta8", TTA), ("no_tta", [0])):
            probs[key].append(predictor.predict_store(test, views).probabilities)

        def predict(batch: np.ndarray, p: Predictor = predictor) -> np.ndarray:
            return p.predict_batch(batch, [0]).probabilities

        for shift in suite:  # the stain-shift suite (evaluate --stain-shift's), without TTA
            shifted.setdefault(shift.name, []).append(shifted_probabilities(predict, test, shift))
    for key, ps in probs.items():
        per_seed = [auroc(labels, p) for p in ps]
        mean_p = np.mean(ps, axis=0)
        lo, hi = bootstrap_interval(labels, mean_p, n_boot, 0)
        result[key] = {"per_seed": per_seed, "mean": float(np.mean(per_seed)),
                       "seed_average_auroc": auroc(labels, mean_p), "seed_average_ci95": [lo, hi],
                       "accuracy_mean": float(np.mean([((p[:, 1] >= 0.5) == (labels == 1)).mean() for p in ps]))}  # fmt: skip
        print(f"test ({len(labels)} patches) {key}: AUROC per seed {[round(v, 4) for v in per_seed]}, mean "
              f"{np.mean(per_seed):.4f}; seed-averaged model {auroc(labels, mean_p):.4f} [{lo:.4f}, {hi:.4f}]")  # fmt: skip
    result["stain_shift"] = stain_drops(labels, probs["no_tta"], shifted, {sh.name: sh.family for sh in suite})
    worst = result["stain_shift"]["worst_out_of_family"]
    print(f"stain shifts (seed-averaged, no TTA): worst out-of-family drop {worst['drop']:+.4f} "
          f"[{worst['ci95'][0]:+.4f}, {worst['ci95'][1]:+.4f}] ({worst['shift']}); aim <= 0.01, upper end <= 0.015")  # fmt: skip
    result["aim"] = {"test_auroc_tta_mean_at_least": 0.97, "met": bool(result["tta8"]["mean"] >= 0.97)}
    print(f"aim (test AUROC with TTA, mean of 3 seeds >= 0.97): {'met' if result['aim']['met'] else 'MISSED'}")
    _write(done, result)
    rec.figures.update(result)


def stain_drops(
    labels: np.ndarray, clean: list[np.ndarray], shifted: dict[str, list[np.ndarray]], family: dict[str, str]
) -> dict[str, Any]:
    """Each shift's AUROC drop from clean (seed-averaged probabilities) and the worst out-of-family one, with a
    paired 95% bootstrap interval over test rows."""
    clean_p = np.mean(clean, axis=0)[:, 1]
    base = auroc(labels, np.mean(clean, axis=0))
    drops = {name: base - auroc(labels, np.mean(ps, axis=0)) for name, ps in shifted.items()}
    out_names = [n for n in drops if family[n] == "out"]
    worst = max(out_names, key=lambda n: drops[n])
    counts = np.random.default_rng(0).multinomial(len(labels), np.full(len(labels), 1 / len(labels)), size=N_BOOT)
    boot = weighted_auroc(clean_p, labels, counts) - weighted_auroc(
        np.mean(shifted[worst], axis=0)[:, 1], labels, counts
    )
    boot = boot[np.isfinite(boot)]
    return {"clean_auroc_no_tta": base, "drops": drops, "family": family,
            "worst_out_of_family": {"shift": worst, "drop": drops[worst],
                                    "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]}}  # fmt: skip


# ---- the command ------------------------------------------------------------------------------------------
def queue(args: argparse.Namespace, out: Path) -> list[tuple[str, int]]:
    if args.queue == "screen":
        return [(c, 0) for c in SCREEN]
    if args.queue == "finals":
        best = screen_best(records(out))
        print(f"finals: the screen's best with delta > 0: {best or 'none'}; combo and stain-consist at seeds 1, 2")
        if not (out / "defined" / "combo.json").is_file():
            print("note: combo is not defined yet (--define combo --set ...): left out of this queue")
        combo = ["combo"] if (out / "defined" / "combo.json").is_file() else []
        return ([(BASELINE, s) for s in (1, 2)] + [(n, s) for n in best for s in (1, 2)]
                + [(c, s) for c in combo for s in (0, 1, 2)]
                + [("stain-consist", s) for s in (1, 2)])  # fmt: skip
    return [(c, s) for c in args.candidates for s in args.seeds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the round's folder (manifest, runs, candidates)")
    ap.add_argument("--store", type=Path, default=None, help="the store of PROTOCOL section 1 (with its split)")
    ap.add_argument("--minutes", type=float, default=20.0, help="training budget per run (PROTOCOL: 20)")
    ap.add_argument("--queue", choices=["screen", "finals"], default=None)
    ap.add_argument("--candidates", nargs="+", default=[])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--busy", action="store_true", help="run beside one CPU-bound process (the busy run); with --adopt: it was busy"
    )
    ap.add_argument("--set", nargs="*", default=[], help="overrides key=YAML for every run of this call")
    ap.add_argument("--adopt", type=Path, default=None, metavar="RUN")
    ap.add_argument("--candidate", default=BASELINE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--define", default=None, metavar="NAME", help="fix a new candidate: --define NAME --set k=v ...")
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--final", default=None, metavar="CANDIDATE")
    ap.add_argument(
        "--retrain", default=None, metavar="CANDIDATE",
        help="train the --seeds of a recorded candidate whose weights are gone again, for --final only",
    )  # fmt: skip
    add_json_option(ap)
    args = ap.parse_args()
    out: Path = args.out
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.define:
        define(out, args.define, extra)
        return
    if args.summary:
        summary(out, args.json)
        return
    man = manifest(out, args.store)
    if args.final:
        final(out, args.final, man)
        return
    if args.adopt:
        adopt(args.adopt, args.candidate, args.seed, out, man, args.minutes, args.busy)
        return
    if args.retrain:
        for seed in args.seeds:
            run_one(args.retrain, seed, out, man, args.minutes, extra, args.busy, retrain=True)
        return
    todo = queue(args, out)
    if not todo:
        sys.exit("nothing to run: give --queue screen|finals, or --candidates NAME ... [--seeds ...]")
    print(f"queue ({len(todo)} runs, one at a time, {args.minutes:g} min each): {todo}")
    for name, seed in todo:
        run_one(name, seed, out, man, args.minutes, extra, args.busy)


if __name__ == "__main__":
    main()
    finish()
