"""The ``histoscan`` command: argument parsing only; every command calls a library function."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from typer.core import TyperGroup

from histoscan import __version__
from histoscan.errors import HistoscanError


class _Group(TyperGroup):
    """Turns HistoscanError into one red line on stderr and exit code 2: no traceback for user errors."""

    def invoke(self, ctx: Any) -> object:
        try:
            return super().invoke(ctx)
        except HistoscanError as exc:
            Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            ctx.exit(2)


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    help="histoscan: find metastatic cancer in histopathology patches.",
)
download_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Download public datasets.")
app.add_typer(download_app, name="download")


def _console() -> Console:
    """The terminal, or a wide console when output is piped (tables keep their columns)."""
    con = Console()
    return con if con.is_terminal else Console(width=160)


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int], Callable[[int], None]]]:
    """A rich progress bar; yields ``start(total) -> advance(n)``."""
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True) as bar:

        def start(total: int) -> Callable[[int], None]:
            task = bar.add_task(label, total=total or None)
            return lambda n: bar.advance(task, n)

        yield start


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
) -> None:
    """Check a labelled patch source and pack it into a memory-mapped store."""
    from histoscan.data.ingest import ingest as run_ingest
    from histoscan.data.summary import report_summary

    with _progress("decoding") as start:
        result = run_ingest(
            source,
            out,
            size=size,
            workers=workers,
            force=force,
            layout=layout,
            class_names=classes.split(",") if classes else None,
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
    val: float = typer.Option(0.1, help="Validation fraction."),
    test: float = typer.Option(0.1, help="Test fraction."),
    seed: int = typer.Option(0, help="Random seed."),
    folds: int = typer.Option(0, help="Also write K stratified (grouped) folds when K >= 2."),
) -> None:
    """Make (or reuse) a stratified, group-disjoint train/val/test split saved next to the store."""
    from histoscan.data.splits import make_folds, save_split, split_store
    from histoscan.data.store import PatchStore

    s = PatchStore(store)
    parts, path = split_store(s, val=val, test=test, seed=seed, use_source_split=False)
    con = _console()
    con.print(", ".join(f"{k}: {len(v)} {v.counts()}" for k, v in parts.items()))
    con.print(f"split saved to {path}")
    if folds >= 2:
        assignment = make_folds(s.labels, s.groups, k=folds, seed=seed)
        fpath = save_split(s, [f"fold{f}" for f in assignment], f"folds{folds}-seed{seed}")
        con.print(f"{folds} folds saved to {fpath}")


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write."),
    layout: str = typer.Option("kaggle", help="kaggle, pcam, folders, grouped-folders or manifest."),
    n: int = typer.Option(200, help="Labelled patches."),
    test: int = typer.Option(0, help="Unlabelled test patches (kaggle layout)."),
    size: int = typer.Option(96, help="Patch side in pixels."),
    noise: float = typer.Option(0.2, help="0 easy .. 1 hard."),
    classes: int = typer.Option(2, help="Number of classes (folders / manifest)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Write synthetic H&E-like patches in any supported layout."""
    from histoscan.data.synthetic import write_synthetic

    try:
        path = write_synthetic(out, layout, n, seed=seed, size=size, noise=noise, num_classes=classes, test=test)
    except ValueError as exc:
        raise HistoscanError(str(exc)) from exc
    _console().print(f"wrote {n} synthetic patches ({layout}) to {path}")


