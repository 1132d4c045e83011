"""The histoscan command end to end through Typer's test runner."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from histoscan.cli import app

runner = CliRunner()


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
    assert (tmp_path / "store" / "splits" / "folds3-seed0.csv").is_file()


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    res = runner.invoke(app, ["ingest", str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "no such file or folder" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["info", str(tmp_path)])
    assert res.exit_code == 2 and "not a histoscan store" in res.output
    res = runner.invoke(app, ["synth", str(tmp_path / "x"), "--layout", "nope"])
    assert res.exit_code == 2 and "unknown layout" in res.output


def test_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("histoscan ")
