"""Options of ``histoscan baselines`` (each field's help text is its ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histoscan.options import doc


@dataclass(frozen=True)
class BaselinesSettings:
    """``histoscan baselines``: logistic regression and random forests on pixels and colour features."""

    store: Path = doc("A labelled packed store.", argument=True)
    out: Path = doc("Folder for one run folder per baseline.", Path("runs/baselines"), argument=True)
    models: str = doc("Comma-separated: logreg, rf.", "logreg,rf")
    features: str = doc(
        "Comma-separated: pixels (shrunk, flattened), colour (histograms, statistics, texture).", "pixels,colour"
    )
    pixel_size: int = doc("Side the images are shrunk to for pixel features.", 32)
    val: float = doc("Validation fraction (same split recipe as 'histoscan train').", 0.1)
    test: float = doc("Test fraction.", 0.1)
    seed: int = doc("Split and model seed.", 0)
    split_file: Path | None = doc("An id,split CSV (e.g. a CNN run's split.csv) instead of the recipe.", None)
    force: bool = doc("Replace existing baseline run folders.", False)

    def model_names(self) -> list[str]:
        """``models`` as a list."""
        return self.models.split(",")

    def feature_names(self) -> list[str]:
        """``features`` as a list."""
        return self.features.split(",")
