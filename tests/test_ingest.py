"""Ingest: the packed store, the validation report, errors and atomicity."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histoscan.data.ingest import ingest
from histoscan.data.sources import open_source
from histoscan.data.store import PatchStore
from histoscan.errors import DataError
from tests.conftest import shared


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_ingest_kaggle_store_matches_source(kaggle_dir: Path, tmp_path: Path) -> None:
    res = ingest(kaggle_dir, tmp_path / "store", workers=2)
    store = PatchStore(res.store)
    assert len(store) == 120 and store.image_size == (96, 96)
    assert isinstance(store.images, np.memmap)
    with open_source(kaggle_dir) as src:
        for i, sample in enumerate(src):
            if i >= 10:
                break
            assert store.ids[i] == sample.id and store.labels[i] == sample.label
            np.testing.assert_array_equal(store.images[i], sample.image)
    assert set(p.name for p in res.store.iterdir()) >= {"images.npy", "index.csv", "meta.json", "validation.json"}
    assert store.meta["histoscan_version"] and store.meta["classes"] == ["normal", "tumor"]


def test_single_and_multi_worker_stores_are_identical(kaggle_dir: Path, tmp_path: Path) -> None:
    a = PatchStore(ingest(kaggle_dir, tmp_path / "a", workers=1).store)
    b = PatchStore(ingest(kaggle_dir, tmp_path / "b", workers=2).store)
    np.testing.assert_array_equal(a.images, b.images)
    assert list(a.ids) == list(b.ids)


@pytest.mark.parametrize("fixture", ["pcam_dir", "folders_dir", "grouped_dir", "manifest_csv"])
def test_ingest_every_layout(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    src = request.getfixturevalue(fixture)
    store = PatchStore(ingest(src, tmp_path / "s").store)
    assert len(store) > 0 and (store.labels >= 0).all()
    if fixture in ("grouped_dir", "manifest_csv", "pcam_dir"):
        assert store.groups is not None
    if fixture == "pcam_dir":
        assert set(store.source_splits) == {"train", "val", "test"}


def test_report_lists_every_problem(kaggle_dir: Path, tmp_path: Path) -> None:
    root = _copy(kaggle_dir, tmp_path / "src")
    train = root / "train"
    files = sorted(train.iterdir())
    files[0].write_bytes(files[0].read_bytes()[:200])  # truncated
    files[1].write_bytes(b"")  # empty
    gray = np.asarray(Image.open(files[2]))[:, :, 0]
    tifffile.imwrite(files[2], gray)  # grayscale
    tifffile.imwrite(
        files[3], np.dstack([np.asarray(Image.open(files[3])), np.full((96, 96), 255, np.uint8)]), photometric="rgb"
    )  # RGBA
    tifffile.imwrite(files[4], (np.asarray(Image.open(files[4])).astype(np.uint16) * 257), photometric="rgb")  # 16-bit
    shutil.copy(files[6], files[5])  # same pixels under two ids
    tifffile.imwrite(train / "orphan.tif", np.zeros((96, 96, 3), np.uint8), photometric="rgb")  # no label
    rows = list(csv.reader((root / "train_labels.csv").open()))
    rows.append(["doesnotexist", "1"])  # label without image
    rows.append([rows[8][0], rows[8][1]])  # duplicate id
    with (root / "train_labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)

    res = ingest(root, tmp_path / "store", workers=2)
    rep = res.report
    bad = {u["id"] for u in rep["unreadable"]}
    assert bad == {files[0].stem, files[1].stem}
    assert all(u["reason"] for u in rep["unreadable"])
    assert (
        rep["conversions"]["grayscale"] == 1 and rep["conversions"]["rgba"] == 1 and rep["conversions"]["16-bit"] == 1
    )
    assert rep["images_without_label"] == ["orphan"]
    assert rep["labels_without_image"] == ["doesnotexist"]
    assert rep["duplicate_ids"] == [rows[8][0]]
    assert [files[5].stem, files[6].stem] in [sorted(g) for g in rep["duplicate_content"]] or sorted(
        [files[5].stem, files[6].stem]
    ) in [sorted(g) for g in rep["duplicate_content"]]
    store = PatchStore(res.store)
    assert len(store) == 120 - 2 and files[0].stem not in set(store.ids)


def test_mixed_sizes_go_to_dominant_size_or_override(tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(tmp_path / "src" / c / f"{c}{i}.png")
    Image.fromarray(np.zeros((128, 100, 3), np.uint8)).save(tmp_path / "src" / "a" / "big.png")
    res = ingest(tmp_path / "src", tmp_path / "s1")
    assert PatchStore(res.store).image_size == (64, 64) and res.report["conversions"]["resized"] == 1
    res = ingest(tmp_path / "src", tmp_path / "s2", size=32)
    assert PatchStore(res.store).images.shape == (9, 32, 32, 3)


def test_bad_label_names_file_and_line(kaggle_dir: Path, tmp_path: Path) -> None:
    root = _copy(kaggle_dir, tmp_path / "src")
    lines = (root / "train_labels.csv").read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",2"
    (root / "train_labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train_labels.csv:6: label '2' .* is not 0 or 1"):
        ingest(root, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_zero_readable_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "src" / "x").mkdir(parents=True)
    (tmp_path / "src" / "x" / "a.png").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"zero readable images.*a\.png"):
        ingest(tmp_path / "src", tmp_path / "store")
    assert not (tmp_path / "store").exists()
    assert not list(tmp_path.glob(".store.partial-*"))


def test_existing_out_needs_force(kaggle_dir: Path, tmp_path: Path) -> None:
    ingest(kaggle_dir, tmp_path / "store")
    with pytest.raises(DataError, match="already exists"):
        ingest(kaggle_dir, tmp_path / "store")
    ingest(kaggle_dir, tmp_path / "store", force=True)
    assert len(PatchStore(tmp_path / "store")) == 120
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.txt").write_text("do not delete")
    with pytest.raises(DataError, match="not a histoscan store"):
        ingest(kaggle_dir, tmp_path / "precious", force=True)
    assert (tmp_path / "precious" / "thesis.txt").exists()


def test_interrupted_ingest_leaves_no_store(kaggle_dir: Path, tmp_path: Path) -> None:
    def start(total: int):
        def tick(n: int) -> None:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-decode

        return tick

    with pytest.raises(KeyboardInterrupt):
        ingest(kaggle_dir, tmp_path / "store", workers=1, progress=start)
    assert not (tmp_path / "store").exists()
    assert not list(tmp_path.iterdir())
    # an old store survives an interrupted --force replacement
    ingest(kaggle_dir, tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        ingest(kaggle_dir, tmp_path / "store", workers=1, force=True, progress=start)
    assert len(PatchStore(tmp_path / "store")) == 120


def test_store_opening_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a histoscan store"):
        PatchStore(tmp_path)


def test_store_subset_and_batch(kaggle_dir: Path, tmp_path: Path) -> None:
    store = PatchStore(ingest(kaggle_dir, tmp_path / "s").store)
    view = store.subset([10, 3, 7])
    assert len(view) == 3 and list(view.ids) == [store.ids[10], store.ids[3], store.ids[7]]
    np.testing.assert_array_equal(view.batch([0, 2]), store.images[[10, 7]])
    np.testing.assert_array_equal(view.images[1], store.images[3])
    assert view[0].id == store.ids[10]
    assert sum(view.counts().values()) == 3


@pytest.mark.parametrize(
    "name,count,size", [("hcd", 6911, (96, 96)), ("lc25000-lung", 900, (224, 224)), ("idc", 2551, (50, 50))]
)
def test_ingest_real_data(name: str, count: int, size: tuple[int, int], tmp_path: Path) -> None:
    root = shared(name)
    res = ingest(root, tmp_path / "store")
    store = PatchStore(res.store)
    assert len(store) == count and store.image_size == size
    assert res.report["unreadable"] == []
    if name == "idc":
        assert store.groups is not None and len(set(store.groups)) == 60
        assert res.report["conversions"].get("padded", 0) > 0  # edge patches padded, not stretched


def test_store_pickles_without_its_images_and_reads_the_same(kaggle_dir: Path, tmp_path: Path) -> None:
    import pickle

    store = PatchStore(ingest(kaggle_dir, tmp_path / "s").store).subset(np.arange(5, 50))
    blob = pickle.dumps(store)
    assert len(blob) < 200_000  # the 120 x 96 x 96 x 3 image array does not travel to DataLoader workers
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.batch([3, 0, 40]), store.batch([3, 0, 40]))
