"""Splits: stratified, group-disjoint, saved and reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histoscan.data.ingest import ingest
from histoscan.data.splits import fold_assignment, make_folds, make_split, read_split, split_store, write_splits
from histoscan.data.store import PatchStore
from histoscan.errors import DataError
from tests.conftest import shared


def test_stratified_split_keeps_class_ratio() -> None:
    labels = np.array([0] * 700 + [1] * 300)
    a = make_split(labels, val=0.1, test=0.2, seed=3)
    for part, frac in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        sel = a == part
        assert abs(sel.mean() - frac) < 0.01
        assert abs(labels[sel].mean() - 0.3) < 0.02
    assert (make_split(labels, val=0.1, test=0.2, seed=3) == a).all()
    assert not (make_split(labels, val=0.1, test=0.2, seed=4) == a).all()


def test_grouped_split_is_disjoint_by_group() -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 40, 2000).astype(str)
    labels = (rng.random(2000) < 0.3).astype(int)
    a = make_split(labels, groups, val=0.1, test=0.1, seed=0)
    parts = {p: set(groups[a == p]) for p in ("train", "val", "test")}
    assert (
        not (parts["train"] & parts["val"])
        and not (parts["train"] & parts["test"])
        and not (parts["val"] & parts["test"])
    )
    assert all(len(v) > 0 for v in parts.values())


def test_folds_cover_everything_once_and_respect_groups() -> None:
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 30, 600).astype(str)
    labels = rng.integers(0, 2, 600)
    folds = make_folds(labels, groups, k=5, seed=0)
    assert set(folds) == set(range(5))
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    plain = make_folds(labels, None, k=4)
    assert np.bincount(plain).min() >= 149


def test_bad_splits_are_clear_errors() -> None:
    with pytest.raises(DataError, match="single class"):
        make_split(np.zeros(10, int))
    with pytest.raises(DataError, match="no label"):
        make_split(np.array([0, 1, -1]))
    with pytest.raises(DataError, match="sum below 1"):
        make_split(np.array([0, 1] * 10), val=0.6, test=0.5)
    with pytest.raises(DataError, match="only 3 groups"):
        make_split(np.array([0, 1] * 30), np.array(["a", "b", "c"] * 20), test=0.1)


def test_split_store_saves_and_reuses(kaggle_dir: Path, tmp_path: Path) -> None:
    store = PatchStore(ingest(kaggle_dir, tmp_path / "s").store)
    parts, path = split_store(store, seed=5)
    assert path.is_file() and sum(len(p) for p in parts.values()) == len(store)
    again, path2 = split_store(PatchStore(store.path), seed=5)
    assert path2 == path and list(again["val"].ids) == list(parts["val"].ids)
    assignment = read_split(path, store)
    assert set(store.ids[assignment == "val"]) == set(parts["val"].ids)


def test_pcam_source_split_is_used(pcam_dir: Path, tmp_path: Path) -> None:
    store = PatchStore(ingest(pcam_dir, tmp_path / "s").store)
    parts, path = split_store(store)
    assert path.name == "source.csv"
    assert all(i.startswith("val_") for i in parts["val"].ids)


def test_real_idc_split_by_patient(tmp_path: Path) -> None:
    root = shared("idc")
    store = PatchStore(ingest(root, tmp_path / "s").store)
    parts, _ = split_store(store, seed=0)
    pats = {k: set(v.groups) for k, v in parts.items()}
    assert not (pats["train"] & pats["test"]) and not (pats["train"] & pats["val"]) and not (pats["val"] & pats["test"])
    for v in parts.values():
        assert 0.1 < (v.labels == 1).mean() < 0.5  # both classes present in every part


def test_folds_leave_the_test_rows_alone_and_read_back_as_splits(grouped_dir: Path, tmp_path: Path) -> None:
    store = PatchStore(ingest(grouped_dir, tmp_path / "s", workers=1).store)
    parts, _ = split_store(store, val=0.2, test=0.2, seed=3)
    folds, name = fold_assignment(store, 3, val=0.2, test=0.2, seed=3)
    assert name == "folds3-seed3-val0.2-test0.2-grouped"
    assert set(store.ids[folds == "test"]) == set(parts["test"].ids)  # the same test rows as the split, never folded
    assert set(folds) == {"0", "1", "2", "test"}
    for g in np.unique(store.groups):
        assert len(set(folds[store.groups == g])) == 1  # a group (patient) sits in one fold only

    written = write_splits(store, val=0.2, test=0.2, seed=3, folds=3)
    assert written.folds_path is not None and written.folds_path.read_text().startswith("id,fold\n")
    for k in range(3):
        assignment = read_split(written.folds_path, store, fold=k)
        assert set(store.ids[assignment == "val"]) == set(store.ids[folds == str(k)])
        assert set(store.ids[assignment == "test"]) == set(parts["test"].ids)
        assert set(store.ids[assignment == "train"]) == set(store.ids[(folds != str(k)) & (folds != "test")])


def test_a_fold_through_split_store_is_saved_as_a_plain_split(grouped_dir: Path, tmp_path: Path) -> None:
    store = PatchStore(ingest(grouped_dir, tmp_path / "s", workers=1).store)
    path = write_splits(store, folds=4).folds_path
    parts, saved = split_store(store, split_file=path, fold=2)
    assert saved.name == f"{path.stem}-fold2.csv" and saved.read_text().startswith("id,split\n")
    assert list(read_split(saved, store)) == list(read_split(path, store, fold=2))
    assert sum(len(p) for p in parts.values()) == len(store)


def test_fold_errors_are_clear(grouped_dir: Path, tmp_path: Path) -> None:
    store = PatchStore(ingest(grouped_dir, tmp_path / "s", workers=1).store)
    written = write_splits(store, folds=3)
    with pytest.raises(DataError, match=r"a folds file \(3 folds\); choose the validation fold with --fold 0\.\.2"):
        read_split(written.folds_path, store)
    with pytest.raises(DataError, match="no fold 5"):
        read_split(written.folds_path, store, fold=5)
    with pytest.raises(DataError, match="has no folds"):
        read_split(written.path, store, fold=0)
    with pytest.raises(DataError, match="--fold needs --split-file"):
        split_store(store, fold=0)
    with pytest.raises(DataError, match="at least 2"):
        write_splits(store, folds=1)


def test_pcam_split_command_and_train_use_the_same_source_split(pcam_dir: Path, tmp_path: Path) -> None:
    store = PatchStore(ingest(pcam_dir, tmp_path / "s").store)
    written = write_splits(store, val=0.3, test=0.3, seed=1, folds=2)
    trained_on, path = split_store(store, val=0.3, test=0.3, seed=1)  # what 'histoscan train' calls
    assert written.source and written.path == path and path.name == "source.csv"
    assert any("source's own split" in line for line in written.lines())
    assert list(written.parts["val"].ids) == list(trained_on["val"].ids)
    folds = read_split(written.folds_path, store, fold=0)
    assert all(i.startswith("test_") for i in store.ids[folds == "test"])  # the official test file stays test


def test_calibration_rows_are_disjoint_stratified_and_grouped() -> None:
    labels = np.array([0] * 700 + [1] * 300)
    a = make_split(labels, val=0.1, test=0.2, seed=3, calibration=0.1)
    for part, frac in (("train", 0.6), ("val", 0.1), ("test", 0.2), ("calibration", 0.1)):
        sel = a == part
        assert abs(sel.mean() - frac) < 0.01 and abs(labels[sel].mean() - 0.3) < 0.02
    # without calibration rows the split is the one earlier versions made; with them the test rows stay
    before = make_split(labels, val=0.1, test=0.2, seed=3)
    assert (make_split(labels, val=0.1, test=0.2, seed=3, calibration=0.0) == before).all()
    assert ((a == "test") == (before == "test")).all()
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 60, 2000).astype(str)
    g = make_split((rng.random(2000) < 0.3).astype(int), groups, val=0.1, test=0.1, seed=0, calibration=0.1)
    owners = [set(np.unique(g[groups == k])) for k in np.unique(groups)]
    assert all(len(o) == 1 for o in owners)  # a patient sits in one part only
    assert set(g) == {"train", "val", "test", "calibration"}
    with pytest.raises(DataError, match=r"val=0.5, test=0.3, calibration=0.3 must be in \[0, 1\) and sum below 1"):
        make_split(labels, val=0.5, test=0.3, calibration=0.3)


@pytest.mark.slow  # imports the training stack (Lightning): about 10 s on the shared machine
def test_calibration_rows_stay_out_of_every_fold_and_of_training(grouped_dir: Path, tmp_path: Path) -> None:
    from histoscan.training.config import TrainConfig
    from histoscan.training.fit import build_data

    store = PatchStore(ingest(grouped_dir, tmp_path / "s", workers=1).store)
    written = write_splits(store, val=0.2, test=0.2, seed=3, folds=3, calibration=0.2)
    assert written.path.name == "seed3-val0.2-test0.2-cal0.2-grouped.csv" and written.folds_path is not None
    cal = set(written.parts["calibration"].ids)
    assert len(cal) > 0 and any("calibration rows" in line for line in written.lines())
    assert set(written.parts["calibration"].labels) == {0, 1}  # stratified: both classes
    folds = read_split(written.folds_path, store, fold=0)  # the raw file marks them calibration, not a fold number
    assert set(store.ids[folds == "calibration"]) == cal
    raw, _ = fold_assignment(store, 3, val=0.2, test=0.2, seed=3, calibration=0.2)
    assert set(raw) == {"0", "1", "2", "test", "calibration"} and set(store.ids[raw == "calibration"]) == cal
    for k in range(3):
        assignment = read_split(written.folds_path, store, fold=k)
        assert set(store.ids[assignment == "calibration"]) == cal
        assert not cal & set(store.ids[(assignment == "train") | (assignment == "val")])
    # 'histoscan train' with the same recipe (or the folds file) never sees them
    cfg = TrainConfig(data=str(store.path), val=0.2, test=0.2, seed=3, calibration=0.2)
    _, parts, path = build_data(cfg)
    assert path == written.path and not cal & (set(parts["train"].ids) | set(parts["val"].ids))
    cfg = TrainConfig(data=str(store.path), split_file=str(written.folds_path), fold=1)
    _, parts, _ = build_data(cfg)
    assert set(parts["calibration"].ids) == cal and not cal & (set(parts["train"].ids) | set(parts["val"].ids))


def test_pcam_calibration_rows_come_from_its_train_part(pcam_dir: Path, tmp_path: Path) -> None:
    store = PatchStore(ingest(pcam_dir, tmp_path / "s").store)
    written = write_splits(store, calibration=0.1, seed=0)
    assert written.source and written.path.name == "source-cal0.1-seed0.csv"
    assert all(i.startswith("train_") for i in written.parts["calibration"].ids)
    plain, _ = split_store(store)
    assert list(written.parts["val"].ids) == list(plain["val"].ids)  # the official val and test parts stay
    assert list(written.parts["test"].ids) == list(plain["test"].ids)
