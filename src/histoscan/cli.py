"""The ``histoscan`` command: argument parsing only; every command calls a library function."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from histoscan import __version__
from histoscan.errors import HistoscanError
from histoscan.options import dataclass_options, given_values, with_parameters
from histoscan.progress import progress_bar

# Commands whose options are generated from a settings dataclass are built when first asked for, so
# 'histoscan info' does not import the server or Optuna just to know the options of 'serve' and 'tune'.
_LAZY: dict[str, Callable[[], Any]] = {}  # name -> builder of the (Typer-vendored) click command


class _Group(TyperGroup):
    """Turns HistoscanError into one red line on stderr and exit code 2; builds generated commands on demand."""

    def invoke(self, ctx: Any) -> object:
        try:
            return super().invoke(ctx)
        except HistoscanError as exc:
            Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *(n for n in _LAZY if n not in self.commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in _LAZY:
            self.commands[cmd_name] = _LAZY[cmd_name]()
        return super().get_command(ctx, cmd_name)


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    help="histoscan: find metastatic cancer in histopathology patches.",
)
download_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Download public datasets.")
app.add_typer(download_app, name="download")
stain_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Stain normalisation targets and stain reports.")
app.add_typer(stain_app, name="stain")


def _generated(name: str, fn: Callable[..., None], params: Callable[[], list[inspect.Parameter]]) -> None:
    """Register ``fn(**values)`` as command ``name``, its options from ``params()`` when first needed."""

    def build() -> Any:
        single = typer.Typer(add_completion=False)
        single.command(name)(with_parameters(fn, params()))
        return typer.main.get_command(single)

    _LAZY[name] = build


def _console() -> Console:
    """The terminal, or a wide console when output is piped (tables keep their columns)."""
    con = Console()
    return con if con.is_terminal else Console(width=160)


def _table(title: str, frame: Any) -> Any:
    """A rich table of a DataFrame (floats to 4 significant digits)."""
    from rich.table import Table

    t = Table(title=title)
    for c in frame.columns:
        t.add_column(str(c))
    for row in frame.itertuples(index=False):
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    return t


def _version(value: bool) -> None:
    """Print the version and stop (``--version``)."""
    if value:
        typer.echo(f"histoscan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """histoscan: find metastatic cancer in histopathology patches."""


@app.command()
def demo(
    workdir: Path = typer.Option(
        Path("histoscan-demo"), help="Folder for the demo's outputs (its contents are replaced)."
    ),
    n: int = typer.Option(600, help="Synthetic labelled patches to generate."),
    epochs: int = typer.Option(6, help="Training epochs."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Run the whole job on embedded synthetic data: generate, ingest, explore, train, evaluate, export, predict, submit."""
    from histoscan.demo import run_demo

    con = _console()
    r = run_demo(workdir, n=n, seed=seed, epochs=epochs, printer=con.print)
    con.print(
        f"\nheld-out test split ({r.split_sizes['test']} patches): AUROC {r.test_auroc:.3f}, accuracy {r.test_accuracy:.3f}"
    )
    for line in r.trust_lines:
        con.print(line, highlight=False)
    for label, path in [
        ("synthetic source (Kaggle layout)", r.source),
        ("packed store", r.store),
        ("data report", r.eda_report),
        ("run folder (model bundle)", r.run),
        ("evaluation report", r.eval_report),
        ("ONNX model", r.onnx),
        ("predictions", r.predictions),
        ("Kaggle submission", r.submission),
        ("slide scan (heatmap, GeoJSON)", r.slide),
        ("examples: referred, not tissue", r.examples),
    ]:
        con.print(f"{label:34s} {path}")


