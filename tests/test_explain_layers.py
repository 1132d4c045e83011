"""The explained layer and method come from the model's structure; maps land on the right pixels for every fit.

The slow test runs every registered histoscan model and a sample of timm families (ResNet, EfficientNet,
ConvNeXt, DenseNet, ViT, Swin) at 96 px and at the recipe's input size (an 80 px centre crop): the map's grid
is the feature map the classifier pools, and activations injected at one known cell of that grid come back
at that cell's pixels of the image after the crop (a geometry round trip through the whole explainer).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from histoscan.cli import app
from histoscan.errors import ConfigError
from histoscan.explain import Explainer
from histoscan.explain.layers import choose_layer
from histoscan.models.registry import register_model, registered, registered_names
from tests.test_explain import make_run, patches


class FlatNet(nn.Module):
    """A model with no spatial feature map at all (an MLP on the pixels): nothing for Grad-CAM to read."""

    def __init__(self, num_outputs: int = 1, input_size: int = 32) -> None:
        super().__init__()
        self.body = nn.Linear(3 * input_size * input_size, 8)
        self.head = nn.Linear(8, num_outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@register_model
def flat_net(num_outputs: int = 1, input_size: int = 32) -> FlatNet:
    """Test model: no spatial layer (the explainer must refuse it)."""
    return FlatNet(num_outputs, input_size)


# ---- geometry for every fit policy ----------------------------------------------------------------
def test_pad_edges_map_is_cropped_to_the_patch_not_resized(tmp_path: Path) -> None:
    # quadrant_net sees only the top-left quadrant of its 96 px input (resized to 32): fitted image rows/cols 0..48
    run = make_run(tmp_path / "pad", "quadrant_net", fit="pad-edges", resize=32)
    e = Explainer(run)
    edge = patches(1, label=0)[0][:, :60]  # an edge patch: full height, 60 of 96 columns; padded white on the right
    m = e.explain([edge])[0]
    assert m.shape == (96, 60)
    assert (m[1:47, 1:47] > 0).all()  # the quadrant's own pixels (resizing 96 -> 60 columns would end it at 30)
    assert m[:, 49:].max() == 0 and m[49:, :].max() == 0
    # the same image under the resize policy is stretched to 96 x 96: the quadrant is its left 30 columns
    r = Explainer(make_run(tmp_path / "rs", "quadrant_net", fit="resize", resize=32)).explain([edge])[0]
    assert r.shape == (96, 60) and r[2:46, 2:28].min() > 0 and r[:, 32:].max() == 0


# ---- layer and method from the structure ----------------------------------------------------------
def test_auto_method_is_hirescam_where_the_head_flattens(tmp_path: Path) -> None:
    pooled = Explainer(make_run(tmp_path / "p", "simple_cnn", resize=32))
    flat = Explainer(make_run(tmp_path / "f", "simple_cnn_flatten", resize=32))
    assert pooled.method == "gradcam" and flat.method == "hirescam"
    assert pooled.choice.grid == (8, 8) and pooled.choice.name == "features.2.1"
    assert Explainer(make_run(tmp_path / "f2", "simple_cnn_flatten", resize=32), method="gradcam").method == "gradcam"


def test_finer_reads_the_stage_before_with_layercam(tmp_path: Path) -> None:
    run = make_run(tmp_path / "p", "simple_cnn", resize=32)
    e = Explainer(run, finer=True)
    assert e.method == "layercam" and e.choice.grid == (16, 16) and e.choice.name == "features.1.1"
    maps = e.explain(patches(2))
    assert maps.shape == (2, 96, 96) and np.isfinite(maps).all()


def test_bad_layer_names_the_model_and_its_spatial_layers(tmp_path: Path) -> None:
    run = make_run(tmp_path / "p", "simple_cnn", resize=32)
    with pytest.raises(ConfigError, match=r"model 'simple_cnn' has no layer 'nope' to explain; layers with a spatial "
                       r"output: features, features\.0, features\.1, features\.2 \(and \d+ layers inside them\)"):  # fmt: skip
        Explainer(run, layer="nope")
    with pytest.raises(ConfigError, match=r"layer 'classifier' of model 'simple_cnn' has no spatial output"):
        Explainer(run, layer="classifier")
    assert Explainer(run, layer="features.1").choice.grid == (8, 8)  # a named layer still overrides


def test_a_model_without_a_spatial_map_is_refused_before_any_image_is_read(tmp_path: Path) -> None:
    run = make_run(tmp_path / "flat", "flat_net")
    with pytest.raises(ConfigError, match="model 'flat_net': no spatial feature map before its pooling"):
        Explainer(run)
    src = tmp_path / "in"
    src.mkdir()
    (src / "broken.tif").write_bytes(b"not a tiff")  # read first, it would be listed as unreadable instead
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["explain", str(run), str(src), "--out", str(out)])
    assert r.exit_code == 2 and "no spatial feature map" in r.output and not out.exists()


# ---- the slow sweep over architectures ------------------------------------------------------------
OWN = [n for n in registered_names() if registered(n).__module__.startswith("histoscan.")]  # type: ignore[union-attr]
TIMM = [
    "resnet18",
    "efficientnet_b0",
    "convnext_atto",
    "densenet121",
    "vit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
]


def _inject(e: Explainer, cell: tuple[int, int]) -> torch.utils.hooks.RemovableHandle:
    """Replace the explained layer's output by zeros except random activations at grid ``cell`` (native layout)."""
    r, c = cell
    gh, gw = e.choice.grid
    gen = torch.Generator().manual_seed(0)

    def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(out)
        if out.ndim == 3:  # ViT tokens: prefix tokens, then the patch grid row by row
            prefix = out.shape[1] - gh * gw
            z[:, prefix + r * gw + c, :] = torch.randn(out.shape[2], generator=gen)
        elif e.choice.reshape is not None:  # channels-last (N, H, W, C)
            z[:, r, c, :] = torch.randn(out.shape[3], generator=gen)
        else:
            z[:, :, r, c] = torch.randn(out.shape[1], generator=gen)
        return out * 0 + z  # still in the graph: the package hooks its gradient

    return e.layer.register_forward_hook(hook)


