"""Knowing when not to answer: referral rules, the tissue check, answers through predict, evaluate, calibrate and the API."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from histoscan.bundle import read_bundle
from histoscan.cli import app
from histoscan.data.imageio import read_image
from histoscan.data.synthetic import NOT_HE_KINDS, not_he_patch, synth_batch
from histoscan.errors import ConfigError, DataError
from histoscan.inference.predict import predict_input
from histoscan.inference.predictor import Predictor
from histoscan.preprocessing import Preprocessing
from histoscan.rules.referral import refer_mask
from histoscan.rules.tissue import check_images, judge, tissue_features
from histoscan.runfolder import parse_model
from histoscan.trust.referral import fit_referral
from histoscan.trust.tissue import fit_tissue_check
from tests.conftest import shared


@pytest.fixture
def run(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run (calibration writes model.json)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def _doubtful(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities whose errors sit near 0.5, and an uncertainty that tracks them loosely."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    margin = rng.normal(1.5, 1.5, n) * np.where(labels == 1, 1, -1)
    p = 1 / (1 + np.exp(-margin))
    unc = np.abs(rng.normal(0, 0.05, n)) + 0.2 * np.exp(-np.abs(margin))
    return np.stack([1 - p, p], axis=1), labels, unc


def test_coverage_rule_is_a_band_around_the_threshold_and_reaches_the_coverage() -> None:
    probs, labels, unc = _doubtful()
    rule = fit_referral(probs, labels, unc, threshold=0.5, tta=[0, 1], coverage=0.9, by="probability")
    assert rule.by == "probability" and rule.band is not None and rule.band[0] < 0.5 < rule.band[1]
    assert rule.coverage == pytest.approx(0.9, abs=0.002)
    full = float(((probs[:, 1] >= 0.5) == labels).mean())
    assert rule.accuracy > full  # referring the least sure raises the accuracy of the rest
    refer = refer_mask(rule, probs, unc)
    assert ((probs[refer, 1] > rule.band[0]) & (probs[refer, 1] < rule.band[1])).all()


def test_target_accuracy_rule_and_auto_choice() -> None:
    probs, labels, unc = _doubtful()
    rule = fit_referral(probs, labels, unc, threshold=0.5, tta=[0, 1], target_accuracy=0.93, by="auto")
    assert rule.accuracy >= 0.93 and 0 < rule.coverage < 1 and rule.asked == "accuracy"
    assert rule.by == max(rule.error_auroc, key=lambda k: rule.error_auroc[k])  # auto: the better error finder
    by_unc = fit_referral(probs, labels, unc, threshold=0.5, tta=[0, 1], coverage=0.8, by="uncertainty")
    assert by_unc.max_uncertainty is not None and by_unc.band is None
    assert refer_mask(by_unc, probs, unc).mean() == pytest.approx(0.2, abs=0.002)


def test_error_detection_and_accuracy_at_coverage_on_known_answers() -> None:
    from histoscan.trust.referral import error_auroc
    from histoscan.trust.scoring import accuracy_at_coverage, risk_coverage

    correct = np.array([True] * 90 + [False] * 10)
    doubt = np.arange(100, dtype=float)  # the ten errors are the least sure
    assert error_auroc(doubt, ~correct) == 1.0 and error_auroc(-doubt, ~correct) == 0.0
    assert accuracy_at_coverage(doubt, correct, 0.9) == 1.0 and accuracy_at_coverage(doubt, correct, 1.0) == 0.9
    curve = risk_coverage(doubt, correct, points=11)
    assert curve["coverage"][0] == 1.0 and curve["risk"][0] == pytest.approx(0.1) and curve["risk"][-1] == 0.0
    assert curve["risk"] == sorted(curve["risk"], reverse=True)  # referring the least sure first only helps here


def test_bad_referral_requests_are_clear() -> None:
    probs, labels, unc = _doubtful(100)
    with pytest.raises(ConfigError, match="exactly one"):
        fit_referral(probs, labels, unc, threshold=0.5, tta=[0], coverage=0.9, target_accuracy=0.9)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        fit_referral(probs, labels, unc, threshold=0.5, tta=[0], coverage=1.5)
    with pytest.raises(ConfigError, match="2 views"):
        fit_referral(probs, labels, None, threshold=0.5, tta=[0], coverage=0.9, by="uncertainty")
    with pytest.raises(DataError, match=r"no referral limit reaches accuracy 0\.9999 with confidence 0\.95"):
        fit_referral(np.full((100, 2), 0.5), np.zeros(100, int), None, threshold=0.5, tta=[0], target_accuracy=0.9999)


def test_runs_written_before_the_trust_issue_still_read(tiny_run: Path) -> None:
    doc = json.loads((tiny_run / "model.json").read_text())
    doc["trust"] = {"referral_band": None, "tissue_check": None}  # what every earlier run holds
    assert parse_model(doc).trust.referral is None


def test_calibrate_fits_a_rule_the_predictor_applies_under_its_policy(run: Path, kaggle_dir: Path) -> None:
    result = CliRunner().invoke(app, ["calibrate", str(run), "--refer-coverage", "0.7", "--no-temperature"])
    assert result.exit_code == 0, result.output
    assert "refer images with" in result.output and "error-detection AUROC" in result.output
    assert "with confidence 0.95 (DKW)" in result.output
    rule = read_bundle(run).trust.referral
    assert rule is not None and rule.tta == list(range(8))  # the binary model's default TTA, stored with the rule
    assert rule.method == "empirical" and rule.delta == 0.05 and rule.bound is not None and rule.margin is not None
    assert read_bundle(run).fitted.referral is not None  # the predictor and rows it was fitted under
    table = predict_input(Predictor(run, backend="torch"), kaggle_dir / "test")  # no TTA named: the rule's policy
    assert table.prediction.uncertainty is not None and table.prediction.answers is not None
    from histoscan.rules.referral import refer_mask as mask

    refer = mask(rule, table.prediction.probabilities, table.prediction.uncertainty)
    assert [a == "refer" for a in table.prediction.answers] == list(refer)  # flagged patches aside: none here
    frame = table.frame()
    assert {"answer", "quality", "uncertainty"} <= set(frame.columns)
    with pytest.raises(ConfigError, match="fitted under TTA views"):
        predict_input(Predictor(run, backend="torch"), kaggle_dir / "test", tta=False)
    bad = CliRunner().invoke(app, ["calibrate", str(run), "--refer-coverage", "1.5", "--no-temperature"])
    assert bad.exit_code == 2 and "between 0 and 1" in bad.output


@pytest.mark.slow
def test_evaluate_reports_error_detection_coverage_and_the_rule(run: Path) -> None:
    from histoscan.evaluation.evaluate import evaluate_run
    from histoscan.trust.calibrate import fit_run_referral

    fit_run_referral(run, coverage=0.8)
    r = evaluate_run(run, backend="torch", n_boot=50)
    trust = r.metrics["trust"]
    assert set(trust["error_detection"]) == {"baseline_1_minus_max_probability", "probability_margin", "uncertainty"}
    assert set(trust["accuracy_at_coverage"]) == {"0.8", "0.9", "0.95"}
    ref = trust["referral"]
    assert ref["applied"] and 0 <= ref["coverage_achieved"] <= 1 and len(ref["coverage_ci95"]) == 2
    assert set(ref["coverage_per_class"]) == {"normal", "tumor"} and "sensitivity_answered" in ref
    assert set(trust["aurc"]) == set(trust["error_detection"])
    assert all(a["e_aurc"] >= -1e-12 and a["aurc"] >= a["e_aurc"] for a in trust["aurc"].values())
    assert any("AURC" in line for line in r.lines(run))
    assert trust["tissue_check"]["checked"]
    assert (r.out / "figures" / "risk_coverage.png").is_file()
    assert "Knowing when not to answer" in (r.out / "report.html").read_text()


def test_new_runs_have_a_tissue_check_that_never_calls_bad_inputs_tumour(tiny_run: Path) -> None:
    assert read_bundle(tiny_run).trust.tissue_check is not None  # fitted at the end of training
    kinds = [k for k in NOT_HE_KINDS if k != "ihc"]  # IHC against real H&E: test_tissue_check_on_real_patches
    pred = Predictor(tiny_run, backend="torch").predict_batch([not_he_patch(kind, 96, seed=3) for kind in kinds])
    assert pred.answers is not None and pred.quality is not None
    assert all(a in ("not tissue", "out of distribution") for a in pred.answers), list(zip(kinds, pred.answers))
    assert pred.quality[kinds.index("black")] == "dark" and pred.quality[kinds.index("white")] == "blank"
    good, _ = synth_batch(40, seed=11)
    ok = Predictor(tiny_run, backend="torch").predict_batch(list(good))
    assert ok.quality is not None and ok.quality.count("ok") >= 38


def test_a_run_without_the_check_says_so(run: Path) -> None:
    doc = json.loads((run / "model.json").read_text())
    doc["trust"]["tissue_check"] = None
    (run / "model.json").write_text(json.dumps(doc))
    pred = Predictor(run, backend="torch").predict_batch([not_he_patch("black")])
    assert pred.quality == ["unchecked"] and pred.answers == [["normal", "tumor"][int(pred.predicted[0])]]


def test_api_returns_answer_quality_and_uncertainty(run: Path) -> None:
    from histoscan.serving.app import create_app
    from histoscan.serving.state import ServeSettings
    from histoscan.trust.calibrate import fit_run_referral

    fit_run_referral(run, coverage=0.7)
    import io

    buf = io.BytesIO()
    Image.fromarray(not_he_patch("black")).save(buf, format="PNG")
    with TestClient(create_app(ServeSettings(str(run), model_process=False))) as c:
        j = c.post("/v1/predict", files={"file": ("black.png", buf.getvalue(), "image/png")}).json()
        assert j["answer"] == "not tissue" and j["quality"] == "dark" and j["uncertainty"] >= 0
        r = c.post("/v1/predict?tta=false", files={"file": ("black.png", buf.getvalue(), "image/png")})
        assert r.status_code == 422 and "TTA views" in r.text
        card = c.get("/v1/model").json()
        assert card["referral"]["coverage"] > 0 and card["tissue_check"] is True
        props = c.get("/openapi.json").json()["components"]["schemas"]["PatchPrediction"]["properties"]
        assert {"answer", "quality", "uncertainty"} <= set(props)


def test_hard_preset_leaves_the_defaults_alone() -> None:
    a, la = synth_batch(30, seed=5)
    b, lb = synth_batch(30, seed=5, noise=0.2, preset=None)
    assert (a == b).all() and (la == lb).all()
    _, hard = synth_batch(400, seed=5, preset="hard")
    _, clean = synth_batch(400, seed=5)
    assert 0 < (hard != clean).mean() < 0.15  # some labels are wrong on purpose
    with pytest.raises(ConfigError, match="preset 'nope'"):
        synth_batch(2, preset="nope")


def _images(folder: Path, n: int, seed: int = 0) -> list[np.ndarray]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif"))
    random.Random(seed).shuffle(files)
    return [read_image(f).pixels for f in files[:n]]


@pytest.mark.slow
def test_tissue_check_on_real_patches() -> None:
    """Fitted on hcd: every bad kind flagged; >= 99% of held-out hcd and >= 95% of other labs' H&E accepted."""
    hcd = shared("hcd")
    ids = pd.read_csv(hcd / "train_labels.csv")["id"].tolist()
    random.Random(0).shuffle(ids)
    pre = Preprocessing(image_size=[96, 96])

    def feats(chosen: list[str]) -> np.ndarray:
        imgs = [read_image(hcd / "train" / f"{i}.tif").pixels for i in chosen]
        return np.concatenate([tissue_features(pre.to_float(imgs[s : s + 256])) for s in range(0, len(imgs), 256)])

    check = fit_tissue_check(feats(ids[:2000]))
    held_out = judge(check, feats(ids[-700:]))
    assert held_out.accepted.mean() >= 0.99
    for name, n in (("idc", 500), ("lc25000-lung", 300)):
        verdict = check_images(check, pre, _images(shared(name), n))
        assert verdict.accepted.mean() >= 0.95, (name, verdict.accepted.mean())
    bad = check_images(check, pre, np.stack([not_he_patch(k, 96, s) for k in NOT_HE_KINDS for s in range(3)]))
    assert not bad.accepted.any(), list(zip([k for k in NOT_HE_KINDS for _ in range(3)], bad.quality))
