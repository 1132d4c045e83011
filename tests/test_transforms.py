"""Transforms: dihedral group, centre-safe crops, colour and stain jitter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histoscan.data.transforms import (
    CentreSafeCrop,
    ColourJitter,
    HEDJitter,
    RandomApply,
    RandomDihedral,
    centre_crop,
    dihedral,
    dihedral_inverse,
    normalise,
    resize,
    to_float_nchw,
)
from histoscan.stain.augment import AUGMENTATION_PRESETS, build_augmentation


def _marked_batch(n: int = 16, size: int = 96) -> torch.Tensor:
    """Patches whose centre 32x32 is 1 and the rest 0, plus a corner mark to see orientation."""
    x = torch.zeros(n, 3, size, size)
    c0 = (size - 32) // 2
    x[:, :, c0 : c0 + 32, c0 : c0 + 32] = 1.0
    x[:, 0, 0:5, 0:10] = 0.5
    return x


def test_dihedral_group_is_eight_distinct_centre_preserving_maps() -> None:
    x = _marked_batch(1)
    outs = [dihedral(x, k) for k in range(8)]
    for k, y in enumerate(outs):
        assert torch.equal(centre_crop(y, 32), centre_crop(x, 32)), k
        assert torch.equal(dihedral_inverse(y, k), x)
    distinct = {tuple(y.flatten().tolist()) for y in outs}
    assert len(distinct) == 8


def test_random_dihedral_keeps_the_centre() -> None:
    x = torch.rand(64, 3, 96, 96)
    gen = torch.Generator().manual_seed(0)
    y = RandomDihedral()(x, gen)
    for i in range(64):
        assert any(torch.equal(y[i], dihedral(x[i : i + 1], k)[0]) for k in range(8))
    # the centre region's content stays in the centre
    assert torch.allclose(
        centre_crop(y, 32).sum(dim=(2, 3)).sort(dim=0).values,
        centre_crop(x, 32).sum(dim=(2, 3)).sort(dim=0).values,
        atol=1e-3,
    )


@pytest.mark.parametrize("size", [33, 64, 80, 96])
def test_centre_safe_crop_never_loses_the_centre(size: int) -> None:
    x = _marked_batch(200)
    y = CentreSafeCrop(size, keep=32)(x, torch.Generator().manual_seed(1))
    assert y.shape[-1] == size
    assert torch.equal(y[:, 1].sum(dim=(1, 2)), torch.full((200,), 32.0 * 32.0))  # all 1024 centre pixels in view


def test_colour_and_stain_jitter_stay_in_range_and_move_no_pixel() -> None:
    x = torch.rand(8, 3, 32, 32)
    gen = torch.Generator().manual_seed(2)
    for op in (ColourJitter(0.3, 0.3, 0.3), HEDJitter(0.1, 0.1)):
        y = op(x, gen)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert torch.allclose(HEDJitter(0.0, 0.0)(x.clamp(0.01, 1)), x.clamp(0.01, 1), atol=1e-4)
    assert torch.equal(ColourJitter(0, 0, 0)(x), x)


def test_presets_and_preprocessing() -> None:
    batch = (np.random.default_rng(0).random((4, 96, 96, 3)) * 255).astype(np.uint8)
    x = to_float_nchw(batch)
    assert x.shape == (4, 3, 96, 96) and x.min() >= 0 and x.max() <= 1
    for name in AUGMENTATION_PRESETS:
        y = build_augmentation(name, crop=80)(x, torch.Generator().manual_seed(0))
        assert y.shape == (4, 3, 80, 80)
    assert resize(x, 192).shape[-1] == 192 and resize(x, 48).shape[-1] == 48
    z = normalise(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(z, (x - 0.5) / 0.25)
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        build_augmentation("wild")


def test_colour_jitter_components_behave_as_defined() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(6, 3, 16, 16) * 0.5 + 0.25
    y = ColourJitter(0.3, 0.0, 0.0)(x, gen)  # brightness: one factor per image
    ratio = (y / x).flatten(1)
    assert torch.allclose(ratio.min(dim=1).values, ratio.max(dim=1).values, atol=1e-5)
    assert not torch.allclose(ratio[:, 0], torch.ones(6))
    y = ColourJitter(0.0, 0.3, 0.0)(x, gen)  # contrast keeps the mean
    assert torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5)
    gray = x[:, :1].expand(-1, 3, -1, -1).contiguous()
    assert torch.allclose(ColourJitter(0.0, 0.0, 0.5)(gray, gen), gray, atol=1e-5)  # saturation leaves gray alone


def test_stain_presets_build_on_light() -> None:
    """A stain preset adds stain ops to ``light``: it keeps the default's brightness/contrast jitter."""
    light = [type(op).__name__ for op in build_augmentation("light").ops]
    for name in ("stain-light", "stain-medium", "stain-strong"):
        ops = [type(op).__name__ for op in build_augmentation(name).ops]
        assert ops == [*light, "HEDJitter", "StainMatrixJitter"], name


