"""The ``histoscan`` command: argument parsing only; every command calls a library function."""

from __future__ import annotations

import importlib
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
    "--bootstrap": ("int", "bootstrap resamples for a 95% interval"),
    "--method": ("text", "the algorithm this command applies (stain fitting, CAM)"),
    "--max-patches": ("int", "patches sampled at most"),
    "--resume": ("bool", "continue an interrupted run"),
    "--batch-size": ("int", "images per batch (a training step or a forward pass)"),
    "--threads": ("int", "CPU threads for torch"),
    "--workers": ("int", "workers reading and decoding the inputs in parallel"),
}
_FLAGS = {"--onnx"}  # dropped options that take no value


def _warn(line: str) -> None:
    Console(stderr=True).print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)


def _path(ctx: Any) -> list[str]:
    """The sub-command names leading to ``ctx`` (the program's own name, however it was run, left out)."""
    return [*_path(ctx.parent), str(ctx.info_name)] if ctx.parent is not None else []


class _Group(TyperGroup):
    """The histoscan command group: one-line errors, lazy commands, deprecated spellings.

    Turns HistoscanError into one red line on stderr and exit code 2; builds generated commands on demand;
    translates deprecated option spellings (warning once) and names the command an out-of-place option
    belongs to.
    """

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
    """A group that runs its first sub-command when no sub-command is named.

    A group whose first sub-command runs when the first argument names none (``slide RUN ...`` is
    ``slide scan RUN ...``).
    """

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


def predictor_options(
    only: tuple[str, ...] = PREDICTOR_FIELDS, shown: dict[str, Any] | None = None
) -> list[inspect.Parameter]:
    """The model options (``PredictorSettings``) a command takes.

    The model options (``PredictorSettings``) a command takes: one declaration for every command; ``shown``:
    the command's own defaults, as ``--help`` shows them.
    """
    return dataclass_options(PredictorSettings, only=only, shown=shown)


def _settings_class(path: str) -> type:
    """The settings dataclass at ``"module:Class"``, imported when a command is first built."""
    module, name = path.split(":")
    cls: type = getattr(importlib.import_module(module), name)
    return cls


def _options(
    settings: str, model: tuple[str, ...] = (), shown: dict[str, Any] | None = None
) -> Callable[[], list[inspect.Parameter]]:
    """The options of a command, from its settings dataclass and the model options.

    The options of a command: one per documented field of ``settings`` (``"module:Class"``), then the model
    options named in ``model`` (``shown``: the command's own defaults of those).
    """

    def params() -> list[inspect.Parameter]:
        own = dataclass_options(_settings_class(settings))
        return own + (predictor_options(model, shown) if model else [])

    return params


def _generated(
    name: str, fn: Callable[..., None], params: Callable[[], list[inspect.Parameter]], into: Any = None
) -> None:
    """Register a command whose options are generated from ``params()``.

    Register ``fn(**values)`` as command ``name`` of the root (built when first needed) or of the Typer app
    ``into``, its options from ``params()``.
    """
    if into is not None:
        into.command(name)(with_parameters(fn, params()))
        return

    def build() -> Any:
        single = typer.Typer(add_completion=False)
        single.command(name)(with_parameters(fn, params()))
        return typer.main.get_command(single)

    _LAZY[name] = build


def _console() -> Console:
    """The terminal, or a wide console when output is piped (tables keep their columns)."""
    con = Console()
    return con if con.is_terminal else Console(width=160)


def _print(lines: list[str], highlight: bool = True) -> None:
    """Print a library function's lines."""
    con = _console()
    for line in lines:
        con.print(line, highlight=highlight)


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


# The commands, in the order 'histoscan --help' lists them. Each takes its options from a settings dataclass
# (named "module:Class") and calls the library function that dataclass feeds.
MODEL_SHOWN = {"backend": "auto", "device": "cpu", "precision": "auto", "batch_size": 256}


def demo(**values: Any) -> None:
    """Run the whole job on embedded synthetic data: generate, ingest, explore, train, evaluate, export, predict, submit."""
    from histoscan.demo import run_demo
    from histoscan.demo_settings import DemoSettings

    s = DemoSettings(**values)
    con = _console()
    r = run_demo(s.workdir, n=s.n, seed=s.seed, epochs=s.epochs, printer=con.print)
    _print(r.lines(), highlight=False)


_generated("demo", demo, _options("histoscan.demo_settings:DemoSettings"))


