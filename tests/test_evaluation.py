"""Metrics agree with scikit-learn; evaluate, thresholds, reports, leaderboard and selection on a tiny run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm
from typer.testing import CliRunner

from histoscan.bundle import read_bundle
from histoscan.cli import app
from histoscan.errors import ConfigError, DataError
from histoscan.evaluation.evaluate import evaluate_run
from histoscan.evaluation.leaderboard import build_leaderboard
from histoscan.evaluation.report import write_evaluation
from histoscan.metrics import (
    bootstrap_interval,
    compute_metrics,
    expected_calibration_error,
    threshold_for_sensitivity,
    youden_threshold,
)
from tests.conftest import assert_images_load, headless_chrome


def _binary(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.int64)
    p = np.clip(0.5 + (y - 0.5) * 0.5 + rng.normal(0, 0.25, n), 0, 1)
    return y, np.stack([1 - p, p], axis=1)


def _multiclass(n: int = 300, k: int = 3, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = rng.normal(0, 1, (n, k))
    z[np.arange(n), y] += 1.5
    e = np.exp(z)
    return y, e / e.sum(axis=1, keepdims=True)


def test_binary_metrics_agree_with_sklearn() -> None:
    y, p = _binary()
    m = compute_metrics(y, p, ["normal", "tumor"], threshold=0.6, n_boot=200)
    pred = (p[:, 1] >= 0.6).astype(int)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]))
    assert m["average_precision"] == pytest.approx(skm.average_precision_score(y, p[:, 1]))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p[:, 1]))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, p), rel=1e-4)
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert m["classification_report"]["tumor"]["precision"] == pytest.approx(skm.precision_score(y, pred))
    lo, hi = m["auroc_ci95"]
    assert lo < m["auroc"] < hi and hi - lo < 0.2


def test_multiclass_metrics_agree_with_sklearn() -> None:
    y, p = _multiclass()
    m = compute_metrics(y, p, ["aca", "n", "scc"], n_boot=100)
    assert m["task"] == "multiclass"
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["auroc_weighted"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="weighted"))
    for i, c in enumerate(["aca", "n", "scc"]):
        assert m["auroc_per_class"][c] == pytest.approx(skm.roc_auc_score(y == i, p[:, i]))
    assert m["f1"] == pytest.approx(skm.f1_score(y, p.argmax(1), average="macro"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, p.argmax(1)).tolist()
    assert np.asarray(m["confusion_matrix"]).sum() == len(y)


def test_single_class_split_is_a_clear_error() -> None:
    y = np.zeros(20, np.int64)
    p = np.tile([0.8, 0.2], (20, 1))
    with pytest.raises(DataError, match="single class"):
        compute_metrics(y, p, ["normal", "tumor"])


def test_ece_by_hand() -> None:
    conf = np.array([0.1, 0.1, 0.9, 0.9])
    hit = np.array([0.0, 1.0, 1.0, 1.0])
    # bin of 0.1: accuracy 0.5 vs 0.1 (weight 0.5); bin of 0.9: 1.0 vs 0.9 (weight 0.5)
    assert expected_calibration_error(conf, hit) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)


def test_thresholds() -> None:
    y, p = _binary(1000)
    s = p[:, 1]
    t = threshold_for_sensitivity(y, s, 0.95)
    assert ((s >= t["threshold"]) & (y == 1)).sum() / (y == 1).sum() >= 0.95
    assert t["sensitivity"] >= 0.95
    j = youden_threshold(y, s)
    fpr, tpr, _ = skm.roc_curve(y, s)
    assert j["j"] == pytest.approx((tpr - fpr).max())
    lo, hi = bootstrap_interval(y, p, n_boot=300, seed=3)
    assert bootstrap_interval(y, p, n_boot=300, seed=3) == (lo, hi)  # deterministic by seed


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_evaluation_report_writes_figures_of_the_expected_size(tmp_path: Path) -> None:
    y, p = _binary(200)
    m = compute_metrics(y, p, ["normal", "tumor"], n_boot=50)
    imgs = np.random.default_rng(0).integers(0, 255, (200, 96, 96, 3), dtype=np.uint8)
    write_evaluation(
        tmp_path, y, p, ["normal", "tumor"], m, title="t", info={"split": "test"}, images=lambda i: imgs[i]
    )
    record = json.loads((tmp_path / "metrics.json").read_text())
    expected = {
        "confusion_matrix": (560, 520),
        "roc": (560, 520),
        "pr": (560, 520),
        "reliability": (560, 620),
        "probabilities": (640, 420),
    }
    for name, size in expected.items():
        assert _png_size(tmp_path / record["figures"][name]) == size
    assert {"false_positives", "false_negatives"} <= set(record["figures"])
    assert record["metrics"]["auroc"] == pytest.approx(m["auroc"])


@pytest.fixture(scope="module")
def evaluated_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("evaluated") / "tiny"
    shutil.copytree(tiny_run, run)
    return run


@pytest.mark.slow
def test_evaluate_run_on_its_test_split(evaluated_run: Path) -> None:
    from histoscan.data.splits import read_split
    from histoscan.data.store import PatchStore
    from histoscan.inference.predictor import Predictor

    r = evaluate_run(evaluated_run, n_boot=100)
    assert r.out == evaluated_run / "eval" and r.split == "test"
    store = PatchStore(read_bundle(evaluated_run).training["store"])
    test = store.subset(np.flatnonzero(read_split(evaluated_run / "split.csv", store) == "test"))
    probs = Predictor(evaluated_run, backend="torch").predict_store(test, tta=True).probabilities  # binary: TTA
    assert r.metrics["count"] == len(test)
    assert r.metrics["auroc"] == pytest.approx(skm.roc_auc_score(test.labels, probs[:, 1]))
    record = json.loads((r.out / "metrics.json").read_text())
    assert record["split"] == "test" and record["inference_images_per_s"] > 0 and record["tta"] is True
    assert (r.out / "figures" / "learning_curves.png").is_file()
    assert (r.out / "report.html").stat().st_size > 10_000


def test_save_threshold_is_chosen_on_validation(evaluated_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    r = evaluate_run(run, save_threshold="sensitivity", target_sensitivities=[0.9], n_boot=0, out=tmp_path / "e")
    assert read_bundle(run).threshold == pytest.approx(r.saved_threshold)
    assert r.metrics["threshold"] == pytest.approx(r.saved_threshold)
    with pytest.raises(ConfigError, match="youden"):
        evaluate_run(run, save_threshold="best", n_boot=0, out=tmp_path / "e2")


@pytest.mark.slow
def test_foreign_store_without_splits_needs_split_all(evaluated_run: Path, tmp_path: Path) -> None:
    from histoscan.data.ingest import ingest
    from histoscan.data.synthetic import write_synthetic

    store = ingest(write_synthetic(tmp_path / "src", "kaggle", 40, seed=9), tmp_path / "other", workers=1).store
    with pytest.raises(DataError, match="--split all"):
        evaluate_run(evaluated_run, store, split="test", n_boot=0)
    r = evaluate_run(evaluated_run, store, n_boot=0)
    assert r.split == "all" and r.metrics["count"] == 40 and r.out.name == "eval-other-all"


@pytest.mark.slow
def test_leaderboard_and_selection(evaluated_run: Path, tmp_path: Path) -> None:
    second = tmp_path / "second"
    shutil.copytree(evaluated_run, second)
    shutil.rmtree(second / "eval", ignore_errors=True)  # compare evaluates it
    worse = tmp_path / "worse"
    shutil.copytree(evaluated_run, worse)
    record = json.loads((worse / "eval" / "metrics.json").read_text())
    record["metrics"]["auroc"] -= 0.2  # the same run, scored lower: it must rank last though given first
    (worse / "eval" / "metrics.json").write_text(json.dumps(record))
    board = build_leaderboard([worse, evaluated_run, second], "auroc", printer=lambda *_: None)
    assert list(board.table["run"]) == ["tiny", "second", "worse"]  # best first; the tied copies keep their order
    assert board.table["auroc"][0] == board.table["auroc"][1] > board.table["auroc"][2]
    assert board.comparable and (second / "eval" / "metrics.json").is_file()
    paths = board.write(tmp_path / "lb")
    assert "| rank |" in paths["md"].read_text() and paths["csv"].is_file()
    sel = board.select(tmp_path / "lb")
    assert sel["best_run"] == board.table["run"][0] and "auroc" in sel["reason"]
    assert json.loads((tmp_path / "lb" / "selection.json").read_text())["best_run"] == sel["best_run"]
    with pytest.raises(ConfigError, match="metric"):
        build_leaderboard([evaluated_run], "speed")
    # in a folder of runs, a run that cannot be scored is left out with its reason; named alone, it is an error
    folder = tmp_path / "runs"
    shutil.copytree(evaluated_run, folder / "good")
    shutil.copytree(evaluated_run, folder / "broken")
    (folder / "broken" / "best.safetensors").unlink()
    shutil.rmtree(folder / "broken" / "eval")
    lines: list[str] = []
    board = build_leaderboard([folder], printer=lines.append)
    assert list(board.table["run"]) == ["good"] and "best.safetensors" in next(iter(board.skipped.values()))
    assert any("left out" in line for line in lines)
    with pytest.raises(ConfigError, match=r"best\.safetensors"):
        build_leaderboard([folder / "broken"], printer=lambda *_: None)


@pytest.mark.slow
def test_cli_evaluate_and_compare(evaluated_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(evaluated_run), "--bootstrap", "50", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "AUROC" in res.output and (tmp_path / "ev" / "report.html").is_file()
    res = runner.invoke(app, ["compare", str(evaluated_run), "--out", str(tmp_path / "lb"), "--select"])
    assert res.exit_code == 0, res.output
    assert "best: tiny" in res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not a histoscan run" in res.output


def test_evaluation_report_renders_in_a_browser(evaluated_run: Path) -> None:
    report = evaluated_run / "eval" / "report.html"
    if not report.is_file():
        evaluate_run(evaluated_run, n_boot=50)
    figures = json.loads((evaluated_run / "eval" / "metrics.json").read_text())["figures"]
    with headless_chrome() as browser:
        assert_images_load(browser, report, expected=len(figures))
        assert "Evaluation of tiny" in browser.title
