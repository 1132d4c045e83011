"""Preprocessing that travels with a model: stored once in ``model.json``, read by every consumer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from histoscan.data.transforms import center_crop, normalize, resize, to_float_nchw


@dataclass
class Preprocessing:
    """uint8 images -> the model's input tensor.

    Order: images of another size are first resized to ``image_size`` (the size the model
    was trained on), then centre-cropped to ``crop`` (if set), resized to ``resize`` (if set),
    and normalised with ``mean`` / ``std`` (on the [0, 1] scale).
    """

    image_size: list[int] = field(default_factory=lambda: [96, 96])
    crop: int | None = None
    resize: int | None = None
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    mpp: float | None = None
    label_size: int | None = None

    @property
    def input_size(self) -> int:
        """Side of the tensor the network sees."""
        if self.resize:
            return int(self.resize)
        if self.crop:
            return int(self.crop)
        return int(self.image_size[0])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "input_size": self.input_size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Size, crop and resize on float NCHW."""
        h, w = self.image_size
        if tuple(x.shape[-2:]) != (h, w):
            x = torch.nn.functional.interpolate(
                x, size=(h, w), mode="bilinear", align_corners=False, antialias=x.shape[-1] > w
            )
        if self.crop:
            x = center_crop(x, self.crop)
        if self.resize:
            x = resize(x, self.resize)
        return x

    def __call__(
        self, batch: np.ndarray | torch.Tensor, device: torch.device | str | None = None, k: int = 0
    ) -> torch.Tensor:
        """uint8 NHWC batch -> normalised float NCHW on ``device`` (under dihedral element ``k``).

        Same result as ``normalize(geometry(x))``, done cheaply: the centre crop is a slice of
        the uint8 batch before conversion, and scaling and normalisation are one fused step. The
        result is channels-last in memory, which oneDNN convolutions run about 1.4x faster on CPU.
        """
        h, w = self.image_size
        t = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        if tuple(t.shape[1:3]) != (h, w):
            x = self.geometry(to_float_nchw(t, device))
            return dihedral_k(normalize(x, self.mean, self.std), k)
        if self.crop:
            top, left = (h - self.crop) // 2, (w - self.crop) // 2
            t = t[:, top : top + self.crop, left : left + self.crop]
        if device is not None:
            t = t.to(device, non_blocking=True)
        x = t.permute(0, 3, 1, 2).float()
        if self.resize:
            x = resize(x, self.resize)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0
        scale = 1.0 / (torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0)
        x = x.sub_(mean).mul_(scale) if not self.resize else (x - mean) * scale
        return dihedral_k(x.contiguous(memory_format=torch.channels_last), k)


def dihedral_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """``dihedral(x, k)``, or ``x`` itself for the identity."""
    from histoscan.data.transforms import dihedral

    return dihedral(x, k).contiguous(memory_format=torch.channels_last) if k else x


def channel_stats(images: np.ndarray, max_images: int = 2000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the [0, 1] scale from up to ``max_images`` random images."""
    rng = np.random.default_rng(seed)
    n = images.shape[0]
    idx = np.sort(rng.choice(n, size=min(n, max_images), replace=False))
    sample = np.asarray(images[idx], dtype=np.float32) / 255.0
    mean = sample.mean(axis=(0, 1, 2))
    std = sample.std(axis=(0, 1, 2)).clip(min=1e-3)
    return [round(float(m), 5) for m in mean], [round(float(s), 5) for s in std]
