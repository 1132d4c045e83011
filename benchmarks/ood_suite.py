"""Generate the pre-registered out-of-distribution suite of issue 38 from ../shared/data (seeded, deterministic).

    python benchmarks/ood_suite.py --run RUN --out DIR [--n 200] [--seed 0]

Writes one ``DIR/<shift>.npz`` per shift (``images``: uint8 N x H x W x 3, or ``image_0000``... when the
sizes differ; ``labels``: int64, -1 where the shift keeps no label) and ``DIR/suite.json`` (what each shift is,
its count, the rows it came from). The tissue-based shifts start from hcd rows of the run's TEST split only
(never its train, val or calibration rows), read from ``../shared/data/hcd/train/<id>.tif``. ``hcd_test`` is
the in-distribution reference: the whole test split, untouched. Other organs are written at their own size:
the Predictor fits them to the model's input as ``predict`` would.

Written before any score was computed on it (issue 38's protocol); changing a shift afterwards is a new suite.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED

SIZE = 96  # hcd patches
# Ruifrok and Johnston's stain vectors (optical density per RGB channel), as skimage.color.hed2rgb uses them;
# written out because scikit-image is not a histoscan dependency and these three rows are all it would give
_HED_FROM = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _HED_FROM / np.linalg.norm(_HED_FROM, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)

# what each shift is (suite.json says it again); the first group is not tissue, the second is damaged or
# re-coloured hcd tissue (labels kept), the third other organs' H&E (reported, not targeted)
NOT_TISSUE = ("blank", "black", "white", "noise", "green", "grayscale", "ihc_brown")
DAMAGED = ("out_of_focus", "pen_ink", "fold", "bubble", "jpeg_q10", "stain_shift")
OTHER_ORGANS = ("lc25000_lung", "idc_breast")
REFERENCE = "hcd_test"
SHIFTS = (*NOT_TISSUE, *DAMAGED, *OTHER_ORGANS)

DESCRIPTIONS = {
    REFERENCE: "the run's hcd test split, untouched (in distribution)",
    "blank": "empty glass: near-white background with a faint uneven tint, dust specks and sensor noise",
    "black": "near-black frames (0-20) with sensor noise",
    "white": "saturated white (245-255)",
    "noise": "uniform random pixels",
    "green": "hcd test tissue recoloured green (its grey texture on a green hue)",
    "grayscale": "hcd test tissue without colour (ITU-R 601 luma)",
    "ihc_brown": "hcd test tissue as IHC: its haematoxylin at 60%, its eosin replaced by DAB brown (HED, Beer-Lambert)",
    "out_of_focus": "hcd test tissue, Gaussian blur sigma 3 px",
    "pen_ink": "hcd test tissue under 1-3 marker strokes (blue, green, black or red ink, 6-14 px, 55-85% opaque)",
    "fold": "hcd test tissue with a fold: a 20-45 px band where a shifted copy of the tissue lies on itself",
    "bubble": "hcd test tissue under an air bubble: a dark refracting rim, a brighter magnified inside",
    "jpeg_q10": "hcd test tissue saved as JPEG at quality 10",
    "stain_shift": "hcd test tissue with H and E scaled by 0.35-0.6 or 1.7-2.5 each (the strong augmentation spans 0.9-1.1)",
    "lc25000_lung": "LC25000 lung H&E (224 px JPEG), 100 per class",
    "idc_breast": "IDC breast H&E (50 px PNG, other lab and organ)",
}


def test_ids(run: Path) -> list[str]:
    """The hcd ids of the run's test split, sorted."""
    with open(run / "split.csv", newline="") as fh:
        return sorted(row["id"] for row in csv.DictReader(fh) if row["split"] == "test")


def hcd_labels() -> dict[str, int]:
    """hcd's ``id -> label``."""
    with open(SHARED / "hcd" / "train_labels.csv", newline="") as fh:
        return {row["id"]: int(row["label"]) for row in csv.DictReader(fh)}


def read_hcd(ids: list[str]) -> np.ndarray:
    """The hcd patches of ``ids``, uint8 N x 96 x 96 x 3."""
    return np.stack([tifffile.imread(SHARED / "hcd" / "train" / f"{i}.tif")[..., :3] for i in ids]).astype(np.uint8)


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _od(img: np.ndarray) -> np.ndarray:
    return -np.log((img.astype(np.float64) + 1.0) / 256.0)


def _from_od(od: np.ndarray) -> np.ndarray:
    return _clip(256.0 * np.exp(-od) - 1.0)


