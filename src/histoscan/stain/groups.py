"""Per-group stain: one source estimate per group (patient, slide), pooled from a sample of its patches.

A model trained with granularity ``group`` maps every patch of a group with the one transform
estimated from that group's tissue. The estimate is a function of the group's patches alone
(an evenly spaced sample of at most ``GROUP_SAMPLE`` of them, in store order, with no random
draw), so training, evaluation, prediction and explanation of the same store compute the same
estimate for the same group. A group with too little usable tissue gets an estimate that is not
``ok``: its patches pass through unchanged and the group is counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from histoscan.data.store import PatchStore
from histoscan.errors import DataError
from histoscan.stain.estimate import Estimate

Tensor = torch.Tensor

#: patches per group its stain is estimated from (pooled sampled pixels: up to 64 x 1024 per group)
GROUP_SAMPLE = 64


def stain_group_names(store: PatchStore) -> np.ndarray:
    """Each patch's stain group name: ``<store path>#<group>`` (patient / slide), or the store's path without groups.

    The store's path keeps patient "7" of one store apart from patient "7" of another.
    """
    root = str(Path(store.path).resolve())
    if store.groups is None:
        return np.full(len(store), root)
    return np.char.add(root + "#", store.groups.astype(str))


def sample_positions(positions: np.ndarray, n: int = GROUP_SAMPLE) -> np.ndarray:
    """At most ``n`` of a group's ``positions``, evenly spaced through them (deterministic, in order)."""
    if len(positions) <= n:
        return positions
    return positions[np.linspace(0, len(positions) - 1, n).round().astype(np.int64)]


def stack_estimates(parts: Sequence[Estimate]) -> Estimate:
    """Concatenate estimates (of one kind) row-wise."""
    kind = type(parts[0])
    return kind(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(kind)))


def select_rows(est: Estimate, rows: Tensor) -> Estimate:
    """The estimate's rows ``rows`` (one per patch), on the rows' device."""
    return type(est)(*(getattr(est, f.name).to(rows.device)[rows] for f in fields(est)))


class GroupStains:
    """The stain estimate of every group seen so far, by group name; looked up one row per patch."""

    def __init__(self) -> None:
        self.keys: dict[str, int] = {}
        self._parts: list[Estimate] = []
        self._table: Estimate | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return str(key) in self.keys

    def add(self, key: str, estimate: Estimate) -> None:
        """Keep ``estimate`` (one row) for group ``key`` (replacing an earlier one)."""
        key = str(key)
        if key in self.keys:
            self._parts[self.keys[key]] = estimate
        else:
            self.keys[key] = len(self._parts)
            self._parts.append(estimate)
        self._table = None

    @property
    def table(self) -> Estimate:
        """Every group's estimate, one row per group in ``keys`` order."""
        if self._table is None:
            self._table = stack_estimates(self._parts)
        return self._table

    def passed_through(self, only: set[str] | None = None) -> list[str]:
        """Groups (of ``only``) whose estimate is unusable (too little tissue, no stain): their patches pass through."""
        if not self.keys:
            return []
        ok = self.table.ok
        return [k for k, i in self.keys.items() if not bool(ok[i]) and (only is None or k in only)]

    def counts(self, only: set[str] | None = None) -> dict[str, int]:
        """Groups (of ``only``) estimated and how many of them passed through unchanged."""
        n = len(self) if only is None else len(only & set(self.keys))
        return {"groups": n, "groups_passed_through": len(self.passed_through(only))}

    def for_patches(self, groups: Sequence[object] | np.ndarray, device: torch.device) -> Estimate:
        """One row per patch: the estimate of each patch's group; DataError naming a group never estimated."""
        names = [str(g) for g in groups]
        missing = sorted({g for g in names if g not in self.keys})
        if missing:
            raise DataError(f"stain group {missing[0]!r} has no stain estimate (estimate its group before predicting)")
        rows = torch.tensor([self.keys[g] for g in names], dtype=torch.long, device=device)
        return select_rows(self.table, rows)


def estimate_groups(
    stains: GroupStains,
    groups: np.ndarray,
    read: Callable[[np.ndarray], np.ndarray],
    estimate: Callable[[Tensor], Estimate],
    only: set[str] | None = None,
) -> None:
    """Estimate each group of ``groups`` (one name per position) not yet in ``stains`` from a sample of its patches.

    ``read(positions)`` returns the uint8 NHWC patches at sorted positions; ``estimate`` pools them
    into one estimate (``StainNormaliser.estimate_pooled``). ``only`` limits the groups estimated.
    """
    names = groups.astype(str)
    keys, inverse = np.unique(names, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(keys) + 1))
    for j, key in enumerate(keys):
        if key in stains or (only is not None and key not in only):
            continue
        positions = sample_positions(order[bounds[j] : bounds[j + 1]])
        stains.add(key, estimate(torch.from_numpy(np.ascontiguousarray(read(positions)))))
