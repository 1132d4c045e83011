"""Stain augmentation on float [0, 1] NCHW batches: perturb each patch's own fitted stain matrix and concentrations."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from histoscan.stain.colour import from_optical_density, optical_density
from histoscan.stain.estimate import macenko, sample_pixels

Tensor = torch.Tensor


@dataclass(frozen=True)
class StainStrength:
    """One named strength of the stain presets: HED jitter (Tellez et al. 2018) and stain-matrix perturbation.

    Attributes:
        hed_scale: HED jitter, each stain's optical density scaled by U(1 - s, 1 + s).
        hed_shift: HED jitter, each stain's optical density shifted by U(-s, s).
        matrix: standard deviation of the Gaussian noise added to each unit stain vector.
        concentration: each stain's concentrations scaled by U(1 - c, 1 + c).
    """

    hed_scale: float
    hed_shift: float
    matrix: float
    concentration: float


#: the named strengths of ``train --augment stain-<name>``
STAIN_STRENGTHS: dict[str, StainStrength] = {
    "light": StainStrength(hed_scale=0.03, hed_shift=0.03, matrix=0.03, concentration=0.10),
    "medium": StainStrength(hed_scale=0.05, hed_shift=0.05, matrix=0.06, concentration=0.20),
    "strong": StainStrength(hed_scale=0.10, hed_shift=0.10, matrix=0.10, concentration=0.35),
}


@dataclass
class StainMatrixJitter:
    """Re-stain each patch with a perturbed copy of its own Macenko stain matrix and rescaled concentrations.

    Only the part of each pixel's optical density that the two stains explain is changed: with the
    patch's stain matrix S (2 x 3) and concentrations C = OD S^+, the new density is
    OD + C (diag(alpha) S' - S), so the residual outside the H&E plane (about 7% of the density on
    HCD patches) is kept and zero strength is the identity. Re-composing from C alone would project
    every augmented patch onto the plane, a systematic look (about 5 grey levels a pixel on HCD) that
    clean patches never have. Patches without a usable estimate (background, single colour) are left
    as they are. Random numbers come from ``gen`` on the CPU, so the result is the same for a seed on
    any device.
    """

    matrix: float = 0.05
    concentration: float = 0.2

    def __call__(self, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """Perturb each patch's stain vectors and concentrations."""
        n, c, h, w = x.shape
        rgb = x.permute(0, 2, 3, 1).mul(255.0)
        est = macenko(optical_density(sample_pixels(rgb)))
        noise = (torch.randn(n, 2, 3, generator=gen) * self.matrix).to(x.device)
        alpha = (1 + (torch.rand(n, 2, generator=gen) * 2 - 1) * self.concentration).to(x.device)
        he_new = (est.stain_matrix + noise).clamp(min=0.0)
        he_new = he_new / he_new.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        delta = alpha.unsqueeze(-1) * he_new - est.stain_matrix
        matrix = torch.eye(3, device=x.device) + torch.linalg.pinv(est.stain_matrix) @ delta
        ok = est.ok & torch.isfinite(matrix).flatten(1).all(dim=1)
        matrix = torch.where(ok.view(-1, 1, 1), matrix, torch.eye(3, device=x.device))
        od = optical_density(rgb.reshape(n, h * w, 3))
        out = from_optical_density(torch.bmm(od, matrix)).div_(255.0)
        return out.view(n, h, w, c).permute(0, 3, 1, 2).contiguous()