@download_app.command("pcam")
def download_pcam(
    dest: Path = typer.Argument(..., help="Folder to download into."),
    splits: str = typer.Option("train,valid,test", help="Comma-separated splits."),
    meta: bool = typer.Option(True, help="Also fetch the *_meta.csv files (slide of each patch)."),
    base_url: str = typer.Option("https://zenodo.org/records/2546921/files/", help="Mirror to download from."),
) -> None:
    """Download PatchCamelyon (about 7.5 GB) with md5 checks."""
    from histoscan.data.download import download_pcam as run_download

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn()) as bar:

        def start(name: str, total: int | None) -> Callable[[int], None]:
            task = bar.add_task(name, total=total)
            return lambda n: bar.advance(task, n)

        files = run_download(dest, splits=splits.split(","), meta=meta, base_url=base_url, progress=start)
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
        Path("predictions.csv"), help="CSV to write: id, prob_<class>..., predicted[, uncertainty]."
    ),
    submission: Path | None = typer.Option(
        None, help="A Kaggle sample_submission.csv: also write submission.csv (id, tumour probability) in its order."
    ),
    submission_out: Path = typer.Option(Path("submission.csv"), help="Where the submission goes."),
    tta: bool = typer.Option(False, help="Average the 8 flips/rotations; adds an uncertainty column."),
    backend: str = typer.Option("auto", help="torch, onnx, or auto (onnx when model.onnx exists)."),
    device: str = typer.Option("cpu", help="Torch device (cpu, cuda, cuda:1, mps)."),
    batch_size: int = typer.Option(256, help="Images per forward pass."),
    workers: int | None = typer.Option(None, help="Decoding processes for folders (default: one per core)."),
    threads: int | None = typer.Option(None, help="CPU threads for the model (default: all cores)."),
) -> None:
    """Predict tumour probabilities for new patches (and write a Kaggle submission)."""
    from histoscan.inference.predict import predict_input, write_predictions, write_submission
    from histoscan.inference.predictor import Predictor

    predictor = Predictor(run, backend=backend, device=device, batch_size=batch_size, threads=threads)
    with _progress("predicting") as start:
        table = predict_input(predictor, input, tta=tta, workers=workers, progress=start(0))
    con = _console()
    path, errors = write_predictions(table, out)
    con.print(f"{len(table.ids)} predictions ({predictor.backend.name} backend) written to {path}")
    if errors:
        con.print(f"[yellow]{len(table.failures)} unreadable inputs listed in {errors}[/]")
    if submission:
        con.print(f"submission written to {write_submission(table, submission, submission_out)}")


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
def calibrate(
    run: Path = typer.Argument(..., help="A run folder."),
    data: Path | None = typer.Option(
        None, help="Store holding the run's validation patches (default: the training store)."
    ),
) -> None:
    """Fit temperature scaling on the validation split and store it in model.json."""
    from histoscan.inference.calibration import calibrate as run_calibrate

    r = run_calibrate(run, data)
    _console().print(
        f"temperature {r.temperature:.3f} on {r.count} validation patches: NLL {r.nll_before:.4f} -> {r.nll_after:.4f}"
    )


@app.command()
def serve(
    run: Path = typer.Argument(..., help="A run folder (the model bundle)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 in a container)."),
    port: int = typer.Option(8000, help="Port."),
    backend: str = typer.Option("auto", help="onnx, torch, or auto (onnx when model.onnx exists)."),
    device: str = typer.Option("cpu", help="Torch device for the torch backend (cuda for a GPU)."),
    workers: int = typer.Option(1, help="Server processes (each loads the model once)."),
    threads: int | None = typer.Option(None, help="CPU threads for the model in each process (default: all cores)."),
    max_upload_mb: float = typer.Option(20.0, help="Largest accepted upload (413 above)."),
    max_batch_files: int = typer.Option(64, help="Most files in one /v1/predict/batch request."),
    max_batch: int = typer.Option(64, help="Most single-image requests gathered into one model batch."),
    max_wait_ms: float = typer.Option(
        0.0, help="How long a batch smaller than --max-batch waits for more requests, in ms."
    ),
    access_log: bool = typer.Option(True, help="Log every request (about 8% of throughput on 2 cores)."),
    in_process: bool = typer.Option(
        False,
        help="Run the model in a thread of the server process, not a child process "
        "(no extra process, but slower under load: the two share one GIL).",
    ),
) -> None:
    """Serve a model over HTTP (API at /v1, docs at /docs, a web page at /). HISTOSCAN_API_KEY sets a key."""
    from histoscan.serving.server import serve as run_server
    from histoscan.serving.state import ServeSettings

    settings = ServeSettings(
        str(run),
        backend=backend,
        device=device,
        threads=threads,
        max_upload_mb=max_upload_mb,
        max_batch_files=max_batch_files,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        model_process=not in_process,
    )
    run_server(settings, host=host, port=port, workers=workers, access_log=access_log)


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

    with _progress("checking patches") as start:
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
    tta: bool = typer.Option(False, help="Average the 8 flips/rotations."),
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
        None, help="With a slides.csv (from 'histoscan slide') as RUN: a slide,label CSV; prints slide-level AUROC."
    ),
) -> None:
    """Score a run: AUROC with 95% CI, report, thresholds, calibration, figures and an HTML report."""
    from histoscan.evaluation.evaluate import evaluate_run
    from histoscan.evaluation.report import headline

    if labels is not None:
        from histoscan.wsi.evaluate import evaluate_slides

        s = evaluate_slides(run, labels)
        for score, value in s.auroc.items():
            _console().print(f"slide-level AUROC ({score}, {s.slides} slides, {s.positives} tumour): {value:.4f}")
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
    )
    con = _console()
    if r.saved_threshold is not None:
        con.print(
            f"threshold {r.saved_threshold:.4f} ({save_threshold}, chosen on the validation split) saved in {run / 'model.json'}"
        )
    con.print(f"{r.split} split of {r.store}:")
    for k, v in headline(r.metrics).items():
        con.print(f"  {k:20s} {v:.4f}" if isinstance(v, float) else f"  {k:20s} {v}")
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


