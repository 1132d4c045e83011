"""Near-duplicate groups by perceptual hash, so a split can keep each group on one side.

LC25000 was made by augmenting a few hundred originals (rotations, flips), so a random split puts
copies of one original in train and test. Each image gets a 64-bit pHash (ImageHash's: DCT of the 32x32
greyscale image, top-left 8x8 above its median); two images whose hashes differ in at most
``max_distance`` bits are linked, and the connected components of the links are the groups. pHash is
not invariant to rotation, so each image is hashed under the 8 flips and rotations and the smallest
distance over them counts (LC25000's augmentations are exactly those).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from histoscan.data.store import PatchStore
from histoscan.errors import DataError

MAX_DISTANCE = 10  # bits of 64: the pre-registered rule of benchmarks/PROTOCOL.md, section 6
_CHUNK = 512  # rows of the pairwise comparison at a time


@dataclass
class DuplicateGroups:
    """A group number per image, and what the grouping found."""

    groups: np.ndarray  # int64, one per image of the store
    max_distance: int

    @property
    def count(self) -> int:
        """Number of groups (singletons included)."""
        return len(np.unique(self.groups))

    @property
    def largest(self) -> int:
        """Size of the largest group."""
        return int(np.bincount(self.groups).max()) if len(self.groups) else 0

    @property
    def shared(self) -> int:
        """Images that share their group with at least one other image."""
        sizes = np.bincount(self.groups)
        return int(sizes[sizes > 1].sum())

    def line(self) -> str:
        """One line for the user: how near-duplicates were handled."""
        return (
            f"near-duplicates (pHash distance <= {self.max_distance} of 64 bits, any flip or rotation): "
            f"{len(self.groups)} images in {self.count} groups, {self.shared} images share a group, "
            f"largest group {self.largest}; each group is kept on one side of the split"
        )


def _dihedral_views(image: np.ndarray) -> list[np.ndarray]:
    views = []
    for flip in (False, True):
        im = image[:, ::-1] if flip else image
        views += [np.rot90(im, k) for k in range(4)]
    return views


def phashes(store: PatchStore, batch: int = 256) -> np.ndarray:
    """The 64-bit pHash of every image of ``store`` under its 8 flips / rotations: uint64 (n, 8)."""
    import imagehash  # the well-kept implementation (DCT pHash); imported here: only dedup needs it

    out = np.zeros((len(store), 8), dtype=np.uint64)
    for start in range(0, len(store), batch):
        images = store.batch(np.arange(start, min(start + batch, len(store))))
        for i, image in enumerate(images):
            for k, view in enumerate(_dihedral_views(image)):
                bits = imagehash.phash(Image.fromarray(np.ascontiguousarray(view))).hash.flatten()
                out[start + i, k] = np.packbits(bits).view(">u8")[0]
    return out


def near_duplicate_groups(store: PatchStore, max_distance: int = MAX_DISTANCE) -> DuplicateGroups:
    """Group the images of ``store`` whose pHashes (any flip / rotation) differ in at most ``max_distance`` bits.

    The comparison is all pairs (chunked: memory stays small, time grows with the square of the store;
    about a second for LC25000's 900 images).
    """
    if not 0 <= max_distance < 64:
        raise DataError(f"max_distance must be in 0..63 bits, got {max_distance}")
    hashes = phashes(store)
    n = len(hashes)
    base = hashes[:, 0]
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    for start in range(0, n, _CHUNK):
        block = hashes[start : start + _CHUNK]  # (b, 8): each image of the block under every view
        dist = np.bitwise_count(block[:, :, None] ^ base[None, None, :]).min(axis=1)  # (b, n)
        r, c = np.nonzero(dist <= max_distance)
        rows.append(r + start)
        cols.append(c)
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return DuplicateGroups(labels.astype(np.int64), max_distance)
