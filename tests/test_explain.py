"""Grad-CAM: every architecture, binary targets, raw maps on the image's pixels, faithfulness, CLI, limits."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from histoscan.bundle import ModelBundle, build_model, save_weights
from histoscan.cli import app
from histoscan.data.synthetic import synth_patch
from histoscan.errors import ConfigError
from histoscan.explain import Explainer
from histoscan.explain.faithfulness import centre_mass, deleted_images, deletion, rank_correlation
from histoscan.models.registry import register_model
from histoscan.preprocessing import Preprocessing
from tests.conftest import shared


class QuadrantNet(nn.Module):
    """Sees only the top-left quadrant of its input: a 1x1 conv (no spatial spread), then a mask."""

    def __init__(self, num_outputs: int = 1, input_size: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, num_outputs)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.fill_(1.0)
            self.head.weight.fill_(1.0)
            self.head.bias.zero_()
        mask = torch.zeros(1, 1, input_size, input_size)
        mask[..., : input_size // 2, : input_size // 2] = 1
        self.register_buffer("mask", mask, persistent=False)

    @property
    def feature_layer(self) -> nn.Module:
        return self.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv(x) * self.mask)
        return self.head(a.mean(dim=(2, 3)))


@register_model
def quadrant_net(num_outputs: int = 1, input_size: int = 32) -> QuadrantNet:
    """Test model: sees only the top-left quadrant of its input."""
    return QuadrantNet(num_outputs, input_size)


def make_run(root: Path, architecture: str, classes: tuple[str, ...] = ("normal", "tumor"), **pre: object) -> Path:
    """A run folder with untrained (or crafted) weights: model.json and best.safetensors."""
    bundle = ModelBundle(architecture, list(classes), Preprocessing(**pre))  # type: ignore[arg-type]
    model = build_model(bundle)
    root.mkdir(parents=True, exist_ok=True)
    bundle.save(root)
    save_weights(model, root / "best.safetensors")
    return root


def patches(n: int, seed: int = 0, label: int = 1, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([synth_patch(rng, label, size) for _ in range(n)])


@pytest.mark.parametrize(
    ("arch", "pre"),
    [
        ("simple_cnn", {"crop": 64, "resize": 48}),
        pytest.param("custom_cnn", {"resize": 64}, marks=pytest.mark.slow),
        pytest.param("resnet18", {"resize": 64}, marks=pytest.mark.slow),
        pytest.param("vit_tiny_patch16_224", {"resize": 32}, marks=pytest.mark.slow),
    ],
)
def test_every_architecture_gives_float32_maps_on_the_image(tmp_path: Path, arch: str, pre: dict) -> None:
    run = make_run(tmp_path / arch, arch, **pre)
    e = Explainer(run, batch_size=4)
    images = patches(3)
    maps = e.explain(images)
    assert isinstance(maps, np.ndarray) and maps.shape == (3, 96, 96) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and (maps >= 0).all()
    odd = e.explain([images[0], images[1][:60, :80]])  # any sizes: each map the size of its image
    assert [m.shape for m in odd] == [(96, 96), (60, 80)]


def test_own_cnn_layer_is_the_last_conv_before_the_final_pool() -> None:
    from histoscan.models import create_model

    model = create_model("simple_cnn", 2)
    got: dict[str, torch.Size] = {}

    def keep(_m: nn.Module, _i: object, o: torch.Tensor) -> None:
        got["shape"] = o.shape

    model.feature_layer.register_forward_hook(keep)
    model(torch.zeros(1, 3, 32, 32))
    assert tuple(got["shape"][-2:]) == (8, 8)  # 32 / 4: before the last max-pool, not 4x4 after it
    assert not isinstance(model.feature_layer, nn.MaxPool2d)


def test_quadrant_model_maps_land_on_the_right_pixels_after_crop_and_resize(tmp_path: Path) -> None:
    run = make_run(tmp_path / "q", "quadrant_net", crop=64, resize=32)
    e = Explainer(run)
    m = e.explain(patches(2, label=0))
    # crop 64 of 96 starts at 16; the model's top-left quadrant (16 of 32 px) is the crop's top-left 32 px
    inside = m[:, 16:48, 16:48]
    assert (inside[:, 1:-1, 1:-1] > 0).all()
    outside = m.copy()
    outside[:, 16:49, 16:49] = 0  # bilinear upsampling may touch one pixel beyond the edge
    assert np.abs(outside).max() == 0
    assert m[:, :16].max() == 0 and m[:, 80:].max() == 0  # zero outside the crop: shown, not hidden
    # a map of a turned view is turned back: view 1 turns the image a quarter, its top-left is the image's top-right
    one = np.stack(e.explain_batch(patches(1, label=0), tta=[1]).maps)
    assert one[0, 17:47, 49:79].min() > 0 and one[0, 16:48, 16:47].max() == 0


def test_binary_targets_tumour_predicted_and_class(tmp_path: Path) -> None:
    run = make_run(tmp_path / "q", "quadrant_net", resize=32)
    images = patches(2, label=0)
    tumour = Explainer(run, target="tumour").explain_batch(images)
    normal = Explainer(run, target="normal").explain_batch(images)
    predicted = Explainer(run, target="predicted").explain_batch(images)
    # the crafted logit grows with the quadrant's activations: positive evidence for tumour, none for normal
    assert tumour.maps[0].max() > 0 and normal.maps[0].max() == 0
    assert (tumour.predicted == 1).all() and predicted.targets == ["tumor", "tumor"]
    np.testing.assert_allclose(predicted.maps[0], tumour.maps[0])
    with pytest.raises(ConfigError, match="not a class"):
        Explainer(run, target="stroma")


def test_multiclass_target_and_bad_method_or_layer(tmp_path: Path) -> None:
    run = make_run(tmp_path / "m", "simple_cnn", classes=("aca", "n", "scc"), resize=32)
    e = Explainer(run, target="predicted")
    ex = e.explain_batch(patches(2))
    assert ex.probabilities.shape == (2, 3) and set(ex.targets) <= {"aca", "n", "scc"}
    with pytest.raises(ConfigError, match="not a class"):
        Explainer(run, target="tumour")  # no class of that name among three
    with pytest.raises(ConfigError, match="--method 'nope'"):
        Explainer(run, method="nope")
    with pytest.raises(ConfigError, match=r"has no layer 'features\.9'"):
        Explainer(run, layer="features.9")


def test_maps_are_fp32_and_raw_not_min_max_scaled(tiny_run: Path) -> None:
    e = Explainer(tiny_run)
    assert all(p.dtype == torch.float32 for p in e.model.parameters())
    maps = e.explain(np.concatenate([patches(4, 1, label=1), patches(4, 2, label=0)]))
    maxima = maps.reshape(len(maps), -1).max(axis=1)
    assert not np.allclose(maxima, 1.0)  # the package's per-image min-max would make every max 1


def test_synthetic_positive_maps_put_most_mass_in_the_centre(tiny_run: Path) -> None:
    e = Explainer(tiny_run)
    images = patches(16, seed=5, label=1)
    ex = e.explain_batch(images)
    positive = ex.predicted == 1
    assert positive.sum() >= 8, "the tiny run should call most synthetic tumour patches positive"
    mass = centre_mass(np.stack(ex.maps)[positive])
    assert float(np.mean(mass)) > 0.5, mass  # the centre half of each side is a quarter of the area


@pytest.mark.slow
def test_deletion_beats_random_and_randomised_weights_change_the_maps(tiny_run: Path, tmp_path: Path) -> None:
    e = Explainer(tiny_run)
    images = patches(24, seed=7, label=1)
    ex = e.explain_batch(images)
    keep = ex.predicted == 1
    d = deletion(e, images[keep], np.stack(ex.maps)[keep], target=1, fraction=0.2)
    assert d.drop("map").mean() > d.drop("random").mean(), (d.drop("map").mean(), d.drop("random").mean())
    # sanity check: the same architecture with random weights explains differently
    bundle = e.bundle
    rand = tmp_path / "random"
    rand.mkdir()
    bundle.save(rand)
    save_weights(build_model(bundle), rand / "best.safetensors")
    r = Explainer(rand).explain(images[keep])
    corr = [rank_correlation(a, b) for a, b in zip(np.stack(ex.maps)[keep], r)]
    assert float(np.mean(corr)) < 0.9, corr  # a barely trained model is still close to its random start
    # ...and maps of random weights do not explain the trained model: greying their top pixels does less
    d_random = deletion(e, images[keep], r, target=1, fraction=0.2)
    assert d.drop("map").mean() > d_random.drop("map").mean(), (d.drop("map").mean(), d_random.drop("map").mean())


def test_deletion_happens_inside_the_crop_on_stain_normalised_colours(tmp_path: Path) -> None:
    from histoscan.stain.normalise import fit_target

    target = fit_target(patches(32, seed=3, label=1), "reinhard").to_dict()
    run = make_run(tmp_path / "crop", "simple_cnn", crop=64, resize=48, stain=target)
    e = Explainer(run)
    images = patches(4, seed=9, label=1)
    maps = np.stack(e.explain_batch(images).maps)
    originals, deleted, _ = deleted_images(e, images, maps, fraction=0.2)
    # deletion works on what the model is given: the stain-normalised patch (deleting first would recolour the rest)
    assert np.array_equal(originals, e.pre.normalise_stain(torch.from_numpy(images)).numpy())
    count = round(0.2 * 64 * 64)  # a fraction of the crop's area, not of the 96 px patch
    inside = np.zeros((96, 96), bool)
    inside[16:80, 16:80] = True
    for name, x in deleted.items():
        changed = (x != originals).any(axis=-1)
        assert not changed[:, ~inside].any(), name  # nothing outside the crop, where the model does not look
        per_image = changed.sum(axis=(1, 2))
        # about ``count`` pixels each (a block is the nearest square; a few pixels may already hold the fill)
        assert ((per_image <= 1.05 * count) & (per_image >= 0.9 * count)).all(), (name, per_image)
    hit = (deleted["map"] != originals).any(axis=-1)
    for m, h in zip(maps, hit):
        assert m[h].min() >= m[inside & ~h].max()  # the map's highest pixels inside the crop go first


def test_normal_fill_takes_the_deleted_pixels_from_a_normal_patch(tmp_path: Path) -> None:
    e = Explainer(make_run(tmp_path / "crop", "simple_cnn", crop=64, resize=48))
    images, donor = patches(3, seed=4, label=1), patches(1, seed=5, label=0)
    maps = np.stack(e.explain_batch(images).maps)
    originals, deleted, _ = deleted_images(e, images, maps, 0.3, fill="normal", donors=donor)
    for name, x in deleted.items():
        changed = (x != originals).any(axis=-1)
        assert changed.any() and np.array_equal(x[changed], np.broadcast_to(donor, x.shape)[changed]), name
    with pytest.raises(ConfigError, match="donor"):
        deleted_images(e, images, maps, 0.3, fill="normal")


@pytest.mark.slow
def test_real_tissue_maps(tiny_run: Path) -> None:
    from histoscan.data.imageio import read_image

    files = sorted((shared("hcd") / "train").glob("*.tif"))[:8]
    images = np.stack([read_image(f).pixels for f in files])
    ex = Explainer(tiny_run, target="predicted").explain_batch(images, tta=True)
    assert len(ex) == 8 and all(m.shape == (96, 96) and np.isfinite(m).all() for m in ex.maps)


def test_cli_writes_pngs_maps_table_gallery_and_lists_bad_files(
    tiny_run: Path, kaggle_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    files = sorted((kaggle_dir / "train").glob("*.tif"))[:6]
    for f in files:
        (src / f.name).write_bytes(f.read_bytes())
    (src / "broken.tif").write_bytes(b"not a tiff")
    out = tmp_path / "out"
    args = ["explain", str(tiny_run), str(src), "--out", str(out), "--labels", str(kaggle_dir / "train_labels.csv")]
    r = CliRunner().invoke(app, [*args, "--save-maps"])
    assert r.exit_code == 0, r.output
    assert len(list((out / "images").glob("*.png"))) == 6 and len(list((out / "maps").glob("*.npy"))) == 6
    assert "broken" in (out / "errors.csv").read_text()
    page = (out / "explain.html").read_text()
    assert page.count("<img") == 6 and ("true positives" in page or "true negatives" in page)
    table = (out / "explain.csv").read_text().splitlines()
    assert len(table) == 7 and table[0].startswith("id,prob_normal,prob_tumor,predicted,label")
    raw = [np.load(p) for p in sorted((out / "maps").glob("*.npy"))]
    assert all(m.dtype == np.float32 and m.shape == (96, 96) for m in raw)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "already exists" in r.output
    r = CliRunner().invoke(app, [*args[:3], "--out", str(tmp_path / "o2"), "--method", "scorecam", "--layer", "nope"])
    assert r.exit_code == 2 and "has no layer 'nope'" in r.output


def test_cli_explains_a_store_split(tiny_run: Path, tmp_path: Path) -> None:
    import json

    store = json.loads((tiny_run / "model.json").read_text())["training"]["store"]
    out = tmp_path / "store-out"
    r = CliRunner().invoke(app, ["explain", str(tiny_run), store, "--split", "test", "--out", str(out), "--tta"])
    assert r.exit_code == 0, r.output
    rows = (out / "explain.csv").read_text().splitlines()[1:]
    assert rows and all(row.split(",")[4] in ("normal", "tumor") for row in rows)  # labels come from the store


def test_gallery_opens_in_a_browser(tiny_run: Path, kaggle_dir: Path, tmp_path: Path) -> None:
    from tests.conftest import assert_images_load, headless_chrome

    out = tmp_path / "g"
    files = sorted((kaggle_dir / "train").glob("*.tif"))[:3]
    r = CliRunner().invoke(app, ["explain", str(tiny_run), *map(str, files), "--out", str(out)])
    assert r.exit_code == 0, r.output
    with headless_chrome() as browser:
        assert_images_load(browser, out / "explain.html", 3)


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to read RSS")
def test_memory_stays_flat_and_hooks_are_released(tmp_path: Path) -> None:
    run = make_run(tmp_path / "m", "simple_cnn", resize=32)
    e = Explainer(run, batch_size=50)
    images = patches(50, size=32)
    e.explain(images)
    gc.collect()
    before = _rss_mb()
    for _ in range(40):  # 2,000 maps
        e.explain(images)
    gc.collect()
    assert _rss_mb() - before < 60
    assert not e.layer._forward_hooks and not e.model._forward_hooks  # the context manager removed them
