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
from histoscan.enums import STAIN_METHODS
from histoscan.errors import HistoscanError
from histoscan.inference.settings import PREDICTOR_FIELDS, PredictorSettings, predictor_settings
from histoscan.options import (
    Deprecated,
    dataclass_options,
    deprecated_args,
    given_values,
    misplaced_option,
    with_parameters,
)
from histoscan.progress import progress_bar

# Commands whose options are generated from a settings dataclass are built when first asked for, so
# 'histoscan info' does not import the server or Optuna just to know the options of 'serve' and 'tune'.
_LAZY: dict[str, Callable[[], Any]] = {}  # name -> builder of the (Typer-vendored) click command

# Old option spellings, per command, that keep working (with one warning) until the next minor version.
DEPRECATED: dict[str, dict[str, Deprecated]] = {
    "synth": {"--classes": Deprecated("--num-classes"), "--test": Deprecated("--unlabelled")},
    "ensemble": {"--weights": Deprecated("--member-weights")},
    "serve": {"--workers": Deprecated("--processes")},
    "train": {"--precision": Deprecated("--train-precision")},
    "export": {"--onnx": Deprecated(None, "ONNX is the only export format")},
}
# Options of another command or mode, per command: what to use instead.
ELSEWHERE: dict[str, dict[str, str]] = {
    "slide scan": {"--labels": "slide-level AUROC of a scan is 'histoscan slide evaluate OUT --labels LABELS.csv'"},
    "predict": {
        "--split": "scoring a labelled store is 'histoscan evaluate RUN --data STORE --split SPLIT'",
        "--labels": "scoring labelled images is 'histoscan evaluate'; Grad-CAM with labels is 'histoscan explain'",
    },
    "evaluate": {
        "--submission": "a Kaggle submission is 'histoscan predict RUN TEST_DIR --submission SAMPLE.csv'",
        "--refer-coverage": "a referral rule is fitted by 'histoscan calibrate RUN --refer-coverage C'",
        "--target-accuracy": "a referral rule is fitted by 'histoscan calibrate RUN --target-accuracy A'",
    },
    "calibrate": {"--save-threshold": "a threshold is chosen by 'histoscan evaluate RUN --save-threshold RULE'"},
    "train": {"--device": "training runs on --accelerator and --devices; --device is for commands that predict"},
}
# Generic option names that several commands declare with their own help text: one type and one meaning each
# (tests/test_cli_vocabulary.py walks every command against this table; any other name shared by two commands
# must be one declaration, such as the model options of PredictorSettings). "text" covers paths and choices.
VOCABULARY: dict[str, tuple[str, str]] = {
    "--out": ("text", "where this command writes its output (file or folder)"),
    "--data": ("text", "the packed store the command reads"),
    "--seed": ("int", "random seed"),
    "--force": ("bool", "replace outputs that already exist"),
    "--n": ("int", "how many patches to generate"),
    "--size": ("int", "patch side in pixels"),
    "--layout": ("text", "a source layout: kaggle, pcam, folders, grouped-folders, manifest"),
    "--mpp": ("float", "resolution of the source in um/px"),
    "--val": ("float", "validation fraction of the split"),
    "--test": ("float", "test fraction of the split"),
    "--calibration": ("float", "calibration fraction of the split (rows no model trains or validates on)"),
    "--folds": ("int", "number of cross-validation folds"),
    "--split": ("text", "which split of a store: test, val, train or all"),
    "--split-file": ("text", "an id,split CSV instead of the split recipe"),
    "--labels": ("text", "a CSV of true labels"),
    "--method": ("text", "the algorithm this command applies (stain fitting, CAM)"),
    "--max-patches": ("int", "patches sampled at most"),
    "--resume": ("bool", "continue an interrupted run"),
    "--batch-size": ("int", "images per batch (a training step or a forward pass)"),
    "--threads": ("int", "CPU threads for torch"),
    "--workers": ("int", "workers reading and decoding the inputs in parallel"),
}
_FLAGS = {"--onnx"}
WORKERS_HELP = (
    "Workers reading and decoding the inputs in parallel (default: one per core)."  # dropped options that take no value
)


def _warn(line: str) -> None:
    Console(stderr=True).print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)


