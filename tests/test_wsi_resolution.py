"""Resolution, level choice, tile geometry, reading details and shards: small and fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histoscan.errors import ConfigError, HistoscanError
from histoscan.preprocessing import Preprocessing
from histoscan.wsi.batch import in_shard, list_slides, parse_shard
from histoscan.wsi.grid import TileSpec
from histoscan.wsi.reader import SlideError, composite, mpp_from_tiff_tags, open_slide
from histoscan.wsi.resolution import choose_level, model_mpp, slide_mpp
from histoscan.wsi.synthetic import write_slide
from histoscan.wsi.tissue import tissue_from_rgb


def test_level_within_five_percent_is_read_as_is() -> None:
    # a 40x Aperio scan: its 4x level is 1.01 um/px, 4% from PCam's 0.972: read it, not level 0
    c = choose_level(0.972, 0.2525, [1.0, 4.0, 16.0])
    assert (c.level, c.factor) == (1, 1.0)


@pytest.mark.parametrize(
    ("downsamples", "target", "level", "factor"),
    [
        ([1.0, 2.0, 4.0], 1.0, 2, 1.0),  # 4x pyramid at 0.25: level 2 is exact
        ([1.0, 2.0], 1.0, 1, 2.0),  # 2x pyramid: finest level below target, shrunk 2x
        ([1.0, 2.0], 0.5, 1, 1.0),
        ([1.0, 4.0, 16.0], 0.6, 0, 2.4),  # nothing within 5%: the nearest finer level
        ([1.0, 4.0], 0.2, 0, 0.8),  # the model is finer than the slide: level 0, enlarged
    ],
)
def test_level_choice_on_pyramids(downsamples: list[float], target: float, level: int, factor: float) -> None:
    c = choose_level(target, 0.25, downsamples)
    assert c.level == level and c.factor == pytest.approx(factor)


def test_level_choice_on_a_real_tiled_tiff(tmp_path: Path) -> None:
    img = np.full((512, 512, 3), 200, np.uint8)
    reader = open_slide(write_slide(tmp_path / "p.tif", img, 0.25, (1, 2, 4)))
    assert len(reader.level_downsamples) >= 2 and reader.mpp == pytest.approx(0.25)
    assert choose_level(1.0, reader.mpp, reader.level_downsamples).level == 2
    assert choose_level(0.5, reader.mpp, reader.level_downsamples).level == 1
    reader.close()


@pytest.mark.parametrize(
    ("xres", "unit", "mpp"),
    [
        ("20000", "centimeter", 0.5),
        ("50800", "inch", 0.5),
        ("72", "inch", None),
        ("96", "inch", None),
        (None, None, None),
        ("1", "none", None),
    ],
)
def test_mpp_from_tiff_tags(xres: str | None, unit: str | None, mpp: float | None) -> None:
    got = mpp_from_tiff_tags(xres, unit)
    assert got == (pytest.approx(mpp) if mpp else None)


def test_missing_resolutions_are_one_line_errors_naming_the_option() -> None:
    with pytest.raises(ConfigError, match="--model-mpp") as e:
        model_mpp("runs/x", None, None)
    assert "\n" not in str(e.value) and "--mpp" in str(e.value)
    assert model_mpp("runs/x", None, 0.5) == 0.5 and model_mpp("runs/x", 0.97, None) == 0.97
    with pytest.raises(SlideError, match="--slide-mpp") as e2:
        slide_mpp("a.svs", None, None)
    assert "a.svs" in str(e2.value)
    assert slide_mpp("a.svs", None, 0.25) == 0.25 and slide_mpp("a.svs", 0.5, 0.25) == 0.5  # metadata wins


def test_tile_spec_defaults_follow_the_label() -> None:
    pcam = Preprocessing(image_size=[96, 96], label_size=32)
    assert TileSpec.for_model(pcam) == TileSpec(96, 32, 32)
    assert TileSpec.for_model(pcam).margin == 32
    whole = Preprocessing(image_size=[224, 224])
    assert TileSpec.for_model(whole) == TileSpec(224, 224, 224)
    assert TileSpec.for_model(whole, overlap=64).stride == 160
    assert TileSpec.for_model(whole, stride=112).stride == 112
    with pytest.raises(ConfigError, match="not both"):
        TileSpec.for_model(whole, stride=100, overlap=10)
    with pytest.raises(ConfigError, match="--tile"):
        TileSpec.for_model(whole, tile=96)


def test_transparent_pixels_become_the_background_not_black() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    out = composite(rgba, (240, 241, 242))
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (240, 241, 242)


def test_shards_partition_the_slide_list(tmp_path: Path) -> None:
    for i in range(23):
        (tmp_path / f"s{i:02d}.svs").write_bytes(b"x")
    slides = list_slides([tmp_path])
    parts = [[s for s in slides if in_shard(s, (i, 4))] for i in range(4)]
    assert sorted(s for part in parts for s in part) == slides and sum(map(len, parts)) == len(slides)
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ConfigError):
            parse_shard(bad)


def test_duplicate_slide_names_and_missing_inputs_are_errors(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "s.svs").write_bytes(b"x")
    (tmp_path / "b" / "s.tif").write_bytes(b"x")
    with pytest.raises(ConfigError, match="both write"):
        list_slides([tmp_path])
    with pytest.raises(ConfigError, match="no such"):
        list_slides([tmp_path / "nope"])


def test_unreadable_files_are_slide_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.svs").write_bytes(b"")
    (tmp_path / "junk.svs").write_bytes(b"not a slide at all" * 100)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 50)
    whole = write_slide(tmp_path / "whole.tif", np.full((600, 600, 3), 200, np.uint8), 0.5, (1, 2)).read_bytes()
    (tmp_path / "truncated.tif").write_bytes(whole[: len(whole) // 2])
    for name in ("empty.svs", "junk.svs", "junk.png", "missing.svs", "truncated.tif"):
        with pytest.raises(HistoscanError) as e:
            open_slide(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)


def test_plain_images_read_with_their_resolution(tmp_path: Path) -> None:
    img = np.full((300, 400, 3), 180, np.uint8)
    tifffile.imwrite(
        tmp_path / "plain.tif", img, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER"
    )
    Image.fromarray(img).save(tmp_path / "plain.png", dpi=(72, 72))
    assert open_slide(tmp_path / "plain.tif").mpp == pytest.approx(0.5)
    png = open_slide(tmp_path / "plain.png")
    assert png.mpp is None  # 72 dpi is a default, not a resolution
    region = png.read(390, 290, 0, 20, 20)
    assert tuple(region[0, 0]) == (180, 180, 180) and tuple(region[-1, -1]) == (255, 255, 255)


def test_tissue_detection_leaves_out_glass_pen_and_dark_edges() -> None:
    img = np.full((200, 300, 3), 242, np.uint8)  # glass
    img[50:150, 50:150] = (220, 150, 190)  # tissue (pink)
    img[60:70, 60:70] = (245, 240, 244)  # a small hole inside: filled
    img[50:150, 200:220] = (40, 160, 60)  # green pen
    img[:, 290:] = (15, 15, 15)  # dark slide edge
    img[10:12, 10:12] = (200, 120, 180)  # a speck
    mask = tissue_from_rgb(img)
    assert mask[50:150, 50:150].all()
    assert not mask[:, 190:].any() and not mask[:20, :20].any()
    assert 0.1 < mask.mean() < 0.2
    assert not tissue_from_rgb(np.full((100, 100, 3), 240, np.uint8)).any()


def test_slide_level_auroc_and_its_errors(tmp_path: Path) -> None:
    from histoscan.errors import DataError
    from histoscan.wsi.evaluate import evaluate_slides

    scores = tmp_path / "slides.csv"
    scores.write_text(
        "slide,status,max_probability,topk_mean_probability\n"
        "a,done,0.9,0.8\nb,done,0.2,0.1\nc,done,0.7,0.05\nd,failed,,\n"
    )
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\na.svs,tumour\nb,normal\nc,0\nd,1\n")  # file names or stems, words or 0/1
    r = evaluate_slides(scores, labels)
    assert r.slides == 3 and r.positives == 1  # the failed slide is left out
    assert r.auroc["max_probability"] == 1.0 and r.auroc["topk_mean_probability"] == 1.0
    labels.write_text("slide,label\na,1\nb,0\n")
    with pytest.raises(DataError, match="no label for slide"):
        evaluate_slides(scores, labels)
    labels.write_text("slide,label\na,1\nb,maybe\nc,0\n")
    with pytest.raises(DataError, match="maybe"):
        evaluate_slides(scores, labels)
