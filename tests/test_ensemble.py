"""Cross-validation (train --folds), ensemble bundles, and every consumer taking an ensemble."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from histoscan.bundle import EnsembleBundle, read_bundle
from histoscan.cli import app
from histoscan.data.splits import fold_assignment
from histoscan.data.store import PatchStore
from histoscan.errors import ConfigError
from histoscan.inference.calibration import calibrate
from histoscan.inference.ensemble import make_ensemble
from histoscan.inference.export import ExportError, export_onnx
from histoscan.inference.fitting import fitting_predictions
from histoscan.inference.predictor import Predictor
from histoscan.inference.settings import PredictorSettings
from histoscan.runfolder import RunFolder
from histoscan.training.config import TrainConfig
from histoscan.training.cv import CV_FILE, ENSEMBLE_DIR, OOF_FILE, collect_folds, fold_dir, train_folds


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
        val=0.2,
        test=0.1,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def store(tiny_run: Path) -> Path:
    path = RunFolder(tiny_run).training_store()
    assert path is not None
    return path


@pytest.fixture(scope="module")
def cv(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two folds x 1 epoch of a tiny CNN on the tiny run's store (its split recipe: same test rows)."""
    out = tmp_path_factory.mktemp("cv")
    train_folds(_cfg(store, out, name="cv", folds=2), printer=lambda *_: None)
    return out / "cv"


def test_folds_training_writes_oof_cv_json_and_an_ensemble(cv: Path, store: Path) -> None:
    s = PatchStore(store)
    assignment, _ = fold_assignment(s, 2, val=0.2, test=0.1, seed=0)  # the folds 'histoscan split --folds 2' writes
    oof = pd.read_csv(cv / OOF_FILE, dtype={"fold": str})
    non_test = set(np.asarray(s.ids)[assignment != "test"])
    assert len(oof) == len(non_test) and set(oof["id"]) == non_test  # every non-test row once, no test row
    by_id = dict(zip(s.ids, assignment))
    assert all(by_id[i] == f for i, f in zip(oof["id"], oof["fold"]))  # predicted by the fold that held it out
    summary = json.loads((cv / CV_FILE).read_text())
    assert summary["folds"] == 2 and 0 <= summary["oof"]["auroc"] <= 1 and summary["oof"]["patches"] == len(oof)
    assert set(summary["metrics"]["best_val_auroc"]) == {"mean", "std"}
    vals = [f["best_val_auroc"] for f in summary["per_fold"]]
    assert summary["metrics"]["best_val_auroc"]["mean"] == pytest.approx(np.mean(vals))
    bundle = read_bundle(cv / ENSEMBLE_DIR)
    assert isinstance(bundle, EnsembleBundle) and bundle.fitted_on == "oof" and len(bundle.members) == 2
    doc = json.loads((cv / ENSEMBLE_DIR / "model.json").read_text())
    assert doc["kind"] == "ensemble" and doc["members"][0]["run"] == "../fold-0" and "oof" in doc["threshold_rule"]
    assert "an approximation: single-member scores" in doc["threshold_rule"]  # no calibration rows: labelled
    # the ensemble scores only the test rows: every other row trained one of its members
    split = pd.read_csv(cv / ENSEMBLE_DIR / "split.csv")
    assert set(split["split"]) == {"train", "test"}


@pytest.mark.slow
def test_one_fold_alone_then_collect_without_retraining(cv: Path, store: Path, tmp_path: Path) -> None:
    shutil.copytree(fold_dir(cv, 0), tmp_path / "cv2" / "fold-0")
    r = train_folds(_cfg(store, tmp_path, name="cv2", folds=2, fold=1), printer=lambda *_: None)
    assert r.trained == [1] and r.reused == [] and r.summary  # fold 0 existed: collected once both finished
    before = (tmp_path / "cv2" / "fold-1" / "best.safetensors").stat().st_mtime_ns
    (tmp_path / "cv2" / OOF_FILE).unlink()
    r = train_folds(_cfg(store, tmp_path, name="cv2", folds=2), printer=lambda *_: None)
    assert r.trained == [] and r.reused == [0, 1] and (tmp_path / "cv2" / OOF_FILE).is_file()
    assert (tmp_path / "cv2" / "fold-1" / "best.safetensors").stat().st_mtime_ns == before


