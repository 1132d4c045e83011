"""ROAD, deletion/insertion AUC, the baselines and the paired intervals of ``histoscan.explain.road``."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from histoscan.explain.road import (
    ProbabilityTarget,
    baseline_maps,
    deletion_insertion_auc,
    nuclei_maps,
    paired_interval,
    rank_maps,
    road,
)


class CornerNet(nn.Module):
    """One logit: how bright the top-left quadrant of channel 0 is (nothing else matters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = x.shape[-1] // 2
        return (10 * (x[:, 0, :side, :side].mean(dim=(1, 2)) - 0.85))[:, None]  # P(bright corner) about 0.8


def _corner_inputs(n: int = 6, side: int = 32) -> tuple[torch.Tensor, np.ndarray]:
    """Bright top-left quadrants on a dark field (slight noise), and a map that ranks that quadrant highest."""
    g = torch.Generator().manual_seed(0)
    x = 0.05 * torch.randn(n, 3, side, side, generator=g)
    x[:, :, : side // 2, : side // 2] += 1.0
    m = np.zeros((n, side, side), np.float32)
    m[:, : side // 2, : side // 2] = 1.0
    return x, m


def test_rank_maps_break_ties_and_keep_the_order() -> None:
    rng = np.random.default_rng(0)
    m = np.zeros((2, 4, 4), np.float32)
    m[:, 0, 0] = 5.0
    r = rank_maps(m, rng)
    assert r.dtype == np.float32 and r.min() == 0 and r.max() == 1
    assert all(len(np.unique(x)) == 16 for x in r)  # the 15 tied zeros get distinct ranks
    assert (r[:, 0, 0] == 1).all()  # the highest pixel keeps the highest rank


def test_baselines_shuffled_is_never_the_own_map_and_mean_leaves_it_out() -> None:
    rng = np.random.default_rng(1)
    maps = np.stack([np.full((8, 8), float(i), np.float32) for i in range(5)])
    b = baseline_maps(maps, np.zeros((5, 8, 8), np.float32), rng)
    assert set(b) == {"random", "block", "centre", "shuffled", "mean", "nuclei"}
    assert all(v.shape == (5, 8, 8) for v in b.values())
    assert all(b["shuffled"][i, 0, 0] != i for i in range(5))
    np.testing.assert_allclose(b["mean"][0], np.full((8, 8), (1 + 2 + 3 + 4) / 4))
    centre = b["centre"][0]
    assert centre[3:5, 3:5].min() > centre[0, 0]  # the disc grows from the centre
    block = b["block"]
    assert all(np.sum(x == x.max()) >= 1 for x in block)


def test_nuclei_map_is_high_on_haematoxylin() -> None:
    img = np.full((1, 32, 32, 3), 240, np.uint8)  # near-white background
    img[0, :, :16] = (70, 40, 130)  # haematoxylin-blue/purple on the left
    m = nuclei_maps(img)
    assert m.shape == (1, 32, 32) and m[0, :, :12].mean() > m[0, :, 20:].mean() + 0.05


def test_road_and_deletion_rank_the_right_map_above_random() -> None:
    x, good = _corner_inputs()
    rng = np.random.default_rng(0)
    model, target = CornerNet().eval(), ProbabilityTarget(1)  # P(class 1): the one logit's sigmoid
    right = road(model, x, rank_maps(good, rng), target, (0.1, 0.2))
    chance = road(model, x, rank_maps(rng.random(good.shape).astype(np.float32), rng), target, (0.1, 0.2))
    assert right.morf.shape == (2, len(x))
    assert right.morf.mean() < chance.morf.mean() - 0.05  # removing the corner first lowers P more
    assert (right.combined > chance.combined).mean() >= 5 / 6
    fill = torch.zeros_like(x)
    d_right, i_right = deletion_insertion_auc(model, x, fill, rank_maps(good, rng), target)
    d_rand, i_rand = deletion_insertion_auc(model, x, fill, rank_maps(rng.random(good.shape), rng), target)
    assert d_right.mean() < d_rand.mean() and i_right.mean() > i_rand.mean()


def test_probability_target_applies_the_temperature() -> None:
    out = torch.tensor([2.0])
    assert torch.isclose(ProbabilityTarget(1)(out), torch.sigmoid(torch.tensor(2.0)))
    assert torch.isclose(ProbabilityTarget(1, 2.0)(out), torch.sigmoid(torch.tensor(1.0)))
    assert torch.isclose(ProbabilityTarget(0)(out), 1 - torch.sigmoid(torch.tensor(2.0)))


def test_paired_interval_covers_the_mean_and_excludes_zero_only_when_it_should() -> None:
    rng = np.random.default_rng(0)
    shifted = 0.2 + 0.05 * rng.standard_normal(100)
    mean, lo, hi = paired_interval(shifted)
    assert lo < mean < hi and lo > 0
    centred = rng.standard_normal(100)
    _, lo, hi = paired_interval(centred - centred.mean())
    assert lo < 0 < hi
