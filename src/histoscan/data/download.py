"""Download PatchCamelyon from Zenodo with md5 checks (resumable file by file)."""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from histoscan.errors import DataError

PCAM_BASE_URL = "https://zenodo.org/records/2546921/files/"


@dataclass(frozen=True)
class RemoteFile:
    """A file of a published dataset with its md5."""

    name: str
    md5: str
    split: str


# md5 sums as published with the dataset (github.com/basveeling/pcam README).
PCAM_FILES = (
    RemoteFile("camelyonpatch_level_2_split_train_x.h5.gz", "1571f514728f59376b705fc836ff4b63", "train"),
    RemoteFile("camelyonpatch_level_2_split_train_y.h5.gz", "35c2d7259d906cfc8143347bb8e05be7", "train"),
    RemoteFile("camelyonpatch_level_2_split_valid_x.h5.gz", "d8c2d60d490dbd479f8199bdfa0cf6ec", "valid"),
    RemoteFile("camelyonpatch_level_2_split_valid_y.h5.gz", "60a7035772fbdb7f34eb86d4420cf66a", "valid"),
    RemoteFile("camelyonpatch_level_2_split_test_x.h5.gz", "d5b63470df7cfa627aeec8b9dc0c066e", "test"),
    RemoteFile("camelyonpatch_level_2_split_test_y.h5.gz", "2b85f58b927af9964a4c15b8f7e8f179", "test"),
    RemoteFile("camelyonpatch_level_2_split_train_meta.csv", "5a3dd671e465cfd74b5b822125e65b0a", "train"),
    RemoteFile("camelyonpatch_level_2_split_valid_meta.csv", "3455fd69135b66734e1008f3af684566", "valid"),
    RemoteFile("camelyonpatch_level_2_split_test_meta.csv", "67589e00a4a37ec317f2d1932c7502ca", "test"),
)

ProgressFactory = Callable[[str, int | None], Callable[[int], None]]


def md5sum(path: Path, chunk: int = 1 << 22) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: Path, md5: str, progress: ProgressFactory | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` via a ``.part`` file; keep it only when its md5 matches."""
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, part.open("wb") as out:
            total = resp.headers.get("Content-Length")
            tick = progress(dest.name, int(total) if total else None) if progress else None
            while block := resp.read(1 << 20):
                out.write(block)
                if tick:
                    tick(len(block))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        part.unlink(missing_ok=True)
        raise DataError(f"{url}: download failed ({exc})") from exc
    got = md5sum(part)
    if got != md5:
        part.unlink(missing_ok=True)
        raise DataError(f"{url}: md5 mismatch (expected {md5}, got {got}); the partial file was removed")
    shutil.move(part, dest)
    return dest


def download_pcam(
    dest: str | Path,
    *,
    splits: Iterable[str] = ("train", "valid", "test"),
    meta: bool = True,
    base_url: str = PCAM_BASE_URL,
    files: Iterable[RemoteFile] = PCAM_FILES,
    progress: ProgressFactory | None = None,
) -> list[Path]:
    """Download the PCam files for ``splits`` into ``dest``; files already present with the right md5 are kept.

    The folder then ingests as the ``pcam`` layout (gzipped files are read as they are).
    """
    wanted = set(splits)
    unknown = wanted - {"train", "valid", "test"}
    if unknown:
        raise DataError(f"unknown PCam split(s) {sorted(unknown)}; choose from train, valid, test")
    out_dir = Path(dest)
    out_dir.mkdir(parents=True, exist_ok=True)
    done: list[Path] = []
    for f in files:
        if f.split not in wanted or (f.name.endswith(".csv") and not meta):
            continue
        target = out_dir / f.name
        if target.exists() and md5sum(target) == f.md5:
            done.append(target)
            continue
        url = base_url.rstrip("/") + "/" + f.name + ("?download=1" if "zenodo.org" in base_url else "")
        done.append(fetch(url, target, f.md5, progress))
    return done