@app.command()
def ingest(
    source: Path = typer.Argument(..., help="Kaggle folder, PCam folder, class folders, image folder or CSV manifest."),
    out: Path = typer.Argument(..., help="Store folder to create."),
    size: int | None = typer.Option(None, help="Resize every image to SIZE x SIZE (default: the dominant size)."),
    workers: int | None = typer.Option(None, help="Decoding processes (default: one per core)."),
    force: bool = typer.Option(False, help="Replace OUT if it exists."),
    layout: str | None = typer.Option(
        None, help="Force a layout: kaggle, pcam, folders, grouped-folders, manifest, unlabelled."
    ),
    classes: str | None = typer.Option(None, help="Comma-separated known class names (folders / manifest)."),
    mpp: float | None = typer.Option(None, help="Source um/px (kaggle, pcam: 0.972)."),
    label_size: int | None = typer.Option(None, help="Labelled centre side, px (kaggle, pcam: 32)."),
) -> None:
    """Check a labelled patch source and pack it into a memory-mapped store."""
    from histoscan.data.ingest import ingest as run_ingest
    from histoscan.data.summary import report_summary

    with progress_bar("decoding") as start:
        result = run_ingest(
            source,
            out,
            size=size,
            workers=workers,
            force=force,
            layout=layout,
            class_names=classes.split(",") if classes else None,
            mpp=mpp,
            label_size=label_size,
            progress=start,
        )
    con = _console()
    con.print(report_summary(result.report))
    con.print(f"store written to {result.store} (full report: {result.store / 'validation.json'})")


@app.command()
def info(store: Path = typer.Argument(..., help="A packed store folder.")) -> None:
    """Print what is in a store."""
    from histoscan.data.store import PatchStore
    from histoscan.data.summary import store_summary

    _console().print(store_summary(PatchStore(store)))


