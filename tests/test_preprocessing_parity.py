"""One preprocessing path: training and the Predictor build the same model input from the same pixels.

fp32 throughout (CPU, ``precision="32-true"``): the same uint8 batch through the training module
(augmentation off) and through the Predictor gives the same input to 1e-6 and the same logits to 1e-4,
and an edge patch is fitted the same way by ingest (for training) and by the Predictor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histoscan.bundle import MODEL_FILE, load_model, read_bundle
from histoscan.data.imageio import resize_rgb
from histoscan.data.ingest import ingest
from histoscan.data.store import PatchStore
from histoscan.data.synthetic import write_synthetic
from histoscan.errors import ConfigError
from histoscan.inference.predict import predict_input
from histoscan.inference.predictor import Predictor
from histoscan.preprocessing import Preprocessing
from histoscan.training.config import TrainConfig
from histoscan.training.fit import train
from histoscan.training.module import PatchClassifier


def tiny_train(store: Path, out: Path, name: str, **kw: object) -> Path:
    """A simple_cnn run of two fp32 CPU steps on ``store`` (settings in ``kw``)."""
    cfg = TrainConfig(
        data=str(store),
        out=str(out),
        name=name,
        model="simple_cnn",
        batch_size=16,
        max_epochs=1,
        limit_train_batches=2,
        progress=False,
        early_stopping=None,
        val=0.25,
        test=0.0,
        precision="32-true",
        accelerator="cpu",
        **kw,  # type: ignore[arg-type]
    )
    return train(cfg, printer=lambda *_: None).run_dir


def _training_module(run: Path, augment: str = "light") -> PatchClassifier:
    """The training module of a run, rebuilt from its folder: same weights and stored preprocessing."""
    model, bundle = load_model(run)
    cfg = TrainConfig.from_yaml(run / "config.yaml").replace(augment=augment)
    return PatchClassifier(model, cfg, bundle.preprocessing, len(bundle.classes)).eval()


def _assert_parity(run: Path, batch: np.ndarray) -> None:
    module = _training_module(run)
    predictor = Predictor(run, backend="torch", precision="fp32")  # the parity is an fp32 check
    with torch.inference_mode():
        x_train = module._inputs(torch.from_numpy(batch), train=False)
        x_pred = predictor.bundle.preprocessing(predictor._to_batch(batch), predictor.device)
        assert x_train.dtype == x_pred.dtype == torch.float32
        assert x_train.shape == x_pred.shape == (len(batch), 3, module.pre.input_size, module.pre.input_size)
        torch.testing.assert_close(x_train, x_pred, atol=1e-6, rtol=0)
        logits_train = module(x_train).numpy()
    np.testing.assert_allclose(logits_train, predictor.logits(batch), atol=1e-4, rtol=0)
    # the augmentation path's stages with an identity augmentation: the same input as the fused path
    torch.testing.assert_close(module.pre.finish(module.pre.to_float(batch)), x_pred, atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    kaggle = write_synthetic(root / "kaggle-src", "kaggle", 64, seed=11)
    folders = write_synthetic(root / "folders-src", "folders", 60, seed=12, num_classes=3, size=64)
    return {
        "kaggle": ingest(kaggle, root / "kaggle", workers=1).store,
        "folders": ingest(folders, root / "folders", workers=1, label_size=32).store,
    }


@pytest.mark.parametrize(
    "store_name,settings",
    [
        pytest.param("kaggle", {"crop": 48}, marks=pytest.mark.slow),  # a crop model
        pytest.param("kaggle", {"resize": 40}, marks=pytest.mark.slow),  # a resize model
        ("folders", {"crop": 40, "resize": 48}),  # a multi-class model, crop then resize (the fast lane's case)
    ],
    ids=["crop", "resize", "multiclass"],
)
def test_training_and_predictor_give_the_same_input_and_logits(
    stores: dict[str, Path], tmp_path: Path, store_name: str, settings: dict[str, int]
) -> None:
    run = tiny_train(stores[store_name], tmp_path / "runs", store_name, **settings)
    pre = read_bundle(run).preprocessing
    assert (pre.crop, pre.resize) == (settings.get("crop"), settings.get("resize"))
    batch = PatchStore(stores[store_name]).batch(np.arange(12))
    _assert_parity(run, batch)


def test_an_edge_patch_reaches_the_model_the_same_through_ingest_and_the_predictor(tmp_path: Path) -> None:
    """IDC-like 50x50 patches with one 50 x 38 edge patch: training saw it white-padded, so must prediction."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for c in ("0", "1"):
        (src / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(src / c / f"p{i}.png")
    edge = rng.integers(0, 200, (50, 38, 3), dtype=np.uint8)  # full height, short width: the slide's edge
    Image.fromarray(edge).save(src / "1" / "edge.png")
    store = PatchStore(ingest(src, tmp_path / "store", workers=1).store)
    assert store.fit == "pad-edges" and store.image_size == (50, 50)
    row = next(i for i in range(len(store)) if np.array_equal(store.batch([i])[0, :, :38], edge))
    stored = store.batch([row])
    assert np.array_equal(stored[0, :, :38], edge) and (stored[0, :, 38:] == 255).all()

    run = tiny_train(store.path, tmp_path / "runs", "edge", crop=40)
    assert read_bundle(run).preprocessing.fit == "pad-edges"
    module, predictor = _training_module(run), Predictor(run, backend="torch", precision="fp32")
    with torch.inference_mode():
        x_train = module._inputs(torch.from_numpy(stored), train=False)
    x_pred = predictor.bundle.preprocessing(predictor._to_batch([edge]))  # the raw 50 x 38 image
    torch.testing.assert_close(x_train, x_pred, atol=1e-6, rtol=0)
    stretched = predictor.bundle.preprocessing(resize_rgb(edge, (50, 50))[None])  # what predict used to do
    assert (stretched - x_train).abs().max() > 0.5
    # the file path of predict (decoding a folder) fits the same way
    (tmp_path / "new").mkdir()
    Image.fromarray(edge).save(tmp_path / "new" / "edge.png")
    table = predict_input(predictor, tmp_path / "new", workers=1)
    np.testing.assert_allclose(
        table.prediction.probabilities, predictor.predict_batch(stored).probabilities, atol=1e-6, rtol=0
    )


def test_fit_policies() -> None:
    edge = np.random.default_rng(1).integers(0, 256, (30, 96, 3), dtype=np.uint8)
    padded = Preprocessing(image_size=[96, 96], fit="pad-edges").fit_image(edge)
    assert np.array_equal(padded[:30], edge) and (padded[30:] == 255).all()
    resized = Preprocessing(image_size=[96, 96], fit="resize").fit_image(edge)
    assert np.array_equal(resized, resize_rgb(edge, (96, 96)))
    big = np.zeros((200, 150, 3), np.uint8)  # not an edge patch: resized under either policy
    assert Preprocessing(image_size=[96, 96], fit="pad-edges").fit_image(big).shape == (96, 96, 3)
    with pytest.raises(ConfigError, match=r"preprocessing\.fit 'stretch'"):
        Preprocessing(fit="stretch")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="image 1: expected a uint8 HxWx3"):
        Preprocessing().fit_batch([np.zeros((96, 96, 3), np.uint8), np.zeros((96, 96), np.uint8)])
    with pytest.raises(ConfigError, match=r"preprocessing\.stain"):
        Preprocessing(stain={"method": "macenko"})(np.zeros((1, 96, 96, 3), np.uint8))


