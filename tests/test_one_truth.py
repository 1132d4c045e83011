"""Facts written once: the centre-crop window, the vocabularies, the tissue thresholds and the TTA defaults."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, get_type_hints

import numpy as np
import pytest
import torch

from histoscan import enums, thresholds
from histoscan.bundle import ModelBundle
from histoscan.data.transforms import CentreSafeCrop, centre_crop
from histoscan.evaluation.plots import centre_outline
from histoscan.explain.cam import _METHODS
from histoscan.explain.explainer import Explainer
from histoscan.explain.faithfulness import model_view
from histoscan.explain.render import Geometry
from histoscan.geometry import centre_box, centre_slices, centre_window
from histoscan.inference.tta import default_views, parse_tta, tta_views
from histoscan.preprocessing import Preprocessing
from histoscan.runfolder import InferencePolicy, ReferralRule, TrustPolicy
from histoscan.stain.augment import build_augmentation
from histoscan.training.config import TrainConfig

# (height, width, crop): square and not, even and odd margins, a crop of the whole image
SIZES = [(96, 96, 64), (96, 96, 65), (97, 96, 64), (50, 70, 33), (64, 48, 47), (32, 32, 32)]


def _numbered(h: int, w: int) -> np.ndarray:
    """A uint8 NHWC image whose pixels say where they are (so a window off by one pixel shows)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy % 256, xx % 256, (yy * 7 + xx) % 256], axis=-1).astype(np.uint8)[None]


