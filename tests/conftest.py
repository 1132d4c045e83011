"""Shared fixtures: generated sources in every layout, and the real data folder when present."""

from __future__ import annotations

from pathlib import Path

import pytest

from histoscan.data.synthetic import write_synthetic

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(name: str) -> Path:
    """A folder of ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data folder {path} is absent (CI has it; see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def kaggle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("kaggle"), "kaggle", 120, seed=1, test=20)


@pytest.fixture(scope="session")
def pcam_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("pcam"), "pcam", 100, seed=2)


@pytest.fixture(scope="session")
def folders_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("folders"), "folders", 90, seed=3, num_classes=3)


@pytest.fixture(scope="session")
def grouped_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("grouped"), "grouped-folders", 160, seed=4, groups=12)


@pytest.fixture(scope="session")
def manifest_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("manifest"), "manifest", 60, seed=5) / "manifest.csv"


@pytest.fixture(scope="session")
def tiny_run(kaggle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small binary model trained for 2 epochs on the synthetic Kaggle fixture (about 10 s)."""
    from histoscan.data.ingest import ingest
    from histoscan.training.config import TrainConfig
    from histoscan.training.fit import train

    root = tmp_path_factory.mktemp("tinyrun")
    store = ingest(kaggle_dir, root / "store", workers=1).store
    cfg = TrainConfig(data=str(store), out=str(root / "runs"), name="tiny", model="simple_cnn",
                      model_args={"batch_norm": True}, resize=48, batch_size=32, max_epochs=2, lr=3e-3,
                      progress=False, early_stopping=None, val=0.2, test=0.1)
    return train(cfg, printer=lambda *_: None).run_dir
