"""Batch transforms on float NCHW image tensors, run on whatever device the batch lives on.

Every augmentation here keeps the labelled centre of a patch in view: the
dihedral group rotates and flips about the centre, colour and stain jitter
move no pixel, and ``CentreSafeCrop`` only shifts by as much as leaves the
centre ``keep`` x ``keep`` region (the store's ``label_size``) inside the crop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from histoscan.errors import ConfigError
from histoscan.geometry import centre_slices, centre_window

Tensor = torch.Tensor

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in scikit-image's rgb_from_hed.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32)


def to_float_nchw(batch: np.ndarray | Tensor, device: torch.device | str | None = None) -> Tensor:
    """uint8 NHWC (numpy or torch) -> float32 NCHW in [0, 1] on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
    if device is not None:
        t = t.to(device, non_blocking=True)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def dihedral(x: Tensor, k: int) -> Tensor:
    """Apply element ``k`` (0..7) of the dihedral group: ``k % 4`` quarter turns after a flip when ``k >= 4``."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x


def dihedral_inverse(x: Tensor, k: int) -> Tensor:
    """Undo ``dihedral(x, k)`` (used to align TTA maps)."""
    x = torch.rot90(x, -(k % 4), dims=(-2, -1)) if k % 4 else x
    return x.flip(-1) if k >= 4 else x


class RandomDihedral:
    """Each image gets one of the 8 flips/rotations at random (only 4 when images are not square).

    Implemented as one gather with a precomputed pixel permutation per group element,
    which is several times faster than flipping and rotating sub-batches.
    """

    def __init__(self) -> None:
        self._perms: dict[tuple[int, int, str], Tensor] = {}

    def _permutations(self, h: int, w: int, device: torch.device) -> Tensor:
        key = (h, w, str(device))
        if key not in self._perms:
            base = torch.arange(h * w).view(1, h, w)
            ks = range(8) if h == w else (0, 2, 4, 6)
            table = (
                torch.stack([dihedral(base, k).reshape(-1) for k in ks])
                if h == w
                else torch.stack([dihedral(base, k).reshape(-1) if k in ks else base.reshape(-1) for k in range(8)])
            )
            self._perms[key] = table.to(device)
        return self._perms[key]

    def __call__(self, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """Apply a random flip / rotation (of the 8 dihedral elements) to each image."""
        n, c, h, w = x.shape
        ops = torch.randint(0, 8 if h == w else 4, (n,), generator=gen)
        if h != w:
            ops = ops * 2  # 0, 2, 4, 6: the shape-preserving elements
        index = self._permutations(h, w, x.device)[ops.to(x.device)]
        return torch.gather(x.reshape(n, c, h * w), 2, index.unsqueeze(1).expand(n, c, h * w)).view(n, c, h, w)


def _uniform(n: int, amount: float, gen: torch.Generator | None, centre: float = 1.0) -> Tensor:
    return centre + (torch.rand(n, generator=gen) * 2 - 1) * amount


_LUMA = torch.tensor([0.299, 0.587, 0.114])


@dataclass
class ColourJitter:
    """Per-image brightness, contrast and saturation jitter on float [0, 1] NCHW.

    The three jitters are affine maps of each pixel's RGB, so they are composed into
    one 3x3 matrix and offset per image and applied in a single batched matmul.
    """

    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2

    def __call__(self, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """Jitter each image's brightness, contrast and saturation."""
        n, c, h, w = x.shape
        b = _uniform(n, self.brightness, gen) if self.brightness else torch.ones(n)
        k = _uniform(n, self.contrast, gen) if self.contrast else torch.ones(n)
        s = _uniform(n, self.saturation, gen) if self.saturation else torch.ones(n)
        eye = torch.eye(3).expand(n, 3, 3)
        # brightness then contrast about the (brightened) mean: y = k*b*x + (1-k)*b*mean
        mean = x.mean(dim=(1, 2, 3)).cpu() if self.contrast else torch.zeros(n)
        a2 = (k * b).view(n, 1, 1) * eye
        t2 = ((1 - k) * b * mean).view(n, 1, 1).expand(n, 3, 1)
        # saturation: z = s*y + (1-s) * luma(y) * [1,1,1]
        a3 = s.view(n, 1, 1) * eye + (1 - s).view(n, 1, 1) * _LUMA.view(1, 1, 3).expand(n, 3, 3)
        matrix, offset = a3 @ a2, a3 @ t2
        out = torch.baddbmm(offset.to(x.device, x.dtype), matrix.to(x.device, x.dtype), x.reshape(n, c, h * w))
        return out.view(n, c, h, w).clamp_(0.0, 1.0)


