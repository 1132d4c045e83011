"""The fast Macenko path (topk percentiles, log-domain matrix on channel planes) against a straightforward reference."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from histoscan.stain.estimate import masked_quantile
from histoscan.stain.normalise import StainNormaliser, fit_target
from tests.conftest import shared
from tests.stain_reference import reference_macenko
from tests.test_stain import HE_A, HE_B, hostile, stained

#: the stated tolerance: mean absolute difference from the reference, in grey levels (uint8)
TOLERANCE = 1.0


def _hcd(n: int) -> np.ndarray:
    files = sorted((shared("hcd") / "train").glob("*.tif"))[:n]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def test_fast_macenko_matches_the_reference_on_real_hcd_patches() -> None:
    images = np.concatenate([_hcd(300), hostile()[:, :48, :48].repeat(2, axis=1).repeat(2, axis=2)])
    target = fit_target(images[:200], "macenko")
    norm = StainNormaliser(target)
    batch = torch.from_numpy(images)
    fast = norm(batch)
    ref, ok = reference_macenko(batch, torch.tensor(target.stain_matrix), torch.tensor(target.max_concentrations))
    diff = (fast.int() - ref.int()).abs().float()
    assert norm.counts()["passed_through"] == int((~ok).sum())
    assert diff.mean() <= 0.05, diff.mean()  # over the whole set: nearly identical
    assert diff.mean(dim=(1, 2, 3)).max() <= TOLERANCE  # and no patch off by more than the tolerance
    assert torch.equal(fast[~ok], batch[~ok])  # hostile patches unchanged, as before


def test_fast_macenko_matches_the_reference_on_generated_labs() -> None:
    target = fit_target(stained(10, HE_A), "macenko")
    batch = torch.from_numpy(np.concatenate([stained(6, HE_B, seed=3), hostile()]))
    fast = StainNormaliser(target)(batch)
    ref, _ = reference_macenko(batch, torch.tensor(target.stain_matrix), torch.tensor(target.max_concentrations))
    assert (fast.int() - ref.int()).abs().float().mean(dim=(1, 2, 3)).max() <= TOLERANCE


def test_topk_percentiles_equal_a_full_sort() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(64, 1024, 2, generator=gen)
    mask = torch.rand(64, 1024, generator=gen) < torch.linspace(0, 1, 64).view(-1, 1)
    for q in (0.01, 0.5, 0.99):
        (got,) = masked_quantile(values, mask, (q,))
        for i in range(64):
            m = int(mask[i].sum())
            if m == 0:
                continue
            want = values[i][mask[i]].sort(dim=0).values[int(np.floor((m - 1) * q))]
            assert torch.equal(got[i], want), (q, i)


def test_the_log_lookup_equals_log1p_bit_for_bit_and_the_od_matrix_its_formula() -> None:
    """``apply_od_matrix`` looks ln(I + 1) up in a table: on the CPU the float32 values ``log1p`` gives, by either
    lookup (OpenCV's, or ``embedding`` as on a GPU), for contiguous and strided batches alike."""
    from histoscan.stain.colour import _log1p_planes, apply_od_matrix

    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (5, 7, 9, 3), dtype=torch.uint8, generator=gen)
    strided = [
        batch,
        torch.randint(0, 256, (5, 7, 12, 3), dtype=torch.uint8, generator=gen)[:, :, 1:10],  # a W slice
        torch.randint(0, 256, (5, 3, 7, 9), dtype=torch.uint8, generator=gen).permute(0, 2, 3, 1),  # NCHW seen NHWC
    ]
    for b in strided:
        expected = b.permute(0, 3, 1, 2).reshape(5, 3, 63).float().log1p()
        assert torch.equal(_log1p_planes(b), expected)
        assert torch.equal(_log1p_planes(b, opencv=True), expected)
        assert torch.equal(_log1p_planes(b, opencv=False), expected)
    matrix = torch.eye(3).repeat(5, 1, 1) + 0.05 * torch.randn(5, 3, 3, generator=gen)
    od = -torch.log((batch.float() + 1.0) / 256.0).reshape(5, 63, 3)  # each pixel's OD, a row vector
    direct = (torch.exp(-(od @ matrix)) * 256.0 - 1.0 + 0.5).floor().clamp(0, 255).reshape(5, 7, 9, 3)
    got = apply_od_matrix(batch, matrix).float()
    assert (got - direct).abs().max() <= 1.0  # float32 rounding may move a value across a half
    assert (got != direct).float().mean() < 0.01