def blank(rng: np.random.Generator) -> np.ndarray:
    """Empty glass: a faint low-frequency tint, a few dust specks, sensor noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = rng.uniform(228, 242) + 4 * np.sin(rng.uniform(1, 4) * xx + rng.uniform(0, 6)) * np.cos(2 * yy)
    img = base[..., None] + rng.uniform(-4, 4, 3) + rng.normal(0, 1.5, (SIZE, SIZE, 3))
    for _ in range(rng.integers(0, 4)):
        y, x = rng.integers(0, SIZE, 2)
        img[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] -= rng.uniform(30, 90)
    return _clip(img)


def black(rng: np.random.Generator) -> np.ndarray:
    return _clip(rng.uniform(0, 20) + rng.normal(0, 2, (SIZE, SIZE, 3)))


def white(rng: np.random.Generator) -> np.ndarray:
    return _clip(rng.uniform(245, 255) + rng.normal(0, 1, (SIZE, SIZE, 3)))


def noise(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _luma(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def green(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    grey = _luma(img) / 255.0
    tint = np.array([rng.uniform(0.15, 0.45), rng.uniform(0.8, 1.0), rng.uniform(0.15, 0.45)])
    return _clip(255 * grey[..., None] * tint + 255 * (1 - tint) * grey[..., None] ** 4)


def grayscale(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.repeat(_clip(_luma(img))[..., None], 3, axis=2)


def ihc_brown(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hed = _od(img) @ _HED_FROM_RGB
    h, e = np.clip(hed[..., 0], 0, None), np.clip(hed[..., 1], 0, None)
    dab = e * rng.uniform(1.2, 2.0)  # eosin's places take the brown chromogen
    return _from_od(0.6 * h[..., None] * _RGB_FROM_HED[0] + dab[..., None] * _RGB_FROM_HED[2])


def out_of_focus(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=3)))  # Pillow's radius is sigma


INKS = {"blue": (30, 60, 170), "green": (20, 120, 60), "black": (25, 25, 30), "red": (180, 30, 40)}


def pen_ink(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Marker strokes: smooth curves of ink multiplied over the tissue (ink absorbs; it does not paint)."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(rng.integers(1, 4)):
        t = np.linspace(0, 1, 24)
        p0, p1, p2 = rng.uniform(-20, SIZE + 20, (3, 2))
        pts = ((1 - t) ** 2)[:, None] * p0 + (2 * t * (1 - t))[:, None] * p1 + (t**2)[:, None] * p2
        draw.line([tuple(p) for p in pts], fill=255, width=int(rng.integers(6, 15)), joint="curve")
    alpha = np.asarray(mask.filter(ImageFilter.GaussianBlur(1)), np.float64)[..., None] / 255.0
    alpha *= rng.uniform(0.55, 0.85)
    ink = np.array(INKS[str(rng.choice(list(INKS)))], np.float64) / 255.0
    return _clip(img * (1 - alpha + alpha * ink))


def fold(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A fold: within a band the tissue lies on a shifted copy of itself (optical densities add)."""
    width, angle = rng.uniform(20, 45), rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    dist = (xx - SIZE / 2) * np.cos(angle) + (yy - SIZE / 2) * np.sin(angle) + rng.uniform(-25, 25)
    band = (np.abs(dist) < width / 2).astype(np.float64)
    band = np.asarray(Image.fromarray((band * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2)), float) / 255
    shifted = np.roll(img, (int(rng.integers(8, 30)), int(rng.integers(8, 30))), axis=(0, 1))[:, ::-1]
    od = _od(img) + band[..., None] * _od(shifted) * rng.uniform(0.8, 1.1)
    return _from_od(od)


def bubble(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An air bubble: a dark refracting rim and a slightly magnified, brighter inside."""
    cy, cx = rng.uniform(20, SIZE - 20, 2)
    r = rng.uniform(18, 40)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    d = np.hypot(yy - cy, xx - cx)
    inside = d < r
    zoom = 1.25
    sy = np.clip(np.rint(cy + (yy - cy) / zoom), 0, SIZE - 1).astype(int)
    sx = np.clip(np.rint(cx + (xx - cx) / zoom), 0, SIZE - 1).astype(int)
    out = img.astype(np.float64).copy()
    out[inside] = 0.55 * img[sy, sx][inside] + 0.45 * 250.0  # the magnified tissue seen washed out through air
    rim = np.exp(-(((d - r) / rng.uniform(1.5, 3.0)) ** 2))[..., None]
    out = out * (1 - 0.8 * rim) + 40.0 * 0.8 * rim
    return _clip(out)


def jpeg_q10(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=10)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def stain_shift(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """H and E amounts each scaled far beyond the augmentation's span (strong: x0.9-1.1, +-0.1)."""
    hed = _od(img) @ _HED_FROM_RGB
    factor = [rng.choice([rng.uniform(0.35, 0.6), rng.uniform(1.7, 2.5)]) for _ in range(2)]
    hed[..., 0] *= factor[0]
    hed[..., 1] *= factor[1]
    return _from_od(np.clip(hed, 0, None) @ _RGB_FROM_HED)


SYNTHETIC: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "blank": blank,
    "black": black,
    "white": white,
    "noise": noise,
}
ON_TISSUE: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "green": green,
    "grayscale": grayscale,
    "ihc_brown": ihc_brown,
    "out_of_focus": out_of_focus,
    "pen_ink": pen_ink,
    "fold": fold,
    "bubble": bubble,
    "jpeg_q10": jpeg_q10,
    "stain_shift": stain_shift,
}
KEEPS_LABEL = set(DAMAGED)