@dataclass
class HEDJitter:
    """H&E stain jitter (Tellez et al. 2018): scale and shift each stain's optical density per image."""

    scale: float = 0.05
    shift: float = 0.05

    def __call__(self, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """Scale and shift each image's stains in HED optical-density space."""
        n, dev = x.shape[0], x.device
        rgb_from_hed = _RGB_FROM_HED.to(dev)
        hed_from_rgb = torch.linalg.inv(rgb_from_hed)
        od = -torch.log(x.clamp(min=1e-6))
        hed = torch.einsum("nchw,cd->ndhw", od, hed_from_rgb)
        alpha = (1 + (torch.rand(n, 3, generator=gen) * 2 - 1) * self.scale).to(dev).view(n, 3, 1, 1)
        beta = ((torch.rand(n, 3, generator=gen) * 2 - 1) * self.shift).to(dev).view(n, 3, 1, 1)
        od = torch.einsum("ndhw,dc->nchw", hed * alpha + beta, rgb_from_hed)
        return torch.exp(-od).clamp_(0.0, 1.0)


@dataclass
class CentreSafeCrop:
    """Random crop of ``size`` whose offset never moves the centre ``keep`` x ``keep`` region out of view.

    ``keep`` is the labelled region (``Preprocessing.label_size``); None means the label is
    about the whole image, so no crop smaller than the image keeps it. With 96 px patches,
    ``keep=32`` (the Kaggle / PCam label region) and ``size=80``, the crop can shift by up to
    8 px either way from the centred position.
    """

    size: int
    keep: int | None = 32

    def __call__(self, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """Crop each image at random, keeping the labelled centre in view."""
        h, w = x.shape[-2:]
        keep = self.keep if self.keep is not None else max(h, w)
        if self.size > min(h, w) or self.size < keep:
            what = (
                f"the labelled centre {self.keep}" if self.keep is not None else "the whole image (the label's extent)"
            )
            raise ConfigError(f"random crop {self.size} must lie between {what} and the image size {h}x{w}")
        oy, ox = centre_window(h, w, self.size)
        # offsets o with o <= (h - keep)//2 and o + size >= (h + keep)//2 keep the centre in view
        lo_y, hi_y = max(0, (h + keep) // 2 - self.size), min(h - self.size, (h - keep) // 2)
        lo_x, hi_x = max(0, (w + keep) // 2 - self.size), min(w - self.size, (w - keep) // 2)
        n = x.shape[0]
        ys = torch.randint(lo_y, hi_y + 1, (n,), generator=gen).tolist() if hi_y >= lo_y else [oy] * n
        xs = torch.randint(lo_x, hi_x + 1, (n,), generator=gen).tolist() if hi_x >= lo_x else [ox] * n
        return torch.stack([x[i, :, y : y + self.size, c : c + self.size] for i, (y, c) in enumerate(zip(ys, xs))])


def centre_crop(x: Tensor, size: int) -> Tensor:
    """Crop the centre ``size`` x ``size`` (the seed that cut HCD patches to their labelled 32x32)."""
    h, w = x.shape[-2:]
    if size > min(h, w):
        raise ValueError(f"centre crop {size} is larger than the image {h}x{w}")
    rows, cols = centre_slices(h, w, size)
    return x[..., rows, cols]


def resize(x: Tensor, size: int) -> Tensor:
    """Resize float NCHW to ``size`` x ``size`` (bilinear, antialiased when shrinking)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    shrink = size < min(x.shape[-2:])
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


BatchOp = Callable[[Tensor, "torch.Generator | None"], Tensor]


@dataclass
class Augment:
    """A sequence of random batch ops applied in order."""

    ops: list[BatchOp] = field(default_factory=list)
    name: str = "custom"

    def __call__(self, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """Apply the ops in order."""
        for op in self.ops:
            x = op(x, gen)
        return x


@dataclass
class RandomApply:
    """Apply ``op`` to a random fraction ``p`` of the batch's patches; the others pass through unchanged.

    The choice is drawn from ``gen`` on the CPU (one number per patch), so it is the same for a seed
    on any device; ``op`` sees only the chosen patches, so its cost falls with ``p``. ``p >= 1``
    applies ``op`` to every patch and draws nothing.
    """

    op: BatchOp
    p: float = 0.5

    def __call__(self, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """Apply the op to a random fraction ``p`` of the images."""
        if self.p >= 1:
            return self.op(x, gen)
        chosen = (torch.rand(x.shape[0], generator=gen) < self.p).nonzero().flatten().to(x.device)
        if chosen.numel() == 0:
            return x
        out = x.clone()
        out[chosen] = self.op(x[chosen], gen)
        return out
