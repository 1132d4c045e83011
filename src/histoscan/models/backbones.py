"""timm backbones: build by name, with ImageNet weights through timm when reachable."""

from __future__ import annotations

from typing import Any

from torch import nn

from histoscan.errors import ConfigError


def create_timm_model(
    name: str, num_outputs: int, *, pretrained: bool = False, input_size: int = 96, **kwargs: Any
) -> nn.Module:
    """``timm.create_model`` with our output count; ViT-style models get ``img_size`` = input size."""
    import timm

    try:
        try:
            return timm.create_model(
                name, pretrained=pretrained, num_classes=num_outputs, img_size=input_size, **kwargs
            )
        except TypeError:  # CNNs take no img_size
            return timm.create_model(name, pretrained=pretrained, num_classes=num_outputs, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise ConfigError(
                f"could not fetch ImageNet weights for {name!r} through timm ({type(exc).__name__}: {exc}). "
                "Without access to the Hugging Face hub, pass a local file with --weights PATH "
                "(.safetensors or .pth state dict) and leave --pretrained off."
            ) from exc
        raise ConfigError(f"could not build timm model {name!r}: {exc}") from exc


def timm_data_config(model: nn.Module) -> dict[str, Any]:
    """Timm's mean/std/input size for a model (``resolve_model_data_config``)."""
    import timm.data

    return dict(timm.data.resolve_model_data_config(model))
