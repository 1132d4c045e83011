"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def shared_or_exit(name: str) -> Path:
    """A folder of ../shared/data, or exit saying it is absent."""
    path = SHARED / name
    if not path.exists():
        sys.exit(f"benchmark needs {path} (the real data folder); it is absent")
    return path


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux)."""
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")
