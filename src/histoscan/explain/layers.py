"""Which layer Grad-CAM reads for each architecture, and how ViT tokens become a grid."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from histoscan.errors import ConfigError

ReshapeFn = Callable[[torch.Tensor], torch.Tensor]


def target_layer(model: nn.Module, architecture: str, layer: str | None = None) -> tuple[nn.Module, ReshapeFn | None]:
    """The layer whose activations and gradients make the map, and the reshape that ViT tokens need.

    * histoscan's CNNs: ``feature_layer`` (the last convolution's activation, before the final pooling);
    * timm ViTs (``blocks`` of tokens): the last block's first norm, tokens reshaped to the patch grid;
    * other timm models: the last feature stage (``feature_info[-1]``).

    Args:
        model: the network (as ``histoscan.models.create_model`` builds it).
        architecture: its architecture name, for error messages.
        layer: a submodule name (``model.get_submodule``) instead of the default.

    Raises:
        ConfigError: naming the model when the layer does not exist or the model exposes none.
    """
    reshape = vit_reshape(model) if _is_vit(model) else None
    if layer is not None:
        try:
            return model.get_submodule(layer), reshape
        except AttributeError:
            raise ConfigError(f"model {architecture!r} has no layer {layer!r} to explain") from None
    feature = getattr(model, "feature_layer", None)
    if isinstance(feature, nn.Module):
        return feature, None
    if _is_vit(model):
        return model.blocks[-1].norm1, reshape  # type: ignore[index,union-attr]
    info = getattr(model, "feature_info", None)
    if info:
        name = info[-1]["module"]
        try:
            return model.get_submodule(name), None
        except AttributeError:
            pass
    raise ConfigError(
        f"model {architecture!r} exposes no convolutional feature layer for Grad-CAM; name one with --layer"
    )


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model.patch_embed, "grid_size")


def vit_reshape(model: nn.Module) -> ReshapeFn:
    """Tokens (N, prefix + H*W, C) -> a feature map (N, C, H, W) on the model's patch grid."""
    gh, gw = (int(v) for v in model.patch_embed.grid_size)  # type: ignore[union-attr]
    prefix = int(getattr(model, "num_prefix_tokens", 1))

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        grid = tokens[:, prefix:, :]
        return grid.reshape(grid.shape[0], gh, gw, grid.shape[2]).permute(0, 3, 1, 2)

    return reshape