@app.command()
def split(
    store: Path = typer.Argument(..., help="A packed store folder."),
    val: float = typer.Option(0.1, help="Validation fraction (ignored where the source has its own split)."),
    test: float = typer.Option(0.1, help="Test fraction (ignored where the source has its own split)."),
    seed: int = typer.Option(0, help="Random seed."),
    folds: int = typer.Option(
        0, help="Also write K >= 2 stratified (grouped) folds of the train+val rows, as id,fold (test rows: test)."
    ),
) -> None:
    """Make (or reuse) the train/val/test split that 'histoscan train' uses with the same options, saved next to the store."""
    from histoscan.data.splits import write_splits
    from histoscan.data.store import PatchStore

    result = write_splits(PatchStore(store), val=val, test=test, seed=seed, folds=folds)
    con = _console()
    for line in result.lines():
        con.print(line)


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write."),
    layout: str = typer.Option("kaggle", help="kaggle, pcam, folders, grouped-folders or manifest."),
    n: int = typer.Option(200, help="Labelled patches."),
    test: int = typer.Option(0, help="Unlabelled test patches (kaggle layout)."),
    size: int = typer.Option(96, help="Patch side in pixels."),
    noise: float = typer.Option(0.2, help="0 easy .. 1 hard."),
    preset: str | None = typer.Option(
        None, help="A named difficulty instead of --noise: hard (fainter tumours, 4% wrong labels; the demo's)."
    ),
    classes: int = typer.Option(2, help="Number of classes (folders / manifest)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Write synthetic H&E-like patches in any supported layout."""
    from histoscan.data.synthetic import write_synthetic

    path = write_synthetic(
        out, layout, n, seed=seed, size=size, noise=noise, num_classes=classes, test=test, preset=preset
    )
    _console().print(f"wrote {n} synthetic patches ({layout}) to {path}")


@stain_app.command("fit")
def stain_fit(
    source: Path = typer.Argument(..., help="A store, a folder of reference images, or one image."),
    method: str = typer.Option("macenko", help="reinhard or macenko."),
    out: Path = typer.Option(Path("target.json"), help="Where the target goes (train --stain-target reads it)."),
    max_patches: int = typer.Option(2000, help="Patches sampled to fit the target."),
    seed: int = typer.Option(0, help="Random seed of the sample."),
) -> None:
    """Fit a stain normalisation target from a store or reference images."""
    from histoscan.stain.sources import fit_reference, write_target

    target = fit_reference(source, method, max_patches, seed)
    _console().print(
        f"{method} target from {target.patches} usable patches of {source} written to {write_target(target, out)}"
    )


@stain_app.command("show")
def stain_show(
    store: Path = typer.Argument(..., help="A packed store."),
    out: Path = typer.Option(Path("stain-report"), help="Folder for the figures, stain.json and report.html."),
    max_patches: int = typer.Option(2000, help="Patches sampled."),
    seed: int = typer.Option(0, help="Random seed of the sample."),
) -> None:
    """Stain vectors and concentrations per group, and patches before and after normalisation."""
    from histoscan.stain.show import show_stain

    r = show_stain(store, out, max_patches, seed)
    _console().print(
        f"{r.summary['patches_usable']} of {r.summary['patches_sampled']} sampled patches usable; "
        f"report: {r.out / 'report.html'}"
    )


@download_app.command("pcam")
def download_pcam(
    dest: Path = typer.Argument(..., help="Folder to download into."),
    splits: str = typer.Option("train,valid,test", help="Comma-separated splits."),
    meta: bool = typer.Option(True, help="Also fetch the *_meta.csv files (slide of each patch)."),
    base_url: str = typer.Option("https://zenodo.org/records/2546921/files/", help="Mirror to download from."),
) -> None:
    """Download PatchCamelyon (about 7.5 GB) with md5 checks."""
    from histoscan.data.download import download_pcam as run_download

    with progress_bar("downloading", count_bytes=True) as start:
        files = run_download(
            dest,
            splits=splits.split(","),
            meta=meta,
            base_url=base_url,
            progress=lambda name, total: start(total, name),
        )
    _console().print(f"{len(files)} files in {dest}; ingest with: histoscan ingest {dest} STORE")


@app.command()
def models(all_timm: bool = typer.Option(False, "--timm", help="Also list every timm model name.")) -> None:
    """List the model names that --model accepts."""
    from histoscan.models import list_models

    for name in list_models(include_timm=all_timm):
        typer.echo(name)


@app.command()
def predict(
    run: Path = typer.Argument(..., help="A run folder (the model bundle)."),
    input: Path = typer.Argument(
        ..., help="An image, a folder of images (recursive), a Kaggle test folder, a store, or PCam HDF5."
    ),
    out: Path = typer.Option(
        Path("predictions.csv"), help="CSV to write: id, prob_<class>..., predicted, answer, quality[, uncertainty]."
    ),
    submission: Path | None = typer.Option(
        None, help="A Kaggle sample_submission.csv: also write submission.csv (id, tumour probability) in its order."
    ),
    submission_out: Path = typer.Option(Path("submission.csv"), help="Where the submission goes."),
    tta: bool | None = typer.Option(
        None,
        "--tta/--no-tta",
        help="Average the 8 flips/rotations; adds an uncertainty column "
        "(default: the referral rule's policy when model.json has one, else on for a Kaggle --submission "
        "of a binary model, off otherwise).",
    ),
    backend: str = typer.Option("auto", help="torch, onnx, or auto (onnx when model.onnx exists)."),
    device: str = typer.Option("cpu", help="Torch device (cpu, cuda, cuda:1, mps)."),
    precision: str = typer.Option(
        "auto", help="Torch backend: auto (bf16 where the CPU or GPU has it natively), fp32, bf16 or fp16."
    ),
    batch_size: int = typer.Option(256, help="Images per forward pass."),
    workers: int | None = typer.Option(None, help="Decoding processes for folders (default: one per core)."),
    threads: int | None = typer.Option(None, help="CPU threads for the model (default: all cores)."),
    force: bool = typer.Option(False, help="Replace an existing --out / --submission-out (never an input)."),
) -> None:
    """Predict tumour probabilities for new patches (and write a Kaggle submission)."""
    from histoscan.inference.predict import check_output, predict_input, write_predictions, write_submission
    from histoscan.inference.predictor import Predictor, submission_tta

    check_output(out, force, [input, run])  # before the work, not after it
    predictor = Predictor(
        run, backend=backend, device=device, batch_size=batch_size, threads=threads, precision=precision
    )
    con = _console()
    with progress_bar("predicting") as start:
        table = predict_input(
            predictor,
            input,
            tta=submission_tta(predictor, tta, submission),
            workers=workers,
            progress=start(0),
            notice=con.print,
        )
    path, errors = write_predictions(table, out, force=force, inputs=[input, run])
    con.print(f"{len(table.ids)} predictions ({predictor.backend.name} backend) written to {path}")
    if errors:
        con.print(f"[yellow]{len(table.failures)} unreadable inputs listed in {errors}[/]")
    if submission:
        con.print(
            f"submission written to {write_submission(table, submission, submission_out, force=force, inputs=[input, run])}"
        )


@app.command()
def export(
    run: Path = typer.Argument(..., help="A run folder."),
    onnx: bool = typer.Option(True, "--onnx", help="Export to ONNX (the only format so far)."),
    opset: int = typer.Option(18, help="ONNX opset."),
    data: Path | None = typer.Option(None, help="Store whose patches verify the export (default: the training store)."),
) -> None:
    """Export a run's model to ONNX and check it against PyTorch."""
    from histoscan.inference.export import export_onnx

    result = export_onnx(run, opset=opset, data=data)
    _console().print(
        f"wrote {result.path}; max |p_onnx - p_torch| = {result.max_abs_diff:.2e} on "
        f"{result.checked} patches of {result.check_source}"
    )


@app.command()
def ensemble(
    runs: list[Path] = typer.Argument(..., help="Two or more run folders (e.g. the fold-<i>/ folders of a CV)."),
    out: Path = typer.Option(..., "--out", help="Folder for the ensemble bundle (model.json, split.csv)."),
    copy: bool = typer.Option(False, "--copy", help="Copy the members into OUT/members/ (default: refer to them)."),
    weights: str | None = typer.Option(None, help="Comma-separated member weights, e.g. 1,1,2 (default: equal)."),
    oof: Path | None = typer.Option(
        None, help="An oof.csv of 'train --folds' to choose the threshold on (default: computed from the members)."
    ),
    threshold_rule: str = typer.Option("youden", help="youden, sensitivity (0.95) or none (keep 0.5)."),
    force: bool = typer.Option(False, help="Replace an ensemble already in OUT."),
) -> None:
    """Average runs into one ensemble bundle that every command takes in place of a run folder."""
    from histoscan.inference.ensemble import make_ensemble, parse_weights

    con = _console()
    r = make_ensemble(
        runs,
        out,
        copy=copy,
        weights=parse_weights(weights),
        oof=oof,
        threshold_rule=threshold_rule,
        force=force,
        printer=con.print,
    )
    for line in r.lines():
        con.print(line)


@app.command()
def calibrate(
    run: Path = typer.Argument(..., help="A run folder."),
    data: Path | None = typer.Option(
        None, help="Store holding the run's validation patches (default: the training store)."
    ),
    temperature: bool = typer.Option(True, help="Fit temperature scaling on the validation split."),
    refer_coverage: float | None = typer.Option(
        None, help="Fit a referral rule answering this fraction of images (the rest: 'refer'), e.g. 0.9."
    ),
    target_accuracy: float | None = typer.Option(
        None, help="Fit a referral rule whose answered images reach this accuracy, e.g. 0.98."
    ),
    refer_by: str = typer.Option(
        "auto",
        help="Refer by probability (a band around the threshold), uncertainty, or auto (the better on validation).",
    ),
    tta: bool | None = typer.Option(
        None, "--tta/--no-tta", help="TTA policy the referral rule is fitted and applied under (default: the model's)."
    ),
    tissue_check: bool = typer.Option(
        False, help="Fit the tissue check (not tissue / out of distribution) on the training split (new runs have it)."
    ),
) -> None:
    """Fit temperature scaling, a referral rule and the tissue check on the run's data (an ensemble of folds:
    out-of-fold predictions); store them in model.json."""
    from histoscan.inference.calibration import calibrate as run_calibrate

    con = _console()
    if temperature:
        r = run_calibrate(run, data)
        con.print(
            f"temperature {r.temperature:.3f} on {r.count} patches ({r.source}): NLL {r.nll_before:.4f} -> {r.nll_after:.4f}"
        )
    if refer_coverage is not None or target_accuracy is not None:
        from histoscan.trust.calibrate import fit_run_referral
        from histoscan.trust.referral import describe

        rule = fit_run_referral(
            run, data, coverage=refer_coverage, target_accuracy=target_accuracy, by=refer_by, tta=tta
        )
        aurocs = ", ".join(f"{k} {v:.3f}" for k, v in rule.error_auroc.items())
        con.print(f"error-detection AUROC on {rule.fitted_on}: {aurocs}")
        con.print(describe(rule), highlight=False)
    if tissue_check:
        from histoscan.trust.tissue import fit_run_tissue_check

        check = fit_run_tissue_check(run, data)
        con.print(
            f"tissue check fitted on {check.count} training patches: Mahalanobis distance limit {check.threshold:.2f}"
        )


def serve(**values: Any) -> None:
    """Serve a model over HTTP (API at /v1, docs at /docs, a web page at /). HISTOSCAN_API_KEY sets a key."""
    from histoscan.serving.server import serve as run_server
    from histoscan.serving.state import ServeSettings

    run_server(ServeSettings(**given_values(ServeSettings, values)))


def _serve_options() -> list[inspect.Parameter]:
    from histoscan.serving.state import ServeSettings

    return dataclass_options(ServeSettings)


_generated("serve", serve, _serve_options)


@app.command()
def eda(
    store: Path = typer.Argument(..., help="A packed store folder."),
    out: Path = typer.Argument(..., help="Folder for the figures, eda.json and report.html."),
    sample: int = typer.Option(
        5000, help="Patches per class for mean images and histograms (quality checks cover all)."
    ),
    grid: int = typer.Option(16, help="Example patches per class in the sample grids."),
    seed: int = typer.Option(0, help="Random seed for the samples."),
) -> None:
    """Explore a store: class balance, samples, mean images, colour histograms, quality checks (PNG + HTML)."""
    from histoscan.eda.report import run_eda

    with progress_bar("checking patches") as start:
        r = run_eda(store, out, sample=sample, grid=grid, seed=seed, progress=start)
    q = r.summary["quality"]
    _console().print(
        f"{r.summary['patches']:,} patches {r.summary['counts']}; blank {q['blank']}, dark {q['dark']}, "
        f"blurry {q['blurry']}, duplicate groups {r.summary['duplicate_groups']}; {len(r.figures)} figures "
        f"in {r.seconds:.1f} s\nreport: {r.out / 'report.html'}"
    )


@app.command()
def baselines(
    store: Path = typer.Argument(..., help="A labelled packed store."),
    out: Path = typer.Argument(Path("runs/baselines"), help="Folder for one run folder per baseline."),
    models: str = typer.Option("logreg,rf", help="Comma-separated: logreg, rf."),
    features: str = typer.Option(
        "pixels,colour", help="Comma-separated: pixels (shrunk, flattened), colour (histograms, statistics, texture)."
    ),
    pixel_size: int = typer.Option(32, help="Side the images are shrunk to for pixel features."),
    val: float = typer.Option(0.1, help="Validation fraction (same split recipe as 'histoscan train')."),
    test: float = typer.Option(0.1, help="Test fraction."),
    seed: int = typer.Option(0, help="Split and model seed."),
    split_file: Path | None = typer.Option(
        None, help="An id,split CSV (e.g. a CNN run's split.csv) instead of the recipe."
    ),
    force: bool = typer.Option(False, help="Replace existing baseline run folders."),
) -> None:
    """Fit logistic regression and random forests on pixels and colour features; write run folders."""
    from histoscan.baselines.fit import run_baselines

    con = _console()
    run_baselines(
        store,
        out,
        models=models.split(","),
        features=features.split(","),
        val=val,
        test=test,
        seed=seed,
        split_file=split_file,
        pixel_size=pixel_size,
        force=force,
        printer=con.print,
    )
    con.print(f"baseline runs in {out}; rank them with: histoscan compare {out} runs/...")


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="A run folder."),
    data: Path | None = typer.Option(None, help="Labelled store (default: the store the run trained on)."),
    split: str | None = typer.Option(
        None, help="test, val, train or all (default: test of the training store, all of another store)."
    ),
    tta: bool | None = typer.Option(
        None, "--tta/--no-tta", help="Average the 8 flips/rotations (default: on for binary patch models)."
    ),
    target_sensitivity: list[float] = typer.Option(
        [0.95], help="Report the threshold reaching this sensitivity (repeatable)."
    ),
    save_threshold: str | None = typer.Option(
        None, help="youden or sensitivity: choose a threshold on the validation split and save it in model.json."
    ),
    out: Path | None = typer.Option(None, help="Output folder (default: RUN/eval for the run's test split)."),
    backend: str = typer.Option("auto", help="torch, onnx or auto."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the AUROC interval."),
    labels: Path | None = typer.Option(
        None,
        help="With a slides.csv (from 'histoscan slide') as RUN: a slide,label CSV; prints slide-level AUROC (95% CI), sensitivity and specificity.",
    ),
    stain_shift: bool = typer.Option(
        False, help="Also score the split under the fixed stain-shift suite (AUROC per shift, worst drop)."
    ),
    stain_donor: list[Path] = typer.Option(
        [], help="A store or image folder whose fitted stain re-stains the patches as one more shift (repeatable)."
    ),
) -> None:
    """Score a run: AUROC with 95% CI, report, thresholds, calibration, figures and an HTML report."""
    from histoscan.evaluation.evaluate import evaluate_run
    from histoscan.evaluation.report import headline

    if labels is not None:
        from histoscan.wsi.evaluate import SlideEvaluationSettings, evaluate_slides

        s = evaluate_slides(run, labels, SlideEvaluationSettings(bootstrap=bootstrap))
        for line in s.lines():
            _console().print(line, highlight=False)
        return
    r = evaluate_run(
        run,
        data,
        split=split,
        tta=tta,
        target_sensitivities=target_sensitivity,
        save_threshold=save_threshold,
        out=out,
        backend=backend,
        n_boot=bootstrap,
        stain_shift=stain_shift,
        stain_donors=stain_donor,
    )
    con = _console()
    if r.saved_threshold is not None:
        con.print(
            f"threshold {r.saved_threshold:.4f} ({save_threshold}, chosen on the validation split) saved in {run / 'model.json'}"
        )
    con.print(f"{r.split} split of {r.store}:")
    for k, v in headline(r.metrics).items():
        con.print(f"  {k:20s} {v:.4f}" if isinstance(v, float) else f"  {k:20s} {v}")
    if "trust" in r.metrics:
        from histoscan.trust.scoring import trust_lines

        for line in trust_lines(r.metrics["trust"]):
            con.print(line, highlight=False)
    if "stain_shift" in r.metrics:
        from histoscan.stain.shift import shift_lines

        for line in shift_lines(r.metrics["stain_shift"]):
            con.print(line, highlight=False)
    con.print(f"report: {r.out / 'report.html'}")


