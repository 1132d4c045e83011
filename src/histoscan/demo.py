"""The embedded default job: synthetic patches in the Kaggle layout, ingested and split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoscan.data.ingest import ingest
from histoscan.data.splits import split_store
from histoscan.data.store import PatchStore
from histoscan.data.synthetic import write_synthetic


@dataclass
class DemoResult:
    """Where each output of the demo is."""

    source: Path
    store: Path
    split_file: Path
    report: dict[str, Any]
    split_sizes: dict[str, int] = field(default_factory=dict)


def run_demo(workdir: str | Path = "histoscan-demo", *, n: int = 600, test: int = 100, seed: int = 0,
             force: bool = True) -> DemoResult:
    """Generate synthetic Kaggle-layout patches, ingest them into a store and split it."""
    root = Path(workdir)
    source = write_synthetic(root / "source", "kaggle", n, seed=seed, test=test)
    result = ingest(source, root / "store", force=force)
    store = PatchStore(result.store)
    parts, split_file = split_store(store, seed=seed)
    return DemoResult(source, result.store, split_file, result.report, {k: len(v) for k, v in parts.items()})
