"""One CLI vocabulary: every option name has one type and one meaning across the real app's commands; old
spellings keep working and warn once; shared model options (``PredictorSettings``) on every command that runs a
model; ``slide evaluate``; an option of another mode names the command to use."""

from __future__ import annotations

import dataclasses
import functools
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from histoscan.cli import DEPRECATED, ELSEWHERE, VOCABULARY, app
from histoscan.inference.settings import PredictorSettings
from histoscan.options import Deprecated, deprecated_args, documented_fields

runner = CliRunner()
MODEL_COMMANDS = ("predict", "evaluate", "calibrate", "slide scan", "explain", "serve")


@functools.cache
def _commands() -> dict[str, Any]:
    """Every leaf command of the real app by its path ('slide scan'), built as the app builds it."""
    from typer._click.core import Context  # Typer vendors click; its Context is what the groups expect

    found: dict[str, Any] = {}

    def walk(cmd: Any, path: list[str], parent: Any) -> None:
        ctx = Context(cmd, parent=parent, info_name=path[-1] if path else "histoscan")
        if hasattr(cmd, "list_commands"):
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), [*path, name], ctx)
        else:
            found[" ".join(path)] = cmd

    walk(typer.main.get_command(app), [], None)
    return found


def _kind(param: Any) -> str:
    """The option's value type as the user sees it: a path is text; a Literal is text with choices."""
    annotation = param.type_descriptor.annotation
    text = getattr(annotation, "__name__", str(annotation))
    if text in ("Path", "str") or "Literal" in text:
        return "text"
    return text  # int, float, bool


def _options() -> dict[str, list[tuple[str, str, str]]]:
    """option -> [(command, kind, help)] over every visible option of every command."""
    out: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for path, cmd in _commands().items():
        for p in cmd.params:
            if p.param_type_name == "option" and not p.hidden:
                for flag in p.opts:
                    if flag.startswith("--"):
                        out[flag].append((path, _kind(p), p.help or ""))
    return out


def test_the_walk_sees_every_command() -> None:
    commands = _commands()
    assert {"predict", "evaluate", "calibrate", "slide scan", "slide evaluate", "explain", "serve", "train"} <= set(
        commands
    )
    assert "download serve" not in commands and "stain train" not in commands  # generated commands: root only


def test_one_name_one_type_one_meaning() -> None:
    """A name on several commands is one shared declaration (same type and help), or a generic name whose one
    meaning and type the vocabulary table states."""
    problems = []
    for flag, uses in sorted(_options().items()):
        kinds = {k for _, k, _ in uses}
        helps = {h for _, _, h in uses}
        if flag in VOCABULARY:
            kind, _meaning = VOCABULARY[flag]
            wrong = [c for c, k, _ in uses if k != kind]
            if wrong:
                problems.append(f"{flag}: {kind} in the vocabulary, another type in {wrong}")
        elif len(uses) > 1 and (len(kinds) > 1 or len(helps) > 1):
            problems.append(f"{flag} on {[c for c, _, _ in uses]}: two types or meanings, not in the vocabulary")
    assert not problems, "\n".join(problems)


def test_the_vocabulary_has_no_stale_entries() -> None:
    used = _options()
    assert not [flag for flag in VOCABULARY if len(used.get(flag, [])) < 2]


def test_every_model_command_shares_the_predictor_options() -> None:
    commands = _commands()
    shared = {"--" + f.name.replace("_", "-"): f.metadata["help"] for f in documented_fields(PredictorSettings)}
    for path in MODEL_COMMANDS:
        flags = {flag: p for p in commands[path].params for flag in p.opts}
        assert "--device" in flags, path
        for flag, help_text in shared.items():
            if flag in flags:
                assert flags[flag].help == help_text, (path, flag)
    for path in ("predict", "evaluate", "calibrate", "slide scan"):  # the full set where the Predictor runs
        assert set(shared) <= {flag for p in commands[path].params for flag in p.opts}, path


def test_predictor_settings_checks_its_values() -> None:
    from histoscan.errors import ConfigError

    with pytest.raises(ConfigError, match="precision: 'fp64' is not one of auto, fp32, bf16, fp16"):
        PredictorSettings(precision="fp64")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_size: must be at least 1, got 0"):
        PredictorSettings(batch_size=0)
    s = PredictorSettings(device="cpu", tta=True)
    assert s.predictor_kwargs(backend="torch", batch_size=64) == {"backend": "torch", "batch_size": 64, "device": "cpu"}

    @dataclasses.dataclass
    class Scan:
        device: str = "cpu"
        tta: bool = False
        other: int = 1

    assert s.apply(Scan()) == Scan(device="cpu", tta=True)