def _structural_grid(e: Explainer) -> tuple[int, int]:
    """The grid of the feature map the classifier pools, read off the model directly."""
    model, s = e.model, e.pre.input_size
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):
        return tuple(int(v) for v in model.patch_embed.grid_size)  # type: ignore[return-value]
    feature = getattr(model, "feature_layer", None)
    got: list[torch.Tensor] = []
    if isinstance(feature, nn.Module):
        h = feature.register_forward_hook(lambda _m, _i, o: got.append(o))
        with torch.no_grad():
            model(torch.zeros(1, 3, s, s))
        h.remove()
        return int(got[0].shape[2]), int(got[0].shape[3])
    with torch.no_grad():
        f = model.forward_features(torch.zeros(1, 3, s, s))
    return (int(f.shape[1]), int(f.shape[2])) if getattr(model, "output_fmt", "NCHW") == "NHWC" else tuple(f.shape[2:])  # type: ignore[return-value]


@pytest.mark.slow
@pytest.mark.parametrize("arch", OWN + TIMM)
def test_every_architecture_maps_its_pooled_grid_onto_the_right_pixels(tmp_path: Path, arch: str) -> None:
    image = patches(1, seed=3)
    first: Path | None = None
    for crop in (None, 80):  # 96 px in, and the recipe's 80 px centre crop
        run = tmp_path / f"c{crop}"
        if first is not None and not any(k in arch for k in ("vit", "swin", "flatten")):  # weights fit any size
            run.mkdir()
            make_run(tmp_path / "spec", arch, crop=crop)  # only for model.json; weights are the first run's
            shutil.copy(tmp_path / "spec" / "model.json", run / "model.json")
            shutil.copy(first / "best.safetensors", run / "best.safetensors")
            shutil.rmtree(tmp_path / "spec")
        else:
            make_run(run, arch, crop=crop)
        first = first or run
        e = Explainer(run, method="gradcam-elementwise", batch_size=1)
        grid = e.choice.grid
        assert grid == _structural_grid(e), (arch, crop, e.choice.name)
        if arch == "efficientnet_b0":
            assert e.choice.name == "bn2"  # after conv_head, what the classifier pools; not blocks.6
        if "vit" not in arch:  # --finer: the stage before, at least twice the resolution (a ViT has none)
            finer = choose_layer(e.model, arch, e.pre.input_size, finer=True)
            assert finer.grid[0] >= 2 * grid[0] - 1 and finer.grid[1] >= 2 * grid[1] - 1, (arch, finer.name)
        side = crop or 96
        off = (96 - side) // 2
        cell = (0, grid[1] - 1)  # top-right: a swapped height and width would put it bottom-left
        handle = _inject(e, cell)
        try:
            m = e.explain(image)[0]
        finally:
            handle.remove()
        ch, cw = side / grid[0], side / grid[1]  # one grid cell in image pixels
        top, left = off + cell[0] * ch, off + cell[1] * cw
        assert m.max() > 0, (arch, crop)
        y, x = np.unravel_index(int(np.argmax(m)), m.shape)
        assert top <= y < top + ch and left <= x < left + cw, (arch, crop, (y, x), (top, left), grid)
        ys, xs = np.nonzero(m)  # bilinear upsampling reaches half a cell beyond the cell, never further
        assert ys.min() >= top - ch / 2 - 1 and ys.max() <= top + 1.5 * ch + 1, (arch, crop)
        assert xs.min() >= left - cw / 2 - 1 and xs.max() <= left + 1.5 * cw + 1, (arch, crop)
        assert m[:off].max() == 0 if off else True  # zero outside the crop
