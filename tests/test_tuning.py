"""Optuna studies: pruning, failed trials, best config, resume after a kill, two workers, space files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from histoscan.cli import app
from histoscan.errors import ConfigError
from histoscan.tuning.settings import TuneSettings, parse_overrides
from histoscan.tuning.space import load_space, shipped_spaces
from histoscan.tuning.study import tune

FAST = {"max_epochs": 2, "early_stopping": None, "batch_size": 32, "resize": 32, "val": 0.25, "test": 0.15}


def _space(tmp_path: Path, params: dict, base: dict | None = None) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump({"base": base or {"model": "simple_cnn", "model_args": {"batch_norm": True}}, "params": params})
    )
    return path


@pytest.fixture(scope="module")
def tune_store(kaggle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from histoscan.data.ingest import ingest

    return ingest(kaggle_dir, tmp_path_factory.mktemp("tune") / "store", workers=1).store


def _studies(root: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / name / 'study.db'}")


def test_shipped_spaces_parse() -> None:
    assert set(shipped_spaces()) >= {"hparams", "nas", "backbone"}
    nas = load_space("nas")
    names = {p.name for p in nas.params}
    assert {"model_args.num_blocks", "model_args.kernel_sizes", "model_args.dense_units", "lr"} <= names
    trial = optuna.create_study().ask()
    overrides = nas.suggest(trial)
    assert len(overrides["model_args"]["kernel_sizes"]) == overrides["model_args"]["num_blocks"]
    assert overrides["model_args"]["dense_units"] in ([512, 256], [256, 128], [512], [256])
    assert 1e-5 <= overrides["lr"] <= 1e-3


@pytest.mark.parametrize(
    "params, message",
    [
        ({"model_args.depth": {"int": [1, 3]}}, "has no argument 'depth'"),
        ({"learning_rate": {"float": [0.1, 1.0]}}, "unknown parameter 'learning_rate'"),
        ({"lr": {"float": [0.1, 0.01]}}, "low must be below high"),
        ({"lr": {"float": [0.0, 0.1], "log": True}}, "log range must be positive"),
        ({"lr": {"float": [0.1]}}, "range \\[low, high\\]"),
        ({"lr": {"uniform": [0.1, 1.0]}}, "exactly one of"),
        ({"lr": {"float": [0.1, 1.0], "scale": 2}}, "unknown option"),
        ({"batch_size": {"choice": []}}, "non-empty list"),
        ({"model_args.dropout": {"choice": [0.1], "per": "lr"}}, "'per' must name an int parameter"),
    ],
)
def test_bad_space_files_are_clear_errors(tmp_path: Path, params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_space(_space(tmp_path, params))


@pytest.mark.slow
def test_study_prunes_records_failures_and_writes_the_best_config(tune_store: Path, tmp_path: Path) -> None:
    space = _space(tmp_path, {"lr": {"choice": [3.0e-3, 10.0, 1.0e-2]}, "model_args.dropout": {"choice": [0.2, 7.0]}})
    # enqueue known trials: a good one, one that cannot learn (lr 10 kills every ReLU: AUROC 0.5),
    # and one with an invalid dropout (fails)
    (tmp_path / "s").mkdir()
    study = optuna.create_study(
        study_name="s", storage=f"sqlite:///{tmp_path / 's' / 'study.db'}", direction="maximize"
    )
    for params in (
        {"lr": 3.0e-3, "model_args.dropout": 0.2},
        {"lr": 10.0, "model_args.dropout": 0.2},
        {"lr": 1.0e-2, "model_args.dropout": 7.0},
    ):
        study.enqueue_trial(params)
    lines: list[str] = []
    aggressive = optuna.pruners.PercentilePruner(50.0, n_startup_trials=1, n_warmup_steps=0)
    r = tune(
        TuneSettings(
            data=str(tune_store),
            space=str(space),
            trials=3,
            study="s",
            out=str(tmp_path),
            resume=True,
            pruner=aggressive,
            overrides=FAST,
            retrain_best=True,
            retrain_epochs=1,
        ),
        printer=lines.append,
    )
    states = dict(zip(r.table["trial"], r.table["state"]))
    assert states == {0: "complete", 1: "pruned", 2: "fail"}, r.table
    assert "dropout" in r.table.loc[2, "error"]
    assert sum("pruned" in line for line in lines) == 1 and any("best" in line for line in lines)
    for f in ("trials.csv", "history.png", "best.yaml"):
        assert (tmp_path / "s" / f).is_file(), f
    assert r.best_params == {"lr": 3.0e-3, "model_args.dropout": 0.2}
    run_trial = tmp_path / "s" / "trials" / "trial-0000"
    assert (run_trial / "model.json").is_file() and (run_trial / "best.safetensors").is_file()
    # the retrained run used train+val and kept the test split held out
    split = (r.retrained / "split.csv").read_text()  # type: ignore[operator]
    assert ",val" not in split and ",test" in split
    # 'histoscan train --config best.yaml' accepts the best configuration
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--config",
            str(r.best_config),
            "--out",
            str(tmp_path / "runs"),
            "--name",
            "b",
            "--max-epochs",
            "1",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    best = yaml.safe_load(r.best_config.read_text())  # type: ignore[union-attr]
    assert best["lr"] == 3.0e-3 and best["model_args"]["dropout"] == 0.2


def test_existing_study_needs_resume(tune_store: Path, tmp_path: Path) -> None:
    space = _space(tmp_path, {"lr": {"float": [1e-3, 1e-2], "log": True}})
    settings = TuneSettings(
        data=str(tune_store), space=str(space), trials=1, study="again", out=str(tmp_path), overrides=FAST
    )
    tune(settings, printer=lambda *_: None)
    with pytest.raises(ConfigError, match="--resume"):
        tune(settings, printer=lambda *_: None)
    settings.resume = True
    lines: list[str] = []
    tune(settings, printer=lines.append)
    assert any("nothing to run" in line for line in lines)


def _tune_cmd(store: Path, space: Path, root: Path, name: str, trials: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "histoscan",
        "tune",
        "--data",
        str(store),
        "--space",
        str(space),
        "--trials",
        str(trials),
        "--study",
        name,
        "--out",
        str(root),
        "--pruner",
        "none",
        *[a for k, v in FAST.items() for a in ("--set", f"{k}={'null' if v is None else v}")],
        *extra,
    ]


def _completed_trials(db: Path) -> int:
    """Complete trials in a study database, read-only: opening it through Optuna while the tuner creates its
    tables would race the tuner's own schema creation (``table ... already exists``)."""
    import sqlite3

    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return int(con.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0])
    except sqlite3.Error:  # the tables are not there yet
        return 0


