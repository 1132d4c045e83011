"""One factory by name (timm's pattern): ``create_model("simple_cnn", num_classes=2)``.

Names registered in ``histoscan.models.registry`` are histoscan's own CNNs; any other name that timm knows
(``resnet18``, ``densenet169``, ``efficientnet_b0``, ``vit_small_patch16_224``, ...)
is built by timm, with ImageNet weights when asked and reachable, or from a local file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, ValidationError, validate_call
from torch import nn

from histoscan.errors import ConfigError
from histoscan.models import cnn  # noqa: F401  (its builders register themselves on import)
from histoscan.models.registry import registered, registered_names


def num_outputs_for(num_classes: int) -> int:
    """Binary tasks use one logit (BCE); multi-class tasks one per class (cross-entropy)."""
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    return 1 if num_classes == 2 else num_classes


def list_models(include_timm: bool = False) -> list[str]:
    """Names of histoscan's own models (and all timm models when asked)."""
    names = registered_names()
    if include_timm:
        import timm

        names += timm.list_models()
    return names


def is_model(name: str) -> bool:
    """True when ``name`` is a histoscan or timm model."""
    if registered(name) is not None:
        return True
    import timm

    return timm.is_model(name)


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    input_size: int = 96,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name with the right number of outputs.

    Args:
        name: a histoscan model (``list_models()``) or any timm model name.
        num_classes: classes in the task; binary tasks get one output logit.
        pretrained: ask timm for ImageNet weights (needs the Hugging Face hub).
        weights: a local ``.safetensors`` / ``.pth`` / ``.pt`` state dict to load instead.
        input_size: the side of the input images (flatten heads and ViTs need it).
        kwargs: architecture arguments of the model.
    """
    outputs = num_outputs_for(num_classes)
    builder = registered(name)
    if builder is not None:
        if pretrained:
            raise ConfigError(
                f"model {name!r} is trained from scratch; it has no pretrained weights (use --weights FILE)"
            )
        build = validate_call(config=ConfigDict(strict=True))(builder)  # "yes" for a bool is an error
        try:
            model = build(num_outputs=outputs, input_size=input_size, **kwargs)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ConfigError(
                f"bad arguments for model {name!r}: {where}: {err['msg']} (got {err['input']!r})"
            ) from None
    else:
        import timm

        from histoscan.models.backbones import create_timm_model

        if not timm.is_model(name):
            close = difflib.get_close_matches(name, list_models() + timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown model {name!r}{hint} (see 'histoscan models')")
        model = create_timm_model(name, outputs, pretrained=pretrained, input_size=input_size, **kwargs)
    if weights is not None:
        from histoscan.models.weights import load_weights

        load_weights(model, weights)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def classifier_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of the final classifier (timm's ``get_classifier``)."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    if not isinstance(head, nn.Module):
        raise ConfigError(f"{type(model).__name__} exposes no classifier; cannot freeze its backbone")
    return list(head.parameters())


def logits_and_pooled(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the pooled features of the last feature maps, from one pass of the trunk.

    timm's split (``forward_features``, then ``forward_head``), which histoscan's own CNNs follow too. The
    features are the global average of the last feature maps (what a timm CNN's ``pre_logits`` gives; for
    histoscan's CNNs, whose heads flatten or add dense layers, the same global average of the trunk's
    output); a model whose ``forward_features`` gives tokens rather than maps (a ViT) gives its ``pre_logits``.
    """
    forward_features = getattr(model, "forward_features", None)
    forward_head = getattr(model, "forward_head", None)
    if not (callable(forward_features) and callable(forward_head)):
        raise ConfigError(f"{type(model).__name__} has no forward_features/forward_head; its features cannot be read")
    maps = forward_features(x)
    pooled = maps.float().mean(dim=(2, 3)) if maps.ndim == 4 else torch.flatten(forward_head(maps, pre_logits=True), 1)
    return forward_head(maps), pooled
