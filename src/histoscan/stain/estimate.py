"""Per-patch stain estimates, batched: Macenko stain vectors and concentrations, Reinhard L*a*b* statistics.

Every estimate comes with ``ok``, one flag per patch: False where the patch has too little tissue
(blank, background), too little colour variation (single colour), degenerate or non-physical stain
vectors (pen marks, very dark patches) or any non-finite value. Callers pass such patches through
unchanged and count them; nothing here raises on image content.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from histoscan.stain.colour import optical_density, rgb_to_lab
from histoscan.thresholds import MIN_TISSUE_FRACTION, OD_BACKGROUND, OD_DARK  # which pixels are tissue

Tensor = torch.Tensor

#: percentile of the stain-vector angles / concentrations taken as the robust extreme (Macenko: 1 and 99)
ALPHA = 1.0
#: pixels sampled per patch for estimation (a regular sub-grid; application uses every pixel)
MAX_SAMPLE_PIXELS = 1024


@dataclass
class MacenkoEstimate:
    """Stain matrix (N x 2 x 3, rows H then E, unit length), robust maximum concentrations (N x 2), validity (N)."""

    stain_matrix: Tensor
    max_concentrations: Tensor
    ok: Tensor


@dataclass
class LabStats:
    """Per-patch L*a*b* mean and std over tissue pixels (N x 3 each) and validity (N)."""

    mean: Tensor
    std: Tensor
    ok: Tensor


#: a source stain estimate: one row per patch (or per group)
Estimate = MacenkoEstimate | LabStats


def sample_pixels(batch: Tensor, max_pixels: int = MAX_SAMPLE_PIXELS) -> Tensor:
    """N x H x W x 3 -> N x P x 3 on a regular sub-grid of at most about ``max_pixels`` pixels per patch."""
    n, h, w, _ = batch.shape
    step = 1
    while (h // step) * (w // step) > max_pixels:
        step += 1
    return batch[:, ::step, ::step].reshape(n, -1, 3)


def tissue_mask(od: Tensor) -> Tensor:
    """N x P boolean: pixels above background in every channel and not too dark to measure."""
    lowest = od.amin(dim=-1)  # above background in every channel <=> the lowest channel is
    return (lowest > OD_BACKGROUND) & (lowest < OD_DARK)


def masked_quantile(values: Tensor, mask: Tensor, qs: tuple[float, ...]) -> list[Tensor]:
    """Per-row quantiles (lower) ``qs`` of ``values`` (N x P [x K]) over ``mask`` (N x P).

    The q-th quantile of m values is the ``floor((m - 1) q)``-th smallest; for the extreme quantiles
    Macenko uses (1st, 99th) that is one of the few smallest or largest, so ``topk`` of that many
    replaces a full sort (about 5x faster on CPU, same result).
    """
    big = torch.finfo(values.dtype).max
    v = (values.unsqueeze(-1) if values.dim() == 2 else values).transpose(1, 2)  # N x K x P
    m = mask.unsqueeze(1)
    last = mask.sum(dim=1).clamp(min=1) - 1
    out = []
    for q in qs:
        rank = (last.double() * q).floor().long()  # from the bottom
        low = q <= 0.5
        if not low:
            rank = last - rank  # from the top
        k = min(int(rank.max()) + 1, v.shape[-1])
        filled = torch.where(m, v, torch.full_like(v, big if low else -big))
        top = filled.topk(k, dim=-1, largest=not low, sorted=True).values  # N x K x k
        got = top.gather(-1, rank.view(-1, 1, 1).expand(-1, v.shape[1], 1)).squeeze(-1)
        out.append(got if values.dim() == 3 else got.squeeze(-1))
    return out


def _enough(mask: Tensor) -> Tensor:
    need = max(16, int(MIN_TISSUE_FRACTION * mask.shape[1]))
    return mask.sum(dim=1) >= need


def macenko(od: Tensor, mask: Tensor | None = None) -> MacenkoEstimate:
    """Macenko et al. (2009) stain vectors from optical density pixels ``od`` (N x P x 3), batched.

    The plane of the two largest principal directions of the tissue pixels' optical density,
    the robust extreme angles in it (``ALPHA`` percentiles) as the two stain vectors, haematoxylin
    first (the larger red optical density), and the 99th-percentile concentration of each.
    """
    od = od.float()
    mask = tissue_mask(od) if mask is None else mask
    enough = _enough(mask)
    w = mask.unsqueeze(-1).float()
    count = w.sum(dim=1).clamp(min=2.0)
    mean = (od * w).sum(dim=1, keepdim=True) / count.unsqueeze(1)
    centred = (od - mean) * w
    cov = centred.transpose(1, 2) @ centred / (count.unsqueeze(-1) - 1)
    cov = torch.nan_to_num(cov) + torch.eye(3, device=od.device) * 1e-9
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    plane = evecs[:, :, 1:3]  # N x 3 x 2: the two largest directions
    plane = plane * torch.where(plane.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)  # point into positive OD
    proj = od @ plane  # N x P x 2
    phi = torch.atan2(proj[..., 1], proj[..., 0])
    lo, hi = masked_quantile(phi, mask, (ALPHA / 100, 1 - ALPHA / 100))
    v_lo = (plane @ torch.stack([lo.cos(), lo.sin()], dim=-1).unsqueeze(-1)).squeeze(-1)
    v_hi = (plane @ torch.stack([hi.cos(), hi.sin()], dim=-1).unsqueeze(-1)).squeeze(-1)
    h_first = (v_lo[:, 0] > v_hi[:, 0]).view(-1, 1)
    he = torch.stack([torch.where(h_first, v_lo, v_hi), torch.where(h_first, v_hi, v_lo)], dim=1)
    he = he / he.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    conc = concentrations(od, he)
    (max_c,) = masked_quantile(conc, mask, (1 - ALPHA / 100,))
    cosine = (he[:, 0] * he[:, 1]).sum(-1)
    ok = (
        enough
        & (evals[:, 1] > 1e-5)  # a second direction of variation: not a single colour
        & (he.min(dim=-1).values.min(dim=-1).values > -0.2)  # physical: absorbing in (nearly) every channel
        & (cosine < 0.995)  # two distinct stains
        & (max_c > 1e-3).all(dim=-1)
        & torch.isfinite(he).all(dim=-1).all(dim=-1)
        & torch.isfinite(max_c).all(dim=-1)
    )
    return MacenkoEstimate(he, max_c, ok)


def concentrations(od: Tensor, stain_matrix: Tensor) -> Tensor:
    """Least-squares stain concentrations (N x P x 2) of ``od`` (N x P x 3) under ``stain_matrix`` (N x 2 x 3 or 2 x 3)."""
    pinv = torch.linalg.pinv(stain_matrix)  # (N x) 3 x 2
    return od @ pinv


def lab_stats(rgb: Tensor) -> LabStats:
    """Reinhard statistics: L*a*b* mean and std of the tissue pixels of ``rgb`` (N x P x 3, 0..255)."""
    lab = rgb_to_lab(rgb)
    mask = tissue_mask(optical_density(rgb))
    w = mask.unsqueeze(-1).float()
    count = w.sum(dim=1).clamp(min=2.0)
    mean = (lab * w).sum(dim=1) / count
    var = (((lab - mean.unsqueeze(1)) * w) ** 2).sum(dim=1) / (count - 1)
    std = var.sqrt()
    ok = (
        _enough(mask)
        & (std > 0.5).all(dim=-1)  # single-colour patches have no spread to rescale
        & torch.isfinite(mean).all(dim=-1)
        & torch.isfinite(std).all(dim=-1)
    )
    return LabStats(mean, std, ok)