@pytest.mark.parametrize(("h", "w", "side"), SIZES)
def test_the_crop_window_is_the_crop_every_part_applies(h: int, w: int, side: int) -> None:
    img = _numbered(h, w)
    top, left = centre_window(h, w, side)
    expected = img[0, top : top + side, left : left + side]
    rows, cols = centre_slices(h, w, side)
    assert (rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start) == (top, left, side, side)
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float()
    # transforms: the centre crop, and a random crop with no freedom (keep = size) sits in the same window
    assert torch.equal(centre_crop(x, side)[0].permute(1, 2, 0), torch.from_numpy(expected).float())
    assert torch.equal(CentreSafeCrop(side, keep=side)(x), centre_crop(x, side))
    # preprocessing: the fused path (a slice of the uint8 batch) and the training path (geometry) agree with it
    pre = Preprocessing(image_size=[h, w], crop=side, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    fused = pre(img)[0].permute(1, 2, 0) * 255.0
    assert torch.allclose(fused, torch.from_numpy(expected).float(), atol=1e-3)
    assert torch.allclose(pre.finish(pre.to_float(img))[0].permute(1, 2, 0) * 255.0, fused, atol=1e-3)
    # explain: the map is put back into the same window, the deletion test edits it, the drawn box outlines it
    back = Explainer.to_patch(SimpleNamespace(pre=pre), np.ones((1, side, side), np.float32))  # type: ignore[arg-type]
    assert back[0, rows, cols].all() and back.sum() == side * side
    assert model_view(pre) == (rows, cols)
    box = Geometry.from_preprocessing([h, w], None, side).crop_box
    assert (
        box
        == (None if side >= min(h, w) else (left, top, left + side, top + side))
        == (None if side >= min(h, w) else centre_box(h, w, side))
    )


def test_the_labelled_centre_outline_uses_the_window() -> None:
    assert centre_outline([96, 96]) == (centre_window(96, 96, 32)[0], 32) == (32, 32)
    assert centre_slices(10, 12, None) == (slice(0, 10), slice(0, 12))


# ---- one vocabulary --------------------------------------------------------------------------------
def test_each_vocabulary_lists_its_values_once() -> None:
    assert enums.values(enums.StainMethod) == enums.STAIN_METHODS == ("reinhard", "macenko")
    assert set(enums.BACKENDS) == set(enums.values(enums.Backend))
    assert set(_METHODS) | {"auto"} == set(enums.CAM_METHODS)  # every CAM method has its class ("auto" picks one)
    for preset in enums.AUGMENT_PRESETS:
        build_augmentation(preset)
    hints = get_type_hints(TrainConfig)
    assert hints["augment"] is enums.AugmentPreset and hints["stain_granularity"] is enums.StainGranularity


def test_the_schema_takes_its_choices_from_the_vocabularies() -> None:
    from histoscan.runfolder import PreprocessingSpec, StainSpec

    assert PreprocessingSpec.model_fields["fit"].annotation is enums.FitPolicy
    assert StainSpec.model_fields["method"].annotation is enums.StainMethod
    assert set(enums.values(enums.StoredPrecision)) < set(enums.PRECISIONS)


def test_the_thresholds_are_the_ones_the_parts_read() -> None:
    from histoscan.eda import stats
    from histoscan.stain import estimate
    from histoscan.wsi import tissue

    assert (stats.BLANK_MEAN, stats.DARK_MEAN) == (thresholds.BLANK_MEAN, thresholds.DARK_MEAN)
    assert (estimate.OD_BACKGROUND, estimate.OD_DARK) == (thresholds.OD_BACKGROUND, thresholds.OD_DARK)
    assert (tissue.MIN_SATURATION, tissue.DARK_VALUE) == (thresholds.MIN_SATURATION, thresholds.DARK_VALUE)


# ---- one TTA default -------------------------------------------------------------------------------
def _bundle(classes: int = 2, referral: list[int] | None = None, tta: list[int] | None = None) -> ModelBundle:
    rule = None
    if referral is not None:
        rule = ReferralRule(
            by="probability", band=[0.3, 0.7], tta=referral, asked="coverage", target=0.9, count=10, coverage=0.9,
            accuracy=0.9,
        )  # fmt: skip
    names = [f"c{i}" for i in range(classes)]
    return ModelBundle(
        "simple_cnn", names, Preprocessing(), inference=InferencePolicy(tta=tta), trust=TrustPolicy(referral=rule)
    )


ALL = list(range(8))
# without a deployed predictor (inference.tta), what each use ran before the defaults were decided in one place;
# with one, every use but explain runs the deployed views (the fitting commands set them to what they fitted under)
CASES: list[tuple[dict[str, Any], dict[str, list[int]]]] = [
    ({}, {"evaluate": ALL, "fit": ALL, "submission": ALL, "predict": [0], "slide": [0], "explain": [0]}),
    ({"classes": 3}, {"evaluate": [0], "fit": [0], "submission": [0], "predict": [0], "slide": [0], "explain": [0]}),
    ({"referral": [0, 1]}, {"evaluate": [0, 1], "submission": [0, 1], "predict": [0, 1], "slide": [0]}),
    ({"tta": [0, 4]}, {"evaluate": [0, 4], "fit": [0, 4], "submission": [0, 4], "predict": [0, 4], "slide": [0, 4]}),
    ({"referral": [0, 1], "tta": [0, 1]}, {"evaluate": [0, 1], "predict": [0, 1], "slide": [0, 1], "explain": [0]}),
]


@pytest.mark.parametrize(("kind", "expected"), CASES)
def test_default_views_per_use(kind: dict[str, Any], expected: dict[str, list[int]]) -> None:
    bundle = _bundle(**kind)
    for use, views in expected.items():
        assert default_views(bundle, use) == views, use  # type: ignore[arg-type]
        assert tta_views(bundle, None, use) == views  # type: ignore[arg-type]
        assert tta_views(bundle, True, use) == ALL and tta_views(bundle, False, use) == [0]  # type: ignore[arg-type]
    assert tta_views(bundle, [5, 0, 5], "slide") == [0, 5] == parse_tta([5, 0])


def test_the_settings_leave_the_tta_default_to_the_one_function() -> None:
    from histoscan.explain.settings import ExplainSettings
    from histoscan.wsi.scan import ScanSettings

    for cls in (ScanSettings, ExplainSettings):
        assert {f.name: f.default for f in dataclasses.fields(cls)}["tta"] is None
