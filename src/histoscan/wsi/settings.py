"""Options of ``histoscan slide evaluate`` (the scan's own options are ``histoscan.wsi.scan.ScanSettings``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histoscan.options import doc


@dataclass(frozen=True)
class SlideEvaluateSettings:
    """``histoscan slide evaluate``: slide-level AUROC of a scan against slide labels."""

    scan: Path = doc("A scan's output folder (or its slides.csv) from 'histoscan slide'.", argument=True)
    labels: Path = doc("A slide,label CSV (labels 0/1 or normal/tumour).")
