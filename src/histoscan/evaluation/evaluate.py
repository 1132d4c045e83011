"""``histoscan evaluate``: score a run on a labelled split through the Predictor and write its report."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscan import __version__
from histoscan.bundle import ModelBundle, read_bundle
from histoscan.data.store import PatchStore
from histoscan.errors import ConfigError, DataError
from histoscan.evaluation.report import write_evaluation
from histoscan.inference.predictor import Prediction, Predictor
from histoscan.inference.settings import PredictorSettings
from histoscan.inference.tta import tta_views
from histoscan.metrics import THRESHOLD_RULES, compute_metrics, pick_threshold
from histoscan.rules.answers import UNCHECKED, policy_views
from histoscan.rules.tissue import OK
from histoscan.runfolder import EVAL_DIR, FitRecord, RunFolder  # noqa: F401  (EVAL_DIR: imported from here before runfolder)
from histoscan.stain.groups import stain_group_names
from histoscan.stain.shift import Shift, shift_suite, stain_shift_report


@dataclass
class EvaluationResult:
    """Where the report is, what was scored and the metrics."""

    out: Path
    metrics: dict[str, Any]
    split: str
    store: Path
    saved_threshold: float | None = None
    notices: list[str] = field(default_factory=list)  # fitted quantities fitted under another predictor

    def lines(self, run_dir: str | Path, save_threshold: str | None = None) -> list[str]:
        """What ``histoscan evaluate`` prints.

        What ``histoscan evaluate`` prints: the saved threshold, the headline metrics, trust and stain-shift
        lines and where the report is.
        """
        from histoscan.evaluation.report import headline
        from histoscan.stain.shift import shift_lines
        from histoscan.trust.scoring import trust_lines

        out = list(self.notices)
        if self.saved_threshold is not None:
            out.append(
                f"threshold {self.saved_threshold:.4f} ({save_threshold}, chosen on the validation split) saved in "
                f"{Path(run_dir) / 'model.json'}"
            )
        out.append(f"{self.split} split of {self.store}:")
        for k, v in headline(self.metrics).items():
            out.append(f"  {k:20s} {v:.4f}" if isinstance(v, float) else f"  {k:20s} {v}")
        if "trust" in self.metrics:
            out += trust_lines(self.metrics["trust"])
        if "stain_shift" in self.metrics:
            out += shift_lines(self.metrics["stain_shift"])
        out.append(f"report: {self.out / 'report.html'}")
        return out


def choose_threshold(
    predictor: Predictor,
    run_dir: Path,
    store_path: Path,
    rule: str,
    target: float,
    views: Sequence[int] | None = None,
) -> tuple[float, FitRecord]:
    """Choose a decision threshold on data the run did not score.

    A decision threshold chosen on the run's validation split, or an ensemble of folds' out-of-fold predictions
    (``fitting_predictions``; never on the split being reported).
    """
    from histoscan.inference.fitting import fitting_predictions

    if rule not in THRESHOLD_RULES:
        raise ConfigError(f"--save-threshold {rule!r} is not one of {list(THRESHOLD_RULES)}")
    if predictor.bundle.task != "binary":
        raise ConfigError("a decision threshold applies to binary models; multi-class models predict the argmax")
    fit = fitting_predictions(run_dir, views, store_path)
    return pick_threshold(fit.labels, fit.probabilities[:, 1], rule, target, fit.source), fit.record


def evaluate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    *,
    split: str | None = None,
    tta: bool | None = None,
    target_sensitivities: Sequence[float] = (0.95,),
    save_threshold: str | None = None,
    out: str | Path | None = None,
    backend: str = "auto",
    batch_size: int = 256,
    n_boot: int = 1000,
    seed: int = 0,
    stain_shift: bool = False,
    stain_donors: Sequence[str | Path] = (),
    settings: PredictorSettings | None = None,
) -> EvaluationResult:
    """Score ``run_dir`` on ``split`` of ``data`` (default: the test split of the store it trained on).

    Writes ``metrics.json``, figures and ``report.html`` to ``out`` (default ``RUN/eval`` for the run's
    own test split, ``RUN/eval-<store>-<split>`` otherwise). With ``save_threshold`` (``youden`` or
    ``sensitivity``, at the first target sensitivity) a threshold chosen on the validation split is
    written into ``model.json`` and the report uses it. ``stain_shift`` also scores the split under the
    stain-shift suite (``histoscan.stain.shift``; one re-staining shift per ``stain_donors`` entry). ``tta`` None
    is the model's default (``inference.tta.default_views(bundle, "evaluate")``: the 8 dihedral elements for
    binary patch models); the report says which was used. ``settings``: the device, precision and threads the
    model runs with (its ``backend`` and ``batch_size``, when given, win over the arguments of those names).
    """
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    bundle = read_bundle(run_dir)
    part, split_name = run.select_patches(run.data_store(data), split)
    if not part.labelled or (part.labels < 0).any():
        raise DataError(f"{part.path}: the store has no labels; evaluation needs labelled patches")
    suite = shift_suite(stain_donors) if stain_shift else None  # a bad donor fails before any scoring
    predictor = (settings or PredictorSettings()).predictor(run_dir, backend=backend, batch_size=batch_size)
    saved = None
    ks = tta_views(bundle, tta, "evaluate")  # the deployed predictor's views by default
    if save_threshold:
        saved, record = choose_threshold(
            predictor,
            run_dir,
            bundle.training_store or part.path,
            save_threshold,
            target_sensitivities[0] if target_sensitivities else 0.95,
            ks,
        )
        bundle.threshold = predictor.bundle.threshold = saved
        bundle.fitted.threshold = predictor.bundle.fitted.threshold = record
        bundle.inference.tta = list(record.under.tta)  # what is fitted is what answers: the deployed views
        bundle.save(run_dir)
    notices = predictor.fitted_notices(ks)
    started = time.perf_counter()
    counted = predictor.bundle.preprocessing.stain_counts()
    pred = predictor.predict_store(part, ks)
    seconds = time.perf_counter() - started
    metrics = compute_metrics(
        part.labels,
        pred.probabilities,
        bundle.classes,
        threshold=bundle.threshold,
        target_sensitivities=target_sensitivities,
        n_boot=n_boot,
        seed=seed,
    )
    metrics["trust"] = evaluate_trust(bundle, part.labels, pred, ks, n_boot, seed)
    stain_counts = stain_split_counts(predictor, part, counted) if bundle.preprocessing.stain else None
    if suite is not None:
        shifted = ShiftedPredict(predictor, part, ks)
        metrics["stain_shift"] = stain_shift_report(
            shifted,
            part,
            suite,
            clean=pred.probabilities,
            n_boot=n_boot,
            seed=seed,
            batch_size=batch_size,
            on_shift=shifted.start,
        )
    # the model's default TTA (or --no-tta) goes to eval/ for its own test split; an explicit --tta keeps its folder
    out = Path(out) if out else run.eval_dir(part.path, split_name, tta is True)
    info = {
        "run": run_dir.name,
        "model": bundle.architecture,
        "store": str(part.path.resolve()),
        "split": split_name,
        "tta": len(ks) > 1,
        "backend": predictor.backend.name,
        "predictor": predictor.settings_record(ks),
        "inference_images_per_s": round(len(part) / max(seconds, 1e-9), 1),
        "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "histoscan_version": __version__,
        **({"stain_normalisation": stain_counts} if stain_counts else {}),
    }
    write_evaluation(
        out,
        part.labels,
        pred.probabilities,
        bundle.classes,
        metrics,
        title=f"Evaluation of {run_dir.name} ({split_name} split)",
        info=info,
        images=part.batch,
        image_size=part.image_size,
        metrics_csv=run.metrics_path,
    )
    return EvaluationResult(out, metrics, split_name, part.path, saved, notices)


class ShiftedPredict:
    """Probabilities of a split's batches under one stain shift after another, in store order.

    For a per-group stain model each group's stain is re-estimated from its shifted patches (the
    group's sample read and shifted), as the model would estimate it on a store stained that way.
    """

    def __init__(self, predictor: Predictor, part: PatchStore, ks: list[int]) -> None:
        self.predictor, self.part, self.ks = predictor, part, ks
        self.names = predictor.bundle.preprocessing.estimate_store_groups(part)
        self.prefix, self.done = "", 0

    def start(self, shift: Shift | None) -> None:
        """A new pass over the split under ``shift``: its groups estimated from their shifted patches."""
        self.done = 0
        if self.names is None or shift is None:
            self.prefix = ""
            return
        self.prefix = f"shift:{shift.name}/"

        def read(positions: np.ndarray) -> np.ndarray:
            batch = torch.from_numpy(np.ascontiguousarray(self.part.batch(positions)))
            return shift.apply(batch, int(positions[0])).numpy()

        pre = self.predictor.bundle.preprocessing
        pre.estimate_stain_groups(np.char.add(self.prefix, self.names.astype(str)), read)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities of a batch after the shift, as the Predictor gives them."""
        n = len(batch)
        groups = None
        if self.names is not None:
            groups = np.char.add(self.prefix, self.names[self.done : self.done + n].astype(str))
        self.done += n
        return self.predictor.predict_batch(batch, self.ks, groups).probabilities


