"""Stratified train/val/test splits and k folds; grouped so no patient or slide is in two parts.

A split may also reserve ``calibration`` rows (``histoscan split --calibration 0.1``): outside train, val
and test and outside every fold, so no member of an ensemble trains or early-stops on them; an
ensemble's threshold, temperature and referral rule are fitted there (``inference/fitting.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from histoscan.data.dedup import DuplicateGroups, near_duplicate_groups
from histoscan.data.store import SPLITS_DIR, PatchStore
from histoscan.errors import DataError

SPLIT_NAMES = ("train", "val", "test")
CALIBRATION = "calibration"  # rows reserved for fitting thresholds and temperatures: never trained or validated on
ASSIGNMENT_NAMES = (*SPLIT_NAMES, CALIBRATION)


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
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    calibration: float = 0.0,
) -> np.ndarray:
    """Assign each patch to "train", "val", "test" or "calibration", stratified by label and disjoint by group.

    Test is held out first, then calibration, then val, each a fraction of the whole store; with
    ``calibration`` 0 the split is the one earlier versions made.
    """
    labels = np.asarray(labels)
    _check_labels(labels)
    fracs = {"val": val, "test": test, "calibration": calibration}
    if not (all(0 <= f < 1 for f in fracs.values()) and val + test + calibration < 1):
        shown = ", ".join(f"{k}={v}" for k, v in fracs.items() if k != "calibration" or v)
        raise DataError(f"split fractions {shown} must be in [0, 1) and sum below 1")
    out = np.full(len(labels), "train", dtype=object)
    idx = np.arange(len(labels))
    left = 1.0
    try:
        for name, frac, offset in (("test", test, 0), (CALIBRATION, calibration, 2), ("val", val, 1)):
            if frac <= 0:
                continue
            share = frac / left
            if groups is not None:
                idx, held = _grouped_holdout(idx, labels, groups, share, seed + offset)
            else:
                idx, held = train_test_split(idx, test_size=share, stratify=labels[idx], random_state=seed + offset)
            out[held] = name
            left -= frac
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


def split_name(val: float, test: float, seed: int, calibration: float = 0.0) -> str:
    """File-safe name of a split recipe, e.g. ``seed0-val0.1-test0.1`` (``-cal0.1`` with calibration rows)."""
    return f"seed{seed}-val{val:g}-test{test:g}" + (f"-cal{calibration:g}" if calibration else "")


def save_split(store: PatchStore, assignment: np.ndarray, name: str, column: str = "split") -> Path:
    """Write ``splits/<name>.csv`` (``id,split``, or ``id,fold`` for folds) next to the store's images."""
    folder = store.path / SPLITS_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.csv"
    tmp = path.with_suffix(".csv.tmp")
    pd.DataFrame({"id": store.ids, column: assignment}).to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def read_split(path: str | Path, store: PatchStore, fold: int | None = None) -> np.ndarray:
    """Read a split CSV and align it with the store's rows: "train", "val", "test" or "calibration" per patch.

    Two layouts: ``id,split`` (train/val/test/calibration), or ``id,fold`` (a fold number, ``test`` or
    ``calibration``) as written by ``histoscan split --folds K``; a folds file needs ``fold``: that fold
    becomes val, the other folds train, and the test and calibration rows stay what they are.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: split file not found")
    df = pd.read_csv(p, dtype=str, keep_default_na=False)
    column = df.columns[1] if len(df.columns) >= 2 and df.columns[0] == "id" else None
    if column not in ("split", "fold"):
        raise DataError(f"{p}: expected columns id,split or id,fold, found {list(df.columns)}")
    by_id = dict(zip(df["id"], df[column]))
    missing = [i for i in store.ids if i not in by_id]
    if missing:
        raise DataError(f"{p}: no {column} for {len(missing)} patches of {store.path} (first: {missing[0]!r})")
    values = np.array([by_id[i] for i in store.ids], dtype=object)
    if column == "fold":
        return _fold_to_split(p, values, fold)
    if fold is not None:
        raise DataError(f"{p}: a train/val/test split file has no folds; --fold needs a folds file (id,fold)")
    bad = sorted(set(values) - set(ASSIGNMENT_NAMES))
    if bad:
        raise DataError(f"{p}: unknown split names {bad}; use {list(ASSIGNMENT_NAMES)}")
    return values


def _fold_to_split(path: Path, values: np.ndarray, fold: int | None) -> np.ndarray:
    """Fold ``fold`` -> val, other folds -> train, ``test`` and ``calibration`` stay."""
    names = set(values) - {"test", CALIBRATION}
    bad = sorted(v for v in names if not v.isdigit())
    if bad:
        raise DataError(f"{path}: fold values must be fold numbers, 'test' or 'calibration', found {bad[:5]}")
    k = len(names)
    if fold is None:
        raise DataError(f"{path}: a folds file ({k} folds); choose the validation fold with --fold 0..{k - 1}")
    if str(fold) not in names:
        raise DataError(f"{path}: no fold {fold}; the file has folds {sorted(int(v) for v in names)}")
    kept = (values == "test") | (values == CALIBRATION)
    out = np.where(kept, values, np.where(values == str(fold), "val", "train")).astype(object)
    return out


def combine_groups(*groupings: np.ndarray) -> np.ndarray:
    """One group number per row such that rows sharing a group in any of ``groupings`` share one here."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(groupings[0])
    rows, cols, offset = [], [], n
    for g in groupings:
        _, codes = np.unique(np.asarray(g), return_inverse=True)
        rows.append(np.arange(n))
        cols.append(codes + offset)  # link each row to a node for its group
        offset += int(codes.max()) + 1 if n else 0
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(offset, offset))
    _, labels = connected_components(graph, directed=False)
    return labels[:n].astype(np.int64)


