"""Physical resolution: where the model's and the slide's um/px come from, and which pyramid level to read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from histoscan.errors import ConfigError
from histoscan.wsi.reader import SlideError

LEVEL_TOLERANCE = 0.05  # a level within 5% of the target either way is read as it is


@dataclass(frozen=True)
class LevelChoice:
    """The pyramid level a scan reads and how it is resampled to the model's resolution."""

    level: int
    downsample: float  # of the level against level 0
    level_mpp: float
    factor: float  # level pixels per model pixel: 1 = read as is, > 1 = shrink after reading

    def describe(self) -> str:
        """One line for the log and summary.json."""
        how = "no resampling" if self.factor == 1.0 else f"resampled by {1 / self.factor:.4f}"
        return f"level {self.level} (downsample {self.downsample:.3f}, {self.level_mpp:.4f} um/px), {how}"


def choose_level(
    target_mpp: float, slide_mpp: float, downsamples: Sequence[float], tolerance: float = LEVEL_TOLERANCE
) -> LevelChoice:
    """The level within ``tolerance`` of ``target_mpp`` (closest first), else the nearest finer level.

    A level within tolerance is read without resampling (its few percent of scale error is less than
    the interpolation blur it saves); otherwise the finer level is read and shrunk to the target.
    """
    levels = [(i, float(d), slide_mpp * float(d)) for i, d in enumerate(downsamples)]
    near = [lv for lv in levels if abs(lv[2] / target_mpp - 1.0) <= tolerance]
    if near:
        i, d, mpp = min(near, key=lambda lv: abs(lv[2] / target_mpp - 1.0))
        return LevelChoice(i, d, mpp, 1.0)
    finer = [lv for lv in levels if lv[2] < target_mpp]
    i, d, mpp = max(finer, key=lambda lv: lv[2]) if finer else levels[0]
    return LevelChoice(i, d, mpp, target_mpp / mpp)


def model_mpp(run_dir: str | Path, stored: float | None, override: float | None) -> float:
    """The model's um/px: ``override`` (--model-mpp), else what model.json stores, else a one-line error."""
    value = override if override is not None else stored
    if value is None:
        raise ConfigError(
            f"{Path(run_dir) / 'model.json'}: the model's resolution (preprocessing.mpp) is unknown; "
            "give --model-mpp UM_PER_PX or retrain with --mpp"
        )
    if value <= 0:
        raise ConfigError(f"model resolution must be positive, got {value} um/px")
    return float(value)


def slide_mpp(path: str | Path, stated: float | None, override: float | None) -> float:
    """The slide's level-0 um/px: its metadata, else ``override`` (--slide-mpp), else a one-line error.

    Metadata wins so that one --slide-mpp for a folder fills in only the slides that lack it.
    """
    value = stated if stated is not None else override
    if value is None:
        raise SlideError(f"{path}: the slide states no resolution (um/px); give --slide-mpp UM_PER_PX")
    if value <= 0:
        raise ConfigError(f"slide resolution must be positive, got {value} um/px")
    return float(value)
