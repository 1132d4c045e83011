"""Stain normalisation of uint8 NHWC batches (Reinhard, Macenko), batched in torch on the batch's device.

A ``StainTarget`` is what ``model.json``'s ``preprocessing.stain`` holds: the method, the
granularity (``patch`` or ``group``) and the fitted target. ``StainNormaliser`` applies it; a patch whose own estimate is
unusable (blank, background, very dark, pen-marked, single colour) passes through unchanged and is
counted in ``passed_through``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from histoscan.enums import STAIN_METHODS, StainGranularity, StainMethod, values
from histoscan.errors import ConfigError, DataError
from histoscan.stain.colour import apply_od_matrix, lab_to_rgb, optical_density, rgb_to_lab, to_uint8
from histoscan.stain.estimate import Estimate, LabStats, MacenkoEstimate, lab_stats, macenko, sample_pixels

Tensor = torch.Tensor
Method = StainMethod
Granularity = StainGranularity
METHODS: tuple[str, ...] = STAIN_METHODS
GRANULARITIES: tuple[str, ...] = values(StainGranularity)
#: fewest usable patches a target is fitted from
MIN_TARGET_PATCHES = 8


@dataclass
class StainTarget:
    """A fitted normalisation target (``model.json`` ``preprocessing.stain``).

    Attributes:
        method: ``reinhard`` (L*a*b* mean / std) or ``macenko`` (stain vectors and concentrations).
        granularity: ``patch``: each patch's own stain is estimated and mapped to the target; ``group``:
            each group's (patient, slide) stain is estimated once from a sample of its patches and every
            patch of the group is mapped with that one transform (``histoscan.stain.groups``).
        stain_matrix: Macenko: haematoxylin and eosin optical-density vectors (2 x 3, unit rows).
        max_concentrations: Macenko: the robust maximum concentration of each stain.
        lab_mean: Reinhard: target L*a*b* mean of tissue pixels.
        lab_std: Reinhard: target L*a*b* standard deviation of tissue pixels.
        fitted_from: what the target was fitted from (a store path or "images").
        patches: usable patches the target was fitted from.
    """

    method: Method
    granularity: Granularity = "patch"
    stain_matrix: list[list[float]] | None = None
    max_concentrations: list[float] | None = None
    lab_mean: list[float] | None = None
    lab_std: list[float] | None = None
    fitted_from: str = "images"
    patches: int = 0

    def __post_init__(self) -> None:
        check_method(self.method)
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"stain granularity {self.granularity!r} is not one of {list(GRANULARITIES)}")
        need = ("stain_matrix", "max_concentrations") if self.method == "macenko" else ("lab_mean", "lab_std")
        missing = [n for n in need if getattr(self, n) is None]
        if missing:
            raise ConfigError(f"stain target ({self.method}) lacks {', '.join(missing)}")

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessing.stain`` entry (fields of the other method left out)."""
        d = asdict(self)
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StainTarget:
        """Read a ``preprocessing.stain`` entry or a target.json."""
        if not isinstance(d, dict) or "method" not in d:
            raise ConfigError("a stain target must be a mapping with a 'method'")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def check_method(method: str, where: str = "") -> str:
    """``method`` itself when it is a known normalisation method; ConfigError (naming ``where``) otherwise."""
    if method not in METHODS:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}unknown stain normalisation method {method!r}; choose one of {list(METHODS)}")
    return method


def fit_target(images: np.ndarray | Tensor, method: str, source: str = "images", batch_size: int = 512) -> StainTarget:
    """Fit a target from reference images (uint8 N x H x W x 3): the median of the usable patches' estimates.

    Raises DataError naming ``source`` when fewer than ``MIN_TARGET_PATCHES`` patches hold enough tissue.
    """
    check_method(method, source)
    mats, maxcs, means, stds = [], [], [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        t = torch.as_tensor(np.ascontiguousarray(chunk)) if isinstance(chunk, np.ndarray) else chunk
        px = sample_pixels(t)
        if method == "macenko":
            est = macenko(optical_density(px))
            mats.append(est.stain_matrix[est.ok])
            maxcs.append(est.max_concentrations[est.ok])
        else:
            st = lab_stats(px.float())
            means.append(st.mean[st.ok])
            stds.append(st.std[st.ok])
    usable = int(sum(len(m) for m in (mats if method == "macenko" else means)))
    if usable < MIN_TARGET_PATCHES:
        raise DataError(
            f"{source}: only {usable} of {len(images)} patches hold enough tissue to fit a {method} stain target "
            f"(need {MIN_TARGET_PATCHES})"
        )
    if method == "macenko":
        he = torch.cat(mats).median(dim=0).values
        he = he / he.norm(dim=-1, keepdim=True)
        maxc = torch.cat(maxcs).median(dim=0).values
        return StainTarget(
            "macenko",
            stain_matrix=_rounded(he),
            max_concentrations=[round(float(v), 6) for v in maxc],
            fitted_from=source,
            patches=usable,
        )
    mean, std = torch.cat(means).median(dim=0).values, torch.cat(stds).median(dim=0).values
    return StainTarget(
        "reinhard",
        lab_mean=[round(float(v), 6) for v in mean],
        lab_std=[round(float(v), 6) for v in std],
        fitted_from=source,
        patches=usable,
    )


def _rounded(m: Tensor) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in m]