def test_cv_predicts_out_of_fold_under_the_given_settings(cv: Path, tmp_path: Path) -> None:
    """CV's out-of-fold scores run under PredictorSettings (device, TTA, batch size), as evaluate and calibrate do."""
    for i in range(2):
        shutil.copytree(fold_dir(cv, i), tmp_path / "cv" / f"fold-{i}")
    settings = PredictorSettings(device="cpu", tta=False, batch_size=7)
    summary = collect_folds(tmp_path / "cv", 2, ensemble=False, printer=lambda *_: None, settings=settings)
    assert summary["tta"] is False and summary["device"] == "cpu"
    oof = pd.read_csv(tmp_path / "cv" / OOF_FILE)
    fold0 = oof[oof["fold"] == 0]
    run = RunFolder(fold_dir(cv, 0))
    part, _ = run.select_patches(run.data_store(), "val")
    expected = Predictor(fold_dir(cv, 0), backend="torch").predict_store(part, [0]).probabilities[:, 1]
    np.testing.assert_allclose(fold0.filter(like="prob_").to_numpy()[:, 1], expected, atol=1e-5)


@pytest.mark.slow
def test_ensemble_of_different_members_is_the_weighted_mean(
    tiny_run: Path, cv: Path, store: Path, tmp_path: Path
) -> None:
    member = fold_dir(cv, 0)  # resize 24, no batch norm; tiny_run: resize 48, batch norm
    ens = tmp_path / "ens"
    with pytest.raises(ConfigError, match="no calibration rows"):  # not folds of one CV: no rows to fit a threshold on
        make_ensemble([tiny_run, member], ens, weights=[1.0, 3.0])
    r = make_ensemble([tiny_run, member], ens, weights=[1.0, 3.0], threshold_rule="none")
    assert r.fitted_on == "validation" and r.threshold == 0.5
    images = PatchStore(store).batch(list(range(12)))
    a = Predictor(tiny_run, backend="torch").predict_batch(images).probabilities
    b = Predictor(member, backend="torch").predict_batch(images).probabilities
    pred = Predictor(ens, backend="torch").predict_batch(images)
    np.testing.assert_allclose(pred.probabilities, (a + 3 * b) / 4, atol=1e-5)
    assert pred.uncertainty is not None and pred.uncertainty.shape == (12,)  # members alone give a spread
    tta = Predictor(ens, backend="torch").predict_batch(images, True)
    assert tta.uncertainty is not None and (tta.uncertainty >= 0).all()
    with pytest.raises(ExportError, match=r"member .*fold-0 preprocesses differently \(resize 24 vs 48\)"):
        export_onnx(ens)
    with pytest.raises(ConfigError, match="explain a member instead"):
        from histoscan.explain.explainer import Explainer

        Explainer(ens)


