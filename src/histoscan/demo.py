"""The embedded default job, end to end on synthetic patches: ingest, train, evaluate, export, predict, submit."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from sklearn.metrics import accuracy_score, roc_auc_score

from histoscan.data.ingest import ingest
from histoscan.data.splits import read_split
from histoscan.data.store import PatchStore
from histoscan.data.synthetic import write_synthetic
from histoscan.inference.export import export_onnx
from histoscan.inference.predict import predict_input, write_predictions, write_submission
from histoscan.inference.predictor import Predictor
from histoscan.training.config import TrainConfig, resolve_config_path
from histoscan.training.fit import train


@dataclass
class DemoResult:
    """Where each output of the demo is, and what the model scored."""

    source: Path
    store: Path
    report: dict[str, Any]
    run: Path
    test_auroc: float
    test_accuracy: float
    onnx: Path
    predictions: Path
    submission: Path
    split_sizes: dict[str, int] = field(default_factory=dict)


def run_demo(workdir: str | Path = "histoscan-demo", *, n: int = 600, test: int = 100, seed: int = 0,
             epochs: int = 6, printer: Callable[[str], None] = print) -> DemoResult:
    """Generate synthetic Kaggle-layout patches and take them through the whole flow.

    The CPU default model (``cpu-default`` config) trains for ``epochs`` epochs; the held-out
    test split is scored through the Predictor; the model is exported to ONNX (parity-checked)
    and predicts the unlabelled ``test/`` folder into a Kaggle submission of probabilities.
    """
    root = Path(workdir)
    printer(f"1/5 generating {n} labelled + {test} unlabelled synthetic patches (Kaggle layout) in {root / 'source'}")
    source = write_synthetic(root / "source", "kaggle", n, seed=seed, test=test)
    printer("2/5 ingesting into a packed store")
    result = ingest(source, root / "store", force=True)
    printer(f"3/5 training the CPU default for {epochs} epochs")
    cfg = TrainConfig.from_yaml(resolve_config_path("cpu-default"), {
        "data": str(result.store), "out": str(root / "runs"), "name": f"demo-{seed}", "max_epochs": epochs,
        "seed": seed, "progress": False})
    run_dir = root / "runs" / f"demo-{seed}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)  # the demo folder is the demo's own; a rerun starts fresh
    trained = train(cfg, printer=printer)
    printer("4/5 scoring the held-out test split and exporting to ONNX")
    store = PatchStore(result.store)
    split = read_split(trained.run_dir / "split.csv", store)
    held_out = store.subset(np.flatnonzero(split == "test"))
    predictor = Predictor(trained.run_dir, backend="torch")
    probs = predictor.predict_store(held_out).probabilities[:, 1]
    onnx = export_onnx(trained.run_dir).path
    printer("5/5 predicting the unlabelled test folder (ONNX backend) into a submission")
    table = predict_input(Predictor(trained.run_dir, backend="onnx"), source / "test")
    preds, _ = write_predictions(table, root / "predictions.csv")
    submission = write_submission(table, source / "sample_submission.csv", root / "submission.csv")
    return DemoResult(source, result.store, result.report, trained.run_dir,
                      float(roc_auc_score(held_out.labels, probs)), float(accuracy_score(held_out.labels, probs >= 0.5)),
                      onnx, preds, submission, {k: int((split == k).sum()) for k in ("train", "val", "test")})
