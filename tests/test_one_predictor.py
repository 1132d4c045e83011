"""One predictor: each image is prepared once for every view, member and the tissue check; ``backend="auto"``
follows what export measured; bf16 only where the hardware computes it natively."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from histoscan.bundle import read_bundle
from histoscan.inference import backends
from histoscan.inference.backends import resolve_backend, resolve_precision
from histoscan.inference.ensemble import make_ensemble
from histoscan.inference.export import export_onnx
from histoscan.inference.predictor import Predictor
from histoscan.runfolder import BackendSpeed
from histoscan.stain.normalise import StainNormaliser, fit_target
from histoscan.system import hardware_id
from tests.test_stain import HE_A, HE_B, stained


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _with_stain(run: Path, method: str = "macenko", seed: int = 0) -> Path:
    bundle = read_bundle(run)
    bundle.preprocessing.stain = fit_target(stained(10, HE_A, seed=seed), method).to_dict()
    bundle.save(run)
    return run


@pytest.fixture
def count_normalised(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Images passed through the stain normaliser, one entry per call."""
    calls: list[int] = []
    original = StainNormaliser.__call__

    def counting(self: StainNormaliser, batch: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(int(batch.shape[0]))
        return original(self, batch, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(StainNormaliser, "__call__", counting)
    return calls


def test_each_image_is_normalised_once_under_8_way_tta_tissue_check_included(
    tiny_run: Path, tmp_path: Path, count_normalised: list[int]
) -> None:
    run = _with_stain(_copy(tiny_run, tmp_path / "run"))
    predictor = Predictor(run, backend="torch", batch_size=4)
    assert predictor.bundle.trust.tissue_check is not None  # the check reads the same prepared batch
    images = stained(10, HE_B, side=96)
    pred = predictor.predict_batch(images, tta=True)
    assert len(pred) == 10 and pred.quality is not None and "unchecked" not in pred.quality
    assert sum(count_normalised) == 10  # not 8 views x 10 + 10 for the check


def test_the_views_are_the_same_as_preprocessing_each_view_apart(tiny_run: Path, tmp_path: Path) -> None:
    run = _with_stain(_copy(tiny_run, tmp_path / "run"), "reinhard")
    predictor = Predictor(run, backend="torch", precision="fp32")
    images = stained(6, HE_B, side=96)
    once = predictor.views(images, list(range(8)))
    apart = np.stack([predictor.probabilities_from_logits(predictor.logits(images, k)) for k in range(8)])
    np.testing.assert_allclose(once, apart, atol=1e-6)
    assert not np.allclose(once[0], once[5])  # the views do differ: the comparison means something


def test_an_ensemble_normalises_once_per_distinct_member_preprocessing(
    tiny_run: Path, tmp_path: Path, count_normalised: list[int]
) -> None:
    a = _with_stain(_copy(tiny_run, tmp_path / "a"))
    b = _copy(a, tmp_path / "b")  # the same stain target as a
    c = _with_stain(_copy(tiny_run, tmp_path / "c"), seed=7)  # another target
    images = stained(5, HE_B, side=96)
    make_ensemble([a, b], tmp_path / "same", threshold_rule="none")
    count_normalised.clear()
    Predictor(tmp_path / "same", backend="torch").predict_batch(images, tta=True)
    assert sum(count_normalised) == 5
    make_ensemble([a, c], tmp_path / "two", threshold_rule="none")
    count_normalised.clear()
    Predictor(tmp_path / "two", backend="torch").predict_batch(images, tta=True)
    assert sum(count_normalised) == 10  # one per image per distinct preprocessing


def test_auto_backend_follows_the_speed_export_measured_on_this_hardware(tiny_run: Path, tmp_path: Path) -> None:
    run = _copy(tiny_run, tmp_path / "run")
    assert resolve_backend(run, "auto") == "torch"  # no model.onnx
    result = export_onnx(run, check=16)
    speed = read_bundle(run).inference.backend_speed
    assert speed is not None and result.speed == speed
    assert speed.torch > 0 and speed.onnx > 0 and speed.hardware == hardware_id("cpu") and speed.batch == 16
    assert speed.faster == ("onnx" if speed.onnx > speed.torch else "torch")
    assert resolve_backend(run, "auto") == speed.faster
    for faster in ("torch", "onnx"):
        bundle = read_bundle(run)
        bundle.inference.backend_speed = speed.model_copy(update={"faster": faster})
        bundle.save(run)
        assert resolve_backend(run, "auto") == faster
        assert resolve_backend(run, "auto", device="cuda") == "torch"
    bundle = read_bundle(run)  # measured elsewhere: not evidence for this machine
    bundle.inference.backend_speed = BackendSpeed(torch=1.0, onnx=9.0, faster="onnx", hardware="cpu: other", batch=8)
    bundle.save(run)
    assert resolve_backend(run, "auto") == "torch"
    assert resolve_backend(run, "onnx") == "onnx"


@pytest.mark.parametrize(("capability", "want"), [((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_bf16_only_on_cards_that_compute_it(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], want: str
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: capability)
    bundle = read_bundle(tiny_run)
    assert resolve_precision("auto", bundle, torch.device("cuda")) == want
    assert resolve_precision("fp32", bundle, torch.device("cuda")) == "fp32"


def test_bf16_on_the_cpu_only_with_native_support(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = read_bundle(tiny_run)
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(backends, "native_bf16_cpu", lambda native=native: native)
        assert resolve_precision("auto", bundle, torch.device("cpu")) == want


# ---- fitted under, fitted on -----------------------------------------------------------------------------
@pytest.mark.slow
def test_what_is_fitted_under_8_views_differs_from_one_view_and_answers_only_under_its_own(
    tiny_run: Path, tmp_path: Path, kaggle_dir: Path
) -> None:
    from typer.testing import CliRunner

    from histoscan.cli import app
    from histoscan.evaluation.evaluate import evaluate_run
    from histoscan.inference.calibration import calibrate

    eight, one = _copy(tiny_run, tmp_path / "eight"), _copy(tiny_run, tmp_path / "one")
    for run, tta in ((eight, True), (one, False)):
        evaluate_run(run, save_threshold="youden", tta=tta, n_boot=0, out=tmp_path / f"eval-{run.name}")
        calibrate(run, tta=tta)
    b8, b1 = read_bundle(eight), read_bundle(one)
    for b, views in ((b8, list(range(8))), (b1, [0])):
        assert b.fitted.threshold is not None and b.fitted.temperature is not None
        assert b.fitted.threshold.under.tta == views and b.fitted.temperature.under.tta == views
        assert b.fitted.threshold.split == "val" and b.fitted.threshold.rows > 0
        assert b.inference.tta == views  # the deployed predictor is the one they were fitted under
    assert b8.temperature != pytest.approx(b1.temperature, abs=1e-4)  # TTA changes the scores, so the fits differ
    assert b8.threshold != pytest.approx(b1.threshold, abs=1e-6)
    p8 = Predictor(eight, backend="torch")
    assert p8.tta_views(None) == list(range(8)) and p8.fitted_notices(list(range(8))) == []
    lines = p8.fitted_notices([0])
    assert len(lines) == 2 and all("fitted under 8 TTA views" in line and "runs 1 view" in line for line in lines)
    assert "the threshold" in lines[0] and "the temperature" in lines[1] and str(eight / "model.json") in lines[0]
    # the CLI says so when asked for other views, and the CSV's side file names what produced it
    res = CliRunner().invoke(app, ["predict", str(eight), str(kaggle_dir / "train"), "--out", str(tmp_path / "p.csv"), "--no-tta"])  # fmt: skip
    assert res.exit_code == 0 and "fitted under 8 TTA views" in " ".join(res.output.split()), res.output
    side = json.loads((tmp_path / "p.csv.json").read_text())
    assert side["tta"] == [0] and side["threshold"] == pytest.approx(b8.threshold)
    assert side["fitted"]["threshold"]["under"]["tta"] == list(range(8))


def test_the_fitted_record_round_trips_and_old_files_are_of_unknown_provenance(tiny_run: Path, tmp_path: Path) -> None:
    from histoscan.runfolder import FitRecord, FittedUnder

    run = _copy(tiny_run, tmp_path / "run")
    bundle = read_bundle(run)
    bundle.threshold = 0.3
    bundle.fitted.threshold = FitRecord(
        under=FittedUnder(tta=[0, 2], members=1, precision="bf16"), split="calibration", rows=40
    )
    bundle.save(run)
    doc = json.loads((run / "model.json").read_text())
    assert doc["schema_version"] == 3
    assert doc["fitted"]["threshold"] == {"under": {"tta": [0, 2], "members": 1, "precision": "bf16"}, "split": "calibration", "rows": 40}  # fmt: skip
    assert read_bundle(run) == bundle
    # a version-2 file recorded nothing: its fitted threshold is reported as of unknown provenance
    doc.pop("fitted")
    (run / "model.json").write_text(json.dumps({**doc, "schema_version": 2}))
    predictor = Predictor(run, backend="torch")
    lines = predictor.fitted_notices([0])
    assert len(lines) == 1 and "threshold was fitted before histoscan recorded how (unknown provenance" in lines[0]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"tta": [0, 9]}, "fitted.threshold.under.tta"),
        ({"members": 2}, "fitted.threshold.under.members is 2 but the bundle has 1 member(s)"),
    ],
)
def test_a_record_naming_a_predictor_that_cannot_run_is_refused_in_one_line(
    tiny_run: Path, tmp_path: Path, change: dict[str, object], words: str
) -> None:
    from histoscan.errors import ConfigError

    run = _copy(tiny_run, tmp_path / "run")
    doc = json.loads((run / "model.json").read_text())
    doc["fitted"] = {"threshold": {"under": {"tta": [0], "members": 1, **change}, "split": "val", "rows": 10}}
    (run / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        Predictor(run, backend="torch")
    assert words in str(err.value) and "model.json" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_onnx_answers_as_torch_on_the_prepare_once_path(tiny_run: Path, tmp_path: Path) -> None:
    run = _with_stain(_copy(tiny_run, tmp_path / "run"))
    export_onnx(run, check=16, time_backends=False)
    images = stained(12, HE_B, side=96)
    a = Predictor(run, backend="torch", precision="fp32").predict_batch(images, tta=True)
    b = Predictor(run, backend="onnx").predict_batch(images, tta=True)
    assert np.abs(a.probabilities - b.probabilities).max() < 1e-4
    assert a.uncertainty is not None and b.uncertainty is not None
    assert np.abs(a.uncertainty - b.uncertainty).max() < 1e-4


def test_the_torch_backend_runs_a_large_batch_in_chunks_with_the_same_logits(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU batch is run in chunks of CPU_CHUNK (faster in cache); logits and pooled features are those of one pass."""
    backend = backends.TorchBackend(tiny_run, "cpu", precision="fp32")
    side = backend.bundle.preprocessing.input_size
    x = torch.rand(11, 3, side, side, generator=torch.Generator().manual_seed(0))
    one_logits, one_features = backend.logits(x), backend.logits_and_features(x)[1]
    monkeypatch.setattr(backends, "CPU_CHUNK", 4)  # 4 + 4 + 3: a ragged last chunk
    sizes: list[int] = []
    forward = backend.model.forward
    monkeypatch.setattr(backend.model, "forward", lambda t: sizes.append(len(t)) or forward(t))
    chunked_logits = backend.logits(x)
    assert sizes == [4, 4, 3]
    chunked_features = backend.logits_and_features(x)[1]
    assert chunked_logits.shape == one_logits.shape and chunked_features.shape == one_features.shape
    assert np.abs(chunked_logits - one_logits).max() < 1e-5
    assert np.abs(chunked_features - one_features).max() < 1e-5
    assert backend.logits(x[:0]).shape == (0, one_logits.shape[1])  # an empty batch is no error
