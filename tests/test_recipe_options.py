"""The recipe round's training options (issue 40): random crop offsets, mixup / CutMix, the whole-tile config
chosen by label geometry, and the near-duplicate (de-duplicated) split."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from histoscan.data.dedup import near_duplicate_groups
from histoscan.data.ingest import ingest
from histoscan.data.splits import combine_groups, write_splits
from histoscan.data.store import PatchStore
from histoscan.data.synthetic import write_synthetic
from histoscan.data.transforms import CentreSafeCrop
from histoscan.errors import ConfigError
from histoscan.preprocessing import Preprocessing
from histoscan.training.config import WHOLE_TILE_CONFIG, TrainConfig, load_for_store
from histoscan.training.fit import train
from histoscan.training.mixing import label_region, mix_batch
from histoscan.training.module import PatchClassifier


# ---- mixup / CutMix -------------------------------------------------------------------------------
def test_mixup_blends_each_row_with_its_partner_by_one_weight() -> None:
    x = torch.rand(6, 3, 16, 16)
    mixed = mix_batch(x, mixup=0.2, cutmix=0.0, keep=16, rng=np.random.default_rng(1))
    assert mixed is not None and 0 <= mixed.lam <= 1 and sorted(mixed.perm.tolist()) == list(range(6))
    assert torch.allclose(mixed.x, mixed.lam * x + (1 - mixed.lam) * x[mixed.perm])
    assert mix_batch(x, 0.0, 0.0, 16, np.random.default_rng(1)) is None  # both off: the batch as it was


@pytest.mark.parametrize("seed", range(12))
def test_cutmix_label_weight_is_the_share_of_the_labelled_centre_left_to_each_row(seed: int) -> None:
    """The label follows the labelled centre: a box in the margin leaves it whole (weight 1)."""
    h = w = 40
    keep = 8
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, h, w).clone()  # row i: all pixels i
    mixed = mix_batch(x, mixup=0.0, cutmix=1.0, keep=keep, rng=np.random.default_rng(seed))
    assert mixed is not None
    pasted = (mixed.x != x)[:, 0]  # where a partner's pixels were pasted
    own = mixed.perm == torch.arange(6)
    box = pasted[~own].any(0) if (~own).any() else torch.zeros(h, w, dtype=torch.bool)
    c0 = (h - keep) // 2
    covered = box[c0 : c0 + keep, c0 : c0 + keep].float().mean().item()
    assert mixed.lam == pytest.approx(1 - covered)
    # the pasted pixels are the partner's: row i's box holds perm[i]'s value
    for i in range(6):
        assert torch.all(mixed.x[i, 0][box] == float(mixed.perm[i]))


def test_label_region_scales_with_the_input_and_whole_tile_labels_use_the_whole_input() -> None:
    assert label_region(80, 32, 80) == 32  # crop 80, no resize
    assert label_region(160, 32, 80) == 64  # crop 80 resized to 160
    assert label_region(128, None, 224) == 128  # whole-tile label


def test_mixed_loss_is_the_weighted_loss_of_both_labels() -> None:
    module = PatchClassifier(
        torch.nn.Flatten(), TrainConfig(mixup=0.4), Preprocessing(image_size=[8, 8], label_size=None), 2
    )
    logits, y = torch.randn(5, 1), torch.tensor([0, 1, 1, 0, 1])
    perm, lam = torch.tensor([4, 3, 2, 1, 0]), 0.3
    want = lam * module.loss(logits, y) + (1 - lam) * module.loss(logits, y[perm])
    target = lam * y.float() + (1 - lam) * y[perm].float()  # BCE is linear in the target
    direct = torch.nn.functional.binary_cross_entropy_with_logits(logits.squeeze(1), target)
    assert torch.allclose(want, direct, atol=1e-6)


# ---- random crop offsets --------------------------------------------------------------------------
def test_random_crop_is_a_centre_safe_crop_in_training_and_centred_elsewhere() -> None:
    pre = Preprocessing(image_size=[96, 96], crop=80, label_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    module = PatchClassifier(torch.nn.Identity(), TrainConfig(crop=80, random_crop=True), pre, 2)
    crops = [op for op in module.augment.ops if isinstance(op, CentreSafeCrop)]
    assert len(crops) == 1 and crops[0].size == 80 and crops[0].keep == 32
    images = torch.randint(0, 256, (16, 96, 96, 3), dtype=torch.uint8)
    assert module._preprocess(images, train=True).shape[-2:] == (80, 80)
    assert torch.equal(module._preprocess(images, train=False), pre(images))  # validation: centred, unaugmented
    plain = PatchClassifier(torch.nn.Identity(), TrainConfig(crop=80), pre, 2)
    assert not any(isinstance(op, CentreSafeCrop) for op in plain.augment.ops)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"random_crop": True}, "random_crop needs crop"),
        ({"mixup": -0.1}, "mixup and cutmix must be at least 0"),
        ({"cutmix": 1.0, "augment": "stain-medium", "stain_consistency": 1.0}, "cannot be combined"),
    ],
)
def test_recipe_options_refuse_bad_values(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(**values)


@pytest.fixture(scope="module")
def kaggle_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    write_synthetic(root / "src", "kaggle", 120, seed=5, noise=0.3)
    return ingest(root / "src", root / "store", workers=1).store


def test_a_run_trains_with_random_crop_mixup_and_cutmix(kaggle_store: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        data=str(kaggle_store),
        out=str(tmp_path),
        name="mix",
        model="simple_cnn",
        crop=64,
        random_crop=True,
        mixup=0.2,
        cutmix=1.0,
        batch_size=16,
        max_epochs=2,
        progress=False,
        early_stopping=None,
        threads=1,
    )
    result = train(cfg)
    assert result.epochs == 2 and np.isfinite(result.best_val_auroc)
    saved = TrainConfig.from_yaml(result.run_dir / "config.yaml")
    assert (saved.random_crop, saved.mixup, saved.cutmix) == (True, 0.2, 1.0)


# ---- the whole-tile config, chosen by label geometry ----------------------------------------------
def test_train_chooses_the_whole_tile_config_for_whole_image_labels(
    kaggle_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("wholetile")
    write_synthetic(root / "src", "folders", 30, seed=2, size=64)
    folders = ingest(root / "src", root / "store", workers=1).store
    assert PatchStore(folders).label_size is None and PatchStore(kaggle_store).label_size == 32
    said: list[str] = []
    cfg = load_for_store(None, {"data": str(folders), "max_time": "10m"}, printer=said.append)
    shipped = TrainConfig.load(WHOLE_TILE_CONFIG)
    assert cfg.model == shipped.model and cfg.resize == shipped.resize and cfg.crop is None
    assert cfg.max_time == "10m"  # what the user gave still wins
    assert len(said) == 1 and f"the shipped config {WHOLE_TILE_CONFIG} is used" in said[0]
    # a centre-labelled store, a named config or a named model: no automatic choice, nothing said
    for config, overrides in [
        (None, {"data": str(kaggle_store)}),
        (None, {"data": str(folders), "model": "simple_cnn"}),
        ("cpu-default", {"data": str(folders)}),
    ]:
        said.clear()
        cfg = load_for_store(config, overrides, printer=said.append)
        assert not said and cfg.resize != shipped.resize


# ---- near-duplicate groups and the de-duplicated split --------------------------------------------
@pytest.fixture(scope="module")
def near_duplicates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A class-folder source of 40 distinct textures, 12 of them also present as a rotated / flipped, re-noised copy."""
    root = tmp_path_factory.mktemp("dups")
    rng = np.random.default_rng(0)
    copies: dict[str, str] = {}
    for c in ("a", "b"):
        (root / "src" / c).mkdir(parents=True)
    for i in range(40):
        cls = "ab"[i % 2]
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # coarse structure pHash sees
        image = np.asarray(Image.fromarray(small).resize((64, 64), Image.BILINEAR))
        Image.fromarray(image).save(root / "src" / cls / f"img{i:02d}.png")
        if i < 12:
            twin = np.rot90(image, i % 4)[:, ::-1] if i % 3 == 0 else np.rot90(image, 1 + i % 3)
            noisy = np.clip(twin.astype(int) + rng.integers(-6, 7, twin.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / "src" / cls / f"copy{i:02d}.png")
            copies[f"copy{i:02d}"] = f"img{i:02d}"
    return ingest(root / "src", root / "store", workers=1).store, copies


def test_near_duplicates_under_any_flip_or_rotation_share_a_group(near_duplicates: tuple[Path, dict]) -> None:
    path, copies = near_duplicates
    store = PatchStore(path)
    found = near_duplicate_groups(store)
    names = {re.sub(r"^.*?(img|copy)", r"\1", Path(i).name).removesuffix(".png"): k for k, i in enumerate(store.ids)}
    for copy, original in copies.items():
        assert found.groups[names[copy]] == found.groups[names[original]], (copy, original)
    singles = [k for n, k in names.items() if n.startswith("img") and n.replace("img", "copy") not in copies]
    assert len({found.groups[k] for k in singles}) == len(singles)  # distinct textures stay apart
    assert found.count == 40 and found.shared == 24 and found.largest == 2


def test_dedup_split_keeps_each_group_on_one_side(near_duplicates: tuple[Path, dict]) -> None:
    path, _ = near_duplicates
    store = PatchStore(path)
    written = write_splits(store, val=0.2, test=0.2, seed=0, dedup=True)
    assert written.path.name == "seed0-val0.2-test0.2-dedup.csv" and written.dedup is not None
    split = pd.read_csv(written.path).set_index("id").loc[list(store.ids), "split"].to_numpy()
    groups = written.dedup.groups
    for g in np.unique(groups):
        assert len(set(split[groups == g])) == 1
    lines = "\n".join(written.lines())
    assert "40 groups, 24 images share a group" in lines and "--split-file" in lines


def test_combine_groups_links_rows_that_share_a_group_in_either_grouping() -> None:
    a = np.array([0, 0, 1, 2, 3])
    b = np.array(["p", "q", "q", "r", "s"])
    out = combine_groups(a, b)
    assert out[0] == out[1] == out[2] and len({out[2], out[3], out[4]}) == 3


# ---- the GPU config, on CPU (no GPU lent when it was written: unmeasured) ----------------------------------
def test_gpu_config_trains_end_to_end_on_cpu_with_a_tiny_backbone(kaggle_store: Path, tmp_path: Path) -> None:
    """gpu-resnet50 as shipped, with a tiny timm backbone and CPU numerics in place of the GPU's."""
    shipped = TrainConfig.load("gpu-resnet50")
    assert (shipped.model, shipped.pretrained, shipped.crop, shipped.resize) == ("resnet50", False, None, 160)
    cfg = TrainConfig.load(
        "gpu-resnet50",
        {
            "data": str(kaggle_store),
            "out": str(tmp_path),
            "name": "gpu-on-cpu",
            "model": "resnet10t",  # the same timm family, small enough for a CPU test
            "resize": 64,
            "batch_size": 16,
            "max_epochs": 1,
            "limit_train_batches": 3,
            "accelerator": "cpu",
            "precision": "32-true",
            "progress": False,
            "threads": 1,
        },
    )
    result = train(cfg)
    assert result.epochs == 1 and (result.run_dir / "best.safetensors").is_file()
    saved = TrainConfig.from_yaml(result.run_dir / "config.yaml")
    assert (saved.weight_decay, saved.ema_decay, saved.schedule) == (shipped.weight_decay, shipped.ema_decay, "cosine")


def test_no_automatic_choice_for_a_path_that_is_not_a_store(tmp_path: Path) -> None:
    said: list[str] = []
    cfg = load_for_store(None, {"data": str(tmp_path)}, printer=said.append)  # training says what is wrong later
    assert not said and cfg.data == str(tmp_path)


def test_random_crop_on_whole_image_labels_says_it_is_not_applied(tmp_path_factory: pytest.TempPathFactory) -> None:
    from histoscan.training.fit import _geometry

    root = tmp_path_factory.mktemp("wholecrop")
    write_synthetic(root / "src", "folders", 12, seed=3, size=64)
    store = PatchStore(ingest(root / "src", root / "store", workers=1).store)
    said: list[str] = []
    pre = _geometry(TrainConfig(data=str(store.path), crop=48, random_crop=True), store, said.append)
    assert pre.crop is None and pre.resize == 48
    assert len(said) == 1 and "random_crop, which keeps a labelled centre in view, is not applied either" in said[0]
