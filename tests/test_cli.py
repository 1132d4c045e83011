"""The histoscan command end to end through Typer's test runner."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from histoscan.cli import app
from histoscan.options import dataclass_options, doc, given_values, with_parameters

runner = CliRunner()


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    res = runner.invoke(app, ["demo", "--workdir", str(tmp_path / "demo"), "--n", "200", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    for word in (
        "packed store",
        "data report",
        "run folder",
        "evaluation report",
        "ONNX model",
        "Kaggle submission",
        "AUROC",
        "refer images with",  # the referral rule fitted on validation
        "referred:",  # a referred example (or none among the unlabelled patches)
        "answer 'not tissue'",  # a blank patch is never called a class
        "error-detection AUROC",
    ):
        assert word in res.output
    assert (tmp_path / "demo" / "eda" / "report.html").is_file()
    assert (tmp_path / "demo" / "runs" / "demo-0" / "eval" / "report.html").is_file()
    meta = json.loads((tmp_path / "demo" / "store" / "meta.json").read_text())
    assert meta["count"] == 200
    sub = (tmp_path / "demo" / "submission.csv").read_text().splitlines()
    assert sub[0] == "id,label" and len(sub) == 101


def test_synth_ingest_info_split(tmp_path: Path) -> None:
    res = runner.invoke(app, ["synth", str(tmp_path / "src"), "--layout", "grouped-folders", "--n", "80"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["ingest", str(tmp_path / "src"), str(tmp_path / "store"), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "images stored" in res.output
    res = runner.invoke(app, ["info", str(tmp_path / "store")])
    assert res.exit_code == 0 and "patches" in res.output and "80" in res.output
    res = runner.invoke(app, ["split", str(tmp_path / "store"), "--val", "0.2", "--test", "0.2", "--folds", "3"])
    assert res.exit_code == 0, res.output
    folds = tmp_path / "store" / "splits" / "folds3-seed0-val0.2-test0.2-grouped.csv"
    assert folds.read_text().startswith("id,fold\n")
    res = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tmp_path / "store"),
            "--split-file",
            str(folds),
            "--fold",
            "1",
            "--out",
            str(tmp_path / "runs"),
            "--name",
            "fold1",
            "--max-epochs",
            "1",
            "--max-time",
            "10m",
            "--resize",
            "32",
            "--batch-size",
            "16",
            "--early-stopping",
            "0",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    used = pd.read_csv(tmp_path / "runs" / "fold1" / "split.csv", dtype=str)
    fold = pd.read_csv(folds, dtype=str)
    assert list(used["split"]) == ["val" if f == "1" else "test" if f == "test" else "train" for f in fold["fold"]]


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    res = runner.invoke(app, ["ingest", str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "no such file or folder" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["info", str(tmp_path)])
    assert res.exit_code == 2 and "not a histoscan store" in res.output
    res = runner.invoke(app, ["synth", str(tmp_path / "x"), "--layout", "nope"])
    assert res.exit_code == 2 and "unknown layout" in res.output


def test_serve_options_come_from_serve_settings() -> None:
    from histoscan.options import documented_fields
    from histoscan.serving.state import ServeSettings

    res = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for f in documented_fields(ServeSettings):
        if not f.metadata.get("argument"):
            flag = f.metadata.get("flags", "--" + f.name.replace("_", "-")).split("/")[0]
            assert flag in res.output, f.name
    assert all(f.metadata.get("help") for f in dataclasses.fields(ServeSettings))  # every field is documented
    assert "--in-process" in res.output and "--api-key" not in res.output  # the key comes from the environment
    res = runner.invoke(app, ["serve", "run", "--backend", "tensorrt"])
    assert res.exit_code == 2 and "tensorrt" in res.output and "onnx" in res.output


def test_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("histoscan ")


def test_any_documented_dataclass_becomes_options() -> None:
    """A field added later with field(metadata={"help": ...}) shows up without touching cli.py."""

    @dataclasses.dataclass
    class Limits:
        max_queue: int = dataclasses.field(default=8, metadata={"help": "Requests waiting at most."})
        mode: Literal["fast", "safe"] = doc("How to run.", "safe")
        strict: bool = doc("Refuse odd inputs.", True)
        sizes: list = doc("Allowed sizes.", [96])
        hidden: str = "x"  # no help text: not an option

    got: list[Limits] = []

    def command(**values: Any) -> None:
        got.append(Limits(**given_values(Limits, values)))

    one = typer.Typer()
    one.command()(with_parameters(command, dataclass_options(Limits)))
    res = CliRunner().invoke(one, ["--max-queue", "3", "--no-strict", "--sizes", "[32, 64]"])
    assert res.exit_code == 0, res.output
    assert got[-1] == Limits(max_queue=3, mode="safe", strict=False, sizes=[32, 64])
    res = CliRunner().invoke(one, ["--mode", "quick"])
    assert res.exit_code == 2 and "fast" in res.output and "safe" in res.output
    res = CliRunner().invoke(one, ["--hidden", "y"])
    assert res.exit_code == 2
    res = CliRunner().invoke(one, ["--help"], env={"COLUMNS": "200"})
    assert "Requests waiting at most." in res.output and "default: 8" in res.output
