"""The embedded default job, end to end on synthetic patches: ingest, explore, train, evaluate, export, predict, submit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoscan.bundle import read_bundle
from histoscan.data.ingest import ingest
from histoscan.data.synthetic import write_synthetic
from histoscan.eda.report import run_eda
from histoscan.evaluation.evaluate import choose_threshold, evaluate_run
from histoscan.inference.export import export_onnx
from histoscan.inference.predict import PredictionTable, predict_input, write_predictions, write_submission
from histoscan.inference.predictor import Predictor
from histoscan.rules.referral import describe
from histoscan.training.config import TrainConfig, resolve_config_path
from histoscan.training.fit import train
from histoscan.trust.calibrate import fit_run_referral
from histoscan.trust.scoring import trust_lines


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
    eda_report: Path
    eval_report: Path
    split_sizes: dict[str, int] = field(default_factory=dict)
    slide: Path | None = None
    examples: Path | None = None
    trust_lines: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """What ``histoscan demo`` prints at the end: the test scores, the trust lines, and where each output is."""
        out = [
            f"\nheld-out test split ({self.split_sizes['test']} patches): AUROC {self.test_auroc:.3f}, "
            f"accuracy {self.test_accuracy:.3f}",
            *self.trust_lines,
        ]
        for label, path in [
            ("synthetic source (Kaggle layout)", self.source),
            ("packed store", self.store),
            ("data report", self.eda_report),
            ("run folder (model bundle)", self.run),
            ("evaluation report", self.eval_report),
            ("ONNX model", self.onnx),
            ("predictions", self.predictions),
            ("Kaggle submission", self.submission),
            ("slide scan (heatmap, GeoJSON)", self.slide),
            ("examples: referred, not tissue", self.examples),
        ]:
            out.append(f"{label:34s} {path}")
        return out


def run_demo(
    workdir: str | Path = "histoscan-demo",
    *,
    n: int = 600,
    test: int = 100,
    seed: int = 0,
    epochs: int = 6,
    printer: Callable[[str], None] = print,
) -> DemoResult:
    """Generate synthetic Kaggle-layout patches and take them through the whole flow.

    The store is explored (an HTML data report); the CPU default model (``cpu-default`` config)
    trains for ``epochs`` epochs; the held-out test split is evaluated through the Predictor (an
    HTML evaluation report, with the referral rule fitted on validation scored there); the model is exported to ONNX (parity-checked) and predicts the
    unlabelled ``test/`` folder into a Kaggle submission of probabilities.
    """
    root = Path(workdir)
    printer(
        f"1/6 generating {n} labelled + {test} unlabelled synthetic patches (Kaggle layout, 'hard' preset: faint "
        f"tumours, some wrong labels) in {root / 'source'}"
    )
    source = write_synthetic(root / "source", "kaggle", n, seed=seed, test=test, preset="hard")
    printer("2/6 ingesting into a packed store and exploring it")
    result = ingest(source, root / "store", force=True)
    eda = run_eda(result.store, root / "eda", sample=1000)
    printer(f"3/6 training the CPU default for {epochs} epochs")
    cfg = TrainConfig.from_yaml(
        resolve_config_path("cpu-default"),
        {
            "data": str(result.store),
            "out": str(root / "runs"),
            "name": f"demo-{seed}",
            "max_epochs": epochs,
            "seed": seed,
            "progress": False,
        },
    )
    run_dir = root / "runs" / f"demo-{seed}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)  # the demo folder is the demo's own; a rerun starts fresh
    trained = train(cfg, printer=printer)
    printer(
        "4/6 choosing the threshold and a referral rule (90% coverage) on validation, evaluating on the held-out "
        "test split, exporting to ONNX"
    )
    bundle = read_bundle(trained.run_dir)
    bundle.threshold, record = choose_threshold(
        Predictor(trained.run_dir, "torch"), trained.run_dir, result.store, "youden", 0.95
    )
    bundle.fitted.threshold = record
    bundle.inference.tta = list(record.under.tta)  # the deployed predictor is the one the threshold was fitted under
    bundle.save(trained.run_dir)
    printer(f"threshold {bundle.threshold:.4f} (Youden's J on validation)")
    printer(describe(fit_run_referral(trained.run_dir, coverage=0.9)))
    evaluation = evaluate_run(trained.run_dir, backend="torch", n_boot=200)
    onnx = export_onnx(trained.run_dir).path
    printer("5/6 predicting the unlabelled test folder (ONNX backend) into a submission")
    predictor = Predictor(trained.run_dir, backend="onnx")
    table = predict_input(predictor, source / "test")
    preds, _ = write_predictions(table, root / "predictions.csv")
    examples = show_examples(predictor, table, source / "test", root / "examples", printer)
    submission = write_submission(table, source / "sample_submission.csv", root / "submission.csv")
    printer("6/6 building a small synthetic slide (pyramidal tiled TIFF) and scanning it into a heatmap")
    slide = demo_slide(trained.run_dir, root / "slides", seed)
    return DemoResult(
        source,
        result.store,
        result.report,
        trained.run_dir,
        evaluation.metrics["auroc"],
        evaluation.metrics["accuracy"],
        onnx,
        preds,
        submission,
        eda.out / "report.html",
        evaluation.out / "report.html",
        dict(read_bundle(trained.run_dir).split.get("sizes", {})),
        slide,
        examples,
        trust_lines(evaluation.metrics["trust"]),
    )


def show_examples(
    predictor: Predictor, table: PredictionTable, folder: Path, out: Path, printer: Callable[[str], None]
) -> Path:
    """Write and print a referred patch of the predicted folder and a blank (not tissue) patch, with their answers."""
    from PIL import Image

    from histoscan.data.synthetic import not_he_patch

    out.mkdir(parents=True, exist_ok=True)
    answers = table.prediction.answers or []
    referred = [i for i, a in enumerate(answers) if a == "refer"]
    if referred:
        i = referred[0]
        src = next(folder.glob(f"{table.ids[i]}.*"))
        (out / f"referred{src.suffix}").write_bytes(src.read_bytes())
        unc = table.prediction.uncertainty
        printer(
            f"referred: {src.name}: P(tumour) {table.prediction.probabilities[i, 1]:.3f}"
            + (f", uncertainty {unc[i]:.3f}" if unc is not None else "")
            + f" -> answer 'refer' ({len(referred)} of {len(answers)} unlabelled patches referred)"
        )
    else:
        printer(f"referred: none of the {len(answers)} unlabelled patches")
    blank = not_he_patch("white", int(predictor.bundle.preprocessing.image_size[0]))
    Image.fromarray(blank).save(out / "blank.png")
    p = predictor.predict_batch([blank])
    printer(
        f"blank slide patch: P(tumour) {p.probabilities[0, 1]:.3f}, quality {p.quality[0] if p.quality else '?'} "
        f"-> answer {p.answers[0] if p.answers else '?'!r}"
    )
    return out


def demo_slide(run_dir: Path, root: Path, seed: int = 0) -> Path:
    """A 20 x 24-cell synthetic slide with a tumour block, scanned with the demo model; returns its output folder.

    The slide is written at the model's resolution when model.json states one, else at 1 um/px
    (and the scan is told so), so the demo needs no option.
    """
    from histoscan.wsi.scan import ScanSettings, scan_slide
    from histoscan.wsi.synthetic import tumour_slide

    stated = read_bundle(run_dir).preprocessing.mpp
    mpp = stated or 1.0
    path, _ = tumour_slide(root / "demo-slide.tif", 20, 24, (5, 14, 6, 17), mpp, seed=seed)
    settings = ScanSettings(model_mpp=None if stated else mpp)
    return scan_slide(Predictor(run_dir), path, root / "scans", settings).folder  # ONNX once exported