@app.command()
def compare(
    runs: list[Path] = typer.Argument(
        ..., help="Run folders, or folders holding runs (runs/, a baselines folder, a study)."
    ),
    metric: str = typer.Option(
        "auroc", help="auroc, average_precision, accuracy, balanced_accuracy, f1, brier or ece."
    ),
    out: Path = typer.Option(Path("leaderboard"), help="Folder for leaderboard.csv/.md/.html (and selection.json)."),
    select: bool = typer.Option(False, "--select", help="Write which run is best and why (selection.json)."),
    evaluate_missing: bool = typer.Option(True, help="Evaluate runs that have no eval/ yet on their test split."),
) -> None:
    """Rank runs (CNNs and baselines) in one leaderboard; --select names the best."""
    from histoscan.evaluation.leaderboard import build_leaderboard

    con = _console()
    board = build_leaderboard(runs, metric, evaluate_missing, printer=con.print)
    con.print(_table(f"leaderboard by {metric}", board.display_rows()))
    if not board.comparable:
        con.print(f"[yellow]warning: {board.warning()}[/]")
    paths = board.write(out)
    con.print(f"written: {', '.join(str(p) for p in paths.values())}")
    if select:
        sel = board.select(out)
        con.print(f"best: {sel['best_run']} - {sel['reason']}\nselection: {out / 'selection.json'}")