def ingest(**values: Any) -> None:
    """Check a labelled patch source and pack it into a memory-mapped store."""
    from histoscan.data.ingest import ingest as run_ingest
    from histoscan.data.settings import IngestSettings
    from histoscan.data.summary import report_summary

    s = IngestSettings(**values)
    with progress_bar("decoding") as start:
        result = run_ingest(
            s.source,
            s.out,
            size=s.size,
            workers=s.workers,
            force=s.force,
            layout=s.layout,
            class_names=s.class_names(),
            mpp=s.mpp,
            label_size=s.label_size,
            progress=start,
        )
    con = _console()
    con.print(report_summary(result.report))
    con.print(f"store written to {result.store} (full report: {result.store / 'validation.json'})")


_generated("ingest", ingest, _options("histoscan.data.settings:IngestSettings"))


def info(**values: Any) -> None:
    """Print what is in a store."""
    from histoscan.data.settings import InfoSettings
    from histoscan.data.store import PatchStore
    from histoscan.data.summary import store_summary

    _console().print(store_summary(PatchStore(InfoSettings(**values).store)))


_generated("info", info, _options("histoscan.data.settings:InfoSettings"))


def split(**values: Any) -> None:
    """Make (or reuse) the train/val/test split that 'histoscan train' uses with the same options, saved next to the store."""
    from histoscan.data.settings import SplitSettings
    from histoscan.data.splits import write_splits
    from histoscan.data.store import PatchStore

    s = SplitSettings(**values)
    _print(
        write_splits(
            PatchStore(s.store),
            val=s.val,
            test=s.test,
            seed=s.seed,
            folds=s.folds,
            calibration=s.calibration,
            dedup=s.dedup,
        ).lines()
    )


_generated("split", split, _options("histoscan.data.settings:SplitSettings"))


def synth(**values: Any) -> None:
    """Write synthetic H&E-like patches in any supported layout."""
    from histoscan.data.settings import SynthSettings
    from histoscan.data.synthetic import write_synthetic

    s = SynthSettings(**values)
    path = write_synthetic(
        s.out,
        s.layout,
        s.n,
        seed=s.seed,
        size=s.size,
        noise=s.noise,
        num_classes=s.num_classes,
        test=s.unlabelled,
        preset=s.preset,
    )
    _console().print(f"wrote {s.n} synthetic patches ({s.layout}) to {path}")


_generated("synth", synth, _options("histoscan.data.settings:SynthSettings"))


def models(**values: Any) -> None:
    """List the model names that --model accepts."""
    from histoscan.models import list_models
    from histoscan.models.settings import ModelsSettings

    for name in list_models(include_timm=ModelsSettings(**values).timm):
        typer.echo(name)


_generated("models", models, _options("histoscan.models.settings:ModelsSettings"))


def predict(**values: Any) -> None:
    """Predict tumour probabilities for new patches (and write a Kaggle submission)."""
    from histoscan.inference.predict import predict_files
    from histoscan.inference.settings import PredictSettings

    model = predictor_settings(values)
    s = PredictSettings(**values)
    con = _console()
    with progress_bar("predicting") as start:
        lines = predict_files(
            s.run,
            s.input,
            out=s.out,
            submission=s.submission,
            submission_out=s.submission_out,
            workers=s.workers,
            force=s.force,
            settings=model,
            progress=start(0),
            notice=con.print,
        )
    _print(lines)


# TTA default: histoscan.inference.tta.default_views ("submission" with --submission, else "predict").
_generated("predict", predict, _options("histoscan.inference.settings:PredictSettings", PREDICTOR_FIELDS, MODEL_SHOWN))


def export(**values: Any) -> None:
    """Export a run's model to ONNX and check it against PyTorch."""
    from histoscan.inference.export import export_onnx
    from histoscan.inference.settings import ExportSettings

    s = ExportSettings(**values)
    for line in export_onnx(s.run, opset=s.opset, data=s.data).lines():
        _console().print(line)


_generated("export", export, _options("histoscan.inference.settings:ExportSettings"))


def ensemble(**values: Any) -> None:
    """Average runs into one ensemble bundle that every command takes in place of a run folder."""
    from histoscan.inference.ensemble import make_ensemble, parse_weights
    from histoscan.inference.settings import EnsembleSettings

    s = EnsembleSettings(**values)
    con = _console()
    r = make_ensemble(
        s.runs,
        s.out,
        copy=s.copy,
        weights=parse_weights(s.member_weights),
        oof=s.oof,
        threshold_rule=s.threshold_rule,
        force=s.force,
        printer=con.print,
    )
    _print(r.lines())


_generated("ensemble", ensemble, _options("histoscan.inference.settings:EnsembleSettings"))


