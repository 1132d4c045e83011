"""Synthetic patches: deterministic, H&E-like, with a centre difference between classes."""

from __future__ import annotations

import numpy as np

from histoscan.data.synthetic import synth_batch


def test_deterministic_by_seed() -> None:
    a, la = synth_batch(8, seed=3)
    b, lb = synth_batch(8, seed=3)
    c, _ = synth_batch(8, seed=4)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)


def test_tumour_centres_are_darker_and_more_purple() -> None:
    x, y = synth_batch(200, seed=0, noise=0.2)
    centre = x[:, 32:64, 32:64].astype(float)
    bright = centre.mean(axis=(1, 2, 3))
    assert bright[y == 1].mean() < bright[y == 0].mean() - 15
    border_mean = x[:, :16].astype(float).mean(axis=(1, 2, 3))
    assert abs(border_mean[y == 1].mean() - border_mean[y == 0].mean()) < 10  # outside the centre they look alike
    assert x[..., 0].astype(float).mean() > x[..., 1].astype(float).mean()  # pink/purple: red above green


def test_multiclass_and_sizes() -> None:
    x, y = synth_batch(30, seed=1, size=64, num_classes=3)
    assert x.shape == (30, 64, 64, 3) and set(y) <= {0, 1, 2}