def tune(set_: list[str], **values: Any) -> None:
    """Search hyperparameters or CNN architectures with Optuna: pruned, resumable, many workers on one study."""
    from histoscan.tuning.settings import TuneSettings, parse_overrides
    from histoscan.tuning.study import tune as run_tune

    settings = TuneSettings(**given_values(TuneSettings, values), overrides=parse_overrides(set_))
    con = _console()
    r = run_tune(settings, printer=con.print)
    con.print(_table(r.title(), r.display_table()))
    for line in r.summary_lines():
        con.print(line)


def _tune_options() -> list[inspect.Parameter]:
    from histoscan.tuning.settings import TuneSettings

    set_ = typer.Option(
        [], "--set", help="Fix a training option for every trial, KEY=YAML (repeatable), e.g. max_epochs=4."
    )
    return [
        *dataclass_options(TuneSettings),
        inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=set_, annotation=list[str]),
    ]


_generated("tune", tune, _tune_options)


def explain(inputs: list[Path], **values: Any) -> None:
    """Grad-CAM maps: a PNG per image (patch, map, overlay), explain.csv and an explain.html gallery."""
    from histoscan.explain.run import explain_inputs
    from histoscan.explain.settings import ExplainSettings

    settings = ExplainSettings(**given_values(ExplainSettings, values))
    with progress_bar("explaining") as start:
        r = explain_inputs(settings, inputs, progress=start(None))
    con = _console()
    con.print(f"{r.count:,} maps (largest value {r.scale:.4g}) in {r.out}; gallery: {r.gallery}")
    if r.errors is not None:
        con.print(f"[yellow]{len(r.failures)} unreadable inputs listed in {r.errors}[/]")


