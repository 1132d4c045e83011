"""Synthetic H&E-like patches for demos and tests (never for benchmarks of accuracy on real data).

Pink stroma with fibres, white gaps, purple nuclei. In class 1 (tumour) the centre
region holds denser, larger, darker and more irregular nuclei; ``noise`` blurs
that difference (0 = easy, 1 = hard). Everything is deterministic by seed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histoscan.errors import ConfigError

SYNTH_LAYOUTS = ("kaggle", "pcam", "folders", "grouped-folders", "manifest")
_STROMA = np.array([236.0, 176.0, 206.0])
_NUCLEUS = np.array([92.0, 52.0, 138.0])
_GAP = np.array([246.0, 242.0, 246.0])


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((size, size), Image.Resampling.BILINEAR))


def _blob(
    img: np.ndarray,
    rng: np.random.Generator,
    cy: float,
    cx: float,
    ry: float,
    rx: float,
    colour: np.ndarray,
    irregular: float,
    alpha: float,
) -> None:
    """Paint one irregular ellipse in place."""
    h, w = img.shape[:2]
    r = int(max(ry, rx) * (1 + irregular)) + 2
    y0, y1, x0, x1 = max(0, int(cy) - r), min(h, int(cy) + r + 1), max(0, int(cx) - r), min(w, int(cx) + r + 1)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.ogrid[y0:y1, x0:x1]
    dy, dx = (yy - cy).astype(np.float32), (xx - cx).astype(np.float32)
    d = (dy / ry) ** 2 + (dx / rx) ** 2
    if irregular >= 0.1:  # wobbly outline: radius varies with angle
        k, phase = rng.integers(2, 5), rng.uniform(0, 2 * np.pi)
        radius2 = (1.0 + irregular * np.sin(k * np.arctan2(dy, dx) + phase)) ** 2
    else:
        radius2 = 1.0
    mask = np.clip((radius2 - d) * 2.0, 0.0, 1.0)[..., None] * np.float32(alpha)
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - mask) + colour * mask


def synth_patch(
    rng: np.random.Generator, label: int = 0, size: int = 96, noise: float = 0.2, severity: float | None = None
) -> np.ndarray:
    """One uint8 size x size x 3 patch; ``label`` 1 (or ``severity`` > 0) puts tumour-like nuclei in the centre."""
    sev = float(label > 0) if severity is None else float(severity)
    sev = np.clip(sev + rng.normal(0, 0.35 * noise), 0.0, 1.0) if sev > 0 else 0.0
    stain = 1.0 + rng.normal(0, 0.04 + 0.08 * noise, 3)
    fib = _smooth_noise(rng, size, max(4, size // 8))
    img = np.empty((size, size, 3), np.float32)
    img[:] = _STROMA * stain
    img += fib[..., None] * np.array([6.0, 16.0, 10.0])
    scale = size / 96.0
    for _ in range(rng.integers(1, 4)):  # white gaps (fat, lumen)
        _blob(
            img,
            rng,
            rng.uniform(0, size),
            rng.uniform(0, size),
            rng.uniform(4, 14) * scale,
            rng.uniform(4, 14) * scale,
            _GAP,
            0.15,
            0.9,
        )
    n_bg = int(rng.integers(14, 26) * scale * scale)
    for _ in range(n_bg):  # ordinary small round nuclei
        r = rng.uniform(1.6, 2.6) * scale
        _blob(
            img,
            rng,
            rng.uniform(0, size),
            rng.uniform(0, size),
            r,
            r * rng.uniform(0.8, 1.2),
            _NUCLEUS * rng.uniform(1.05, 1.3),
            0.05,
            rng.uniform(0.6, 0.85),
        )
    if sev > 0:
        c0, c1 = size * 0.3, size * 0.7  # slightly wider than the labelled centre third
        for _ in range(int((10 + 14 * sev) * scale * scale)):  # tumour nuclei: big, dark, irregular, crowded
            r = rng.uniform(2.8, 4.5) * scale * (0.8 + 0.4 * sev)
            _blob(
                img,
                rng,
                rng.uniform(c0, c1),
                rng.uniform(c0, c1),
                r,
                r * rng.uniform(0.6, 1.3),
                _NUCLEUS * rng.uniform(0.55, 0.8),
                0.15 + 0.2 * sev,
                0.9,
            )
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(3 + 10 * noise)
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SynthPreset:
    """A named difficulty: the noise knob, how faint a tumour can be, and the share of labels that are wrong."""

    noise: float
    severity: tuple[float, float] | None = None  # a tumour patch's severity is drawn from this range
    label_noise: float = 0.0


# 'hard' is not separable at the first epoch (fainter tumours, 4% wrong labels): its learning curve,
# threshold and referral band mean something. The defaults (noise 0.2, full severity, clean labels) stay as
# they are: other tests rely on them.
SYNTH_PRESETS = {"default": SynthPreset(0.2), "hard": SynthPreset(0.6, (0.3, 0.9), 0.04)}


def synth_batch(
    n: int,
    seed: int = 0,
    size: int = 96,
    noise: float = 0.2,
    positive: float = 0.4,
    num_classes: int = 2,
    preset: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` patches and their labels; with ``num_classes`` > 2 the class sets the tumour severity.

    ``preset`` (a name of ``SYNTH_PRESETS``) replaces ``noise`` and sets the severity range and label noise.
    """
    spec = SynthPreset(noise) if preset is None else synth_preset(preset)
    rng = np.random.default_rng(seed)
    if num_classes == 2:
        labels = (rng.random(n) < positive).astype(np.int64)
    else:
        labels = rng.integers(0, num_classes, n)
    images = np.empty((n, size, size, 3), np.uint8)
    for i, lbl in enumerate(labels):
        sev = None if num_classes == 2 else lbl / (num_classes - 1)
        if spec.severity is not None and lbl > 0:
            sev = float(rng.uniform(*spec.severity)) * (1.0 if sev is None else sev)
        images[i] = synth_patch(rng, int(lbl), size, spec.noise, sev)
    if spec.label_noise > 0:
        flip = rng.random(n) < spec.label_noise
        labels = np.where(flip, (labels + rng.integers(1, num_classes, n)) % num_classes, labels)
    return images, labels


