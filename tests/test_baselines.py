"""Classical baselines: features, run folders in the leaderboard format, real HCD patches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from histoscan.baselines.features import colour_features, extract, pixel_features
from histoscan.baselines.fit import run_baselines
from histoscan.cli import app
from histoscan.data.ingest import ingest
from histoscan.data.store import PatchStore
from histoscan.errors import ConfigError
from histoscan.evaluation.leaderboard import build_leaderboard
from tests.conftest import shared


def test_pixel_features_shrink_by_area_average() -> None:
    img = np.zeros((2, 4, 4, 3), np.uint8)
    img[0, :2, :2] = 255
    f = pixel_features(img, size=2).reshape(2, 2, 2, 3)
    assert f[0, 0, 0, 0] == pytest.approx(1.0) and f[0, 1, 1, 0] == 0 and f.shape == (2, 2, 2, 3)


def test_colour_features_are_finite_and_see_the_centre() -> None:
    a = np.full((1, 96, 96, 3), 200, np.uint8)
    b = a.copy()
    b[:, 40:56, 40:56] = 60  # dark nuclei in the centre only
    fa, fb = colour_features(a), colour_features(b)
    assert fa.shape == (1, 83) and np.isfinite(fa).all()
    assert not np.allclose(fa, fb)


@pytest.mark.slow
def test_baselines_write_runs_that_the_leaderboard_ranks(tiny_run: Path, tmp_path: Path) -> None:
    from histoscan.bundle import read_bundle

    store = read_bundle(tiny_run).training["store"]
    results = run_baselines(store, tmp_path / "b", val=0.2, test=0.1, n_boot=50, printer=lambda *_: None)
    assert [r.name for r in results] == ["logreg-pixels", "rf-pixels", "logreg-colour", "rf-colour"]
    for r in results:
        for f in ("config.yaml", "baseline.json", "metrics.csv", "split.csv", "eval/metrics.json", "eval/report.html"):
            assert (r.run_dir / f).is_file(), (r.name, f)
        assert r.test_metrics["auroc"] > 0.8  # the synthetic classes are easy
    # the same split as the CNN run with the same recipe
    assert (results[0].run_dir / "split.csv").read_text() == (tiny_run / "split.csv").read_text()
    board = build_leaderboard([tiny_run, tmp_path / "b"], printer=lambda *_: None)
    assert len(board.table) == 5 and board.comparable
    assert set(board.table["kind"]) == {"cnn", "baseline"}
    with pytest.raises(ConfigError, match="exist"):
        run_baselines(store, tmp_path / "b", val=0.2, test=0.1, printer=lambda *_: None)
    with pytest.raises(ConfigError, match="svm"):
        run_baselines(store, tmp_path / "c", models=["svm"])


@pytest.mark.slow
def test_baselines_on_real_hcd_beat_chance(tmp_path: Path) -> None:
    store = ingest(shared("hcd"), tmp_path / "hcd", workers=2).store
    view = PatchStore(store)
    assert extract(view.subset(np.arange(10)), "colour").shape == (10, 83)
    res = CliRunner().invoke(
        app, ["baselines", str(store), str(tmp_path / "b"), "--models", "logreg,rf", "--features", "colour"]
    )
    assert res.exit_code == 0, res.output
    for name in ("logreg-colour", "rf-colour"):
        m = json.loads((tmp_path / "b" / name / "eval" / "metrics.json").read_text())["metrics"]
        assert m["count"] == 692 and m["auroc"] > 0.75, (name, m["auroc"])
