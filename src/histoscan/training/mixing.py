"""Mixup and CutMix at patch level, aware of where the label lives in the patch.

timm's ``Mixup`` mixes one-hot targets by the pasted box's share of the whole image; on Kaggle / PCam
patches the label is about the centre 32x32 only, so a box pasted in the margin changes the image but
not its label. Here the CutMix weight is the share of the *labelled region* each patch contributes
(the whole image where the label describes the whole image), which timm cannot express; hence this
small module. The loss is linear in the target, so a mixed batch is scored as
``lam * loss(logits, y) + (1 - lam) * loss(logits, y[perm])`` with the model's own loss (label
smoothing and class weights included).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MixedBatch:
    """A batch after mixing: the images, each row's partner (``perm``) and the weight of each row's own label."""

    x: torch.Tensor
    perm: torch.Tensor
    lam: float  # the weight of each row's own label (1 - lam goes to y[perm]); one value for the batch


def label_region(side: int, label_size: int | None, source_side: int) -> int:
    """Side in network-input pixels of the labelled centre: ``label_size`` scaled from ``source_side`` to ``side``.

    ``label_size`` None (the label is about the whole image) gives the whole input.
    """
    if label_size is None:
        return side
    return max(1, min(side, round(label_size * side / source_side)))


def mix_batch(x: torch.Tensor, mixup: float, cutmix: float, keep: int, rng: np.random.Generator) -> MixedBatch | None:
    """Mix a batch of network inputs (N, C, H, W) with a shuffled copy of itself, or return None (no mixing).

    ``mixup`` / ``cutmix``: the Beta(alpha, alpha) parameters (0: off); with both on, each batch uses one of
    the two at random. ``keep``: side of the labelled centre region in input pixels (``label_region``):
    CutMix's label weight is the share of that region left to each row's own image.
    """
    n, _, h, w = x.shape
    modes = [m for m, a in (("mixup", mixup), ("cutmix", cutmix)) if a > 0]
    if not modes or n < 2:
        return None
    mode = modes[int(rng.integers(len(modes)))]
    perm = torch.from_numpy(rng.permutation(n)).to(x.device)
    if mode == "mixup":
        lam = float(rng.beta(mixup, mixup))
        return MixedBatch(x * lam + x[perm] * (1 - lam), perm, lam)
    # CutMix: one box for the batch, of area (1 - lam0) of the image, at a uniform centre, clipped to the image
    lam0 = float(rng.beta(cutmix, cutmix))
    bh, bw = round(h * np.sqrt(1 - lam0)), round(w * np.sqrt(1 - lam0))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(0, cy - bh // 2), min(h, cy + bh - bh // 2)
    x0, x1 = max(0, cx - bw // 2), min(w, cx + bw - bw // 2)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    # the labelled centre region, and how much of it the box covers
    ky0, kx0 = (h - keep) // 2, (w - keep) // 2
    iy = max(0, min(y1, ky0 + keep) - max(y0, ky0))
    ix = max(0, min(x1, kx0 + keep) - max(x0, kx0))
    lam = 1.0 - (iy * ix) / float(keep * keep)
    return MixedBatch(out, perm, lam)
