"""What made a slide's result: a fingerprint of the model's files and of the settings that change results.

A scan records its identity in ``summary.json`` (and ``slides.csv``); a later scan into the same folder
reuses a slide's outputs only when the identity is the same, and recomputes them otherwise.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from histoscan.runfolder import MODEL_FILE, ONNX_FILE, WEIGHTS_FILE

_CHUNK = 1 << 20
_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: a file is hashed once per process


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (cached per path, size and modification time)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with p.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def model_files(run_dir: str | Path, member_dirs: Iterable[str | Path] = ()) -> list[Path]:
    """The files that decide a model's outputs: model.json and its weights (torch and ONNX), members' too."""
    dirs = [Path(run_dir), *(Path(d) for d in member_dirs)]
    return [d / f for d in dirs for f in (MODEL_FILE, WEIGHTS_FILE, ONNX_FILE) if (d / f).is_file()]


def model_fingerprint(run_dir: str | Path, member_dirs: Iterable[str | Path] = ()) -> str:
    """16 hex digits over the model's files (names and contents); "unknown" when it has none on disk."""
    files = model_files(run_dir, member_dirs)
    if not files:
        return "unknown"
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.parent.name}/{f.name}:{file_digest(f)}\n".encode())
    return h.hexdigest()[:16]


def identity_key(identity: Mapping[str, Any]) -> str:
    """16 hex digits over an identity dict (canonical JSON)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
