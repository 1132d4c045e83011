"""Batches straight from the packed store: one ``pread`` per batch, no per-image collate."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from histoscan.data.store import PatchStore


class StoreBatches(Dataset):
    """``dataset[positions]`` -> (uint8 NHWC images, int64 labels[, group names]) for a list of positions.

    With ``groups`` (one name per patch of the store) each batch also carries its patches' stain
    group names, for per-group stain normalisation.
    """

    def __init__(self, store: PatchStore, groups: np.ndarray | None = None) -> None:
        self.store = store
        self.labels = torch.from_numpy(store.labels)
        self.groups = groups

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, positions: list[int]) -> tuple[Any, ...]:
        idx = np.asarray(positions, dtype=np.int64)
        images, labels = torch.from_numpy(self.store.batch(idx)), self.labels[idx]
        return (images, labels) if self.groups is None else (images, labels, self.groups[idx])


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of positions, reshuffled per epoch from ``seed + epoch`` and sharded across DDP ranks.

    Deterministic by (seed, epoch), so a run resumed at an epoch sees the same batches as an
    uninterrupted one. ``weights`` draws with replacement (a class-balanced sampler).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        weights: np.ndarray | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.weights, self.rank, self.world_size = drop_last, weights, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of each epoch."""
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is not None:
            p = self.weights / self.weights.sum()
            return rng.choice(self.n, size=self.n, replace=True, p=p)
        return rng.permutation(self.n) if self.shuffle else np.arange(self.n)

    def _per_rank(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        per_rank = self._per_rank()
        if self.world_size > 1:  # pad by wrapping so every rank gets the same number of samples
            order = np.resize(order, per_rank * self.world_size)[self.rank :: self.world_size]
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        for start in range(0, stop, self.batch_size):
            yield order[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        per_rank = self._per_rank()
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)


def make_loader(
    store: PatchStore,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    num_workers: int,
    balanced: bool = False,
    rank: int = 0,
    world_size: int = 1,
    groups: np.ndarray | None = None,
) -> DataLoader:
    """A DataLoader whose items are whole batches read from the store (with their stain group names, ``groups``)."""
    weights = None
    if train and balanced:
        labels = store.labels
        counts = np.bincount(labels, minlength=labels.max() + 1).astype(np.float64)
        weights = 1.0 / counts[labels]
    sampler = EpochBatchSampler(
        len(store),
        batch_size,
        shuffle=train,
        seed=seed,
        drop_last=train and len(store) > batch_size,
        weights=weights,
        rank=rank,
        world_size=world_size,
    )
    return DataLoader(
        StoreBatches(store, groups),
        batch_size=None,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