def calibrate(**values: Any) -> None:
    """Calibrate a run: temperature, referral rule, tissue check and out-of-distribution detector.

    Fit temperature scaling, a referral rule and the tissue check on the run's data: the calibration rows of its
    split when it has them, else its validation split (an ensemble of folds: out-of-fold predictions, an
    approximation); store them in model.json. --tta: the policy they are fitted and applied under.
    """
    from histoscan.trust.calibrate import calibrate_run
    from histoscan.trust.settings import CalibrateSettings

    model = predictor_settings(values)
    s = CalibrateSettings(**values)
    lines = calibrate_run(
        s.run,
        s.data,
        temperature=s.temperature,
        refer_coverage=s.refer_coverage,
        target_accuracy=s.target_accuracy,
        target_sensitivity=s.refer_sensitivity,
        delta=s.delta,
        refer_by=s.refer_by,
        tissue_check=s.tissue_check,
        ood=s.ood,
        settings=model,
    )
    _print(lines, highlight=False)


_generated(
    "calibrate",
    calibrate,
    _options(
        "histoscan.trust.settings:CalibrateSettings",
        PREDICTOR_FIELDS,
        {"backend": "torch", "device": "cpu", "precision": "auto"},
    ),
)


def eda(**values: Any) -> None:
    """Explore a store: class balance, samples, mean images, colour histograms, quality checks (PNG + HTML)."""
    from histoscan.eda.report import run_eda
    from histoscan.eda.settings import EdaSettings

    s = EdaSettings(**values)
    with progress_bar("checking patches") as start:
        r = run_eda(s.store, s.out, sample=s.sample, grid=s.grid, seed=s.seed, progress=start)
    _console().print("\n".join(r.lines()))


_generated("eda", eda, _options("histoscan.eda.settings:EdaSettings"))


def baselines(**values: Any) -> None:
    """Fit logistic regression and random forests on pixels and colour features; write run folders."""
    from histoscan.baselines.fit import run_baselines
    from histoscan.baselines.settings import BaselinesSettings

    s = BaselinesSettings(**values)
    con = _console()
    run_baselines(
        s.store,
        s.out,
        models=s.model_names(),
        features=s.feature_names(),
        val=s.val,
        test=s.test,
        seed=s.seed,
        split_file=s.split_file,
        pixel_size=s.pixel_size,
        force=s.force,
        printer=con.print,
    )
    con.print(f"baseline runs in {s.out}; rank them with: histoscan compare {s.out} runs/...")


_generated("baselines", baselines, _options("histoscan.baselines.settings:BaselinesSettings"))


def evaluate(**values: Any) -> None:
    """Score a run: AUROC with 95% CI, report, thresholds, calibration, figures and an HTML report."""
    from histoscan.evaluation.evaluate import evaluate_run
    from histoscan.evaluation.settings import EvaluateSettings

    model = predictor_settings(values)
    s = EvaluateSettings(**values)
    if s.labels is not None:  # the slide mode of old: warn, then do what 'slide evaluate' does
        _warn("option --labels of 'histoscan evaluate' is deprecated: use 'histoscan slide evaluate SCAN --labels CSV'")
        return slide_evaluate(scan=s.run, labels=s.labels)
    r = evaluate_run(
        s.run,
        s.data,
        split=s.split,
        tta=model.tta,
        target_sensitivities=s.target_sensitivity,
        save_threshold=s.save_threshold,
        out=s.out,
        n_boot=s.bootstrap,
        stain_shift=s.stain_shift,
        stain_donors=s.stain_donor,
        settings=model,
    )
    _print(r.lines(s.run, s.save_threshold), highlight=False)


_generated(
    "evaluate", evaluate, _options("histoscan.evaluation.settings:EvaluateSettings", PREDICTOR_FIELDS, MODEL_SHOWN)
)


def compare(**values: Any) -> None:
    """Rank runs (CNNs and baselines) in one leaderboard; --select names the best."""
    from histoscan.evaluation.leaderboard import compare_runs
    from histoscan.evaluation.settings import CompareSettings

    s = CompareSettings(**values)
    con = _console()
    board, lines = compare_runs(
        s.runs, metric=s.metric, out=s.out, select=s.select, evaluate_missing=s.evaluate_missing, printer=con.print
    )
    con.print(_table(f"leaderboard by {s.metric}", board.display_rows()))
    _print(lines)


_generated("compare", compare, _options("histoscan.evaluation.settings:CompareSettings"))


