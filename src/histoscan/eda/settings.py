"""Options of ``histoscan eda`` (each field's help text is its ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histoscan.options import doc


@dataclass(frozen=True)
class EdaSettings:
    """``histoscan eda``: explore a store into figures and one HTML report."""

    store: Path = doc("A packed store folder.", argument=True)
    out: Path = doc("Folder for the figures, eda.json and report.html.", argument=True)
    sample: int = doc("Patches per class for mean images and histograms (quality checks cover all).", 5000)
    grid: int = doc("Example patches per class in the sample grids.", 16)
    seed: int = doc("Random seed for the samples.", 0)
