"""The model factory: every registered model, timm backbones, local weights, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from histoscan.errors import ConfigError
from histoscan.models import create_model, list_models
from histoscan.models.factory import count_parameters

TIMM_NAMES = ["resnet18", "resnet50", "densenet121", "densenet169", "efficientnet_b0", "vit_small_patch16_224"]
HEAVY = {"custom_cnn", *TIMM_NAMES}  # seconds of forward and backward each on 2 CPU cores: slow tier


def _tiered(name: str) -> object:
    return pytest.param(name, marks=pytest.mark.slow) if name in HEAVY else name


@pytest.mark.parametrize("name", [_tiered(n) for n in list_models() + TIMM_NAMES])
@pytest.mark.parametrize("size", [96, 224])
def test_model_forward_backward(name: str, size: int) -> None:
    torch.manual_seed(0)
    for classes, outputs in ((2, 1), (3, 3)):
        if classes == 3 and size == 224 and name not in list_models():
            continue  # the multi-class head is the same code path; spare CPU time
        model = create_model(name, classes, input_size=size)
        x = torch.rand(2, 3, size, size)
        y = model(x)
        assert y.shape == (2, outputs)
        y.sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_custom_cnn_has_about_2_3_million_parameters() -> None:
    assert 2.1e6 < count_parameters(create_model("custom_cnn", 2)) < 2.5e6


def test_nas_cnn_follows_its_config() -> None:
    m = create_model(
        "nas_cnn", 2, num_blocks=3, filter_mult=2, kernel_sizes=[5, 3, 3], batch_norm=True, dense_units=[256]
    )
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 6 and convs[0].kernel_size == (5, 5) and convs[-1].out_channels == 64
    assert any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())


def test_local_safetensors_and_pth_weights(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    donor = timm.create_model("resnet18", num_classes=1000)  # ImageNet-shaped head, as a downloaded file has
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    torch.save({"state_dict": donor.state_dict()}, tmp_path / "r18.pth")
    for f in ("r18.safetensors", "r18.pth"):
        model = create_model("resnet18", 2, weights=tmp_path / f)
        assert torch.equal(model.conv1.weight, donor.conv1.weight)
        assert model.get_classifier().out_features == 1  # head rebuilt for our task
    own = create_model("simple_cnn", 2)
    torch.save(own.state_dict(), tmp_path / "cnn.pt")
    again = create_model("simple_cnn", 2, weights=tmp_path / "cnn.pt")
    assert all(torch.equal(a, b) for a, b in zip(own.state_dict().values(), again.state_dict().values()))


def test_bad_models_and_weights_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'resnet'.*did you mean"):
        create_model("resnet", 2)
    with pytest.raises(ConfigError, match="weights file not found"):
        create_model("simple_cnn", 2, weights=tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable weights file"):
        create_model("simple_cnn", 2, weights=tmp_path / "junk.pth")
    torch.save(create_model("custom_cnn", 2).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="do not fit"):
        create_model("simple_cnn", 2, weights=tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="no pretrained weights"):
        create_model("simple_cnn", 2, pretrained=True)
    with pytest.raises(ConfigError, match="bad arguments"):
        create_model("nas_cnn", 2, wings=3)


def test_pretrained_without_hub_names_the_local_file_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """When timm cannot reach the hub (as on an offline machine), the error says how to use a local file."""
    import timm

    real = timm.create_model

    def offline(name: str, pretrained: bool = False, **kw: object) -> torch.nn.Module:
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConfigError, match=r"could not fetch ImageNet weights for 'resnet18'.*--weights PATH"):
        create_model("resnet18", 2, pretrained=True)
    assert create_model("resnet18", 2).get_classifier().out_features == 1


def test_registering_a_taken_name_raises() -> None:
    from torch import nn

    from histoscan.models.registry import register_model

    def simple_cnn(num_outputs: int = 1, input_size: int = 96) -> nn.Module:
        return nn.Linear(1, num_outputs)

    list_models()  # the built-in models are registered
    with pytest.raises(ConfigError, match=r"'simple_cnn' is already registered by histoscan\.models\.cnn"):
        register_model(simple_cnn)
    assert create_model("simple_cnn", 2).__class__.__name__ != "Linear"  # the original builder is still there
