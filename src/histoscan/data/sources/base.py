"""What every source reader gives: a cheap listing of entries, then decoded samples."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from histoscan.data.imageio import DecodedImage, read_image

BINARY_CLASSES = ["normal", "tumor"]


class Sample(NamedTuple):
    """One patch as every consumer sees it, whatever layout it came from."""

    id: str
    image: np.ndarray  # uint8 HxWx3 RGB
    label: int | None
    group: str | None


@dataclass(frozen=True)
class Entry:
    """One patch before decoding: where it is and what is known about it."""

    id: str
    ref: str  # file path, or "<file>#<row>" for array sources
    label: int | None
    group: str | None = None
    source_split: str | None = None


@dataclass
class Listing:
    """The result of scanning a source: entries plus the problems found on the way."""

    entries: list[Entry]
    class_names: list[str]
    duplicate_ids: list[str] = field(default_factory=list)
    labels_without_image: list[str] = field(default_factory=list)
    images_without_label: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        """Whether any entry has a label."""
        return any(e.label is not None for e in self.entries)


class Source:
    """Base class of the source readers.

    Subclasses implement ``scan`` (cheap: list files, read label tables) and,
    for sources whose entries are not image files, ``load``.
    """

    layout: str = "unknown"
    #: True when each entry is an image file that worker processes can decode independently.
    decodes_files: bool = True
    #: The patch side (px) at which the layout's ``label_size`` and ``mpp`` hold; None when it declares neither.
    native_size: int | None = None
    #: Side (px, at ``native_size``) of the centred square a label describes; None: the label is about the whole image.
    label_size: int | None = None
    #: Micrometres per pixel at ``native_size``; None when the layout does not say.
    mpp: float | None = None

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._listing: Listing | None = None

    def scan(self) -> Listing:  # pragma: no cover - abstract
        """List the source's entries (id, where to read it, label, group) without decoding them."""
        raise NotImplementedError

    @property
    def listing(self) -> Listing:
        """The scan, done once."""
        if self._listing is None:
            self._listing = self.scan()
        return self._listing

    def load(self, entry: Entry) -> DecodedImage:
        """Decode one entry (an image file by default)."""
        return read_image(entry.ref)

    def load_block(self, entries: list[Entry]) -> list[DecodedImage]:
        """Decode several entries; array sources override this to read slices."""
        return [self.load(e) for e in entries]

    def __iter__(self) -> Iterator[Sample]:
        """Yield decoded samples; unreadable files raise ImageReadError naming the file."""
        for entry in self.listing.entries:
            img = self.load(entry)
            yield Sample(entry.id, img.pixels, entry.label, entry.group)

    def __len__(self) -> int:
        return len(self.listing.entries)

    def close(self) -> None:
        """Release temporary files (decompressed archives)."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """The source in words, for messages."""
        return f"{self.layout} at {self.root}"


def natural_key(text: str) -> list[object]:
    """Sort key that puts "2" before "10"."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def unique_ids(paths: list[Path], root: Path) -> list[str]:
    """File stems when they are unique, else paths relative to root without suffix."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [str(p.relative_to(root).with_suffix("")).replace("\\", "/") for p in paths]
