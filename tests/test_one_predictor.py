"""One predictor: each image is prepared once for every view, member and the tissue check; ``backend="auto"``
follows what export measured; bf16 only where the hardware computes it natively."""

from __future__ import annotations

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
