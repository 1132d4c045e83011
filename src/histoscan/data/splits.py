"""Stratified train/val/test splits and k folds; grouped so no patient or slide is in two parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from histoscan.data.store import SPLITS_DIR, PatchStore
from histoscan.errors import DataError

SPLIT_NAMES = ("train", "val", "test")


def _check_labels(labels: np.ndarray) -> None:
    if (labels < 0).any():
        raise DataError("cannot split: some patches have no label (an unlabelled store is for prediction only)")
    if len(np.unique(labels)) < 2:
        raise DataError("cannot split: the store holds a single class")


def _grouped_holdout(
    idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, frac: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out about ``frac`` of ``idx`` by whole groups, keeping classes as balanced as groups allow."""
    n_splits = max(2, round(1.0 / frac))
    n_groups = len(np.unique(groups[idx]))
    if n_groups < n_splits:
        raise DataError(f"cannot hold out {frac:.0%} by group: only {n_groups} groups (need at least {n_splits})")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    keep, held = next(cv.split(idx, labels[idx], groups[idx]))
    return idx[keep], idx[held]


def make_split(
    labels: np.ndarray, groups: np.ndarray | None = None, *, val: float = 0.1, test: float = 0.1, seed: int = 0
) -> np.ndarray:
    """Assign each patch to "train", "val" or "test", stratified by label and disjoint by group."""
    labels = np.asarray(labels)
    _check_labels(labels)
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DataError(f"split fractions val={val}, test={test} must be in [0, 1) and sum below 1")
    out = np.full(len(labels), "train", dtype=object)
    idx = np.arange(len(labels))
    try:
        if test > 0:
            if groups is not None:
                idx, held = _grouped_holdout(idx, labels, groups, test, seed)
            else:
                idx, held = train_test_split(idx, test_size=test, stratify=labels[idx], random_state=seed)
            out[held] = "test"
        if val > 0:
            frac = val / (1.0 - test)
            if groups is not None:
                idx, held = _grouped_holdout(idx, labels, groups, frac, seed + 1)
            else:
                idx, held = train_test_split(idx, test_size=frac, stratify=labels[idx], random_state=seed + 1)
            out[held] = "val"
    except ValueError as exc:  # sklearn: too few members of a class
        raise DataError(f"cannot make a stratified split: {exc}") from exc
    return out


def make_folds(labels: np.ndarray, groups: np.ndarray | None = None, *, k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold number (0..k-1) per patch, stratified, and grouped when groups are given."""
    labels = np.asarray(labels)
    _check_labels(labels)
    if k < 2:
        raise DataError(f"k folds must be at least 2, got {k}")
    folds = np.full(len(labels), -1, dtype=np.int64)
    try:
        if groups is not None:
            cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            parts = cv.split(np.zeros(len(labels)), labels, groups)
        else:
            parts = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
        for f, (_, held) in enumerate(parts):
            folds[held] = f
    except ValueError as exc:
        raise DataError(f"cannot make {k} stratified folds: {exc}") from exc
    return folds


def split_name(val: float, test: float, seed: int) -> str:
    """File-safe name of a split recipe, e.g. ``seed0-val0.1-test0.1``."""
    return f"seed{seed}-val{val:g}-test{test:g}"


def save_split(store: PatchStore, assignment: np.ndarray, name: str) -> Path:
    """Write ``splits/<name>.csv`` (id, split) next to the store's images."""
    folder = store.path / SPLITS_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.csv"
    tmp = path.with_suffix(".csv.tmp")
    pd.DataFrame({"id": store.ids, "split": assignment}).to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def read_split(path: str | Path, store: PatchStore) -> np.ndarray:
    """Read an (id, split) CSV and align it with the store's rows."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: split file not found")
    df = pd.read_csv(p, dtype={"id": str, "split": str}, keep_default_na=False)
    if list(df.columns[:2]) != ["id", "split"]:
        raise DataError(f"{p}: expected columns id,split, found {list(df.columns)}")
    by_id = dict(zip(df["id"], df["split"]))
    missing = [i for i in store.ids if i not in by_id]
    if missing:
        raise DataError(f"{p}: no split for {len(missing)} patches of {store.path} (first: {missing[0]!r})")
    out = np.array([by_id[i] for i in store.ids], dtype=object)
    bad = sorted(set(out) - set(SPLIT_NAMES))
    if bad:
        raise DataError(f"{p}: unknown split names {bad}; use {list(SPLIT_NAMES)}")
    return out


def split_store(
    store: PatchStore,
    *,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    split_file: str | Path | None = None,
    use_source_split: bool = True,
) -> tuple[dict[str, PatchStore], Path]:
    """Split a store into views by name, saving (or reusing) the assignment so a run can repeat it.

    Order of precedence: an explicit ``split_file``; the source's own split (PCam) when it has
    train, val and test; else a saved split of the same recipe; else a new one, saved.
    """
    folder = store.path / SPLITS_DIR
    if split_file is not None:
        assignment, path = read_split(split_file, store), Path(split_file)
    elif use_source_split and store.source_splits is not None and set(store.source_splits) >= {"train", "val"}:
        assignment = np.asarray(store.source_splits, dtype=object)
        path = folder / "source.csv"
        if not path.is_file():
            path = save_split(store, assignment, "source")
    else:
        name = split_name(val, test, seed) + ("-grouped" if store.groups is not None else "")
        path = folder / f"{name}.csv"
        if path.is_file():
            assignment = read_split(path, store)
        else:
            assignment = make_split(store.labels, store.groups, val=val, test=test, seed=seed)
            path = save_split(store, assignment, name)
    parts = {s: store.subset(np.flatnonzero(assignment == s)) for s in SPLIT_NAMES}
    return parts, path