def lung(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    root = SHARED / "lc25000-lung"
    files = []
    for cls in sorted(p.name for p in root.iterdir() if p.is_dir()):
        names = sorted((root / cls).glob("*.jpeg"))
        files += [names[i] for i in np.sort(rng.choice(len(names), size=min(n // 3, len(names)), replace=False))]
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def idc(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    files = sorted((SHARED / "idc").glob("*/*/*.png"))
    pick = np.sort(rng.choice(len(files), size=min(n, len(files)), replace=False))
    return [np.asarray(Image.open(files[i]).convert("RGB")) for i in pick]


def save_shift(
    out: Path, name: str, images: list[np.ndarray] | np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None
) -> None:
    """One shift's npz: ``images`` when every image has one size, else ``image_0000``, ``image_0001``...

    ``rows``: for a tissue-based shift, which rows of ``hcd_test`` each image was made from.
    """
    arrays: dict[str, np.ndarray] = {"labels": np.asarray(labels, np.int64)}
    if rows is not None:
        arrays["rows"] = np.asarray(rows, np.int64)
    if len({im.shape for im in images}) == 1:
        arrays["images"] = np.stack(list(images)).astype(np.uint8)
    else:
        arrays.update({f"image_{i:04d}": np.asarray(im, np.uint8) for i, im in enumerate(images)})
    np.savez_compressed(out / f"{name}.npz", **arrays)  # type: ignore[arg-type]


def load_shift(path: Path) -> tuple[np.ndarray | list[np.ndarray], np.ndarray, np.ndarray | None]:
    """A shift's images (one array, or a list when sizes differ), labels (-1: none kept) and source rows (or None)."""
    with np.load(path, allow_pickle=False) as z:
        labels = z["labels"]
        rows = z["rows"] if "rows" in z.files else None
        if "images" in z.files:
            return z["images"], labels, rows
        return [z[k] for k in sorted(k for k in z.files if k.startswith("image_"))], labels, rows


def generate(run: Path, out: Path, n: int = 200, seed: int = 0, n_synthetic: int = 100, n_other: int = 300) -> dict:
    """Write the suite into ``out``; return its description (also written to ``out/suite.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    ids = test_ids(run)
    if not ids:
        raise SystemExit(f"{run / 'split.csv'}: no test rows")
    labels_of = hcd_labels()
    ref = read_hcd(ids)
    ref_labels = np.array([labels_of[i] for i in ids])
    save_shift(out, REFERENCE, ref, ref_labels)
    meta: dict = {"seed": seed, "run_split": str(run / "split.csv"), "shifts": {}}
    meta["shifts"][REFERENCE] = {"count": len(ids), "labels": True, "what": DESCRIPTIONS[REFERENCE]}
    for k, name in enumerate(SHIFTS):
        rng = np.random.default_rng([seed, k])  # each shift its own stream: adding one changes no other
        rows = None
        if name in SYNTHETIC:
            images: list[np.ndarray] | np.ndarray = [SYNTHETIC[name](rng) for _ in range(n_synthetic)]
            labels = np.full(n_synthetic, -1)
        elif name in ON_TISSUE:
            rows = np.sort(rng.choice(len(ids), size=min(n, len(ids)), replace=False))
            images = [ON_TISSUE[name](ref[i], rng) for i in rows]
            labels = ref_labels[rows] if name in KEEPS_LABEL else np.full(len(rows), -1)
        else:
            images = lung(n_other, rng) if name == "lc25000_lung" else idc(n_other, rng)
            labels = np.full(len(images), -1)  # another organ's task: the model's classes do not apply
        save_shift(out, name, images, labels, rows)
        group = "not tissue" if name in NOT_TISSUE else "damaged" if name in DAMAGED else "other organ"
        meta["shifts"][name] = {
            "count": len(images),
            "labels": name in KEEPS_LABEL,
            "group": group,
            "what": DESCRIPTIONS[name],
        }
    (out / "suite.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the run whose split.csv names the hcd test rows")
    ap.add_argument("--out", type=Path, required=True, help="folder to write the suite into")
    ap.add_argument("--n", type=int, default=200, help="images per tissue-based shift")
    ap.add_argument("--n-synthetic", type=int, default=100, help="images per synthetic non-tissue shift")
    ap.add_argument("--n-other", type=int, default=300, help="images per other organ")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not (SHARED / "hcd").is_dir():
        sys.exit(f"the suite needs {SHARED / 'hcd'} (the real data folder); it is absent")
    meta = generate(args.run, args.out, args.n, args.seed, args.n_synthetic, args.n_other)
    for name, m in meta["shifts"].items():
        print(f"{name:14s} {m['count']:5d}  {m['what']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
