"""Out of distribution, measured apart: the scores on crafted features, the stored detector, its answer, the suite."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from histoscan.cli import app
from histoscan.data.synthetic import not_he_patch, synth_batch
from histoscan.errors import ConfigError
from histoscan.inference.predictor import Predictor
from histoscan.rules.ood import (
    OOD,
    energy_score,
    knn_score,
    mahalanobis_score,
    msp_score,
    normalise,
    with_ood,
)
from histoscan.trust.ood import fit_arrays, fit_run_ood, score_images
from tests.conftest import shared

ROOT = Path(__file__).resolve().parents[1]


# ---- the scores on known distributions ---------------------------------------------------------------------


def test_mahalanobis_with_a_shared_covariance_is_the_exact_distance_to_the_nearest_class_mean() -> None:
    rng = np.random.default_rng(0)
    cov = np.array([[4.0, 1.2], [1.2, 1.0]])
    means = np.array([[0.0, 0.0], [10.0, 0.0]])
    labels = np.repeat([0, 1], 20000)
    feats = means[labels] + rng.multivariate_normal([0, 0], cov, len(labels))
    arrays = fit_arrays(feats, labels)
    assert np.allclose(arrays.means, means, atol=0.05)
    assert np.allclose(np.linalg.inv(arrays.precision), cov, rtol=0.05)
    inv = np.linalg.inv(cov)
    queries = np.array([[0.0, 0.0], [10.0, 0.0], [2.0, 1.0], [9.0, -1.0], [5.0, 5.0]])
    exact = [min(np.sqrt((q - m) @ inv @ (q - m)) for m in means) for q in queries]
    got = mahalanobis_score(queries, means, inv)
    assert np.allclose(got, exact)
    assert np.allclose(mahalanobis_score(queries, arrays.means, arrays.precision), exact, atol=0.1)
    # a shifted cloud is told apart from the training distribution; the same cloud is not
    inside = means[labels[:500]] + rng.multivariate_normal([0, 0], cov, 500)
    shifted = inside + np.array([0.0, 4.0])
    score_in = mahalanobis_score(inside, arrays.means, arrays.precision)
    auc = roc_auc_score(
        np.r_[np.zeros(500), np.ones(500)], np.r_[score_in, mahalanobis_score(shifted, arrays.means, arrays.precision)]
    )
    assert auc > 0.97


def test_knn_is_the_distance_to_the_kth_nearest_normalised_training_feature() -> None:
    angles = np.deg2rad([0.0, 10.0, 20.0, 90.0])
    bank = normalise(np.c_[np.cos(angles), np.sin(angles)] * [[1.0], [5.0], [0.2], [3.0]])  # lengths do not matter
    q = np.array([[2.0, 0.0]])  # on the 0 degree row
    chord = lambda deg: 2 * np.sin(np.deg2rad(deg) / 2)  # noqa: E731
    assert knn_score(q, bank, 1)[0] == pytest.approx(0.0, abs=1e-3)
    assert knn_score(q, bank, 2)[0] == pytest.approx(chord(10), abs=1e-4)
    assert knn_score(q, bank, 3)[0] == pytest.approx(chord(20), abs=1e-4)
    assert knn_score(q, bank, 99)[0] == pytest.approx(chord(90), abs=1e-4)  # k beyond the bank: its last


def test_energy_and_max_probability_on_known_logits() -> None:
    z = np.array([[-6.0], [-1.0], [0.0], [1.0], [6.0]])
    assert np.allclose(energy_score(z), -np.log(2 * np.cosh(z[:, 0] / 2)))
    assert np.argmax(energy_score(z)) == 2  # the boundary is the least sure: the highest energy
    assert np.allclose(energy_score(z, temperature=2.0), energy_score(z / 2))
    multi = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert np.allclose(energy_score(multi), -np.log(np.exp(multi).sum(axis=1)))
    p = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    assert np.allclose(msp_score(p), [0.1, 0.5, 0.2])


def test_the_detector_overrules_only_an_accepted_quality() -> None:
    quality = ["ok", "unchecked", "dark", "ok"]
    assert with_ood(quality, np.array([True, True, True, False])) == [OOD, OOD, "dark", "ok"]


# ---- the stored detector on a trained run -----------------------------------------------------------------


@pytest.fixture
def ood_run(tiny_run: Path, tmp_path: Path) -> Path:
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    fit_run_ood(run)
    return run


def _set_threshold(run: Path, threshold: float) -> None:
    doc = json.loads((run / "model.json").read_text())
    doc["trust"]["ood"]["threshold"] = threshold
    (run / "model.json").write_text(json.dumps(doc))


def test_stored_detector_round_trip_and_its_answer(ood_run: Path) -> None:
    doc = json.loads((ood_run / "model.json").read_text())
    spec = doc["trust"]["ood"]
    assert spec["score"] == "mahalanobis" and spec["fitted_on"] == "val" and spec["quantile"] == 0.99
    assert spec["sha256"] == hashlib.sha256((ood_run / spec["file"]).read_bytes()).hexdigest()
    images, _ = synth_batch(24, seed=3)
    predictor = Predictor(ood_run, backend="torch")
    pred = predictor.predict_batch(images)
    again = score_images(predictor, images, [0]).scores["mahalanobis"]
    assert pred.ood is not None and np.allclose(pred.ood, again)  # what answers is the score the pass computed
    assert all(
        (a == OOD) == (s > spec["threshold"] and q == OOD)
        for a, s, q in zip(pred.answers or [], pred.ood, pred.quality or [])
    )

    _set_threshold(ood_run, float(pred.ood.min()) - 1.0)  # every image above it
    pred = Predictor(ood_run, backend="torch").predict_batch([*images[:3], not_he_patch("black")])
    assert pred.answers == [OOD, OOD, OOD, "not tissue"]  # the tissue check's answer stands where it fired
    assert pred.quality is not None and pred.quality[:3] == [OOD] * 3


def test_a_side_file_that_lies_is_refused_with_one_line_naming_it(ood_run: Path) -> None:
    path = ood_run / "ood.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        ConfigError, match=r"ood\.safetensors: its sha256 does not match model\.json trust\.ood\.sha256"
    ) as e:
        Predictor(ood_run, backend="torch")
    assert "\n" not in str(e.value)
    res = CliRunner().invoke(app, ["predict", str(ood_run), str(ood_run / "x.png")])
    assert res.exit_code == 2 and "ood.safetensors" in res.output
    path.unlink()
    with pytest.raises(ConfigError, match=r"ood\.safetensors: missing"):
        Predictor(ood_run, backend="torch")


def test_calibrate_ood_and_the_metrics_count_answers(tiny_run: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from histoscan.serving.app import create_app
    from histoscan.serving.state import ServeSettings

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    res = CliRunner().invoke(app, ["calibrate", str(run), "--no-temperature", "--ood"])
    assert res.exit_code == 0, res.output
    assert "out-of-distribution detector: mahalanobis above" in res.output
    _set_threshold(run, -1.0)  # flags every accepted image
    buf = io.BytesIO()
    Image.fromarray(synth_batch(1, seed=1)[0][0]).save(buf, format="PNG")
    black = io.BytesIO()
    Image.fromarray(not_he_patch("black")).save(black, format="PNG")
    with TestClient(create_app(ServeSettings(str(run), model_process=False))) as c:
        j = c.post("/v1/predict", files={"file": ("t.png", buf.getvalue(), "image/png")}).json()
        assert j["answer"] == OOD and j["quality"] == OOD
        c.post("/v1/predict", files={"file": ("b.png", black.getvalue(), "image/png")})
        text = c.get("/metrics").text
        assert c.get("/v1/model").json()["ood"]["score"] == "mahalanobis"
    assert 'histoscan_answers_total{answer="out of distribution"} 1.0' in text
    assert 'histoscan_answers_total{answer="not tissue"} 1.0' in text
    assert 'histoscan_answers_total{answer="refer"} 0.0' in text


# ---- the pre-registered suite ---------------------------------------------------------------------------


def test_suite_generator_is_deterministic(tmp_path: Path) -> None:
    hcd = shared("hcd")  # skips, saying why, when the real data folder is absent
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ood_suite

    with open(hcd / "train_labels.csv", newline="") as fh:
        ids = [row["id"] for _, row in zip(range(40), csv.DictReader(fh))]
    run = tmp_path / "run"
    run.mkdir()
    (run / "split.csv").write_text(
        "id,split\n" + "".join(f"{i},{'test' if k % 4 == 0 else 'train'}\n" for k, i in enumerate(ids))
    )
    a = ood_suite.generate(run, tmp_path / "a", n=4, seed=0, n_synthetic=3, n_other=3)
    ood_suite.generate(run, tmp_path / "b", n=4, seed=0, n_synthetic=3, n_other=3)
    assert a["shifts"]["hcd_test"]["count"] == 10  # every test row, and only those
    assert set(a["shifts"]) == {"hcd_test", *ood_suite.SHIFTS}
    for name in a["shifts"]:
        x = np.load(tmp_path / "a" / f"{name}.npz")
        y = np.load(tmp_path / "b" / f"{name}.npz")
        assert x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files), name
    images, labels, rows = ood_suite.load_shift(tmp_path / "a" / "out_of_focus.npz")
    ref, ref_labels, _ = ood_suite.load_shift(tmp_path / "a" / "hcd_test.npz")
    assert rows is not None and np.array_equal(labels, np.asarray(ref_labels)[rows])  # labels kept from the clean rows
    assert np.asarray(images).shape == (4, 96, 96, 3) and np.asarray(images).std() < np.asarray(ref)[rows].std()
    assert (ood_suite.load_shift(tmp_path / "a" / "grayscale.npz")[1] == -1).all()  # not tissue: no label


def test_onnx_cannot_give_features_so_auto_runs_torch_and_onnx_is_refused(ood_run: Path) -> None:
    from histoscan.inference.backends import resolve_backend
    from histoscan.inference.export import export_onnx

    assert export_onnx(ood_run).speed is None  # the graph is written; the backends are not raced (torch must run)
    assert resolve_backend(ood_run, "auto") == "torch"
    with pytest.raises(ConfigError, match=r"trust\.ood scores the network's pooled features"):
        Predictor(ood_run, backend="onnx")


@pytest.mark.parametrize("name", ["simple_cnn_flatten", "nas_cnn", "resnet18"])
def test_pooled_features_come_from_the_pass_that_gives_the_logits(name: str) -> None:
    import torch

    from histoscan.models.factory import create_model, logits_and_pooled

    model = create_model(name, num_classes=2, input_size=64).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        logits, pooled = logits_and_pooled(model, x)
        assert torch.allclose(logits, model(x), atol=1e-5)
    assert pooled.shape == (3, model.num_features)  # the global average of the last feature maps


def test_predict_writes_the_score_and_answers_out_of_distribution(ood_run: Path, tmp_path: Path) -> None:
    import pandas as pd

    folder = tmp_path / "patches"
    folder.mkdir()
    for i, img in enumerate(synth_batch(4, seed=2)[0]):
        Image.fromarray(img).save(folder / f"p{i}.png")
    _set_threshold(ood_run, -1.0)
    res = CliRunner().invoke(app, ["predict", str(ood_run), str(folder), "--out", str(tmp_path / "preds.csv")])
    assert res.exit_code == 0, res.output
    preds = pd.read_csv(tmp_path / "preds.csv")
    assert (preds["answer"] == OOD).all() and (preds["ood_score"] > -1.0).all()
