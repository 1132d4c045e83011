"""Rows no member saw (issue 34): ensembles and 'calibrate' fit on the split's calibration rows, scored by the
ensemble as deployed; overlap with a member's training or validation rows and non-CV ensembles without
calibration rows are refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from histoscan.bundle import read_bundle
from histoscan.cli import app
from histoscan.data.store import PatchStore
from histoscan.errors import ConfigError
from histoscan.evaluation.evaluate import pick_threshold
from histoscan.inference.calibration import calibrate
from histoscan.inference.ensemble import make_ensemble
from histoscan.inference.fitting import fitting_predictions
from histoscan.inference.predictor import Predictor, default_tta
from histoscan.runfolder import RunFolder
from histoscan.training.config import TrainConfig
from histoscan.training.cv import CV_FILE, ENSEMBLE_DIR, OOF_FILE, fold_dir, train_folds
from histoscan.training.fit import train

pytestmark = pytest.mark.slow  # trains four tiny CNNs for one epoch each (about 30 s on the shared 2-core machine)

SPLIT = dict(val=0.2, test=0.1, calibration=0.2)


def _cfg(store: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        data=str(store),
        out=str(out),
        model="simple_cnn",
        resize=24,
        batch_size=32,
        max_epochs=1,
        progress=False,
        early_stopping=None,
        ema_decay=None,
        **SPLIT,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def store(tiny_run: Path) -> Path:
    path = RunFolder(tiny_run).training_store()
    assert path is not None
    return path


@pytest.fixture(scope="module")
def runs(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two runs on one split with calibration rows (different learning rates) and a 2-fold CV of the same recipe."""
    out = tmp_path_factory.mktemp("calrows")
    quiet = lambda *_: None  # noqa: E731
    train(_cfg(store, out, name="a", lr=3e-3), printer=quiet)
    train(_cfg(store, out, name="b", lr=1e-3, model_args={"batch_norm": True}), printer=quiet)
    train_folds(_cfg(store, out, name="cv", folds=2), printer=quiet)
    return out


def _calibration(run: Path) -> PatchStore:
    r = RunFolder(run)
    part, _ = r.select_patches(r.data_store(), "calibration")
    return part


def _deployed_threshold(ens: Path, part: PatchStore) -> float:
    """Youden's threshold picked from the ensemble Predictor's own scores (every member, its default TTA)."""
    pred = Predictor(ens, backend="torch").predict_store(part, default_tta(read_bundle(ens)))
    return pick_threshold(part.labels, pred.probabilities[:, 1], "youden")


def test_cv_folds_leave_the_calibration_rows_out_and_the_ensemble_fits_there(runs: Path, store: Path) -> None:
    cv = runs / "cv"
    cal = _calibration(fold_dir(cv, 0))
    ids = set(cal.ids)
    assert len(ids) > 0
    for i in (0, 1):
        split = pd.read_csv(fold_dir(cv, i) / "split.csv", dtype=str)
        assert set(split.loc[split["split"] == "calibration", "id"]) == ids  # never a fold's train or val row
    assert not ids & set(pd.read_csv(cv / OOF_FILE, dtype=str)["id"])
    doc = json.loads((cv / ENSEMBLE_DIR / "model.json").read_text())
    assert doc["fitted_on"] == "calibration" and doc["fitted_rows"] == len(ids)
    assert "calibration rows" in doc["threshold_rule"] and "as deployed" in doc["threshold_rule"]
    ens_split = pd.read_csv(cv / ENSEMBLE_DIR / "split.csv", dtype=str)
    assert set(ens_split.loc[ens_split["split"] == "calibration", "id"]) == ids
    assert doc["threshold"] == pytest.approx(_deployed_threshold(cv / ENSEMBLE_DIR, cal))
    assert json.loads((cv / CV_FILE).read_text())["ensemble"]["fitted_on"] == "calibration"


def test_a_non_cv_ensemble_fits_on_calibration_rows_as_deployed(runs: Path, tmp_path: Path) -> None:
    ens = tmp_path / "ens"
    r = make_ensemble([runs / "a", runs / "b"], ens)
    cal = _calibration(runs / "a")
    assert r.fitted_on == "calibration" and f"the {len(cal)} calibration rows" in r.threshold_source
    assert "as deployed" in r.threshold_source
    assert r.threshold == pytest.approx(_deployed_threshold(ens, cal))
    doc = json.loads((ens / "model.json").read_text())
    assert doc["fitted_on"] == "calibration" and doc["fitted_rows"] == len(cal)
    # calibrate fits the temperature there too, through the ensemble
    fit = fitting_predictions(ens)
    assert sorted(fit.labels.tolist()) == sorted(cal.labels.tolist()) and "ensemble of 2 members" in fit.source
    res = CliRunner().invoke(app, ["calibrate", str(ens)])
    assert res.exit_code == 0 and f"on {len(cal)} patches (the {len(cal)} calibration rows" in res.output, res.output


def test_a_single_run_calibrates_on_its_calibration_rows_else_on_val_saying_so(
    runs: Path, tiny_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "a"
    shutil.copytree(runs / "a", run)
    result = calibrate(run)
    assert result.count == len(_calibration(run)) and "calibration rows" in result.source
    old = fitting_predictions(tiny_run)  # a split without calibration rows: val, and it says so
    assert "validation split" in old.source and "no calibration rows" in old.source


def test_overlap_with_a_members_training_rows_is_refused(runs: Path, tmp_path: Path) -> None:
    leaky = tmp_path / "leaky"
    shutil.copytree(runs / "b", leaky)
    split = pd.read_csv(leaky / "split.csv", dtype=str)
    moved = split["split"] == "calibration"
    split.loc[moved, "split"] = "train"  # this member trained on the rows the other one reserves
    split.to_csv(leaky / "split.csv", index=False)
    n = int(moved.sum())
    words = rf"^{leaky}/split.csv: field 'split' puts {n} of the {n} calibration rows in member .*leaky's training"
    with pytest.raises(ConfigError, match=words + r".*histoscan split STORE --calibration 0.1"):
        make_ensemble([runs / "a", leaky], tmp_path / "e1")
    assert not (tmp_path / "e1" / "model.json").exists()
    # a member retrained on other rows after the ensemble was written: refused when the ensemble is refitted
    ens = tmp_path / "e2"
    shutil.copytree(runs / "b", tmp_path / "b")
    make_ensemble([runs / "a", tmp_path / "b"], ens, threshold_rule="none")
    shutil.copy(leaky / "split.csv", tmp_path / "b" / "split.csv")
    res = CliRunner().invoke(app, ["calibrate", str(ens)])
    assert res.exit_code != 0 and "split.csv: field 'split' puts" in res.output, res.output


def test_a_non_cv_ensemble_without_calibration_rows_is_refused(runs: Path, tiny_run: Path, tmp_path: Path) -> None:
    twin = tmp_path / "twin"
    shutil.copytree(tiny_run, twin)  # the same split, without calibration rows, and not folds of one CV
    words = r"split.csv: these members are not the folds of one cross-validation and their split has no calibration"
    with pytest.raises(ConfigError, match=words + r".*histoscan split STORE --calibration 0.1"):
        make_ensemble([tiny_run, twin], tmp_path / "e")
    assert not (tmp_path / "e").exists()
    make_ensemble([tiny_run, twin], tmp_path / "e", threshold_rule="none")  # nothing fitted: allowed, 0.5 kept
    with pytest.raises(ConfigError, match=r"has no calibration rows and its members are not the folds"):
        fitting_predictions(tmp_path / "e")  # and 'calibrate' is refused the same way