def _path(ctx: Any) -> list[str]:
    """The sub-command names leading to ``ctx`` (the program's own name, however it was run, left out)."""
    return [*_path(ctx.parent), str(ctx.info_name)] if ctx.parent is not None else []


class _Group(TyperGroup):
    """Turns HistoscanError into one red line on stderr and exit code 2; builds generated commands on demand;
    translates deprecated option spellings (warning once) and names the command an out-of-place option
    belongs to."""

    def invoke(self, ctx: Any) -> object:
        try:
            return super().invoke(ctx)
        except HistoscanError as exc:
            Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    def list_commands(self, ctx: Any) -> list[str]:
        lazy = _LAZY if ctx.parent is None else {}  # generated commands belong to the root only
        return [*super().list_commands(ctx), *(n for n in lazy if n not in self.commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if ctx.parent is None and cmd_name not in self.commands and cmd_name in _LAZY:
            self.commands[cmd_name] = _LAZY[cmd_name]()
        return super().get_command(ctx, cmd_name)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, cmd, rest = super().resolve_command(ctx, args)
        path = " ".join([*_path(ctx), str(name)])
        rest = deprecated_args(rest, DEPRECATED.get(path, {}), _warn, _FLAGS)
        misplaced_option(path, rest, ELSEWHERE.get(path, {}))
        return name, cmd, rest


class _DefaultGroup(_Group):
    """A group whose first sub-command runs when the first argument names none (``slide RUN ...`` is
    ``slide scan RUN ...``)."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [next(iter(self.commands)), *args]
        return super().resolve_command(ctx, args)


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


def predictor_options(
    only: tuple[str, ...] = PREDICTOR_FIELDS, shown: dict[str, Any] | None = None
) -> list[inspect.Parameter]:
    """The model options (``PredictorSettings``) a command takes: one declaration for every command; ``shown``:
    the command's own defaults, as ``--help`` shows them."""
    return dataclass_options(PredictorSettings, only=only, shown=shown)


def _with_predictor(
    fn: Callable[..., None], only: tuple[str, ...] = PREDICTOR_FIELDS, shown: dict[str, Any] | None = None
) -> Callable[..., None]:
    """``fn``'s own Typer parameters followed by the model options; ``fn`` takes them as ``**values``."""
    own = [
        p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD
    ]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == p.POSITIONAL_OR_KEYWORD else p for p in own]
    return with_parameters(fn, params + predictor_options(only, shown))


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
    workers: int | None = typer.Option(None, help=WORKERS_HELP),
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
    calibration: float = typer.Option(
        0.0,
        help="Also reserve this fraction as calibration rows (e.g. 0.1), outside train/val/test and every fold: "
        "ensembles and 'calibrate' fit their threshold and temperature there.",
    ),
) -> None:
    """Make (or reuse) the train/val/test split that 'histoscan train' uses with the same options, saved next to the store."""
    from histoscan.data.splits import write_splits
    from histoscan.data.store import PatchStore

    result = write_splits(PatchStore(store), val=val, test=test, seed=seed, folds=folds, calibration=calibration)
    con = _console()
    for line in result.lines():
        con.print(line)


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write."),
    layout: str = typer.Option("kaggle", help="kaggle, pcam, folders, grouped-folders or manifest."),
    n: int = typer.Option(200, help="Labelled patches."),
    unlabelled: int = typer.Option(0, help="Unlabelled test patches (kaggle layout)."),
    size: int = typer.Option(96, help="Patch side in pixels."),
    noise: float = typer.Option(0.2, help="0 easy .. 1 hard."),
    preset: str | None = typer.Option(
        None, help="A named difficulty instead of --noise: hard (fainter tumours, 4% wrong labels; the demo's)."
    ),
    num_classes: int = typer.Option(2, help="Number of classes (folders / manifest)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Write synthetic H&E-like patches in any supported layout."""
    from histoscan.data.synthetic import write_synthetic

    path = write_synthetic(
        out, layout, n, seed=seed, size=size, noise=noise, num_classes=num_classes, test=unlabelled, preset=preset
    )
    _console().print(f"wrote {n} synthetic patches ({layout}) to {path}")


@stain_app.command("fit")
def stain_fit(
    source: Path = typer.Argument(..., help="A store, a folder of reference images, or one image."),
    method: str = typer.Option("macenko", help=f"{' or '.join(STAIN_METHODS)}."),  # checked by stain.normalise
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
    workers: int | None = typer.Option(None, help=WORKERS_HELP),
    force: bool = typer.Option(False, help="Replace an existing --out / --submission-out (never an input)."),
    **values: Any,
) -> None:
    """Predict tumour probabilities for new patches (and write a Kaggle submission)."""
    from histoscan.inference.predict import predict_files

    con = _console()
    with progress_bar("predicting") as start:
        lines = predict_files(
            run,
            input,
            out=out,
            submission=submission,
            submission_out=submission_out,
            workers=workers,
            force=force,
            settings=predictor_settings(values),
            progress=start(0),
            notice=con.print,
        )
    for line in lines:
        con.print(line)


# TTA default: histoscan.inference.tta.default_views ("submission" with --submission, else "predict").
app.command()(
    _with_predictor(predict, shown={"backend": "auto", "device": "cpu", "precision": "auto", "batch_size": 256})
)


@app.command()
def export(
    run: Path = typer.Argument(..., help="A run folder."),
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
    member_weights: str | None = typer.Option(
        None, help="Comma-separated member weights, e.g. 1,1,2 (default: equal)."
    ),
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
        weights=parse_weights(member_weights),
        oof=oof,
        threshold_rule=threshold_rule,
        force=force,
        printer=con.print,
    )
    for line in r.lines():
        con.print(line)


def calibrate(
    run: Path = typer.Argument(..., help="A run folder."),
    data: Path | None = typer.Option(
        None, help="Store holding the run's validation patches (default: the training store)."
    ),
    temperature: bool = typer.Option(
        True, help="Fit temperature scaling on the calibration rows of the run's split (else the validation split)."
    ),
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
    tissue_check: bool = typer.Option(
        False, help="Fit the tissue check (not tissue / out of distribution) on the training split (new runs have it)."
    ),
    **values: Any,
) -> None:
    """Fit temperature scaling, a referral rule and the tissue check on the run's data: the calibration rows of its
    split when it has them, else its validation split (an ensemble of folds: out-of-fold predictions, an
    approximation); store them in model.json. --tta: the policy they are fitted and applied under."""
    from histoscan.trust.calibrate import calibrate_run

    lines = calibrate_run(
        run,
        data,
        temperature=temperature,
        refer_coverage=refer_coverage,
        target_accuracy=target_accuracy,
        refer_by=refer_by,
        tissue_check=tissue_check,
        settings=predictor_settings(values),
    )
    con = _console()
    for line in lines:
        con.print(line, highlight=False)


app.command()(_with_predictor(calibrate, shown={"backend": "torch", "device": "cpu", "precision": "auto"}))


def serve(**values: Any) -> None:
    """Serve a model over HTTP (API at /v1, docs at /docs, a web page at /). HISTOSCAN_API_KEY sets a key."""
    from histoscan.serving.server import serve as run_server
    from histoscan.serving.state import ServeSettings

    model = predictor_settings(values)
    run_server(model.apply(ServeSettings(**given_values(ServeSettings, values))))


SERVE_MODEL_OPTIONS = ("backend", "device", "threads")  # the server batches requests itself and TTA is per request


def _serve_options() -> list[inspect.Parameter]:
    from histoscan.serving.state import ServeSettings

    return dataclass_options(ServeSettings) + predictor_options(
        SERVE_MODEL_OPTIONS, shown={"backend": "auto", "device": "cpu"}
    )


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


def evaluate(
    run: Path = typer.Argument(..., help="A run folder."),
    data: Path | None = typer.Option(None, help="Labelled store (default: the store the run trained on)."),
    split: str | None = typer.Option(
        None, help="test, val, train or all (default: test of the training store, all of another store)."
    ),
    target_sensitivity: list[float] = typer.Option(
        [0.95], help="Report the threshold reaching this sensitivity (repeatable)."
    ),
    save_threshold: str | None = typer.Option(
        None, help="youden or sensitivity: choose a threshold on the validation split and save it in model.json."
    ),
    out: Path | None = typer.Option(None, help="Output folder (default: RUN/eval for the run's test split)."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the AUROC interval."),
    labels: Path | None = typer.Option(None, help="Deprecated: use 'histoscan slide evaluate'.", hidden=True),
    stain_shift: bool = typer.Option(
        False, help="Also score the split under the fixed stain-shift suite (AUROC per shift, worst drop)."
    ),
    stain_donor: list[Path] = typer.Option(
        [], help="A store or image folder whose fitted stain re-stains the patches as one more shift (repeatable)."
    ),
    **values: Any,
) -> None:
    """Score a run: AUROC with 95% CI, report, thresholds, calibration, figures and an HTML report."""
    from histoscan.evaluation.evaluate import evaluate_run

    if labels is not None:  # the slide mode of old: warn, then do what 'slide evaluate' does
        _warn("option --labels of 'histoscan evaluate' is deprecated: use 'histoscan slide evaluate SCAN --labels CSV'")
        return slide_evaluate(run, labels)
    settings = predictor_settings(values)
    r = evaluate_run(
        run,
        data,
        split=split,
        tta=settings.tta,
        target_sensitivities=target_sensitivity,
        save_threshold=save_threshold,
        out=out,
        n_boot=bootstrap,
        stain_shift=stain_shift,
        stain_donors=stain_donor,
        settings=settings,
    )
    con = _console()
    for line in r.lines(run, save_threshold):
        con.print(line, highlight=False)


app.command()(
    _with_predictor(evaluate, shown={"backend": "auto", "device": "cpu", "precision": "auto", "batch_size": 256})
)


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

    model = predictor_settings(values)
    settings = model.apply(ExplainSettings(**given_values(ExplainSettings, values)))
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
    model = predictor_options(EXPLAIN_MODEL_OPTIONS, shown={"device": "cpu", "batch_size": 32, "tta": False})
    return [
        params[0],
        inspect.Parameter("inputs", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=inputs, annotation=list[Path]),
        *params[1:],
        *model,
    ]


EXPLAIN_MODEL_OPTIONS = ("device", "batch_size", "tta")  # Grad-CAM needs torch's gradients in fp32


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


def slide_scan(run: Path, slides: list[Path] | None, out: Path, **values: Any) -> None:
    """Scan whole-slide images into heatmaps, probability grids, tiles.csv and QuPath GeoJSON regions
    ('histoscan slide RUN ...' is this command)."""
    from histoscan.wsi.batch import run_slides
    from histoscan.wsi.scan import ScanSettings

    model = predictor_settings(values)
    settings = model.apply(ScanSettings(**given_values(ScanSettings, values)))
    con = _console()
    with progress_bar("scanning", rate_unit="tiles") as start:
        r = run_slides(
            partial(model.predictor, run, **vars(settings)),
            slides or [],
            out,
            settings,
            progress=lambda name: partial(start, name=name),
            printer=con.print,
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
    shown = {"backend": "auto", "device": "cpu", "precision": "auto", "batch_size": 256, "tta": False}
    return head + dataclass_options(ScanSettings) + predictor_options(shown=shown)


def slide_evaluate(
    scan: Path = typer.Argument(..., help="A scan's output folder (or its slides.csv) from 'histoscan slide'."),
    labels: Path = typer.Option(..., "--labels", help="A slide,label CSV (labels 0/1 or normal/tumour)."),
) -> None:
    """Slide-level AUROC of a scan's slide scores (max and top-k mean tile probability) against slide labels."""
    from histoscan.wsi.evaluate import evaluate_slides

    con = _console()
    for line in evaluate_slides(scan, labels).lines():
        con.print(line)


def _slide_group() -> Any:
    slide_app = typer.Typer(
        name="slide",
        cls=_DefaultGroup,
        no_args_is_help=True,
        help="Whole-slide images: scan (the default) and evaluate.",
    )
    slide_app.command("scan")(with_parameters(slide_scan, _slide_options()))
    slide_app.command("evaluate")(slide_evaluate)
    return typer.main.get_command(slide_app)


_LAZY["slide"] = _slide_group


def main() -> None:
    """Console entry point."""
    app()
