"""Every reader, on generated fixtures and on the real folders."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from histoscan.data.sources import detect_layout, open_source
from histoscan.errors import DataError
from tests.conftest import shared


def _check_samples(src, n_expected: int, size: tuple[int, int] | None = None) -> None:
    samples = list(src)
    assert len(samples) == n_expected
    for s in samples[:5]:
        assert s.image.dtype == np.uint8 and s.image.ndim == 3 and s.image.shape[2] == 3
        if size:
            assert s.image.shape[:2] == size


def test_kaggle_reader(kaggle_dir: Path) -> None:
    assert detect_layout(kaggle_dir) == "kaggle"
    with open_source(kaggle_dir) as src:
        listing = src.listing
        assert listing.class_names == ["normal", "tumor"]
        assert len(listing.entries) == 120 and {e.label for e in listing.entries} == {0, 1}
        _check_samples(src, 120, (96, 96))


def test_kaggle_test_folder_keeps_sample_submission_order(kaggle_dir: Path) -> None:
    assert detect_layout(kaggle_dir / "test") == "unlabelled"
    order = [line.split(",")[0] for line in (kaggle_dir / "sample_submission.csv").read_text().splitlines()[1:]]
    with open_source(kaggle_dir / "test") as src:
        assert [e.id for e in src.listing.entries] == order
        assert all(e.label is None for e in src.listing.entries)


def test_pcam_reader_plain_and_gzipped(pcam_dir: Path, tmp_path: Path) -> None:
    assert detect_layout(pcam_dir) == "pcam"
    with open_source(pcam_dir) as src:
        entries = src.listing.entries
        assert len(entries) == 100
        assert {e.source_split for e in entries} == {"train", "val", "test"}
        assert all(e.group and e.group.startswith(("train_", "valid_", "test_")) for e in entries)
        _check_samples(src, 100, (96, 96))
        plain = [s.image for s in src][:3]
    gz = tmp_path / "gz"
    gz.mkdir()
    for f in pcam_dir.iterdir():
        if f.suffix == ".h5":
            with f.open("rb") as a, gzip.open(gz / (f.name + ".gz"), "wb") as b:
                shutil.copyfileobj(a, b)
        else:
            shutil.copy(f, gz / f.name)
    with open_source(gz) as src:
        again = [s.image for s in src][:3]
    for a, b in zip(plain, again):
        np.testing.assert_array_equal(a, b)


def test_pcam_bad_shapes_are_named(tmp_path: Path) -> None:
    import h5py

    with h5py.File(tmp_path / "camelyonpatch_level_2_split_valid_x.h5", "w") as f:
        f["x"] = np.zeros((4, 96, 96), np.uint8)
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_valid_y.h5", "w") as f:
        f["y"] = np.zeros((4, 1, 1, 1), np.uint8)
    with pytest.raises(DataError, match=r"valid_x\.h5.*expected N x H x W x 3"):
        open_source(tmp_path).scan()


def test_class_folders_and_manifest(folders_dir: Path, manifest_csv: Path) -> None:
    assert detect_layout(folders_dir) == "folders"
    with open_source(folders_dir) as src:
        assert src.listing.class_names == ["class0", "class1", "class2"]
        _check_samples(src, 90)
    assert detect_layout(manifest_csv) == "manifest"
    with open_source(manifest_csv) as src:
        assert src.listing.class_names == ["normal", "tumor"]
        assert all(e.group for e in src.listing.entries)
        _check_samples(src, 60)


def test_grouped_folders(grouped_dir: Path) -> None:
    assert detect_layout(grouped_dir) == "grouped-folders"
    with open_source(grouped_dir) as src:
        groups = {e.group for e in src.listing.entries}
        assert len(groups) > 3 and all(g.startswith("slide") for g in groups)


def test_manifest_unknown_label_names_line(tmp_path: Path, manifest_csv: Path) -> None:
    bad = manifest_csv.parent / "bad.csv"
    lines = manifest_csv.read_text().splitlines()
    lines[3] = lines[3].replace("tumor", "unicorn").replace("normal", "unicorn")
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad.csv:4: label 'unicorn' is not a known class"):
        open_source(bad, class_names=["normal", "tumor"]).scan()


def test_unknown_layout_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown layout"):
        detect_layout(tmp_path)


# ---- real data -----------------------------------------------------------------
def test_real_hcd() -> None:
    root = shared("hcd")
    with open_source(root) as src:
        entries = src.listing.entries
        assert len(entries) == 6911
        assert sum(e.label == 1 for e in entries) == 2766
        first = src.load(entries[0])
        assert first.pixels.shape == (96, 96, 3)


def test_real_lc25000() -> None:
    root = shared("lc25000-lung")
    with open_source(root) as src:
        assert src.listing.class_names == ["lung_aca", "lung_n", "lung_scc"]
        assert len(src.listing.entries) == 900
        assert src.load(src.listing.entries[0]).pixels.shape == (224, 224, 3)


def test_real_idc_groups_are_patients() -> None:
    root = shared("idc")
    assert detect_layout(root) == "grouped-folders"
    with open_source(root) as src:
        entries = src.listing.entries
        assert len(entries) == 2551 and len({e.group for e in entries}) == 60
        assert src.listing.class_names == ["0", "1"]
