"""Per-group stain normalisation: one estimate per patient / slide, the same in training and at inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histoscan.bundle import read_bundle
from histoscan.data.ingest import ingest
from histoscan.data.store import PatchStore
from histoscan.errors import ConfigError
from histoscan.evaluation.evaluate import evaluate_run
from histoscan.inference.predict import INPUT_GROUP, predict_input
from histoscan.inference.predictor import Predictor
from histoscan.preprocessing import Preprocessing
from histoscan.runfolder import RunFolder
from histoscan.stain.groups import GROUP_SAMPLE, sample_positions, stain_group_names
from histoscan.stain.normalise import StainNormaliser, StainTarget, fit_target
from histoscan.training.config import TrainConfig
from histoscan.training.data import StoreBatches
from histoscan.training.fit import train
from histoscan.training.module import PatchClassifier
from tests.test_stain import HE_A, HE_B, stained

#: group name -> stain of its patches (None: blank background, too little tissue for any estimate)
GROUPS = {"lab-a1": HE_A, "lab-a2": HE_A, "lab-b1": HE_B, "lab-b2": HE_B, "lab-b3": HE_B, "blank": None}


@pytest.fixture(scope="module")
def grouped_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six patients of 64 px patches: two stained one way, three another, one blank; labels alternate."""
    root = tmp_path_factory.mktemp("stain-groups")
    for j, (group, he) in enumerate(GROUPS.items()):
        images = stained(12, he, seed=j) if he is not None else np.full((12, 64, 64, 3), 246, np.uint8)
        for i, img in enumerate(images):
            folder = root / "src" / group / str(i % 2)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{group}_{i}.png")
    return ingest(root / "src", root / "store", workers=1).store