@app.command()
def tune(
    data: Path = typer.Option(..., help="Labelled packed store to tune on."),
    space: str = typer.Option("nas", help="Search space: a shipped name (nas, hparams, backbone) or a YAML file."),
    trials: int = typer.Option(20, help="Finished trials the study should hold (a resumed study runs only the rest)."),
    timeout: float | None = typer.Option(None, help="Stop this worker after this many minutes."),
    study: str | None = typer.Option(None, help="Study name (default: the space's name)."),
    out: Path = typer.Option(
        Path("studies"), help="Folder holding study folders (trials, study.db, plots, best.yaml)."
    ),
    storage: str | None = typer.Option(
        None, help="Optuna RDB URL shared by many workers (default: SQLite in the study folder)."
    ),
    sampler: str = typer.Option("tpe", help="tpe or random."),
    pruner: str = typer.Option("hyperband", help="hyperband, median or none."),
    seed: int = typer.Option(0, help="Split seed of every trial, and the sampler's seed."),
    resume: bool = typer.Option(False, help="Continue an existing study (or join it as another worker)."),
    set_: list[str] = typer.Option(
        [], "--set", help="Fix a training option for every trial, KEY=YAML (repeatable), e.g. max_epochs=4."
    ),
    retrain_best: bool = typer.Option(False, help="At the end, train the best configuration on train+val."),
    retrain_epochs: int | None = typer.Option(
        None, help="Epochs for --retrain-best (default: 1.5x the trials' max_epochs)."
    ),
) -> None:
    """Search hyperparameters or CNN architectures with Optuna: pruned, resumable, many workers on one study."""
    from histoscan.tuning.study import TuneSettings
    from histoscan.tuning.study import tune as run_tune

    overrides = {}
    for item in set_:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        overrides[key.strip()] = _yaml_value(value, "set")
    con = _console()
    r = run_tune(
        TuneSettings(
            data=str(data),
            space=space,
            trials=trials,
            timeout=timeout,
            study=study,
            out=str(out),
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            seed=seed,
            resume=resume,
            overrides=overrides,
            retrain_best=retrain_best,
            retrain_epochs=retrain_epochs,
        ),
        printer=con.print,
    )
    shown = r.table.drop(columns=["run_dir", "error"], errors="ignore")
    shown.columns = [c.replace("param:", "").replace("model_args.", "") for c in shown.columns]
    con.print(
        _table(
            f"study {r.study_name}: {r.counts['complete']} complete, {r.counts['pruned']} pruned, "
            f"{r.counts['fail']} failed",
            shown,
        )
    )
    con.print(
        f"trials: {r.study_dir / 'trials.csv'}; plots: {', '.join(str(p) for p in r.plots.values()) or 'none yet'}"
    )
    if r.best_config is not None:
        con.print(
            f"best val AUROC {r.best_value:.4f}; config: {r.best_config} (histoscan train --config {r.best_config} --data ...)"
        )
    if r.retrained is not None:
        con.print(f"retrained on train+val: {r.retrained}")


# ---- train: options generated from TrainConfig, so the help text lives in one place ------------
def _yaml_value(text: str, name: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise typer.BadParameter(f"not valid YAML: {exc}", param_hint=f"--{name.replace('_', '-')}") from exc


def _train_parameter(f: dataclasses.Field[Any], help_text: str) -> inspect.Parameter:
    flag = "--" + f.name.replace("_", "-")
    hint = str(f.type)
    if hint.startswith("bool"):
        kind: Any = bool | None
        opt = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)
    elif hint.startswith(("dict", "list")):
        kind = str | None
        opt = typer.Option(None, flag, help=help_text + " YAML, e.g. '[1, 1.5]'.", metavar="YAML", show_default=False)
    else:
        kind = int | None if hint.startswith("int") else float | None if hint.startswith("float") else str | None
        opt = typer.Option(None, flag, help=help_text, show_default=False)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind)