def _explain_options() -> list[inspect.Parameter]:
    from histoscan.explain.settings import ExplainSettings

    inputs = typer.Argument(
        ..., help="Images, folders of images, stores (with --split / --ids) or PCam HDF5 files.", metavar="INPUT..."
    )
    params = dataclass_options(ExplainSettings)
    return [
        params[0],
        inspect.Parameter("inputs", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=inputs, annotation=list[Path]),
        *params[1:],
    ]


_generated("explain", explain, _explain_options)


def train(config: str | None, **values: Any) -> None:
    """Train a model on a packed store and write a run folder (the model bundle)."""
    from histoscan.training.config import TrainConfig
    from histoscan.training.cv import train_folds
    from histoscan.training.fit import train as run_train

    cfg = TrainConfig.load(config, given_values(TrainConfig, values))
    con = _console()
    result = train_folds(cfg, printer=con.print) if cfg.folds else run_train(cfg, printer=con.print)
    for line in result.summary_lines():
        con.print(line)


def _train_options() -> list[inspect.Parameter]:
    from histoscan.training.config import TrainConfig

    config = typer.Option(
        None,
        "--config",
        metavar="FILE|NAME",
        help="YAML config: a path, or a shipped name such as cpu-default. Options given here override it.",
    )
    return [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=config, annotation=str | None),
        *dataclass_options(TrainConfig, defaults=False),
    ]


