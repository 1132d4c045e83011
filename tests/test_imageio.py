"""Decoding: every odd file becomes 8-bit RGB or a clear reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histoscan.data.imageio import ImageReadError, decode_bytes, fit_to_size, read_image

RGB = (np.arange(20 * 30 * 3) % 251).astype(np.uint8).reshape(20, 30, 3)


def test_rgb_png_and_tiff_roundtrip(tmp_path: Path) -> None:
    Image.fromarray(RGB).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", RGB, photometric="rgb")
    for name in ("a.png", "a.tif"):
        img = read_image(tmp_path / name)
        assert img.pixels.dtype == np.uint8 and img.pixels.shape == (20, 30, 3)
        np.testing.assert_array_equal(img.pixels, RGB)
        assert img.conversions == []


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    gray = RGB[:, :, 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.pixels.shape == (20, 30, 3) and "grayscale" in img.conversions
    np.testing.assert_array_equal(img.pixels[:, :, 2], gray)


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent black -> white
    rgba[0, 0] = (10, 20, 30, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    img = read_image(tmp_path / "t.png")
    assert "rgba" in img.conversions
    assert tuple(img.pixels[0, 0]) == (10, 20, 30)
    assert tuple(img.pixels[1, 1]) == (255, 255, 255)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_16_bit_is_scaled_to_8_bit(tmp_path: Path, suffix: str) -> None:
    if suffix == ".tif":
        data = RGB.astype(np.uint16) * 257
        tifffile.imwrite(tmp_path / f"s{suffix}", data, photometric="rgb")
    else:
        data = RGB[:, :, 0].astype(np.uint16) * 257
        Image.fromarray(data).save(tmp_path / f"s{suffix}")
    img = read_image(tmp_path / f"s{suffix}")
    assert "16-bit" in img.conversions and img.pixels.dtype == np.uint8
    expected = RGB if suffix == ".tif" else np.repeat(RGB[:, :, :1], 3, axis=2)
    np.testing.assert_array_equal(img.pixels, expected)


def test_truncated_empty_and_garbage_files_give_reasons(tmp_path: Path) -> None:
    Image.fromarray(RGB).save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    tifffile.imwrite(tmp_path / "full.tif", np.zeros((96, 96, 3), np.uint8) + 7, photometric="rgb")
    traw = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(traw[: len(traw) // 3])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"this is not an image at all")
    reasons = {
        "cut.png": "truncated",
        "cut.tif": "unreadable TIFF",
        "empty.jpg": "empty file (0 bytes)",
        "text.png": "not an image file",
    }
    for name, words in reasons.items():
        with pytest.raises(ImageReadError) as err:
            read_image(tmp_path / name)
        assert words in str(err.value), (name, str(err.value))


def test_decode_bytes_matches_read_image(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", RGB, photometric="rgb")
    a = decode_bytes((tmp_path / "a.tif").read_bytes())
    np.testing.assert_array_equal(a.pixels, RGB)
    with pytest.raises(ImageReadError):
        decode_bytes(b"")


def test_fit_to_size_pads_edge_patches_and_resizes_others() -> None:
    edge = np.zeros((41, 50, 3), np.uint8)
    out, how = fit_to_size(edge, (50, 50))
    assert how == "padded" and out.shape == (50, 50, 3) and out[45, 10, 0] == 255 and out[10, 10, 0] == 0
    out, how = fit_to_size(np.zeros((100, 100, 3), np.uint8), (50, 50))
    assert how == "resized" and out.shape == (50, 50, 3)


def test_tiff_template_fast_path_is_exact_and_falls_back(tmp_path: Path) -> None:
    from histoscan.data.imageio import FastTiffReader

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(5)]
    for i, img in enumerate(imgs):
        tifffile.imwrite(tmp_path / f"{i}.tif", img, photometric="rgb")
    tifffile.imwrite(tmp_path / "gray.tif", imgs[0][:, :, 0])  # other layout: must not match the template
    tifffile.imwrite(tmp_path / "zip.tif", imgs[1], photometric="rgb", compression="zlib")
    read = FastTiffReader()
    for i, img in enumerate(imgs):
        np.testing.assert_array_equal(read(tmp_path / f"{i}.tif").pixels, img)
    assert read.hits == 4
    g = read(tmp_path / "gray.tif")
    assert "grayscale" in g.conversions and np.array_equal(g.pixels[:, :, 1], imgs[0][:, :, 0])
    np.testing.assert_array_equal(read(tmp_path / "zip.tif").pixels, imgs[1])
    raw = (tmp_path / "3.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw[:-100])
    with pytest.raises(ImageReadError):
        read(tmp_path / "cut.tif")