def download_pcam(**values: Any) -> None:
    """Download PatchCamelyon (about 7.5 GB) with md5 checks."""
    from histoscan.data.download import download_pcam as run_download
    from histoscan.data.settings import DownloadPcamSettings

    s = DownloadPcamSettings(**values)
    with progress_bar("downloading", count_bytes=True) as start:
        files = run_download(
            s.dest,
            splits=s.split_names(),
            meta=s.meta,
            base_url=s.base_url,
            progress=lambda name, total: start(total, name),
        )
    _console().print(f"{len(files)} files in {s.dest}; ingest with: histoscan ingest {s.dest} STORE")


def _download_group() -> Any:
    download_app = typer.Typer(name="download", cls=_Group, no_args_is_help=True, help="Download public datasets.")
    _generated("pcam", download_pcam, _options("histoscan.data.settings:DownloadPcamSettings"), into=download_app)
    return typer.main.get_group(download_app)  # a group even with one command


_LAZY["download"] = _download_group


def stain_fit(**values: Any) -> None:
    """Fit a stain normalisation target from a store or reference images."""
    from histoscan.stain.settings import StainFitSettings
    from histoscan.stain.sources import fit_reference, write_target

    s = StainFitSettings(**values)
    target = fit_reference(s.source, s.method, s.max_patches, s.seed)
    _console().print(
        f"{s.method} target from {target.patches} usable patches of {s.source} written to {write_target(target, s.out)}"
    )


def stain_show(**values: Any) -> None:
    """Stain vectors and concentrations per group, and patches before and after normalisation."""
    from histoscan.stain.settings import StainShowSettings
    from histoscan.stain.show import show_stain

    s = StainShowSettings(**values)
    r = show_stain(s.store, s.out, s.max_patches, s.seed)
    _console().print(
        f"{r.summary['patches_usable']} of {r.summary['patches_sampled']} sampled patches usable; "
        f"report: {r.out / 'report.html'}"
    )


def _stain_group() -> Any:
    stain_app = typer.Typer(
        name="stain", cls=_Group, no_args_is_help=True, help="Stain normalisation targets and stain reports."
    )
    _generated("fit", stain_fit, _options("histoscan.stain.settings:StainFitSettings"), into=stain_app)
    _generated("show", stain_show, _options("histoscan.stain.settings:StainShowSettings"), into=stain_app)
    return typer.main.get_group(stain_app)


_LAZY["stain"] = _stain_group


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
    """Train a model on a packed store and write a run folder (the model bundle).

    With --folds, --device is where the folds predict their out-of-fold patches (oof.csv).
    """
    from histoscan.training.config import TrainConfig, load_for_store
    from histoscan.training.cv import train_run

    model = predictor_settings(values, only=TRAIN_MODEL_OPTIONS)
    con = _console()
    cfg = load_for_store(config, given_values(TrainConfig, values), printer=con.print)
    _print(train_run(cfg, printer=con.print, settings=model).summary_lines())


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
        *predictor_options(TRAIN_MODEL_OPTIONS, shown={"device": "cpu"}),
    ]


# Cross-validation predicts out-of-fold patches; --batch-size and --threads of train are training's own
# (TrainConfig), and --precision is train's deprecated spelling of --train-precision.
TRAIN_MODEL_OPTIONS = ("device",)


_generated("train", train, _train_options)


def slide_scan(run: Path, slides: list[Path] | None, out: Path, **values: Any) -> None:
    """Scan whole-slide images into heatmaps and QuPath regions.

    Scan whole-slide images into heatmaps, probability grids, tiles.csv and QuPath GeoJSON regions
    ('histoscan slide RUN ...' is this command).
    """
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


def slide_evaluate(**values: Any) -> None:
    """Slide-level AUROC of a scan's slide scores (max and top-k mean tile probability) against slide labels."""
    from histoscan.wsi.evaluate import evaluate_slides
    from histoscan.wsi.settings import SlideEvaluateSettings

    s = SlideEvaluateSettings(**values)
    _print(evaluate_slides(s.scan, s.labels, s.evaluation()).lines())


def _slide_group() -> Any:
    slide_app = typer.Typer(
        name="slide",
        cls=_DefaultGroup,
        no_args_is_help=True,
        help="Whole-slide images: scan (the default) and evaluate.",
    )
    slide_app.command("scan")(with_parameters(slide_scan, _slide_options()))
    _generated("evaluate", slide_evaluate, _options("histoscan.wsi.settings:SlideEvaluateSettings"), into=slide_app)
    return typer.main.get_command(slide_app)


_LAZY["slide"] = _slide_group


def main() -> None:
    """Console entry point."""
    app()