def stain_split_counts(predictor: Predictor, part: PatchStore, before: dict[str, int]) -> dict[str, int]:
    """Stain counts of the scored split: its patches (each normalised once, whatever the TTA views) and its groups."""
    pre = predictor.bundle.preprocessing
    after = pre.stain_counts(set(stain_group_names(part).tolist()))
    return {k: v - before[k] if k in ("patches", "passed_through") else v for k, v in after.items()}


def evaluate_trust(
    bundle: ModelBundle, labels: np.ndarray, pred: Prediction, ks: list[int], n_boot: int, seed: int
) -> dict[str, Any]:
    """The trust section: error detection, accuracy at coverage, the referral rule and the tissue check."""
    from histoscan.trust.scoring import trust_metrics

    rule = bundle.trust.referral
    applies = policy_views(bundle.trust, ks)
    out = trust_metrics(
        labels,
        pred.probabilities,
        pred.uncertainty,
        threshold=bundle.threshold,
        rule=rule if applies else None,
        views=len(ks),
        classes=bundle.classes,
        n_boot=n_boot,
        seed=seed,
    )
    if rule is not None and not applies:
        out["referral"] = {
            "applied": False,
            "why": f"evaluated under TTA views {ks}, the rule was fitted under {rule.tta}",
        }
    quality = pred.quality or []
    flagged = [q for q in quality if q not in (OK, UNCHECKED)]
    out["tissue_check"] = {
        "checked": bundle.trust.tissue_check is not None,
        "count": len(quality),
        "flagged": len(flagged),
        "flags": {q: flagged.count(q) for q in sorted(set(flagged))},
    }
    return out