def test_deprecated_spellings_are_translated_and_warned_about_once() -> None:
    lines: list[str] = []
    old = {"--weights": Deprecated("--member-weights"), "--onnx": Deprecated(None, "ONNX is the only format")}
    args = ["a", "--weights", "1,2", "--weights=3,4", "--onnx", "--", "--weights"]
    assert deprecated_args(args, old, lines.append, flags={"--onnx"}) == [
        "a",
        "--member-weights",
        "1,2",
        "--member-weights=3,4",
        "--",
        "--weights",
    ]
    assert lines == [
        "option --weights is deprecated: use --member-weights",
        "option --onnx is deprecated: it does nothing (ONNX is the only format)",
    ]


def test_every_deprecated_spelling_names_a_real_option() -> None:
    commands = _commands()
    for path, table in DEPRECATED.items():
        flags = {flag for p in commands[path].params for flag in [*p.opts, *p.secondary_opts]}
        for old, dep in table.items():
            assert dep.use is None or dep.use in flags, (path, old, dep.use)
            assert old not in flags or commands[path].params, (path, old)


def test_synth_old_spellings_work_and_warn_once(tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["synth", str(tmp_path / "f"), "--layout", "folders", "--n", "30", "--classes", "3", "--classes", "3"]
    )
    assert res.exit_code == 0, res.output
    assert res.output.count("option --classes is deprecated: use --num-classes") == 1
    assert len([d for d in (tmp_path / "f").iterdir() if d.is_dir()]) == 3
    res = runner.invoke(app, ["synth", str(tmp_path / "k"), "--n", "20", "--test", "5"])
    assert res.exit_code == 0 and "option --test is deprecated: use --unlabelled" in res.output
    assert len(list((tmp_path / "k" / "test").iterdir())) == 5
    same = runner.invoke(app, ["synth", str(tmp_path / "k2"), "--n", "20", "--unlabelled", "5"])
    assert same.exit_code == 0 and "deprecated" not in same.output


def test_an_option_of_another_mode_names_the_command() -> None:
    commands = _commands()
    for path, table in ELSEWHERE.items():
        flags = {flag for p in commands[path].params for flag in p.opts}
        assert not set(table) & flags, path  # only options the command does not have
    res = runner.invoke(app, ["slide", "run", "a.svs", "--out", "o", "--labels", "l.csv"])
    assert res.exit_code == 2
    assert "--labels is not an option of 'histoscan slide scan'" in res.output and "slide evaluate" in res.output
    res = runner.invoke(app, ["calibrate", "run", "--save-threshold", "youden"], prog_name="python -m histoscan")
    assert res.exit_code == 2 and "histoscan evaluate RUN --save-threshold" in res.output  # however it is run


def _scan(tmp_path: Path) -> tuple[Path, Path]:
    scan = tmp_path / "scan"
    scan.mkdir()
    (scan / "slides.csv").write_text(
        "slide,status,max_probability,topk_mean_probability\n"
        "a,done,0.9,0.8\nb,done,0.2,0.1\nc,done,0.7,0.6\nd,failed,,\n"
    )
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\na,tumour\nb,normal\nc,1\n")
    return scan, labels


