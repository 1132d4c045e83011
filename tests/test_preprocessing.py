"""The fused preprocessing equals the step-by-step definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histoscan.data.transforms import dihedral, normalise, to_float_nchw
from histoscan.preprocessing import Preprocessing


@pytest.mark.parametrize("crop,resize_to", [(None, None), (64, None), (32, 96), (None, 48)])
@pytest.mark.parametrize("k", [0, 5])
def test_fused_preprocessing_matches_the_definition(crop: int | None, resize_to: int | None, k: int) -> None:
    pre = Preprocessing(image_size=[96, 96], crop=crop, resize=resize_to, mean=[0.7, 0.5, 0.6], std=[0.2, 0.25, 0.15])
    batch = np.random.default_rng(0).integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    want = dihedral(normalise(pre.geometry(to_float_nchw(batch)), pre.mean, pre.std), k)
    got = pre(batch, k=k)
    assert got.shape == want.shape == (5, 3, pre.input_size, pre.input_size)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_other_sizes_go_through_the_model_image_size_first() -> None:
    pre = Preprocessing(image_size=[96, 96], crop=64)
    big = np.random.default_rng(1).integers(0, 256, (2, 192, 192, 3), dtype=np.uint8)
    assert pre(big).shape == (2, 3, 64, 64)