@pytest.mark.slow
def test_killed_study_resumes_without_repeating_finished_trials(tune_store: Path, tmp_path: Path) -> None:
    space = _space(tmp_path, {"lr": {"float": [1e-3, 1e-2], "log": True}})
    proc = subprocess.Popen(
        _tune_cmd(tune_store, space, tmp_path, "k", 3), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 240
    finished = 0
    while time.time() < deadline and proc.poll() is None and not finished:
        time.sleep(0.5)
        finished = _completed_trials(tmp_path / "k" / "study.db")
    assert finished, (
        f"no trial completed before the kill: {proc.stderr.read().decode() if proc.poll() is not None else ''}"
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _studies(tmp_path, "k").get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    before = {
        t.number: (t.value, (Path(t.user_attrs["run_dir"]) / "best.safetensors").stat().st_mtime_ns) for t in done
    }
    r = tune(
        TuneSettings(
            data=str(tune_store),
            space=str(space),
            trials=3,
            study="k",
            out=str(tmp_path),
            resume=True,
            pruner="none",
            overrides=FAST,
        ),
        printer=lambda *_: None,
    )
    complete = r.table[r.table["state"] == "complete"]
    assert len(complete) == 3
    for number, (value, mtime) in before.items():  # finished trials kept, not run again
        t = _studies(tmp_path, "k").trials[number]
        assert t.value == value and (Path(t.user_attrs["run_dir"]) / "best.safetensors").stat().st_mtime_ns == mtime
    run_dirs = [Path(p) for p in r.table["run_dir"] if p]
    assert len(set(run_dirs)) == len(run_dirs)


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tune_store: Path, tmp_path: Path) -> None:
    space = _space(tmp_path, {"lr": {"float": [1e-3, 1e-2], "log": True}})
    (tmp_path / "w").mkdir()
    optuna.create_study(study_name="w", storage=f"sqlite:///{tmp_path / 'w' / 'study.db'}", direction="maximize")
    procs = [
        subprocess.Popen(
            _tune_cmd(tune_store, space, tmp_path, "w", 4, "--resume", "--seed", "0"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err.decode()[-2000:]
    trials = _studies(tmp_path, "w").get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) >= 4
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers completed trials
    assert len({t.params["lr"] for t in trials}) == len(trials)  # distinct configurations


def test_cli_tune_bad_input(tune_store: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["tune", "--data", str(tune_store), "--space", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "not a shipped space" in res.output
    res = CliRunner().invoke(app, ["tune", "--data", str(tune_store), "--pruner", "fast", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "fast" in res.output and all(p in res.output for p in ("hyperband", "median"))
    res = CliRunner().invoke(app, ["tune", "--data", str(tune_store), "--timeout", "600", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "has no unit" in res.output
    res = CliRunner().invoke(app, ["tune", "--data", str(tune_store), "--set", "max_epochs", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "expected KEY=VALUE" in res.output


def test_tune_settings_durations_and_choices() -> None:
    assert TuneSettings(data="s", timeout="1h30m").timeout_seconds == 5400.0
    assert TuneSettings(data="s").timeout_seconds is None
    with pytest.raises(ConfigError, match="timeout: '600' has no unit"):
        TuneSettings(data="s", timeout=600)
    with pytest.raises(ConfigError, match="sampler: 'grid' is not one of tpe, random"):
        TuneSettings(data="s", sampler="grid")
    assert parse_overrides(["max_epochs=4", "class_weights=[1, 2]"]) == {"max_epochs": 4, "class_weights": [1, 2]}
