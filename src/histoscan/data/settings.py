"""Options of the data commands, one dataclass per command.

Options of the data commands (``ingest``, ``info``, ``split``, ``synth``, ``download pcam``): one dataclass per
command, each field's help text its ``--help`` line, so the command line and Python share one set of defaults.

Values are checked by the functions they feed (``histoscan.data.ingest.ingest``, ``write_synthetic``, ...), which
name the bad option; ``layout`` and the like stay ``str`` until the enumerations module exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histoscan.data.download import PCAM_BASE_URL
from histoscan.options import WORKERS_HELP, doc


def comma_list(text: str | None) -> list[str] | None:
    """``"a,b"`` as ``["a", "b"]`` (None or empty: None)."""
    return text.split(",") if text else None


@dataclass(frozen=True)
class IngestSettings:
    """``histoscan ingest``: check a labelled patch source and pack it into a memory-mapped store."""

    source: Path = doc("Kaggle folder, PCam folder, class folders, image folder or CSV manifest.", argument=True)
    out: Path = doc("Store folder to create.", argument=True)
    size: int | None = doc("Resize every image to SIZE x SIZE (default: the dominant size).", None)
    workers: int | None = doc(WORKERS_HELP, None)
    force: bool = doc("Replace OUT if it exists.", False)
    layout: str | None = doc("Force a layout: kaggle, pcam, folders, grouped-folders, manifest, unlabelled.", None)
    classes: str | None = doc("Comma-separated known class names (folders / manifest).", None)
    mpp: float | None = doc("Source um/px (kaggle, pcam: 0.972).", None)
    label_size: int | None = doc("Labelled centre side, px (kaggle, pcam: 32).", None)

    def class_names(self) -> list[str] | None:
        """``classes`` as a list (None: not given)."""
        return comma_list(self.classes)


@dataclass(frozen=True)
class InfoSettings:
    """``histoscan info``: what is in a store."""

    store: Path = doc("A packed store folder.", argument=True)


@dataclass(frozen=True)
class SplitSettings:
    """``histoscan split``: the train/val/test split (and folds) that ``histoscan train`` uses."""

    store: Path = doc("A packed store folder.", argument=True)
    val: float = doc("Validation fraction (ignored where the source has its own split).", 0.1)
    test: float = doc("Test fraction (ignored where the source has its own split).", 0.1)
    seed: int = doc("Random seed.", 0)
    folds: int = doc(
        "Also write K >= 2 stratified (grouped) folds of the train+val rows, as id,fold (test rows: test).", 0
    )
    calibration: float = doc(
        "Also reserve this fraction as calibration rows (e.g. 0.1), outside train/val/test and every fold: "
        "ensembles and 'calibrate' fit their threshold and temperature there.",
        0.0,
    )
    dedup: bool = doc(
        "Keep near-duplicate images (perceptual hash within 10 of 64 bits, any flip or rotation) on one side of "
        "the split: for sets made by augmenting a few originals, such as LC25000. Writes <name>-dedup.csv.",
        False,
    )


@dataclass(frozen=True)
class SynthSettings:
    """``histoscan synth``: synthetic H&E-like patches in any supported layout."""

    out: Path = doc("Folder to write.", argument=True)
    layout: str = doc("kaggle, pcam, folders, grouped-folders or manifest.", "kaggle")
    n: int = doc("Labelled patches.", 200)
    unlabelled: int = doc("Unlabelled test patches (kaggle layout).", 0)
    size: int = doc("Patch side in pixels.", 96)
    noise: float = doc("0 easy .. 1 hard.", 0.2)
    preset: str | None = doc(
        "A named difficulty instead of --noise: hard (fainter tumours, 4% wrong labels; the demo's).", None
    )
    num_classes: int = doc("Number of classes (folders / manifest).", 2)
    seed: int = doc("Random seed.", 0)


@dataclass(frozen=True)
class DownloadPcamSettings:
    """``histoscan download pcam``: PatchCamelyon with md5 checks."""

    dest: Path = doc("Folder to download into.", argument=True)
    splits: str = doc("Comma-separated splits.", "train,valid,test")
    meta: bool = doc("Also fetch the *_meta.csv files (slide of each patch).", True)
    base_url: str = doc("Mirror to download from.", PCAM_BASE_URL)

    def split_names(self) -> list[str]:
        """``splits`` as a list."""
        return self.splits.split(",")
