"""The Predictor, both backends, TTA, calibration, batch prediction, submissions, ONNX export."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from histoscan.bundle import WEIGHTS_FILE, load_model, read_bundle, save_weights
from histoscan.cli import app
from histoscan.data.store import PatchStore
from histoscan.errors import DataError
from histoscan.inference import export as export_mod
from histoscan.inference.calibration import calibrate
from histoscan.inference.export import ExportError, export_onnx
from histoscan.inference.predict import predict_input, write_predictions, write_submission
from histoscan.inference.predictor import Predictor, parse_tta


@pytest.fixture(scope="module")
def exported_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("exported") / "run"
    shutil.copytree(tiny_run, run)
    result = export_onnx(run)
    assert result.max_abs_diff < 1e-4 and result.checked > 0
    return run


def _store_of(run: Path) -> PatchStore:
    return PatchStore(read_bundle(run).training["store"])


def test_torch_and_onnx_backends_agree(exported_run: Path) -> None:
    store = _store_of(exported_run)
    a = Predictor(exported_run, backend="torch", precision="fp32").predict_store(store)
    b = Predictor(exported_run, backend="onnx").predict_store(store)
    speed = read_bundle(exported_run).inference.backend_speed
    assert speed is not None  # auto follows the faster of the two as export timed them on this machine
    assert Predictor(exported_run).backend.name == speed.faster
    assert np.abs(a.probabilities - b.probabilities).max() < 1e-4
    assert (a.predicted == b.predicted).mean() > 0.99


def test_onnx_file_carries_a_contract_marker_not_a_copy_of_model_json(exported_run: Path) -> None:
    import onnx

    proto = onnx.load(str(exported_run / "model.onnx"))
    assert {p.key: p.value for p in proto.metadata_props} == {"histoscan_onnx_contract": "1"}
    dims = [
        [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
        for v in (*proto.graph.input, *proto.graph.output)
    ]
    assert dims == [["batch", 3, 48, 48], ["batch", 1]]  # preprocessed 48 px input -> one binary logit


def test_calibration_after_export_reaches_the_onnx_backend(exported_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    before = Predictor(run, backend="onnx").predict_store(_store_of(run)).probabilities[:, 1]
    bundle = read_bundle(run)
    bundle.temperature = 3.0
    bundle.save(run)
    after = Predictor(run, backend="onnx").predict_store(_store_of(run)).probabilities[:, 1]
    logit = np.log(before / (1 - before))
    np.testing.assert_allclose(after, 1 / (1 + np.exp(-logit / 3.0)), atol=1e-5)  # model.json's temperature applies


def test_export_fails_loudly_and_writes_nothing(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    monkeypatch.setattr(export_mod, "PARITY_TOLERANCE", 0.0)
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_onnx(run)
    assert not (run / "model.onnx").exists() and not (run / "model.onnx.tmp").exists()


def test_tta_on_a_symmetric_input_changes_nothing(tiny_run: Path) -> None:
    p = Predictor(tiny_run, backend="torch", precision="fp32")  # bf16 rounding differs between flipped copies
    yy, xx = np.mgrid[:96, :96] - 47.5
    r = np.sqrt(yy**2 + xx**2)
    img = np.stack([200 - r, 120 + r / 2, 180 - r / 3], axis=-1).clip(0, 255).astype(np.uint8)  # radially symmetric
    sym = np.stack([img, np.full_like(img, 210)])
    plain = p.predict_batch(sym)
    tta = p.predict_batch(sym, tta=True)
    np.testing.assert_allclose(tta.probabilities, plain.probabilities, atol=1e-5)
    assert tta.uncertainty is not None and tta.uncertainty.max() < 1e-5
    assert parse_tta([0, 5]) == [0, 5]


def test_store_and_files_give_the_same_predictions(tiny_run: Path, kaggle_dir: Path) -> None:
    p = Predictor(tiny_run, backend="torch")
    from_files = predict_input(p, kaggle_dir / "train", workers=2)
    store = _store_of(tiny_run)
    from_store = p.predict_store(store)
    by_id = dict(zip(from_files.ids, from_files.prediction.probabilities[:, 1]))
    np.testing.assert_allclose([by_id[i] for i in store.ids], from_store.probabilities[:, 1], atol=1e-6)


def test_images_of_other_sizes_are_resized_like_the_store(tiny_run: Path) -> None:
    p = Predictor(tiny_run, backend="torch")
    img = _store_of(tiny_run).batch([0])[0]
    big = np.asarray(Image.fromarray(img).resize((192, 192), Image.NEAREST))
    a, b = p.predict_batch([img]), p.predict_batch([big])
    assert abs(a.probabilities[0, 1] - b.probabilities[0, 1]) < 0.05


def test_submission_keeps_sample_order_and_writes_probabilities(
    tiny_run: Path, kaggle_dir: Path, tmp_path: Path
) -> None:
    p = Predictor(tiny_run, backend="torch")
    table = predict_input(p, kaggle_dir / "test", workers=1)
    out = write_submission(table, kaggle_dir / "sample_submission.csv", tmp_path / "submission.csv")
    sub = pd.read_csv(out, dtype={"id": str})
    sample = pd.read_csv(kaggle_dir / "sample_submission.csv", dtype={"id": str})
    assert list(sub["id"]) == list(sample["id"]) and list(sub.columns) == ["id", "label"]
    assert sub["label"].between(0, 1).all() and not sub["label"].isin([0.0, 1.0]).all()


def test_missing_image_in_submission_is_a_clear_error(tiny_run: Path, kaggle_dir: Path, tmp_path: Path) -> None:
    test_dir = tmp_path / "test"
    shutil.copytree(kaggle_dir / "test", test_dir)
    victim = sorted(test_dir.iterdir())[3]
    victim.unlink()
    table = predict_input(Predictor(tiny_run, backend="torch"), test_dir, workers=1)
    with pytest.raises(DataError, match=rf"1 ids have no prediction: {victim.stem} \(no image\)"):
        write_submission(table, kaggle_dir / "sample_submission.csv", tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def test_unreadable_images_are_listed_not_dropped(tiny_run: Path, kaggle_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    shutil.copytree(kaggle_dir / "test", folder)
    (folder / "broken.tif").write_bytes(b"II*\x00garbage")
    table = predict_input(Predictor(tiny_run, backend="torch"), folder, workers=2)
    out, errors = write_predictions(table, tmp_path / "p.csv")
    assert errors is not None and "broken" in errors.read_text()
    assert len(pd.read_csv(out)) == 20


def test_predict_pcam_h5(tiny_run: Path, pcam_dir: Path) -> None:
    table = predict_input(Predictor(tiny_run, backend="torch"), pcam_dir / "camelyonpatch_level_2_split_valid_x.h5")
    assert len(table.ids) == 10 and table.ids[0] == "camelyonpatch_level_2_split_valid_x_0"


def test_calibration_lowers_nll_of_an_overconfident_model(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    model, _ = load_model(run)
    with torch.no_grad():  # make it overconfident: logits x 8
        head = model.get_classifier()
        head.weight.mul_(8.0)
        head.bias.mul_(8.0)
    save_weights(model, run / WEIGHTS_FILE)
    result = calibrate(run)
    assert result.temperature > 1.5 and result.nll_after < result.nll_before
    assert read_bundle(run).temperature == pytest.approx(result.temperature)
    # the Predictor applies it
    probs = Predictor(run, backend="torch").predict_store(_store_of(run)).probabilities[:, 1]
    assert probs.min() > 1e-6 and probs.max() < 1 - 1e-6


def test_cli_predict_export_calibrate(tiny_run: Path, kaggle_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    r = CliRunner()
    res = r.invoke(app, ["export", str(run)])
    assert res.exit_code == 0 and "max |p_onnx - p_torch|" in res.output, res.output
    res = r.invoke(app, ["calibrate", str(run)])
    assert res.exit_code == 0 and "temperature" in res.output, res.output
    res = r.invoke(
        app,
        [
            "predict",
            str(run),
            str(kaggle_dir / "test"),
            "--out",
            str(tmp_path / "p.csv"),
            "--tta",
            "--submission",
            str(kaggle_dir / "sample_submission.csv"),
            "--submission-out",
            str(tmp_path / "s.csv"),
        ],
    )
    assert res.exit_code == 0, res.output
    preds = pd.read_csv(tmp_path / "p.csv")
    assert (
        list(preds.columns) == ["id", "prob_normal", "prob_tumor", "predicted", "answer", "quality", "uncertainty"]
        and len(preds) == 20
    )
    assert len(pd.read_csv(tmp_path / "s.csv")) == 20
    res = r.invoke(app, ["predict", str(run), str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no such file" in res.output


SLOW_EXPORTS = ("custom_cnn", "nas_cnn", "resnet18", "efficientnet_b0", "densenet121")  # each trains, then exports


@pytest.mark.parametrize(
    "model", ["simple_cnn_flatten", *(pytest.param(m, marks=pytest.mark.slow) for m in SLOW_EXPORTS)]
)
def test_export_works_for_seed_cnns_and_timm_backbones(model: str, tiny_run: Path, tmp_path: Path) -> None:
    from histoscan.training.config import TrainConfig
    from histoscan.training.fit import train

    store = read_bundle(tiny_run).training["store"]
    cfg = TrainConfig(
        data=store,
        out=str(tmp_path),
        name=model,
        model=model,
        resize=64,
        batch_size=16,
        max_epochs=1,
        limit_train_batches=1,
        progress=False,
        early_stopping=None,
        val=0.2,
        test=0.1,
    )
    run = train(cfg, printer=lambda *_: None).run_dir
    result = export_onnx(run, check=16)
    assert result.max_abs_diff < 1e-4
    a = Predictor(run, backend="onnx").predict_store(_store_of(run).subset(range(8)))
    b = Predictor(run, backend="torch", precision="fp32").predict_store(_store_of(run).subset(range(8)))
    assert np.abs(a.probabilities - b.probabilities).max() < 1e-4  # parity at full precision (auto may pick bf16)


def test_probabilities_are_defined_once_for_numpy_and_torch() -> None:
    from histoscan.errors import ConfigError
    from histoscan.inference.probabilities import probabilities

    z = np.array([[-2.0], [0.0], [3.0]], np.float32)
    p = probabilities(z, 2.0)
    pos = 1 / (1 + np.exp(-z[:, 0] / 2.0))
    assert isinstance(p, np.ndarray) and p.dtype == np.float32
    np.testing.assert_allclose(p, np.stack([1 - pos, pos], axis=1), atol=1e-6)
    t = probabilities(torch.from_numpy(z), 2.0)
    assert isinstance(t, torch.Tensor) and torch.allclose(t, torch.from_numpy(p))
    m = np.random.default_rng(0).normal(size=(5, 3))
    e = np.exp(m / 0.5)
    np.testing.assert_allclose(probabilities(m, 0.5), e / e.sum(axis=1, keepdims=True), rtol=1e-5)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="temperature"):
            probabilities(z, bad)