def _base_split(
    store: PatchStore,
    val: float,
    test: float,
    seed: int,
    use_source_split: bool,
    calibration: float = 0.0,
    dedup: DuplicateGroups | None = None,
) -> tuple[np.ndarray, str]:
    """The recipe's train/val/test(/calibration) assignment (the source's own split when it has one) and its name.

    With the source's own split, ``calibration`` rows are held out of its train part (PCam's val and
    test stay the official ones). ``dedup``: near-duplicate groups (``histoscan.data.dedup``) kept on one
    side each, together with the store's own groups; the split's name ends in ``-dedup``.
    """
    if dedup is not None:
        if has_source_split(store):
            raise DataError(f"{store.path}: the source has its own split; --dedup makes a new one and cannot apply")
        groups = dedup.groups if store.groups is None else combine_groups(dedup.groups, store.groups)
        name = split_name(val, test, seed, calibration) + "-dedup"
        return make_split(store.labels, groups, val=val, test=test, seed=seed, calibration=calibration), name
    if use_source_split and has_source_split(store):
        source = np.asarray(store.source_splits, dtype=object)
        if not calibration:
            return source, "source"
        return _calibration_from_train(store, source, calibration, seed), f"source-cal{calibration:g}-seed{seed}"
    name = split_name(val, test, seed, calibration) + ("-grouped" if store.groups is not None else "")
    path = store.path / SPLITS_DIR / f"{name}.csv"
    if path.is_file():
        return read_split(path, store), name
    return make_split(store.labels, store.groups, val=val, test=test, seed=seed, calibration=calibration), name


def _calibration_from_train(store: PatchStore, source: np.ndarray, calibration: float, seed: int) -> np.ndarray:
    """The source's split with about ``calibration`` of the whole store moved from its train part to calibration."""
    train = np.flatnonzero(source == "train")
    share = calibration * len(source) / max(len(train), 1)
    if not 0 < share < 1:
        raise DataError(f"{store.path}: --calibration {calibration} is more than the source's train part holds")
    try:
        if store.groups is not None:
            _, held = _grouped_holdout(train, store.labels, store.groups, share, seed + 2)
        else:
            _, held = train_test_split(train, test_size=share, stratify=store.labels[train], random_state=seed + 2)
    except ValueError as exc:
        raise DataError(f"cannot make a stratified calibration split: {exc}") from exc
    out = source.copy()
    out[held] = CALIBRATION
    return out


def has_source_split(store: PatchStore) -> bool:
    """True when the source came with its own train and val parts (PCam's official files)."""
    return store.source_splits is not None and set(store.source_splits) >= {"train", "val"}


def split_store(
    store: PatchStore,
    *,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    split_file: str | Path | None = None,
    fold: int | None = None,
    use_source_split: bool = True,
    calibration: float = 0.0,
) -> tuple[dict[str, PatchStore], Path]:
    """Split a store into views by name, saving (or reusing) the assignment so a run can repeat it.

    Order of precedence: an explicit ``split_file`` (with ``fold`` when it is a folds file: the resolved
    split is saved as ``splits/<file>-fold<I>.csv``); the source's own split (PCam) when it has train, val
    and test; else a saved split of the same recipe; else a new one, saved. The views are train, val and
    test, and ``calibration`` when the split reserves calibration rows (never trained or validated on).
    """
    if split_file is not None:
        assignment, path = read_split(split_file, store, fold), Path(split_file)
        if fold is not None:
            path = save_split(store, assignment, f"{path.stem}-fold{fold}")
    elif fold is not None:
        raise DataError(
            f"{store.path}: --fold needs --split-file FOLDS.csv (write one with 'histoscan split --folds K')"
        )
    else:
        assignment, name = _base_split(store, val, test, seed, use_source_split, calibration)
        path = store.path / SPLITS_DIR / f"{name}.csv"
        if not path.is_file():
            path = save_split(store, assignment, name)
    parts = {s: store.subset(np.flatnonzero(assignment == s)) for s in SPLIT_NAMES}
    if (assignment == CALIBRATION).any():
        parts[CALIBRATION] = store.subset(np.flatnonzero(assignment == CALIBRATION))
    return parts, path


