"""Reference patches for a stain target or a stain donor: a packed store, or an image source folder / files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from histoscan.data.imageio import fit_to_size, read_image
from histoscan.data.store import META_FILE, PatchStore
from histoscan.errors import ConfigError, DataError
from histoscan.stain.normalise import StainTarget, check_method, fit_target

#: patches read (at most) to fit a target or a donor's stain
MAX_REFERENCE_PATCHES = 2000
#: side the images of a source folder are fitted to for estimation (stores keep their own size)
REFERENCE_SIDE = 96


def reference_patches(path: str | Path, max_patches: int = MAX_REFERENCE_PATCHES, seed: int = 0) -> np.ndarray:
    """Up to ``max_patches`` uint8 patches (a seeded random sample) from a store, a source folder or an image file."""
    p = Path(path)
    rng = np.random.default_rng(seed)
    if (p / META_FILE).is_file():
        store = PatchStore(p)
        n = len(store)
        if n == 0:
            raise DataError(f"{p}: the store holds no patches")
        idx = np.sort(rng.choice(n, size=min(n, max_patches), replace=False))
        return store.batch(idx)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"))
    else:
        raise DataError(f"{p}: no such store, folder or image")
    if not files:
        raise DataError(f"{p}: neither a histoscan store nor a folder holding images")
    pick = rng.choice(len(files), size=min(len(files), max_patches), replace=False)
    side = (REFERENCE_SIDE, REFERENCE_SIDE)
    return np.stack([fit_to_size(read_image(files[i]).pixels, side, "resize")[0] for i in sorted(pick)])


def fit_reference(
    path: str | Path, method: str, max_patches: int = MAX_REFERENCE_PATCHES, seed: int = 0
) -> StainTarget:
    """A stain target fitted from the patches at ``path`` (store, folder or image); DataError with too little tissue."""
    check_method(method, str(path))
    return fit_target(reference_patches(path, max_patches, seed), method, source=str(path))


def fit_store(store: PatchStore, method: str, max_patches: int = MAX_REFERENCE_PATCHES, seed: int = 0) -> StainTarget:
    """A stain target fitted from a store view (e.g. the training split)."""
    if len(store) == 0:
        raise DataError(f"{store.path}: no patches to fit a stain target from")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(store), size=min(len(store), max_patches), replace=False))
    return fit_target(store.batch(idx), method, source=str(store.path))


def read_target(path: str | Path) -> StainTarget:
    """A target.json written by ``histoscan stain fit``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{p}: not a readable stain target ({exc})") from None
    try:
        return StainTarget.from_dict(data)
    except Exception as exc:  # ConfigError from the target's own checks, TypeError from unknown shapes
        raise DataError(f"{p}: not a stain target ({exc})") from None


def write_target(target: StainTarget, out: str | Path) -> Path:
    """Write ``target`` as JSON."""
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(target.to_dict(), indent=2) + "\n")
    return p


def training_stain(
    method: str, target: str | None, train: PatchStore, seed: int = 0, granularity: str = "patch"
) -> dict[str, Any] | None:
    """``preprocessing.stain`` for a training run: None for ``none``, else ``target`` or a fit to the training split.

    ``granularity`` ``group`` needs a store with groups (patients / slides): ConfigError naming it otherwise.
    """
    if method == "none":
        return None
    check_method(method)
    if granularity == "group" and train.groups is None:
        raise ConfigError(
            f"{train.path}: stain_granularity group needs a store with groups (patients or slides); this one has none"
        )
    fitted = read_target(target) if target else fit_store(train, method, seed=seed)
    if fitted.method != method:
        raise ConfigError(f"{target}: a {fitted.method} stain target, but stain_norm is {method}")
    return StainTarget.from_dict({**fitted.to_dict(), "granularity": granularity}).to_dict()


def stain_summary(counts: dict[str, int]) -> str:
    """One log line: how many patches (and, per group, groups) stain normalisation passed through unchanged."""
    line = (
        f"stain normalisation: {counts['passed_through']} of {counts['patches']} patches passed through unchanged "
        "(blank, background, very dark, pen-marked or single-colour)"
    )
    if "groups" in counts:
        line += (
            f"; {counts['groups_passed_through']} of {counts['groups']} groups had too little tissue for a stain "
            "estimate (their patches pass through unchanged)"
        )
    return line