def train(config: str | None = None, **values: Any) -> None:
    """Train a model on a packed store and write a run folder (the model bundle)."""
    from histoscan.training.config import TrainConfig, resolve_config_path, structured_fields
    from histoscan.training.fit import train as run_train

    overrides = {k: (_yaml_value(v, k) if k in structured_fields() else v) for k, v in values.items() if v is not None}
    cfg = (
        TrainConfig.from_yaml(resolve_config_path(config), overrides)
        if config
        else TrainConfig.from_dict(overrides, "options")
    )
    con = _console()
    result = run_train(cfg, printer=con.print)
    best = (
        f"best val AUROC {result.best_val_auroc:.4f} at epoch {result.best_epoch}"
        if result.best_val_auroc == result.best_val_auroc
        else "no validation split: kept the last epoch's weights"
    )
    con.print(f"{best}; {result.epochs} epochs in {result.seconds:.0f} s")
    con.print(f"run folder: {result.run_dir}")


class _Rate(ProgressColumn):
    """Tiles per second of a progress task."""

    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:,.0f} tiles/s" if task.speed else "")


def slide(run: Path, slides: list[Path] | None, out: Path, **values: Any) -> None:
    """Scan whole-slide images into heatmaps, probability grids, tiles.csv and QuPath GeoJSON regions."""
    from histoscan.inference.predictor import Predictor
    from histoscan.wsi.batch import run_slides
    from histoscan.wsi.scan import ScanSettings

    settings = ScanSettings(**{k: v for k, v in values.items() if v is not None})
    con = _console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(), TimeRemainingColumn())
    with Progress(*columns, console=con, transient=True) as bar:

        def progress(name: str) -> Callable[[int], Callable[[int], None]]:
            def start(total: int) -> Callable[[int], None]:
                task = bar.add_task(name, total=total)
                return lambda n: bar.advance(task, n)

            return start

        def predictor() -> Predictor:
            return Predictor(
                run, settings.backend, settings.device, batch_size=settings.batch_size, threads=settings.threads
            )

        r = run_slides(predictor, slides or [], out, settings, progress=progress, printer=con.print)
    con.print(f"{len(r.scanned)} scanned, {len(r.skipped)} already done (--force redoes them), {len(r.failed)} failed")
    for name, error in r.failed.items():
        con.print(f"[red]{name}: {error}[/]", highlight=False)
    if r.slides_csv is not None:
        con.print(f"slides: {r.slides_csv}")
    elif settings.shard is None:
        con.print(f"no slides given and {out} holds no scans")
    else:
        con.print(f"shard done; gather slides.csv once all shards finish: histoscan slide {run} --out {out}")


def _register_slide() -> None:
    from histoscan.wsi.scan import ScanSettings

    head = [
        inspect.Parameter(
            "run", inspect.Parameter.KEYWORD_ONLY, annotation=Path, default=typer.Argument(..., help="A run folder.")
        ),
        inspect.Parameter(
            "slides",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=list[Path] | None,
            default=typer.Argument(
                None, help="Slide files and folders (none: only gather OUT/slides.csv from finished shards)."
            ),
        ),
        inspect.Parameter(
            "out",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Path,
            default=typer.Option(..., "--out", help="Output folder: OUT/<slide>/ per slide and OUT/slides.csv."),
        ),
    ]
    params = head + [_train_parameter(f, f.metadata["help"]) for f in dataclasses.fields(ScanSettings)]
    slide.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    app.command("slide")(slide)


def _register_train() -> None:
    from histoscan.training.config import TrainConfig, field_help

    helps = field_help()
    config = inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=str | None,
        default=typer.Option(
            None,
            "--config",
            metavar="FILE|NAME",
            help="YAML config: a path, or a shipped name such as cpu-default. Options given here override it.",
        ),
    )
    params = [config] + [_train_parameter(f, helps[f.name]) for f in dataclasses.fields(TrainConfig)]
    train.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    app.command("train")(train)


_register_train()
_register_slide()


def main() -> None:
    """Console entry point."""
    app()
