"""Logits -> class probabilities, with temperature: the one definition for training, the Predictor and export."""

from __future__ import annotations

import math
from typing import overload

import numpy as np
import torch

from histoscan.errors import ConfigError


@overload
def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray: ...
@overload
def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor: ...
def probabilities(logits: np.ndarray | torch.Tensor, temperature: float = 1.0) -> np.ndarray | torch.Tensor:
    """N x C class probabilities (float32) from N x K logits divided by ``temperature``.

    K = 1 is a binary model's single logit: the result is [1 - sigmoid, sigmoid]. K > 1: softmax.
    A numpy array gives a numpy array back, a tensor a tensor (on its device).
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a positive finite number, got {temperature}")
    if isinstance(logits, np.ndarray):
        return probabilities(torch.from_numpy(np.asarray(logits, dtype=np.float32)), temperature).numpy()
    z = logits.float() / temperature
    if z.ndim != 2:
        raise ValueError(f"logits must be N x K, got shape {tuple(z.shape)}")
    if z.shape[1] == 1:
        p = torch.sigmoid(z)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(z, dim=1)


def logits_of(probs: np.ndarray) -> np.ndarray:
    """The inverse of ``probabilities`` at temperature 1: N x 1 logits for two classes, N x C log-probabilities else.

    An ensemble's averaged probabilities pass through it so that its own temperature applies the same way.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    if p.shape[1] == 2:
        return (np.log(p[:, 1]) - np.log(p[:, 0]))[:, None].astype(np.float32)
    return np.log(p).astype(np.float32)
