"""Options of ``histoscan stain fit`` and ``histoscan stain show`` (each field's help text is its ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histoscan.enums import STAIN_METHODS
from histoscan.options import doc


@dataclass(frozen=True)
class StainFitSettings:
    """``histoscan stain fit``: a stain normalisation target from a store or reference images."""

    source: Path = doc("A store, a folder of reference images, or one image.", argument=True)
    # a str checked by stain.normalise.check_method (its error names the source), listed from histoscan.enums
    method: str = doc(f"{' or '.join(STAIN_METHODS)}.", "macenko")
    out: Path = doc("Where the target goes (train --stain-target reads it).", Path("target.json"))
    max_patches: int = doc("Patches sampled to fit the target.", 2000)
    seed: int = doc("Random seed of the sample.", 0)


@dataclass(frozen=True)
class StainShowSettings:
    """``histoscan stain show``: stain vectors and concentrations per group, before and after normalisation."""

    store: Path = doc("A packed store.", argument=True)
    out: Path = doc("Folder for the figures, stain.json and report.html.", Path("stain-report"))
    max_patches: int = doc("Patches sampled.", 2000)
    seed: int = doc("Random seed of the sample.", 0)
