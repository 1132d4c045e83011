"""Options of ``histoscan slide evaluate`` (the scan's own options are ``histoscan.wsi.scan.ScanSettings``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from histoscan.options import doc

if TYPE_CHECKING:
    from histoscan.wsi.evaluate import SlideEvaluationSettings


@dataclass(frozen=True)
class SlideEvaluateSettings:
    """Options of ``histoscan slide evaluate``.

    ``histoscan slide evaluate``: slide-level AUROC of a scan against slide labels; lesion-level FROC with
    tumour annotations.
    """

    scan: Path = doc("A scan's output folder (or its slides.csv) from 'histoscan slide'.", argument=True)
    labels: Path | None = doc(
        "A slide,label CSV (labels 0/1 or normal/tumour); without it, a slide's label comes from --annotations.",
        None,
    )
    annotations: list[Path] = doc(
        "Tumour annotations for the lesion-level FROC: a folder of <slide>.geojson (QuPath) or <slide>.xml "
        "(ASAP, as Camelyon16 ships them), or such files (repeatable); a slide without one has no lesions.",
        [],
        multiple=True,
    )
    bootstrap: int = doc("Bootstrap resamples for the AUROC's 95% interval (0: none).", 1000)

    def evaluation(self) -> SlideEvaluationSettings:
        """The library's evaluation settings (annotations: one folder as given, else the list of files)."""
        from histoscan.wsi.evaluate import SlideEvaluationSettings

        ann = self.annotations
        annotations = None if not ann else ann[0] if len(ann) == 1 and ann[0].is_dir() else tuple(ann)
        return SlideEvaluationSettings(annotations=annotations, bootstrap=self.bootstrap)