def test_todays_model_json_loads_and_predicts_as_before(tiny_run: Path, tmp_path: Path) -> None:
    """A model.json without fit / mpp / label_size / stain (written before they existed) still works."""
    import shutil

    old = tmp_path / "old-run"
    shutil.copytree(tiny_run, old, ignore=shutil.ignore_patterns("*.onnx"))
    data = json.loads((old / MODEL_FILE).read_text())
    for key in ("fit", "mpp", "label_size", "stain"):
        data["preprocessing"].pop(key, None)
    data.pop("schema_version", None)  # files of that time had no schema version (read as version 1)
    (old / MODEL_FILE).write_text(json.dumps(data))
    pre = read_bundle(old).preprocessing
    assert (pre.fit, pre.mpp, pre.label_size, pre.stain) == ("pad-edges", None, None, None)
    images = np.random.default_rng(2).integers(0, 256, (6, 96, 96, 3), dtype=np.uint8)
    before, after = Predictor(tiny_run, backend="torch"), Predictor(old, backend="torch")
    np.testing.assert_array_equal(after.predict_batch(images).probabilities, before.predict_batch(images).probabilities)
    # an edge patch is padded, as that version's ingest padded the training data
    edge = images[0, :, :60]
    padded = images[:1].copy()
    padded[0, :, 60:] = 255
    np.testing.assert_allclose(
        after.predict_batch([edge]).probabilities, after.predict_batch(padded).probabilities, atol=1e-6
    )