@pytest.mark.slow
def test_consumers_take_an_ensemble(cv: Path, store: Path, kaggle_dir: Path, tmp_path: Path) -> None:
    ens = tmp_path / "ens"
    shutil.copytree(cv / ENSEMBLE_DIR, ens)  # members are ../fold-<i>: keep them beside it
    for i in (0, 1):
        shutil.copytree(fold_dir(cv, i), tmp_path / f"fold-{i}")
    r = CliRunner()
    res = r.invoke(app, ["predict", str(ens), str(kaggle_dir / "test"), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    preds = pd.read_csv(tmp_path / "p.csv")
    assert "uncertainty" in preds.columns and len(preds) == 20  # spread across members, without TTA
    res = r.invoke(app, ["evaluate", str(ens), "--bootstrap", "20", "--no-tta"])
    assert res.exit_code == 0 and "AUROC" in res.output, res.output
    res = r.invoke(app, ["evaluate", str(ens), "--save-threshold", "youden", "--bootstrap", "0", "--no-tta"])
    assert res.exit_code == 0 and "chosen on the validation split" in res.output, res.output  # (its OOF predictions)
    res = r.invoke(app, ["calibrate", str(ens)])
    assert res.exit_code == 0 and "out-of-fold predictions of the 2 folds" in res.output, res.output
    assert "an approximation" in res.output
    assert read_bundle(ens).temperature != 1.0 and read_bundle(tmp_path / "fold-0").temperature == 1.0
    res = r.invoke(app, ["compare", str(ens), str(tmp_path / "fold-0"), "--out", str(tmp_path / "board")])
    assert res.exit_code == 0 and "ens" in res.output, res.output
    # export: one graph, parity-checked against the torch ensemble, predicting with the same uncertainty
    res = r.invoke(app, ["export", str(ens)])
    assert res.exit_code == 0 and "max |p_onnx - p_torch|" in res.output, res.output
    images = PatchStore(store).batch(list(range(10)))
    on = Predictor(ens, backend="onnx").predict_batch(images, True)
    to = Predictor(ens, backend="torch", precision="fp32").predict_batch(images, True)
    assert on.uncertainty is not None and to.uncertainty is not None
    np.testing.assert_allclose(on.probabilities, to.probabilities, atol=1e-4)
    np.testing.assert_allclose(on.uncertainty, to.uncertainty, atol=1e-4)
    # serve, in process and through the model process
    from histoscan.serving.app import create_app
    from histoscan.serving.state import ServeSettings

    f = sorted((kaggle_dir / "test").glob("*.tif"))[0]
    for model_process in (False, True):
        with TestClient(create_app(ServeSettings(str(ens), model_process=model_process))) as c:
            j = c.post("/v1/predict", files={"file": (f.name, f.read_bytes(), "image/tiff")}).json()
            assert set(j["probabilities"]) == {"normal", "tumor"} and j["uncertainty"] >= 0, j
            card = c.get("/v1/model").json()
            assert card["architecture"] == "ensemble" and [m["run"] for m in card["members"]] == ["fold-0", "fold-1"]


def test_slide_scan_takes_an_ensemble(cv: Path, tmp_path: Path) -> None:
    from histoscan.wsi.scan import ScanSettings, scan_slide
    from histoscan.wsi.synthetic import tumour_slide

    mpp = read_bundle(cv / ENSEMBLE_DIR).preprocessing.mpp
    slide = tmp_path / "s.tif"
    tumour_slide(slide, 6, 6, (1, 4, 1, 4), mpp or 0.972, seed=1)
    r = scan_slide(
        Predictor(cv / ENSEMBLE_DIR, backend="torch"), slide, tmp_path / "out", ScanSettings(model_mpp=mpp or 0.972)
    )
    assert r.folder.is_dir()


def _edited(run: Path, dest: Path, **changes: object) -> Path:
    shutil.copytree(run, dest)
    doc = json.loads((dest / "model.json").read_text())
    for key, value in changes.items():
        if key == "mpp":
            doc["preprocessing"]["mpp"] = value
        else:
            doc[key] = value
    (dest / "model.json").write_text(json.dumps(doc))
    return dest


def test_ensemble_refuses_bad_members_naming_them(tiny_run: Path, cv: Path, tmp_path: Path) -> None:
    member = fold_dir(cv, 0)
    with pytest.raises(ConfigError, match=r"^member .*nowhere: no such run folder"):
        make_ensemble([member, tmp_path / "nowhere"], tmp_path / "e1")
    other = _edited(member, tmp_path / "other", classes=["benign", "malignant"])
    with pytest.raises(ConfigError, match=r"^member .*other: classes \['benign', 'malignant'\]"):
        make_ensemble([member, other], tmp_path / "e2")
    three = _edited(member, tmp_path / "three", classes=["a", "b", "c"])
    with pytest.raises(ConfigError, match=r"^member .*three: a multiclass model, but .* is binary"):
        make_ensemble([member, three], tmp_path / "e3")
    coarse = _edited(member, tmp_path / "coarse", mpp=2.0)
    with pytest.raises(ConfigError, match=r"^member .*coarse: trained at 2.0 um/px"):
        make_ensemble([member, coarse], tmp_path / "e4")
    with pytest.raises(ConfigError, match=r"member .*ensemble is itself an ensemble"):
        make_ensemble([member, cv / ENSEMBLE_DIR], tmp_path / "e5")
    with pytest.raises(ConfigError, match=r"--member-weights: 3 weights for 2 runs"):
        make_ensemble([member, fold_dir(cv, 1)], tmp_path / "e6", weights=[1, 1, 1])
    res = CliRunner().invoke(app, ["ensemble", str(member), str(tmp_path / "gone"), "--out", str(tmp_path / "e7")])
    assert res.exit_code == 2 and "gone: no such run folder" in res.output
    # a member removed after the ensemble was written: one line naming it when the ensemble is read
    ens = tmp_path / "e8"
    shutil.copytree(fold_dir(cv, 1), tmp_path / "f1")
    make_ensemble([member, tmp_path / "f1"], ens, threshold_rule="none")
    shutil.rmtree(tmp_path / "f1")
    with pytest.raises(ConfigError, match=r"member .*f1 is not a histoscan run"):
        Predictor(ens)


@pytest.mark.slow
def test_fitting_predictions_of_a_single_run_is_its_validation_split(tiny_run: Path, tmp_path: Path) -> None:
    fit = fitting_predictions(tiny_run)  # under the fitting default: all 8 views for a binary model
    val, _ = RunFolder(tiny_run).select_patches(RunFolder(tiny_run).data_store(), "val")
    assert len(fit.labels) == len(val) and fit.uncertainty is not None and "validation split" in fit.source
    assert fit.record.under.tta == list(range(8)) and fit.record.split == "val" and fit.record.rows == len(val)
    one = fitting_predictions(tiny_run, False)
    assert one.uncertainty is None and one.record.under.tta == [0]
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = Predictor(run).predict_store(val, True).predicted
    calibrate(run)
    assert (
        Predictor(run).predict_store(val, True).predicted == before
    ).all()  # the threshold moves with the temperature


def test_cli_train_folds_collects_finished_folds_and_refuses_bad_options(cv: Path, store: Path, tmp_path: Path) -> None:
    for i in (0, 1):
        shutil.copytree(fold_dir(cv, i), tmp_path / "cv3" / f"fold-{i}")
    args = ["train", "--data", str(store), "--out", str(tmp_path), "--name", "cv3", "--val", "0.2", "--test", "0.1"]
    res = CliRunner().invoke(app, [*args, "--folds", "2"])
    assert res.exit_code == 0 and "reused: [0, 1]" in res.output and "out-of-fold AUROC" in res.output, res.output
    assert (tmp_path / "cv3" / CV_FILE).is_file() and (tmp_path / "cv3" / ENSEMBLE_DIR / "model.json").is_file()
    res = CliRunner().invoke(app, [*args, "--folds", "3"])  # other folds than the ones this CV started with
    assert res.exit_code == 2 and "folds.csv: these folds differ" in res.output, res.output
    for bad, words in [
        ({"folds": 1}, "folds must be at least 2"),
        ({"folds": 2, "split_file": "x.csv"}, "no split_file"),
    ]:
        with pytest.raises(ConfigError, match=words):
            TrainConfig(data=str(store), **bad)  # type: ignore[arg-type]


def test_copy_makes_a_self_contained_ensemble(cv: Path, store: Path, tmp_path: Path) -> None:
    for i in (0, 1):
        shutil.copytree(fold_dir(cv, i), tmp_path / f"f{i}")
    ens = tmp_path / "ens"
    r = make_ensemble([tmp_path / "f0", tmp_path / "f1"], ens, copy=True, threshold_rule="none")
    assert r.fitted_on == "oof" and r.threshold == 0.5
    for i in (0, 1):
        shutil.rmtree(tmp_path / f"f{i}")
    doc = json.loads((ens / "model.json").read_text())
    assert [m["run"] for m in doc["members"]] == ["members/0-f0", "members/1-f1"]
    assert len(Predictor(ens).predict_batch(PatchStore(store).batch([0, 1, 2]))) == 3
    with pytest.raises(ConfigError, match="a model already exists there"):
        make_ensemble([ens / "members/0-f0", ens / "members/1-f1"], ens)