def test_random_apply_changes_only_the_chosen_patches_deterministically() -> None:
    """``RandomApply`` applies its op to about ``p`` of the patches, the same ones for a seed; the rest are untouched."""
    x = torch.rand(400, 3, 8, 8)
    op = RandomApply(lambda b, gen: 1 - b, 0.3)
    a = op(x, torch.Generator().manual_seed(3))
    b = op(x, torch.Generator().manual_seed(3))
    c = op(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = ~torch.isclose(a, x).flatten(1).all(dim=1)
    assert 80 <= int(changed.sum()) <= 160  # 120 expected
    assert torch.allclose(a[changed], 1 - x[changed])
    assert torch.equal(RandomApply(lambda b, gen: 1 - b, 1.0)(x), 1 - x)


def test_stain_p_re_stains_a_fraction_and_is_checked() -> None:
    """``stain_p`` < 1 wraps the two stain ops together; p = 1 keeps the preset as it was."""
    ops = [type(op).__name__ for op in build_augmentation("stain-medium", stain_p=0.5).ops]
    assert ops == [*(type(op).__name__ for op in build_augmentation("light").ops), "RandomApply"]
    wrapped = build_augmentation("stain-medium", stain_p=0.5).ops[-1]
    assert [type(op).__name__ for op in wrapped.op.ops] == ["HEDJitter", "StainMatrixJitter"]
    with pytest.raises(ValueError, match="stain_p must be in"):
        build_augmentation("stain-medium", stain_p=0.0)


def test_matrix_noise_replaces_only_the_stain_vector_noise() -> None:
    """``matrix_noise`` sets the stain-vector noise (scaled by strength); the other strengths stay the preset's."""
    from histoscan.stain.augment import STAIN_STRENGTHS

    medium = STAIN_STRENGTHS["medium"]
    jitter = build_augmentation("stain-medium", 2.0, matrix_noise=0.03).ops[-1]
    assert jitter.matrix == pytest.approx(0.06) and jitter.concentration == pytest.approx(2 * medium.concentration)
    assert build_augmentation("stain-medium").ops[-1].matrix == pytest.approx(medium.matrix)
    with pytest.raises(ValueError, match="matrix_noise cannot be negative"):
        build_augmentation("stain-medium", matrix_noise=-0.1)


def test_a_stain_preset_is_its_base_then_its_stain_ops() -> None:
    """``build_augmentation`` of a stain preset = its base (``restain=False``) followed by ``build_restain``."""
    from histoscan.stain.augment import build_restain

    x = torch.rand(5, 3, 24, 24)
    whole = build_augmentation("stain-medium", 1.5, matrix_noise=0.02)(x, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    base = build_augmentation("stain-medium", 1.5, restain=False)(x, gen)
    assert torch.allclose(whole, build_restain("stain-medium", 1.5, matrix_noise=0.02)(base, gen))
    assert build_restain("light").ops == []