_generated("train", train, _train_options)


def slide(run: Path, slides: list[Path] | None, out: Path, **values: Any) -> None:
    """Scan whole-slide images into heatmaps, probability grids, tiles.csv and QuPath GeoJSON regions."""
    from histoscan.inference.predictor import Predictor
    from histoscan.wsi.batch import run_slides
    from histoscan.wsi.scan import ScanSettings

    settings = ScanSettings(**given_values(ScanSettings, values))
    con = _console()

    def predictor() -> Predictor:
        return Predictor(
            run, settings.backend, settings.device, batch_size=settings.batch_size, threads=settings.threads
        )

    with progress_bar("scanning", rate_unit="tiles") as start:
        r = run_slides(
            predictor, slides or [], out, settings, progress=lambda name: partial(start, name=name), printer=con.print
        )
    for line in r.summary_lines(run, out, settings.shard is not None):
        con.print(line, highlight=False)


def _slide_options() -> list[inspect.Parameter]:
    from histoscan.wsi.scan import ScanSettings

    kw = inspect.Parameter.KEYWORD_ONLY
    head = [
        inspect.Parameter("run", kw, annotation=Path, default=typer.Argument(..., help="A run folder.")),
        inspect.Parameter(
            "slides",
            kw,
            annotation=list[Path] | None,
            default=typer.Argument(
                None, help="Slide files and folders (none: only gather OUT/slides.csv from finished shards)."
            ),
        ),
        inspect.Parameter(
            "out",
            kw,
            annotation=Path,
            default=typer.Option(..., "--out", help="Output folder: OUT/<slide>/ per slide and OUT/slides.csv."),
        ),
    ]
    return head + dataclass_options(ScanSettings)


_generated("slide", slide, _slide_options)


def main() -> None:
    """Console entry point."""
    app()
