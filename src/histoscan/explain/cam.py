"""The CAM methods histoscan offers, computed on raw values (one scale across images), and the targets.

pytorch-grad-cam scales every map to its own [0, 1] (``scale_cam_image``), which makes a true
negative look as hot as a tumour. ``RawScale`` keeps the method's own values: it repeats the
package's per-layer step without that min-max (a few lines; the package offers no switch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import (
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.base_cam import BaseCAM

from histoscan.enums import CAM_METHODS
from histoscan.errors import ConfigError

_METHODS: dict[str, type[BaseCAM]] = {  # one class per value of enums.CamMethod ("auto" is resolved to one)
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
    "gradcam-elementwise": GradCAMElementWise,
    "eigencam": EigenCAM,
    "eigengradcam": EigenGradCAM,
    "scorecam": ScoreCAM,
}
METHODS: tuple[str, ...] = CAM_METHODS


class RawScale:
    """Mixin for a BaseCAM subclass: maps keep raw values, upsampled bilinearly to the input size."""

    def compute_cam_per_layer(self: Any, input_tensor: torch.Tensor, targets: list[Any], eigen_smooth: bool) -> list:
        """Raw (not min-max scaled) maps of each target layer."""
        acts = [a.cpu().data.numpy() for a in self.activations_and_grads.activations]
        grads = [g.cpu().data.numpy() for g in self.activations_and_grads.gradients]
        size = tuple(input_tensor.shape[-2:])
        out = []
        for i, layer in enumerate(self.target_layers):
            a = acts[i] if i < len(acts) else None
            g = grads[i] if i < len(grads) else None
            cam = np.maximum(self.get_cam_image(input_tensor, layer, targets, a, g, eigen_smooth), 0)
            out.append(upsample(np.asarray(cam, np.float32), size)[:, None])
        return out

    def aggregate_multi_layers(self: Any, cam_per_target_layer: list) -> np.ndarray:
        """Average the layers' maps, negative values clipped to zero."""
        return np.maximum(np.concatenate(cam_per_target_layer, axis=1), 0).mean(axis=1).astype(np.float32)


def upsample(maps: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """(N, h, w) float maps -> (N, H, W), bilinear with half-pixel centres (as cv2.resize)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    t = torch.from_numpy(np.ascontiguousarray(maps))[:, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


def auto_method(flattens: bool, finer: bool) -> str:
    """The method ``auto`` stands for, from the model's structure.

    HiResCAM where the head flattens (a weight per position, so Grad-CAM's gradient average over
    positions would mix weights that are not shared), LayerCAM on a finer (earlier) stage, where
    Grad-CAM's channel averages are noisy, and Grad-CAM otherwise.
    """
    return "hirescam" if flattens else "layercam" if finer else "gradcam"


def cam_class(method: str) -> type[BaseCAM]:
    """The raw-valued class of ``method`` (ConfigError listing the methods for an unknown one)."""
    base = _METHODS.get(method.lower())
    if base is None:
        raise ConfigError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    return type(f"Raw{base.__name__}", (RawScale, base), {})


class LogitTarget:
    """The target of one image: ``sign * output[index]``.

    A binary model has one logit: "tumour" is that logit (sign +1) and "the other class" is its
    negation, so ``predicted`` follows the prediction's sign; the package's default (argmax over
    one output) would always pick index 0 with sign +1, whatever the model predicted.
    """

    def __init__(self, index: int, sign: float = 1.0) -> None:
        self.index, self.sign = index, sign

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        """The logit to explain per image: ``sign * output[index]``."""
        return self.sign * (output[self.index] if output.ndim == 1 else output[:, self.index])
