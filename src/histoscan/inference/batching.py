"""Run a model over uint8 images in batches: the loop the Predictor owns."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

from histoscan.bundle import ModelBundle


@torch.inference_mode()
def predict_batches(model: nn.Module, bundle: ModelBundle, batches: Iterable[np.ndarray],
                    device: str | torch.device = "cpu") -> np.ndarray:
    """Class probabilities for uint8 NHWC batches: shape (N,) P(positive) for binary, (N, C) otherwise.

    Preprocessing and temperature come from the bundle, so every consumer gets the same numbers.
    """
    out: list[np.ndarray] = []
    model.eval()
    for batch in batches:
        x = bundle.preprocessing(batch, device)
        logits = model(x).float() / bundle.temperature
        if bundle.task == "binary":
            out.append(torch.sigmoid(logits.squeeze(1)).cpu().numpy())
        else:
            out.append(torch.softmax(logits, dim=1).cpu().numpy())
    if not out:
        return np.zeros((0,) if bundle.task == "binary" else (0, len(bundle.classes)), dtype=np.float32)
    return np.concatenate(out)


def store_batches(store, batch_size: int = 256) -> Iterable[np.ndarray]:  # type: ignore[no-untyped-def]
    """Consecutive uint8 batches of a PatchStore view."""
    for start in range(0, len(store), batch_size):
        yield store.batch(np.arange(start, min(len(store), start + batch_size)))