@pytest.fixture(scope="module")
def group_run(grouped_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained for one epoch with per-group Macenko normalisation."""
    cfg = TrainConfig(
        data=str(grouped_store),
        out=str(tmp_path_factory.mktemp("group-runs")),
        name="group",
        model="simple_cnn",
        resize=32,
        batch_size=16,
        max_epochs=1,
        progress=False,
        early_stopping=None,
        val=0.2,
        test=0.2,
        stain_norm="macenko",
        stain_granularity="group",
    )
    lines: list[str] = []
    run = train(cfg, printer=lines.append).run_dir
    assert any("of 6 groups had too little tissue" in line or "groups had too little" in line for line in lines), lines
    return run


def test_the_granularity_is_stored_and_validated(group_run: Path, tmp_path: Path) -> None:
    assert read_bundle(group_run).preprocessing.stain["granularity"] == "group"
    doc = json.loads((group_run / "model.json").read_text())
    doc["preprocessing"]["stain"]["granularity"] = "slide"
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"preprocessing.stain.granularity"):
        RunFolder(bad).read_model_json()
    with pytest.raises(ConfigError, match="stain granularity 'slide'"):
        StainTarget.from_dict({**doc["preprocessing"]["stain"]})


def test_training_and_the_predictor_see_the_same_input_for_a_group(group_run: Path, grouped_store: Path) -> None:
    bundle = read_bundle(group_run)
    store = PatchStore(grouped_store)
    # the training path: the run's preprocessing, every group estimated from the whole store (as train() does),
    # batches from the training loader's dataset, through the LightningModule's own preprocessing
    pre = Preprocessing(**{k: getattr(bundle.preprocessing, k) for k in bundle.preprocessing.__dataclass_fields__})
    pre.estimate_store_groups(store)
    cfg = TrainConfig(data=str(grouped_store), stain_norm="macenko", stain_granularity="group", augment="none")
    module = PatchClassifier(torch.nn.Identity(), cfg, pre, 2)
    images, _, groups = StoreBatches(store, stain_group_names(store))[list(range(len(store)))]
    trained = module._inputs(images, train=False, groups=groups)
    # inference: the Predictor on a split of the store (a view) estimates its groups itself
    predictor = Predictor(group_run)
    view = store.subset(np.flatnonzero(np.isin(store.groups, ["lab-b2", "blank", "lab-a1"])))
    predictor.predict_store(view)
    inferred = predictor.bundle.preprocessing(view.batch(np.arange(len(view))), groups=stain_group_names(view))
    assert torch.equal(trained[torch.from_numpy(view.indices)], inferred)
    # one transform per group: a patch normalised alone with its group's name gets the group's mapping
    one = predictor.bundle.preprocessing(view.batch([3]), groups=stain_group_names(view)[3:4])
    assert torch.equal(one, inferred[3:4])


def test_a_group_is_estimated_from_a_sample_of_its_patches_and_differs_from_per_patch(grouped_store: Path) -> None:
    store = PatchStore(grouped_store)
    target = fit_target(store.batch(np.arange(len(store))), "macenko")
    pre = Preprocessing(image_size=[64, 64], stain={**target.to_dict(), "granularity": "group"})
    names = pre.estimate_store_groups(store)
    assert names is not None and len(pre.stain_groups) == len(GROUPS)
    assert pre.stain_groups.passed_through() == [f"{grouped_store.resolve()}#blank"]
    a1 = np.flatnonzero(store.groups == "lab-a1")
    batch = torch.from_numpy(store.batch(a1))
    per_group = pre.normalise_stain(batch, names[a1])
    per_patch = StainNormaliser(target)(batch)
    assert not torch.equal(per_group, per_patch)
    pooled = StainNormaliser(target).estimate_pooled(batch)  # 12 patches: all of them are the sample
    want = StainNormaliser(target)(
        batch, type(pooled)(*(v.expand(len(a1), *v.shape[1:]) for v in vars(pooled).values()))
    )
    assert torch.equal(per_group, want)
    assert len(sample_positions(np.arange(1000))) == GROUP_SAMPLE


def test_a_blank_group_passes_through_unchanged_and_is_counted(group_run: Path, grouped_store: Path) -> None:
    store = PatchStore(grouped_store)
    blank = store.subset(np.flatnonzero(store.groups == "blank"))
    pre = read_bundle(group_run).preprocessing
    names = pre.estimate_store_groups(blank)
    images = torch.from_numpy(blank.batch(np.arange(len(blank))))
    out = pre.normalise_stain(images, names)
    assert torch.equal(out, images)
    assert pre.stain_counts() == {"patches": 12, "passed_through": 12, "groups": 1, "groups_passed_through": 1}
    x = pre(images.numpy(), groups=names)
    assert torch.isfinite(x).all()


def test_evaluate_reports_group_counts(group_run: Path, grouped_store: Path, tmp_path: Path) -> None:
    r = evaluate_run(group_run, grouped_store, split="all", out=tmp_path / "eval", n_boot=10, tta=False)
    counts = json.loads((r.out / "metrics.json").read_text())["stain_normalisation"]
    assert counts == {"patches": 72, "passed_through": 12, "groups": 6, "groups_passed_through": 1}


def test_loose_files_are_one_group_with_a_notice(group_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "loose"
    folder.mkdir()
    images = stained(5, HE_B, seed=11)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i}.png")
    said: list[str] = []
    predictor = Predictor(group_run)
    table = predict_input(predictor, folder, tta=False, workers=1, notice=said.append)
    assert len(table.ids) == 5 and len(said) == 1 and "whole input is one group" in said[0]
    pre = predictor.bundle.preprocessing
    assert list(pre.stain_groups.keys) == [INPUT_GROUP]
    want = Predictor(group_run).predict_batch(images, tta=False).probabilities  # per image: a different transform
    assert not np.allclose(table.prediction.probabilities, want)


def test_the_same_patient_name_in_two_stores_is_two_groups(
    group_run: Path, grouped_store: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(grouped_store, other)
    pre = read_bundle(group_run).preprocessing
    a = pre.estimate_store_groups(PatchStore(grouped_store))
    b = pre.estimate_store_groups(PatchStore(other))
    assert a is not None and b is not None and not set(a) & set(b)
    assert len(pre.stain_groups) == 2 * len(GROUPS)


def test_bad_granularity_requests_are_one_line_errors(kaggle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stain_granularity group needs stain_norm"):
        TrainConfig(data="x", stain_granularity="group")
    store = ingest(kaggle_dir, tmp_path / "store", workers=1).store
    cfg = TrainConfig(
        data=str(store), out=str(tmp_path / "runs"), name="nogroups", stain_norm="macenko", stain_granularity="group"
    )
    with pytest.raises(ConfigError, match=r"store: stain_granularity group needs a store with groups"):
        train(cfg, printer=lambda *_: None)


@pytest.mark.slow
def test_a_slide_is_one_group_estimated_once_from_its_tissue(tmp_path_factory: pytest.TempPathFactory) -> None:
    from histoscan.wsi.scan import ScanSettings, scan_slide
    from histoscan.wsi.synthetic import tumour_slide
    from tests.wsi_helpers import MODEL_MPP, train_mosaic_run

    src = train_mosaic_run(tmp_path_factory)
    run = tmp_path_factory.mktemp("slide-group-run") / "run"
    shutil.copytree(src, run)
    bundle = read_bundle(run)
    slide, _ = tumour_slide(run.parent / "slide.tif", 10, 12, (2, 8, 3, 9), MODEL_MPP, seed=5)
    predictor = Predictor(run, backend="torch")
    patches = predictor.bundle.preprocessing.fit_batch(stained(16, HE_A, seed=2, side=96))
    bundle.preprocessing.stain = {**fit_target(patches, "macenko").to_dict(), "granularity": "group"}
    bundle.save(run)
    predictor = Predictor(run, backend="torch")
    r = scan_slide(predictor, slide, run.parent / "out", ScanSettings(explain_top=2))
    pre = predictor.bundle.preprocessing
    assert list(pre.stain_groups.keys) == [f"slide:{slide.resolve()}"]
    assert "stain_group_passed_through" in r.summary
    assert (r.folder / "explain" / "tiles.csv").is_file()


@pytest.mark.slow
def test_the_stain_shift_suite_re_estimates_each_group_under_each_shift(group_run: Path, grouped_store: Path) -> None:
    from histoscan.evaluation.evaluate import ShiftedPredict
    from histoscan.stain.shift import shift_suite, stain_shift_report

    store = PatchStore(grouped_store)
    predictor = Predictor(group_run)
    shifted = ShiftedPredict(predictor, store, [0])
    suite = [s for s in shift_suite() if s.name in ("gamma-0.7", "rotate-20")]
    report = stain_shift_report(shifted, store, suite, n_boot=10, on_shift=shifted.start)
    assert [r["shift"] for r in report["shifts"]] == ["gamma-0.7", "rotate-20"]
    keys = set(predictor.bundle.preprocessing.stain_groups.keys)
    root = grouped_store.resolve()
    assert {f"shift:{s}/{root}#{g}" for s in ("gamma-0.7", "rotate-20") for g in GROUPS} <= keys
    per_patch = stain_shift_report(lambda b: predictor.predict_batch(b, [0]).probabilities, store, suite, n_boot=10)
    assert report["shifts"] != per_patch["shifts"]  # the group transform, not each patch's own
