"""Colour-space maths on torch tensors: optical density and CIE L*a*b*, batched on any device.

Written by hand because no maintained library in the environment offers these on torch tensors
on every device (scikit-image is numpy-only and per image; kornia is not a dependency): each is a
few lines of textbook formulae (Ruifrok & Johnston optical density; sRGB D65 -> XYZ -> L*a*b*).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Optical density of an 8-bit intensity I is -log((I + 1) / 256): finite for I = 0, 0 for white.
_I0 = 256.0

_RGB_TO_XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE = torch.tensor([0.950456, 1.0, 1.088754])


_OD_TABLE = -torch.log((torch.arange(256, dtype=torch.float32) + 1.0) / _I0)
# ln(I + 1) of every 8-bit intensity: the float32 values CPU ``log1p`` gives, looked up instead of computed
_LOG1P_TABLE = torch.arange(256, dtype=torch.float32).log1p()


def optical_density(rgb: Tensor) -> Tensor:
    """Intensities on the 0..255 scale (uint8 or float, channels last) -> optical density, same shape.

    uint8 input is looked up in a 256-entry table (``embedding``: about twice as fast as the logarithm on CPU).
    """
    if rgb.dtype == torch.uint8:
        table = _OD_TABLE.to(rgb.device).view(256, 1)
        return F.embedding(rgb.int(), table).view(rgb.shape)
    return -torch.log((rgb.float() + 1.0) / _I0)


def from_optical_density(od: Tensor) -> Tensor:
    """Optical density -> float intensities on the 0..255 scale, clamped (channels last)."""
    return (torch.exp(-od) * _I0 - 1.0).clamp_(0.0, 255.0)


def apply_od_matrix(batch: Tensor, matrix: Tensor) -> Tensor:
    """uint8 N x H x W x 3 -> uint8: each patch's optical density times its 3 x 3 ``matrix`` (N x 3 x 3), back to intensity.

    With od = ln 256 - ln(I + 1), the output exp(-(od M)) 256 - 1 is exp(ln(I + 1) M + b) - 1 with
    b = ln 256 (1 - column sums of M): one log, one batched matrix product on channel planes (N x 3 x HW,
    where ``bmm`` is fast; on N x HW x 3 it is not) and one exp per value, rounded half up. ``matrix``
    must be finite.
    """
    n, h, w, _ = batch.shape
    logs = _log1p_planes(batch)
    bias = (math.log(_I0) * (1.0 - matrix.sum(dim=1))).unsqueeze(-1)  # N x 3 x 1
    out = torch.baddbmm(bias, matrix.transpose(1, 2), logs).exp_().sub_(0.5).clamp_(0.0, 255.0)
    return out.to(torch.uint8).view(n, 3, h, w).permute(0, 2, 3, 1).contiguous()


def _log1p_planes(batch: Tensor, opencv: bool | None = None) -> Tensor:
    """uint8 N x H x W x 3 -> float32 N x 3 x HW of ln(I + 1): the values CPU ``log1p`` gives, looked up.

    A lookup in a 256-entry table computed once by ``log1p`` on the CPU (so on the CPU bit for bit what the
    logarithm gave; on a GPU within an ulp of its own ``log1p``): with ``opencv`` (default: on the CPU)
    OpenCV's ``LUT`` on the channel planes (torch's ``log1p`` is not vectorised there: an order of magnitude
    slower on a batch of 256 patches of 96 px, ``stain_log_lookup`` in benchmarks/bench_predict.py), else
    ``embedding`` (on a CPU batch laid out as channel planes, slower than OpenCV's ``LUT``).
    """
    n, h, w, _ = batch.shape
    planes = batch.permute(0, 3, 1, 2).reshape(n * 3, h * w)
    if opencv if opencv is not None else batch.device.type == "cpu":
        import cv2  # imported here: most commands never normalise stain

        table = _LOG1P_TABLE.numpy()
        return torch.from_numpy(cv2.LUT(np.ascontiguousarray(planes.cpu().numpy()), table)).view(n, 3, h * w)
    return F.embedding(planes.int(), _LOG1P_TABLE.to(batch.device).view(256, 1)).view(n, 3, h * w)


def to_uint8(rgb: Tensor) -> Tensor:
    """Float 0..255 -> uint8, rounded (NaN becomes 0; callers never pass it, this only bounds the damage)."""
    return torch.nan_to_num(rgb, nan=0.0).round_().clamp_(0, 255).to(torch.uint8)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """SRGB on the 0..255 scale (channels last) -> CIE L*a*b* (D65), float32."""
    c = rgb.float() / 255.0
    lin = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055).pow(2.4))
    xyz = lin @ _RGB_TO_XYZ.to(rgb.device).T / _WHITE.to(rgb.device)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12).pow(1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-1)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """CIE L*a*b* (D65) -> sRGB float on the 0..255 scale, clamped (channels last)."""
    L, a, b = lab.unbind(-1)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=-1)
    xyz = torch.where(f > 0.206893, f.pow(3), (f - 16 / 116) / 7.787) * _WHITE.to(lab.device)
    lin = (xyz @ torch.linalg.inv(_RGB_TO_XYZ).to(lab.device).T).clamp(min=0.0)
    c = torch.where(lin <= 0.0031308, lin * 12.92, 1.055 * lin.clamp(min=1e-12).pow(1 / 2.4) - 0.055)
    return (c * 255.0).clamp_(0.0, 255.0)
