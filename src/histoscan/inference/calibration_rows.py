"""Calibration rows: the rows of a split that no member of a bundle trained or early-stopped on.

A split reserves them with ``histoscan split STORE --calibration 0.1`` (assignment value
``calibration``). A bundle's fitted values (threshold, temperature, referral rule) are fitted there,
scored by the bundle as deployed. Rows are matched by patch id, so members trained on different
copies of a store are still checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from histoscan.data.splits import CALIBRATION
from histoscan.errors import ConfigError, DataError
from histoscan.runfolder import SPLIT_FILE, RunFolder

SEEN = ("train", "val")  # the parts a run trains or early-stops on (a folds file: every fold number)
RESPLIT = "histoscan split STORE --calibration 0.1"


def _read(path: Path) -> tuple[pd.DataFrame, str]:
    """A split file as text, and the name of its assignment column (``split`` or ``fold``)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the split file: {exc}") from exc
    column = frame.columns[1] if len(frame.columns) >= 2 and frame.columns[0] == "id" else None
    if column not in ("split", "fold"):
        raise DataError(f"{path}: expected columns id,split or id,fold, found {list(frame.columns)}")
    return frame, str(column)


def calibration_ids(split_path: str | Path) -> set[str]:
    """The ids a split file marks ``calibration`` (empty when the file is absent or reserves none)."""
    path = Path(split_path)
    if not path.is_file():
        return set()
    frame, column = _read(path)
    return set(frame.loc[frame[column] == CALIBRATION, "id"])


def check_unseen(member_dirs: Sequence[Path], ids: set[str]) -> None:
    """ConfigError naming the first member whose split file puts any of ``ids`` in its training or validation rows."""
    if not ids:
        return
    for member in member_dirs:
        path = RunFolder(member).split_path
        if not path.is_file():
            raise ConfigError(
                f"{path}: member {member} has no {SPLIT_FILE}, so nothing shows it never trained or validated on "
                f"the calibration rows; retrain it with --split-file on the split that reserves them ({RESPLIT})"
            )
        frame, column = _read(path)
        values = frame[column]
        seen = values.isin(SEEN) | values.str.isdigit()
        overlap = frame.loc[seen & frame["id"].isin(ids), "id"]
        if len(overlap):
            raise ConfigError(
                f"{path}: field {column!r} puts {len(overlap)} of the {len(ids)} calibration rows in member "
                f"{member}'s training or validation rows (first: {overlap.iloc[0]!r}); retrain that member with "
                "--split-file on the split that reserves them, or re-split once "
                f"({RESPLIT}) and retrain every member on it"
            )