def synth_preset(name: str) -> SynthPreset:
    """The preset called ``name``; ConfigError naming the known ones otherwise."""
    if name not in SYNTH_PRESETS:
        raise ConfigError(f"synthetic preset {name!r} is not one of {list(SYNTH_PRESETS)}")
    return SYNTH_PRESETS[name]


def write_synthetic(
    out: str | Path,
    layout: str = "kaggle",
    n: int = 200,
    *,
    seed: int = 0,
    size: int = 96,
    noise: float = 0.2,
    num_classes: int = 2,
    groups: int = 8,
    test: int = 0,
    preset: str | None = None,
) -> Path:
    """Write ``n`` synthetic labelled patches in ``layout`` under ``out`` (and ``test`` unlabelled ones for kaggle).

    ``preset`` (``hard``, see ``SYNTH_PRESETS``) replaces ``noise``.
    """
    if layout not in SYNTH_LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; choose one of {list(SYNTH_LAYOUTS)}")
    if layout in ("kaggle", "pcam") and num_classes != 2:
        raise ConfigError(f"the {layout} layout is binary; num_classes must be 2")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    images, labels = synth_batch(n, seed, size, noise, num_classes=num_classes, preset=preset)
    rng = np.random.default_rng(seed + 1)
    ids = [f"{rng.bytes(20).hex()}" for _ in range(n)]
    group_of = [f"slide{g:03d}" for g in rng.integers(0, max(1, groups), n)]
    classes = ["normal", "tumor"] if num_classes == 2 else [f"class{c}" for c in range(num_classes)]
    if layout == "kaggle":
        _write_kaggle_part(root, "train", "train_labels.csv", ids, images, labels.tolist())
        if test:
            timgs, _ = synth_batch(test, seed + 7, size, noise, preset=preset)
            tids = [f"{rng.bytes(20).hex()}" for _ in range(test)]
            _write_kaggle_part(root, "test", "sample_submission.csv", tids, timgs, [0] * test)
    elif layout == "pcam":
        _write_pcam(root, images, labels, group_of)
    elif layout in ("folders", "grouped-folders"):
        for pid, img, lbl, grp in zip(ids, images, labels, group_of):
            folder = root / classes[lbl] if layout == "folders" else root / grp / classes[lbl]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{pid[:16]}.png")
    else:  # manifest
        (root / "images").mkdir(exist_ok=True)
        with (root / "manifest.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "group"])
            for pid, img, lbl, grp in zip(ids, images, labels, group_of):
                Image.fromarray(img).save(root / "images" / f"{pid[:16]}.png")
                w.writerow([f"images/{pid[:16]}.png", classes[lbl], grp])
    return root


def _write_kaggle_part(
    root: Path, folder: str, table: str, ids: list[str], images: np.ndarray, labels: list[int]
) -> None:
    """``folder/<id>.tif`` plus an ``id,label`` table (the labels, or the sample submission's zeros)."""
    import tifffile

    (root / folder).mkdir(exist_ok=True)
    for pid, img in zip(ids, images):
        tifffile.imwrite(root / folder / f"{pid}.tif", img, photometric="rgb")
    with (root / table).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label"])
        w.writerows(zip(ids, labels))


def _write_pcam(root: Path, images: np.ndarray, labels: np.ndarray, groups: list[str]) -> None:
    """Official PCam file shapes: x N x H x W x 3 uint8, y N x 1 x 1 x 1, meta CSV with a wsi column."""
    import h5py

    n = len(images)
    cut = [0, int(n * 0.8), int(n * 0.9), n]
    for k, split in enumerate(("train", "valid", "test")):
        lo, hi = cut[k], cut[k + 1]
        stem = f"camelyonpatch_level_2_split_{split}"
        with h5py.File(root / f"{stem}_x.h5", "w") as f:
            f.create_dataset(
                "x", data=images[lo:hi], chunks=(min(max(hi - lo, 1), 32), *images.shape[1:]), compression="gzip"
            )
        with h5py.File(root / f"{stem}_y.h5", "w") as f:
            f.create_dataset("y", data=labels[lo:hi].astype(np.uint8).reshape(-1, 1, 1, 1))
        with (root / f"{stem}_meta.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"])
            for i in range(lo, hi):
                w.writerow([i - lo, 0, 0, bool(labels[i]), bool(labels[i]), f"{split}_{groups[i]}"])