def fold_assignment(
    store: PatchStore,
    k: int,
    *,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    use_source_split: bool = True,
    calibration: float = 0.0,
) -> tuple[np.ndarray, str]:
    """K stratified (and grouped) folds of the rows outside the test and calibration parts.

    K stratified (and grouped) folds of the rows outside the test and calibration parts: a fold number per
    row, "test" or "calibration".

    The test and calibration parts are the ones ``split_store`` makes with the same arguments (PCam: the
    official test file), so they never enter a fold; train and val rows are folded together. Returns the
    assignment and the name it is saved under (``folds<K>-<split name>``).
    """
    base, name = _base_split(store, val, test, seed, use_source_split, calibration)
    pool = np.flatnonzero((base != "test") & (base != CALIBRATION))
    groups = store.groups[pool] if store.groups is not None else None
    folds = make_folds(store.labels[pool], groups, k=k, seed=seed)
    out = base.copy().astype(object)
    out[pool] = folds.astype(str)
    return out, f"folds{k}-{name}"


@dataclass
class StoreSplits:
    """What ``histoscan split`` wrote: the train/val/test split and, when asked, the folds."""

    parts: dict[str, PatchStore]
    path: Path
    source: bool
    folds_path: Path | None = None
    folds: int = 0
    dedup: DuplicateGroups | None = None

    def lines(self) -> list[str]:
        """A human summary, one line per fact."""
        out = [", ".join(f"{k}: {len(v)} {v.counts()}" for k, v in self.parts.items())]
        how = "the source's own split (as 'histoscan train' uses it)" if self.source else "split"
        if self.dedup is not None:
            out.append(self.dedup.line())
        out.append(f"{how} saved to {self.path}")
        if self.dedup is not None:
            out.append(f"train on it with: histoscan train --split-file {self.path}")
        if CALIBRATION in self.parts:
            out.append(
                f"{len(self.parts[CALIBRATION])} calibration rows: never trained or validated on; ensembles and "
                f"'histoscan calibrate' fit there. Train on this split with: histoscan train --split-file {self.path}"
            )
        if self.folds_path is not None:
            out.append(
                f"{self.folds} folds of the train+val rows (test and calibration rows marked so) saved to "
                f"{self.folds_path}; train on fold I with: histoscan train --split-file {self.folds_path} --fold I"
            )
        return out


def write_splits(
    store: PatchStore,
    *,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    folds: int = 0,
    calibration: float = 0.0,
    dedup: bool = False,
) -> StoreSplits:
    """Make (or reuse) the split ``histoscan train`` would use with the same arguments, and ``folds`` folds.

    ``calibration``: also reserve that fraction of the store as calibration rows, outside train, val, test
    and every fold (stratified, and grouped by patient or slide where the store has groups). ``dedup``:
    instead, a split that keeps each group of near-duplicate images (``histoscan.data.dedup``) on one side,
    saved as ``splits/<name>-dedup.csv`` for ``histoscan train --split-file``.
    """
    if dedup:
        if folds:
            raise DataError("--dedup makes a train/val/test split; it cannot be combined with --folds")
        groups = near_duplicate_groups(store)
        assignment, name = _base_split(store, val, test, seed, False, calibration, dedup=groups)
        path = save_split(store, assignment, name)
        parts = {s: store.subset(np.flatnonzero(assignment == s)) for s in SPLIT_NAMES}
        if (assignment == CALIBRATION).any():
            parts[CALIBRATION] = store.subset(np.flatnonzero(assignment == CALIBRATION))
        return StoreSplits(parts, path, source=False, dedup=groups)
    parts, path = split_store(store, val=val, test=test, seed=seed, calibration=calibration)
    result = StoreSplits(parts, path, source=path.stem.startswith("source") and has_source_split(store))
    if folds:
        assignment, name = fold_assignment(store, folds, val=val, test=test, seed=seed, calibration=calibration)
        result.folds_path, result.folds = save_split(store, assignment, name, column="fold"), folds
    return result
