"""A straightforward Macenko normaliser (full sorts, float64, NHWC matrix products) to check the fast one against.

It is the implementation histoscan shipped before the throughput work, kept here as the reference.
"""

from __future__ import annotations

import torch

from histoscan.stain.estimate import ALPHA, MIN_TISSUE_FRACTION, OD_BACKGROUND, OD_DARK, sample_pixels

Tensor = torch.Tensor


def _od(rgb: Tensor) -> Tensor:
    return -torch.log((rgb.double() + 1.0) / 256.0)


def _quantile(values: Tensor, mask: Tensor, q: float) -> Tensor:
    """Per-row lower quantile ``q`` of ``values`` (N x P [x K]) over ``mask``, by a full sort."""
    big = torch.finfo(values.dtype).max
    m = mask if values.dim() == 2 else mask.unsqueeze(-1)
    ordered = torch.where(m, values, torch.full_like(values, big)).sort(dim=1).values
    idx = ((mask.sum(dim=1).clamp(min=1) - 1).double() * q).floor().long()
    if values.dim() == 3:
        return ordered.gather(1, idx.view(-1, 1, 1).expand(-1, 1, values.shape[2])).squeeze(1)
    return ordered.gather(1, idx.view(-1, 1)).squeeze(1)


def reference_macenko(batch: Tensor, ref_he: Tensor, ref_max: Tensor) -> tuple[Tensor, Tensor]:
    """uint8 NHWC -> (uint8 NHWC normalised to the target, ok per patch); not-ok patches unchanged."""
    n, h, w, _ = batch.shape
    od = _od(sample_pixels(batch))
    lowest = od.amin(dim=-1)
    mask = (lowest > OD_BACKGROUND) & (lowest < OD_DARK)
    enough = mask.sum(dim=1) >= max(16, int(MIN_TISSUE_FRACTION * mask.shape[1]))
    wgt = mask.unsqueeze(-1).double()
    count = wgt.sum(dim=1).clamp(min=2.0)
    mean = (od * wgt).sum(dim=1, keepdim=True) / count.unsqueeze(1)
    centred = (od - mean) * wgt
    cov = centred.transpose(1, 2) @ centred / (count.unsqueeze(-1) - 1)
    evals, evecs = torch.linalg.eigh(torch.nan_to_num(cov) + torch.eye(3, dtype=cov.dtype) * 1e-9)
    plane = evecs[:, :, 1:3]
    plane = plane * torch.where(plane.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
    proj = od @ plane
    phi = torch.atan2(proj[..., 1], proj[..., 0])
    lo, hi = _quantile(phi, mask, ALPHA / 100), _quantile(phi, mask, 1 - ALPHA / 100)
    v_lo = (plane @ torch.stack([lo.cos(), lo.sin()], dim=-1).unsqueeze(-1)).squeeze(-1)
    v_hi = (plane @ torch.stack([hi.cos(), hi.sin()], dim=-1).unsqueeze(-1)).squeeze(-1)
    h_first = (v_lo[:, 0] > v_hi[:, 0]).view(-1, 1)
    he = torch.stack([torch.where(h_first, v_lo, v_hi), torch.where(h_first, v_hi, v_lo)], dim=1)
    he = he / he.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    conc = od @ torch.linalg.pinv(he)
    max_c = _quantile(conc, mask, 1 - ALPHA / 100)
    ok = (
        enough
        & (evals[:, 1] > 1e-5)
        & (he.min(dim=-1).values.min(dim=-1).values > -0.2)
        & ((he[:, 0] * he[:, 1]).sum(-1) < 0.995)
        & (max_c > 1e-3).all(dim=-1)
    )
    scale = ref_max.double() / max_c.clamp(min=1e-6)
    matrix = torch.linalg.pinv(he) @ (scale.unsqueeze(-1) * ref_he.double())
    full = _od(batch.reshape(n, h * w, 3)) @ matrix
    out = (torch.exp(-full) * 256.0 - 1.0).clamp(0.0, 255.0).round().to(torch.uint8).view(n, h, w, 3)
    return torch.where(ok.view(-1, 1, 1, 1), out, batch), ok
