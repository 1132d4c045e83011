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


PLAUSIBLE_MPP = (0.1, 10.0)  # level-0 um/px of slide scanners (100x oil ~0.1 to macro overviews ~10)
# What image writers put in a resolution tag when they know nothing: screen and print dpi, and round
# px/cm values. Each becomes a "resolution" (72 dpi = 352.8 um/px) that OpenSlide 4 reports as mpp.
COMMON_DPI = (72.0, 96.0, 100.0, 150.0, 200.0, 240.0, 300.0, 600.0, 1200.0, 2400.0)
COMMON_PX_PER_CM = (1.0, 10.0, 28.3465, 37.7953, 100.0)
OBJECTIVE_UM = 10.0  # um/px x objective power of a typical scanner: 20x ~ 0.5, 40x ~ 0.25 um/px
OBJECTIVE_TOLERANCE = 1.5  # stated resolution and objective power further apart than this: refused


@dataclass(frozen=True)
class SlideResolution:
    """A slide's level-0 um/px and where it came from (for the log and summary.json)."""

    mpp: float
    source: str  # "metadata", "--slide-mpp" (filled in) or "--slide-mpp-override"
    note: str = ""  # why metadata was not used, when it was not


def _default_tag(mpp: float) -> str | None:
    """The dpi or px/cm placeholder ``mpp`` comes from, or None."""
    for dpi in COMMON_DPI:
        if abs(mpp / (25400.0 / dpi) - 1.0) < 0.005:
            return f"{dpi:g} dpi"
    for ppcm in COMMON_PX_PER_CM:
        if abs(mpp / (10000.0 / ppcm) - 1.0) < 0.005:
            return f"{ppcm:g} px/cm"
    return None


def implausible(mpp: float) -> str | None:
    """Why a stated level-0 resolution cannot be a slide's (a default dpi tag, or out of range), else None."""
    tag = _default_tag(mpp)
    if tag is not None:
        return f"{mpp:.4g} um/px is a {tag} resolution tag (an image writer's default, not a scanner's)"
    lo, hi = PLAUSIBLE_MPP
    if not lo <= mpp <= hi:
        return f"{mpp:.4g} um/px is outside the {lo:g}-{hi:g} um/px of slide scanners"
    return None


def slide_resolution(
    path: str | Path,
    stated: float | None,
    fill_in: float | None = None,
    override: float | None = None,
    objective: float | None = None,
) -> SlideResolution:
    """The slide's level-0 um/px, checked: ``override`` wins; else plausible metadata; else ``fill_in``.

    Metadata is refused when it is a default dpi/px-per-cm tag or outside ``PLAUSIBLE_MPP`` (then
    ``fill_in`` is used as for a slide that states nothing), and when it contradicts the objective power by
    more than ``OBJECTIVE_TOLERANCE`` times (an error naming both: the user decides with the override).
    """
    for value, option in ((fill_in, "--slide-mpp"), (override, "--slide-mpp-override")):
        if value is not None and value <= 0:
            raise ConfigError(f"{option} must be positive, got {value} um/px")
    if override is not None:
        return SlideResolution(float(override), "--slide-mpp-override")
    note = ""
    if stated is not None and stated > 0:
        why = implausible(stated)
        if why is None:
            if objective is not None and objective > 0:
                expected = OBJECTIVE_UM / objective
                if max(stated / expected, expected / stated) > OBJECTIVE_TOLERANCE:
                    raise SlideError(
                        f"{path}: its metadata says {stated:.4g} um/px but objective power {objective:g}x "
                        f"(~{expected:.3g} um/px); check the slide and give the true value with "
                        "--slide-mpp-override UM_PER_PX"
                    )
            return SlideResolution(float(stated), "metadata")
        note = f"metadata refused: {why}"
        if fill_in is None:
            raise SlideError(
                f"{path}: the slide's resolution metadata is not credible ({why}); give its true resolution "
                "with --slide-mpp UM_PER_PX (or --slide-mpp-override)"
            )
    if fill_in is None:
        raise SlideError(f"{path}: the slide states no resolution (um/px); give --slide-mpp UM_PER_PX")
    return SlideResolution(float(fill_in), "--slide-mpp", note)


def slide_mpp(path: str | Path, stated: float | None, fill_in: float | None) -> float:
    """The slide's level-0 um/px: plausible metadata, else ``fill_in`` (--slide-mpp), else a one-line error.

    Metadata wins so that one --slide-mpp for a folder fills in only the slides that lack it.
    """
    return slide_resolution(path, stated, fill_in).mpp


def describe_slide_resolution(path: str | Path) -> str:
    """One line on what a slide states about its resolution and whether a scan would accept it.

    For checking a slide before scanning it: ``python -c "from histoscan.wsi.resolution import
    describe_slide_resolution as d; print(d('slide.svs'))"``.
    """
    from histoscan.wsi.reader import open_slide

    reader = open_slide(path)
    try:
        stated, power = reader.mpp, reader.objective_power
        w, h = reader.dimensions
        levels = ", ".join(f"{d:.3g}" for d in reader.level_downsamples)
    finally:
        reader.close()
    what = f"{path}: {w}x{h} px, level downsamples {levels}; "
    what += f"states {stated:.4g} um/px" if stated else "states no resolution"
    what += f" at {power:g}x" if power else ", no objective power"
    try:
        res = slide_resolution(path, stated, None, None, power)
    except SlideError as exc:
        return f"{what}. A scan refuses it: {str(exc).removeprefix(f'{path}: ')}"
    return f"{what}. A scan uses {res.mpp:.4g} um/px (from its {res.source})"
