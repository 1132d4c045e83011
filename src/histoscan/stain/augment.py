"""Stain augmentation on float [0, 1] NCHW batches: perturb each patch's own fitted stain matrix and concentrations.

The augmentation presets training picks by name (``build_augmentation``) live here too: they combine the
geometric and colour ops of ``histoscan.data.transforms`` with the stain ops of this module, and data,
the lower layer, cannot import stain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from histoscan.data.transforms import (
    Augment,
    BatchOp,
    CentreSafeCrop,
    ColourJitter,
    HEDJitter,
    RandomApply,
    RandomDihedral,
)
from histoscan.enums import AUGMENT_PRESETS
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


AUGMENTATION_PRESETS = AUGMENT_PRESETS  # the vocabulary of histoscan.enums (the name callers import)


def build_augmentation(
    preset: str = "light",
    strength: float = 1.0,
    crop: int | None = None,
    keep: int | None = 32,
    stain_p: float = 1.0,
    matrix_noise: float | None = None,
    restain: bool = True,
) -> Augment:
    """An augmentation preset by name, scaled by ``strength``.

    - ``none``: nothing.
    - ``flips``: the 8 dihedral transforms.
    - ``light``: flips + brightness/contrast/saturation jitter.
    - ``strong``: light + H&E stain jitter, with stronger colour changes.
    - ``stain-light`` / ``stain-medium`` / ``stain-strong``: ``light`` (flips + brightness/contrast/
      saturation jitter) + HED jitter + perturbation of each patch's fitted stain matrix and
      concentrations, at the named strength (``histoscan.stain.augment.STAIN_STRENGTHS``), all scaled
      by ``strength``. They build on ``light`` so that choosing a stain preset adds stain
      robustness without dropping the default's robustness to brightness and contrast. ``stain_p``
      is the fraction of patches the two stain ops re-stain (together); the rest keep their colours.
      ``matrix_noise`` replaces the preset's stain-vector noise (sd, before ``strength``): on HCD that
      noise alone buys the robustness to hue shifts and costs the clean AUROC (benchmarks/stain_ablation.py).
      ``restain=False`` builds a stain preset without its stain ops: its base, ``light``.

    ``crop`` adds a centre-safe random crop to that size (before any resize) that keeps the
    centre ``keep`` px (the label's extent; None: the whole image) in view.
    """
    if preset not in AUGMENTATION_PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {list(AUGMENTATION_PRESETS)}")
    if not 0 < stain_p <= 1:
        raise ValueError(f"stain_p must be in (0, 1], got {stain_p}")
    if matrix_noise is not None and matrix_noise < 0:
        raise ValueError(f"matrix_noise cannot be negative, got {matrix_noise}")
    ops: list[BatchOp] = []
    if crop:
        ops.append(CentreSafeCrop(crop, keep))
    if preset in ("flips", "light", "strong") or preset.startswith("stain-"):
        ops.append(RandomDihedral())
    if preset == "light" or preset.startswith("stain-"):
        ops.append(ColourJitter(0.15 * strength, 0.15 * strength, 0.15 * strength))
    if preset == "strong":
        ops.append(ColourJitter(0.25 * strength, 0.25 * strength, 0.25 * strength))
        ops.append(HEDJitter(0.05 * strength, 0.05 * strength))
    if restain:
        ops += build_restain(preset, strength, stain_p, matrix_noise).ops
    return Augment(ops, preset)


def build_restain(
    preset: str, strength: float = 1.0, stain_p: float = 1.0, matrix_noise: float | None = None
) -> Augment:
    """The stain ops of a stain preset, without its base augmentation.

    The stain ops of a ``stain-*`` preset alone (HED jitter, then stain-matrix perturbation), as
    ``build_augmentation`` appends them after the preset's base; empty for any other preset.

    Training with a stain-consistency term applies them to a copy of the base-augmented batch.
    """
    if not preset.startswith("stain-"):
        return Augment([], "none")
    s = STAIN_STRENGTHS[preset.removeprefix("stain-")]
    stain_ops: list[BatchOp] = [
        HEDJitter(s.hed_scale * strength, s.hed_shift * strength),
        StainMatrixJitter((s.matrix if matrix_noise is None else matrix_noise) * strength, s.concentration * strength),
    ]
    return Augment(stain_ops if stain_p >= 1 else [RandomApply(Augment(stain_ops, "stain"), stain_p)], "stain")