class StainNormaliser:
    """Applies a ``StainTarget`` to uint8 NHWC batches; counts the patches it passes through unchanged.

    Each patch is mapped from a source estimate of its stain: its own (``estimate``, the default)
    or one shared by its group (``estimate_pooled`` over a sample of the group's patches, handed
    to ``__call__`` one row per patch).
    """

    def __init__(self, target: StainTarget) -> None:
        self.target = target
        self.seen = 0
        self.passed_through = 0

    def reset_counts(self) -> None:
        """Start counting afresh."""
        self.seen = self.passed_through = 0

    def counts(self) -> dict[str, int]:
        """Patches normalised so far and how many of them passed through unchanged."""
        return {"patches": self.seen, "passed_through": self.passed_through}

    def estimate(self, batch: Tensor) -> Estimate:
        """Each patch's own source estimate (one row per patch of the uint8 NHWC ``batch``)."""
        px = sample_pixels(batch)
        return macenko(optical_density(px)) if self.target.method == "macenko" else lab_stats(px.float())

    def estimate_pooled(self, images: Tensor) -> Estimate:
        """One source estimate (one row) from the sampled pixels of all ``images`` pooled: a group's stain."""
        px = sample_pixels(images).reshape(1, -1, 3)
        return macenko(optical_density(px)) if self.target.method == "macenko" else lab_stats(px.float())

    def __call__(self, batch: Tensor, estimate: Estimate | None = None) -> Tensor:
        """uint8 N x H x W x 3 -> uint8 N x H x W x 3 on the same device.

        ``estimate``: the source stain of each patch (N rows; a group's estimate repeated for its
        patches); None estimates each patch's own.
        """
        if batch.shape[0] == 0:
            return batch
        est = self.estimate(batch) if estimate is None else estimate
        if est.ok.shape[0] != batch.shape[0]:
            raise ValueError(f"{est.ok.shape[0]} stain estimates for {batch.shape[0]} patches")
        if isinstance(est, MacenkoEstimate):
            out, ok = self._macenko(batch, est)
        else:
            out, ok = self._reinhard(batch, est)
        self.seen += int(batch.shape[0])
        kept = ~ok
        self.passed_through += int(kept.sum())
        if bool(kept.any()):
            out[kept] = batch[kept]
        return out

    def _macenko(self, batch: Tensor, est: MacenkoEstimate) -> tuple[Tensor, Tensor]:
        dev = batch.device
        ref_he = torch.tensor(self.target.stain_matrix, device=dev)
        ref_max = torch.tensor(self.target.max_concentrations, device=dev)
        scale = torch.where(est.ok.view(-1, 1), ref_max / est.max_concentrations.clamp(min=1e-6), 1.0)
        # od -> concentrations -> rescaled -> target od is linear: one 3 x 3 matrix per patch
        matrix = torch.linalg.pinv(est.stain_matrix) @ (scale.unsqueeze(-1) * ref_he)
        ok = est.ok & torch.isfinite(matrix).flatten(1).all(dim=1)
        matrix = torch.where(ok.view(-1, 1, 1), matrix, torch.eye(3, device=dev))
        # the patch's matrix is finite (or the identity): no NaN reaches the conversion
        return apply_od_matrix(batch, matrix), ok

    def _reinhard(self, batch: Tensor, st: LabStats) -> tuple[Tensor, Tensor]:
        n, h, w, _ = batch.shape
        dev = batch.device
        ref_mean = torch.tensor(self.target.lab_mean, device=dev)
        ref_std = torch.tensor(self.target.lab_std, device=dev)
        lab = rgb_to_lab(batch.reshape(n, h * w, 3))
        scale = torch.where(st.ok.view(-1, 1), ref_std / st.std.clamp(min=1e-3), 1.0).unsqueeze(1)
        out = lab_to_rgb((lab - st.mean.unsqueeze(1)) * scale + ref_mean)
        return to_uint8(out).view(n, h, w, 3), st.ok
