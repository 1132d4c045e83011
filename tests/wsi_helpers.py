"""Shared pieces of the whole-slide tests: a tiny model that reads labelled centres, and a coordinate slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from histoscan.bundle import ModelBundle, read_bundle
from histoscan.inference.predictor import Prediction, Predictor
from histoscan.preprocessing import Preprocessing

MODEL_MPP = 1.0


def train_mosaic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simple_cnn trained 2 epochs on 3 x 3 mosaics labelled by their centre cell (about 15 s, cached per session).

    model.json states mpp 1.0 um/px and label_size 32, as ingest will for a PCam-like store.
    """
    from histoscan.data.ingest import ingest
    from histoscan.training.config import TrainConfig
    from histoscan.training.fit import train
    from histoscan.wsi.synthetic import write_mosaic_patches

    root = tmp_path_factory.getbasetemp() / "wsi-mosaic-run"
    run = root / "runs" / "tiny"
    if (run / "model.json").is_file():
        return run
    src = write_mosaic_patches(root / "src", 600, seed=0)
    store = ingest(src, root / "store", workers=1, force=True).store
    cfg = TrainConfig(
        data=str(store),
        out=str(root / "runs"),
        name="tiny",
        model="simple_cnn",
        model_args={"batch_norm": True},
        resize=48,
        batch_size=32,
        max_epochs=2,
        lr=3e-3,
        progress=False,
        early_stopping=None,
        val=0.2,
        test=0.1,
    )
    run = train(cfg, printer=lambda *_: None).run_dir
    bundle = read_bundle(run)
    bundle.preprocessing.mpp = MODEL_MPP
    bundle.preprocessing.label_size = 32
    bundle.save(run)
    return run


def coordinate_image(height: int, width: int) -> np.ndarray:
    """Pixels that encode their own level-0 position: R = x % 256, G = y % 256, B = 16 * (x // 256) + y // 256."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx % 256, yy % 256, 16 * (xx // 256) + yy // 256], axis=2).astype(np.uint8)


def decode(pixel: np.ndarray) -> tuple[int, int]:
    """(x, y) from a coordinate pixel."""
    r, g, b = (int(v) for v in pixel)
    return (b // 16) * 256 + r, (b % 16) * 256 + g


class CoordinatePredictor(Predictor):
    """A stand-in model for alignment tests: it reads the level-0 position of each tile's centre pixel.

    ``probability`` maps a position to a value, so each output row can be checked against the slide.
    """

    def __init__(self, probability: object, image_size: int = 96, label_size: int = 32, mpp: float = 1.0) -> None:
        pre = Preprocessing(image_size=[image_size, image_size], mpp=mpp, label_size=label_size)
        self.bundle = ModelBundle("none", ["normal", "tumor"], pre, threshold=0.5)
        self.run_dir = Path("coordinate-model")
        self.batch_size = 256
        self.members: list[Predictor] = []  # a single model
        self.device = torch.device("cpu")
        self.probability = probability
        self.seen: list[tuple[int, int]] = []

        class _Backend:
            name = "coordinates"

        self.backend = _Backend()  # type: ignore[assignment]

    def predict_batch(self, images, tta=None, groups=None) -> Prediction:  # type: ignore[no-untyped-def,override]
        c = images.shape[1] // 2
        xy = [decode(img[c, c]) for img in images]
        self.seen.extend(xy)
        p = np.array([self.probability(x, y) for x, y in xy], np.float32)  # type: ignore[operator]
        probs = np.stack([1 - p, p], axis=1)
        return Prediction(probs, (p >= 0.5).astype(np.int64))
