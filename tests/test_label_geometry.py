"""Label geometry and resolution: recorded by ingest, carried into the bundle, and crops that follow the label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from histoscan.bundle import read_bundle
from histoscan.data.imageio import read_image
from histoscan.data.ingest import ingest
from histoscan.data.store import INDEX_FILE, PatchStore
from histoscan.data.synthetic import write_synthetic
from histoscan.data.transforms import normalise, resize
from histoscan.errors import ConfigError
from histoscan.inference.predictor import Predictor
from histoscan.preprocessing import Preprocessing
from histoscan.training.config import TrainConfig, resolve_config_path
from histoscan.training.fit import _geometry
from tests.conftest import shared
from tests.test_preprocessing_parity import tiny_train


def test_kaggle_and_pcam_stores_record_pcam_geometry(kaggle_dir: Path, pcam_dir: Path, tmp_path: Path) -> None:
    for name, src in (("kaggle", kaggle_dir), ("pcam", pcam_dir)):
        store = PatchStore(ingest(src, tmp_path / name, workers=1).store)
        assert (store.image_size, store.label_size, store.mpp, store.fit) == ((96, 96), 32, 0.972, "pad-edges")
    half = PatchStore(ingest(kaggle_dir, tmp_path / "half", workers=1, size=48).store)
    assert (half.label_size, half.mpp) == (16, 1.944)  # the same tissue in half the pixels


def test_other_layouts_record_what_the_user_says(folders_dir: Path, tmp_path: Path) -> None:
    plain = PatchStore(ingest(folders_dir, tmp_path / "plain", workers=1).store)
    assert (plain.label_size, plain.mpp) == (None, None)  # labels describe whole images; resolution unknown
    told = PatchStore(ingest(folders_dir, tmp_path / "told", workers=1, size=48, mpp=0.5, label_size=40).store)
    assert (told.label_size, told.mpp) == (20, 1.0)  # given for the 96 px source, scaled to 48 px
    with pytest.raises(ConfigError, match="mpp must be a positive"):
        ingest(folders_dir, tmp_path / "bad", workers=1, mpp=0.0)
    with pytest.raises(ConfigError, match="label_size 200 must lie between 1 and the image side 96"):
        ingest(folders_dir, tmp_path / "bad", workers=1, label_size=200)


def test_ingest_cli_takes_mpp_and_label_size(folders_dir: Path, tmp_path: Path) -> None:
    from histoscan.cli import app

    out = tmp_path / "cli"
    res = CliRunner().invoke(
        app, ["ingest", str(folders_dir), str(out), "--workers", "1", "--mpp", "0.25", "--label-size", "48"]
    )
    assert res.exit_code == 0, res.output
    assert (PatchStore(out).mpp, PatchStore(out).label_size) == (0.25, 48)


def test_bundle_stores_geometry_and_train_mpp_overrides(kaggle_dir: Path, tmp_path: Path) -> None:
    store = PatchStore(ingest(kaggle_dir, tmp_path / "store", workers=1).store)
    pre = _geometry(TrainConfig(data=str(store.path), crop=64), store)
    assert (pre.crop, pre.label_size, pre.mpp, pre.fit) == (64, 32, 0.972, "pad-edges")
    assert _geometry(TrainConfig(data=str(store.path), mpp=0.5), store).mpp == 0.5
    with pytest.raises(ConfigError, match="crop 24 would cut into the labelled centre"):
        _geometry(TrainConfig(data=str(store.path), crop=24), store)


@pytest.fixture(scope="module")
def lc25000_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of 128 px images labelled as a whole, like LC25000."""
    root = tmp_path_factory.mktemp("lc")
    src = write_synthetic(root / "src", "folders", 48, seed=21, num_classes=3, size=128)
    return ingest(src, root / "store", workers=1).store


def test_cpu_default_crop_does_not_cut_whole_image_labels(lc25000_like: Path, tmp_path: Path) -> None:
    store = PatchStore(lc25000_like)
    assert store.label_size is None
    cfg = TrainConfig.from_yaml(resolve_config_path("cpu-default"), {"data": str(store.path)})
    assert cfg.crop == 80
    notes: list[str] = []
    pre = _geometry(cfg, store, notes.append)
    assert (pre.crop, pre.resize, pre.input_size) == (None, 80, 80)  # the whole image, at the chosen input size
    assert len(notes) == 1 and "centre crop 80 is not applied" in notes[0]
    # end to end: the run's model sees the whole image, downscaled
    run = tiny_train(store.path, tmp_path / "runs", "lc", crop=64)
    pre = read_bundle(run).preprocessing
    assert (pre.crop, pre.resize, pre.label_size) == (None, 64, None)
    images = store.batch(np.arange(4))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    torch.testing.assert_close(
        Predictor(run, backend="torch").bundle.preprocessing(images),
        normalise(resize(x, 64), pre.mean, pre.std),
        atol=2e-5,
        rtol=1e-5,
    )


def test_real_idc_edge_patches_are_fitted_alike_by_ingest_and_prediction(tmp_path: Path) -> None:
    """On real IDC tissue: every stored patch equals what the Predictor's fit makes of its source file."""
    store = PatchStore(ingest(shared("idc"), tmp_path / "idc").store)
    assert (store.label_size, store.mpp) == (None, None)
    pre = Preprocessing(image_size=list(store.image_size), fit=store.fit)
    sources = pd.read_csv(store.path / INDEX_FILE)["source"].to_numpy()
    odd = [i for i, s in enumerate(sources) if read_image(s).pixels.shape[:2] != store.image_size]
    assert odd, "the IDC set holds edge patches smaller than 50x50"
    for i in odd:
        assert np.array_equal(pre.fit_image(read_image(sources[i]).pixels), store.batch([i])[0]), sources[i]
