"""Options of ``histoscan demo``.

Options of ``histoscan demo`` (kept apart from ``histoscan.demo``, which imports the whole flow, so that
``histoscan demo --help`` stays quick).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histoscan.options import doc


@dataclass(frozen=True)
class DemoSettings:
    """``histoscan demo``: the whole job on embedded synthetic data."""

    workdir: Path = doc("Folder for the demo's outputs (its contents are replaced).", Path("histoscan-demo"))
    n: int = doc("Synthetic labelled patches to generate.", 600)
    epochs: int = doc("Training epochs.", 6)
    seed: int = doc("Random seed.", 0)
