"""Options of ``histoscan models`` (the names ``--model`` accepts)."""

from __future__ import annotations

from dataclasses import dataclass

from histoscan.options import doc


@dataclass(frozen=True)
class ModelsSettings:
    """``histoscan models``: which model names to list."""

    timm: bool = doc("Also list every timm model name.", False, flags="--timm")