def test_slide_evaluate_and_the_deprecated_evaluate_labels(tmp_path: Path) -> None:
    scan, labels = _scan(tmp_path)
    res = runner.invoke(app, ["slide", "evaluate", str(scan), "--labels", str(labels)])
    assert res.exit_code == 0, res.output
    assert "slide-level AUROC (max_probability, 3 slides, 2 tumour): 1.0000" in res.output
    old = runner.invoke(app, ["evaluate", str(scan / "slides.csv"), "--labels", str(labels)])
    assert old.exit_code == 0, old.output
    assert old.output.count("deprecated: use 'histoscan slide evaluate") == 1
    assert "slide-level AUROC (max_probability, 3 slides, 2 tumour): 1.0000" in old.output
    res = runner.invoke(app, ["slide", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "scan" in res.output and "evaluate" in res.output


@pytest.mark.slow
def test_evaluate_and_calibrate_take_the_device(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    res = runner.invoke(
        app,
        ["evaluate", str(run), "--device", "cpu", "--precision", "fp32", "--no-tta", "--bootstrap", "10"],
    )
    assert res.exit_code == 0, res.output
    assert "auroc" in res.output.lower()
    res = runner.invoke(app, ["calibrate", str(run), "--device", "cpu", "--batch-size", "16"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("temperature ")
    res = runner.invoke(app, ["evaluate", str(run), "--precision", "fp64"])
    assert res.exit_code == 2 and "fp64" in res.output and "fp32" in res.output


# Every command's settings dataclass ("module:Class"); its options are generated from these and PredictorSettings.
SETTINGS = {
    "demo": "histoscan.demo_settings:DemoSettings",
    "ingest": "histoscan.data.settings:IngestSettings",
    "info": "histoscan.data.settings:InfoSettings",
    "split": "histoscan.data.settings:SplitSettings",
    "synth": "histoscan.data.settings:SynthSettings",
    "download pcam": "histoscan.data.settings:DownloadPcamSettings",
    "stain fit": "histoscan.stain.settings:StainFitSettings",
    "stain show": "histoscan.stain.settings:StainShowSettings",
    "models": "histoscan.models.settings:ModelsSettings",
    "predict": "histoscan.inference.settings:PredictSettings",
    "export": "histoscan.inference.settings:ExportSettings",
    "ensemble": "histoscan.inference.settings:EnsembleSettings",
    "calibrate": "histoscan.trust.settings:CalibrateSettings",
    "eda": "histoscan.eda.settings:EdaSettings",
    "baselines": "histoscan.baselines.settings:BaselinesSettings",
    "evaluate": "histoscan.evaluation.settings:EvaluateSettings",
    "compare": "histoscan.evaluation.settings:CompareSettings",
    "serve": "histoscan.serving.state:ServeSettings",
    "tune": "histoscan.tuning.settings:TuneSettings",
    "explain": "histoscan.explain.settings:ExplainSettings",
    "train": "histoscan.training.config:TrainConfig",
    "slide scan": "histoscan.wsi.scan:ScanSettings",
    "slide evaluate": "histoscan.wsi.settings:SlideEvaluateSettings",
}
# The few parameters declared by hand, and why: a config file that fills TrainConfig, tune's KEY=YAML overrides
# of TrainConfig, explain's inputs (many kinds), and the run, slides and output folder that slide scan feeds
# run_slides beside ScanSettings.
BY_HAND = {"train": {"config"}, "tune": {"set_"}, "explain": {"inputs"}, "slide scan": {"run", "slides", "out"}}


def test_every_option_comes_from_a_settings_dataclass() -> None:
    """Each parameter of each command is a documented field of its settings dataclass (or of PredictorSettings),
    with that field's help text: no command repeats a default or a help text by hand."""
    import importlib

    commands = _commands()
    assert set(commands) == set(SETTINGS), "a command without a settings dataclass (or a stale entry)"
    model = {f.name: f for f in documented_fields(PredictorSettings)}
    problems = []
    for path, cmd in commands.items():
        module, name = SETTINGS[path].split(":")
        cls = getattr(importlib.import_module(module), name)
        # the packages own their settings: none lives in the CLI
        assert not cls.__module__.startswith("histoscan.cli"), path
        fields = {f.name: f for f in documented_fields(cls)}
        for p in cmd.params:
            if p.name in BY_HAND.get(path, set()) or p.name == "help":
                continue
            f = fields.get(p.name) or model.get(p.name)
            if f is None:
                problems.append(f"{path}: {p.name} is not a field of {name} or PredictorSettings")
            elif not (p.help or "").startswith(f.metadata["help"]):  # YAML options append an example
                problems.append(f"{path}: {p.name}'s help is not its field's")
    assert not problems, "\n".join(problems)


def test_settings_dataclasses_keep_the_command_defaults() -> None:
    """The command line and Python share one set of defaults (a few spot checks of renamed or odd options)."""
    from histoscan.baselines.settings import BaselinesSettings
    from histoscan.data.settings import IngestSettings, SynthSettings
    from histoscan.evaluation.settings import EvaluateSettings
    from histoscan.inference.settings import EnsembleSettings

    assert SynthSettings(Path("o")).num_classes == 2 and SynthSettings(Path("o")).unlabelled == 0
    assert IngestSettings(Path("s"), Path("o"), classes="a,b").class_names() == ["a", "b"]
    assert BaselinesSettings(Path("s")).out == Path("runs/baselines")
    assert EvaluateSettings(Path("r")).target_sensitivity == [0.95]
    assert EnsembleSettings([Path("a"), Path("b")], Path("o")).threshold_rule == "youden"
    commands = _commands()
    sens = next(p for p in commands["evaluate"].params if p.name == "target_sensitivity")
    assert sens.multiple and sens.default == [0.95]  # repeatable, as before
    out = next(p for p in commands["baselines"].params if p.name == "out")
    assert out.param_type_name == "argument" and str(out.default) == "runs/baselines"


def test_train_device_without_folds_names_the_training_options(tmp_path: Path) -> None:
    res = runner.invoke(app, ["train", "--data", str(tmp_path), "--device", "cuda"])
    assert res.exit_code == 2
    assert "--device is where 'train --folds K' predicts its out-of-fold patches" in res.output
    assert "--accelerator and --devices" in res.output