def write_synthetic_store(
    out: str | Path, n: int, *, seed: int = 0, size: int = 96, pool: int = 2000, noise: float = 0.2, force: bool = False
) -> Path:
    """A large synthetic store made quickly: ``pool`` generated patches, each reused under random flips/rotations.

    Meant for speed and memory benchmarks, where content matters less than volume.
    """
    import pandas as pd

    from histoscan.data.store import StoreWriter

    images, labels = synth_batch(min(pool, n), seed, size, noise)
    rng = np.random.default_rng(seed + 11)
    pick = rng.integers(0, len(images), n)
    ops = rng.integers(0, 8, n)
    writer = StoreWriter(out, n, (size, size), force=force)
    try:
        for start in range(0, n, 4096):
            for i in range(start, min(n, start + 4096)):
                img = images[pick[i]]
                img = np.rot90(img[:, ::-1] if ops[i] >= 4 else img, ops[i] % 4)
                writer.images[i] = img
        index = pd.DataFrame(
            {"id": [f"syn{i:07d}" for i in range(n)], "label": labels[pick], "group": "", "source": "synthetic"}
        )
        counts = {"normal": int((labels[pick] == 0).sum()), "tumor": int((labels[pick] == 1).sum())}
        meta = {
            "classes": ["normal", "tumor"],
            "labelled": True,
            "has_groups": False,
            "counts_per_class": counts,
            "layout": "synthetic",
            "source": "synthetic",
            "label_size": round(size / 3),  # the label is about the centre third, as in PCam
        }
        report = {
            "source": "synthetic",
            "layout": "synthetic",
            "listed": n,
            "stored": n,
            "image_size": [size, size],
            "counts_per_class": counts,
            "sizes_seen": {f"{size}x{size}": n},
            "conversions": {},
            "unreadable": [],
            "duplicate_ids": [],
            "labels_without_image": [],
            "images_without_label": [],
            "duplicate_content": [],
        }
        return writer.commit(np.ones(n, bool), index, meta, report)
    except BaseException:
        writer.abort()
        raise


# Ruifrok and Johnston's optical densities of haematoxylin and DAB (rows: stains; columns: R, G, B)
_HAEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29])
_DAB_OD = np.array([0.27, 0.57, 0.78])
NOT_HE_KINDS = ("black", "white", "uniform", "noise", "grayscale", "photograph", "ihc")


def not_he_patch(kind: str, size: int = 96, seed: int = 0) -> np.ndarray:
    """One uint8 patch that is not an H&E tissue patch, for checking the tissue check.

    ``black``, ``white`` (blank slide), ``uniform`` (one flat stroma-pink colour), ``noise`` (uniform random
    pixels), ``grayscale`` (an H&E-like patch without colour), ``photograph`` (a sky, hills and a sun: a
    photograph-like scene) and ``ihc`` (an immunohistochemistry patch: pale haematoxylin counterstain with
    DAB-brown cells, by Beer-Lambert from the stains' optical densities).
    """
    rng = np.random.default_rng(seed)
    if kind == "black":
        return np.full((size, size, 3), rng.integers(0, 12), np.uint8)
    if kind == "white":
        return np.clip(245 + rng.normal(0, 1.5, (size, size, 3)), 0, 255).astype(np.uint8)
    if kind == "uniform":
        return np.broadcast_to(_STROMA.astype(np.uint8), (size, size, 3)).copy()
    if kind == "noise":
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    if kind == "grayscale":
        grey = synth_patch(rng, 1, size).astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if kind == "photograph":
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        img = np.empty((size, size, 3), np.float32)
        img[:] = np.stack([90 + 80 * yy, 150 + 60 * yy, 235 - 10 * yy], axis=-1)  # sky, lighter near the horizon
        hill = yy > 0.6 + 0.1 * np.sin(6 * xx + rng.uniform(0, 6))
        img[hill] = np.array([60.0, 140.0, 50.0]) * (0.8 + 0.4 * rng.random((int(hill.sum()), 1)))
        sun = (yy - 0.25) ** 2 + (xx - 0.7) ** 2 < 0.01
        img[sun] = np.array([255.0, 230.0, 120.0])
        return np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
    if kind == "ihc":
        h = np.clip(0.15 + 0.1 * _smooth_noise(rng, size, max(4, size // 8)), 0, None)[..., None] * _HAEMATOXYLIN_OD
        dab = np.zeros((size, size, 1), np.float32)
        canvas = np.zeros((size, size, 3), np.float32)
        for _ in range(int(30 * (size / 96) ** 2)):  # DAB-positive cells
            r = rng.uniform(3, 6) * size / 96
            _blob(canvas, rng, rng.uniform(0, size), rng.uniform(0, size), r, r, np.ones(3), 0.1, 1.0)
        dab[..., 0] = canvas[..., 0] * rng.uniform(0.8, 1.2)
        od = h + dab * _DAB_OD
        return np.clip(255 * np.exp(-od) + rng.normal(0, 2, od.shape), 0, 255).astype(np.uint8)
    raise ConfigError(f"not-H&E kind {kind!r} is not one of {list(NOT_HE_KINDS)}")
