"""Which layer a CAM method reads, chosen from the model's structure, and how its output becomes a grid.

The map must be computed on the last spatial feature map before the global pooling: what the
classifier actually pools. That is found by running the model once on a blank input of its input
size and watching every module's output:

* histoscan's CNNs: ``feature_layer`` (the last convolution's activation, before the final max-pool);
* timm ViTs (``blocks`` of tokens): the last block's first norm (the final norm's patch tokens get no
  gradient when the head reads the class token), tokens reshaped to the patch grid;
* every other model: the module whose output *is* the tensor ``forward_features`` returns (for an
  EfficientNet that is ``bn2`` after the 1 x 1 ``conv_head``, not the last stage ``blocks.6``);
  timm families that keep feature maps channels-last (Swin, MambaOut: ``output_fmt == "NHWC"``)
  get their maps permuted to channels-first for the package.

A head that flattens the feature map instead of pooling it (histoscan's ``flatten_size`` heads) has a
weight per position, so plain Grad-CAM's gradient average over positions is wrong there: the
``auto`` method becomes HiResCAM for it (``explain.explainer``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from histoscan.errors import ConfigError

ReshapeFn = Callable[[torch.Tensor], torch.Tensor]
_NCHW_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d)  # torch's own layers are channels-first


@dataclass
class LayerChoice:
    """The layer a CAM method reads and what its output looks like at the model's input size."""

    module: nn.Module
    name: str
    reshape: ReshapeFn | None  # to (N, C, h, w); None when the output already is
    grid: tuple[int, int]  # (h, w) of the map before it is resized to the input
    flattens: bool  # the head flattens the feature map (a weight per position): HiResCAM, not Grad-CAM


@dataclass
class _Output:
    name: str
    module: nn.Module
    tensor: torch.Tensor


def channels_last(model: nn.Module) -> bool:
    """True for timm families whose feature maps are (N, H, W, C) (Swin-like: ``output_fmt == "NHWC"``)."""
    return str(getattr(model, "output_fmt", "NCHW")) == "NHWC"


def head_flattens(model: nn.Module) -> bool:
    """True when the head flattens the feature map (one weight per position) instead of pooling it."""
    return bool(getattr(model, "flatten_size", None))


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model.patch_embed, "grid_size")


def _vit_grid(model: nn.Module) -> tuple[int, int, int]:
    gh, gw = (int(v) for v in model.patch_embed.grid_size)  # type: ignore[union-attr]
    return gh, gw, int(getattr(model, "num_prefix_tokens", 1))


def vit_reshape(model: nn.Module) -> ReshapeFn:
    """Tokens (N, prefix + H*W, C) -> a feature map (N, C, H, W) on the model's patch grid."""
    gh, gw, prefix = _vit_grid(model)

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        grid = tokens[:, prefix:, :]
        return grid.reshape(grid.shape[0], gh, gw, grid.shape[2]).permute(0, 3, 1, 2)

    return reshape


def nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    """A channels-last feature map (N, H, W, C) as (N, C, H, W)."""
    return x.permute(0, 3, 1, 2)


def _layout(model: nn.Module, out: _Output) -> tuple[tuple[int, int], ReshapeFn | None] | None:
    """(grid, reshape) of a module's output, or None when it is not a spatial map."""
    t = out.tensor
    if t.ndim == 4 and min(t.shape[1:]) > 0:
        if channels_last(model) and not isinstance(out.module, _NCHW_MODULES):
            return (int(t.shape[1]), int(t.shape[2])), nhwc_to_nchw
        return (int(t.shape[2]), int(t.shape[3])), None
    if t.ndim == 3 and _is_vit(model):
        gh, gw, prefix = _vit_grid(model)
        if t.shape[1] == prefix + gh * gw:
            return (gh, gw), vit_reshape(model)
    return None


def _outputs(model: nn.Module, input_size: int) -> tuple[list[_Output], torch.Tensor | None]:
    """Every module's tensor output (in the order they finish) on a blank input, and ``forward_features``' result."""
    seen: list[_Output] = []
    hooks = []
    for name, module in model.named_modules():
        if not name:
            continue

        def keep(m: nn.Module, _i: object, o: object, name: str = name) -> None:
            if isinstance(o, torch.Tensor):
                seen.append(_Output(name, m, o))

        hooks.append(module.register_forward_hook(keep))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device)
            forward = getattr(model, "forward_features", None)
            features = forward(x) if callable(forward) else None
            if features is None:
                model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen, features if isinstance(features, torch.Tensor) else None


def _spatial(model: nn.Module, outputs: list[_Output]) -> dict[str, tuple[_Output, tuple[int, int], ReshapeFn | None]]:
    """The modules with a spatial output, in the model's own (definition) order, each with its grid and reshape."""
    found = {}
    for out in outputs:
        lay = _layout(model, out)
        if lay is not None and out.name not in found:
            found[out.name] = (out, *lay)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(found.items(), key=lambda item: order.get(item[0], len(order))))


def _listing(names: list[str]) -> str:
    short = [n for n in names if n.count(".") <= 1]
    more = len(names) - len(short)
    return ", ".join(short) + (f" (and {more} layers inside them)" if more else "")


def _choice(model: nn.Module, spatial: dict, name: str) -> LayerChoice:
    out, grid, reshape = spatial[name]
    return LayerChoice(out.module, name, reshape, grid, head_flattens(model))


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), type(module).__name__)


def choose_layer(
    model: nn.Module, architecture: str, input_size: int, layer: str | None = None, finer: bool = False
) -> LayerChoice:
    """The layer whose activations and gradients make the map.

    Args:
        model: the network (as ``histoscan.models.create_model`` builds it).
        architecture: its architecture name, for error messages.
        input_size: the side of the model's input (the map's grid depends on it).
        layer: a submodule name (``model.get_submodule``) instead of the structural choice.
        finer: the stage before the chosen one (twice the resolution, for coarse networks).

    Raises:
        ConfigError: one line naming the model and its spatial layers when ``layer`` does not exist or has
            no spatial output, or when the model has no spatial feature map at all.
    """
    outputs, features = _outputs(model, input_size)
    spatial = _spatial(model, outputs)
    names = list(spatial)
    if layer is not None:
        try:
            model.get_submodule(layer)
        except AttributeError:
            raise ConfigError(
                f"model {architecture!r} has no layer {layer!r} to explain; layers with a spatial output: "
                f"{_listing(names)}"
            ) from None
        if layer not in spatial:
            raise ConfigError(
                f"layer {layer!r} of model {architecture!r} has no spatial output at input size {input_size}; "
                f"layers with one: {_listing(names)}"
            )
        return _choice(model, spatial, layer)
    chosen = _structural(model, architecture, input_size, outputs, features, spatial)
    return _earlier_stage(model, architecture, chosen, spatial) if finer else chosen


def _structural(
    model: nn.Module,
    architecture: str,
    input_size: int,
    outputs: list[_Output],
    features: torch.Tensor | None,
    spatial: dict,
) -> LayerChoice:
    feature = getattr(model, "feature_layer", None)
    if isinstance(feature, nn.Module):
        name = _name_of(model, feature)
        if name in spatial:
            return _choice(model, spatial, name)
    if _is_vit(model):
        name = _name_of(model, model.blocks[-1].norm1)  # type: ignore[index,union-attr]
        if name in spatial:
            return _choice(model, spatial, name)
    if features is not None:
        # every module whose output is that very tensor (a stage, its last block, an Identity after it):
        # the outermost real one, so the hook sees the whole forward_features result
        same = [o for o in outputs if o.tensor is features and o.name in spatial]
        real = [o for o in same if not isinstance(o.module, nn.Identity)] or same
        if real:
            return _choice(model, spatial, real[-1].name)
    shape = tuple(features.shape) if features is not None else "none"
    raise ConfigError(
        f"model {architecture!r}: no spatial feature map before its pooling at input size {input_size} "
        f"(forward_features gives {shape}); Grad-CAM explains CNNs, ViTs and Swin-like models; name a layer with "
        f"--layer ({_listing(list(spatial)) or 'it has no layer with a spatial output'})"
    )


def _earlier_stage(model: nn.Module, architecture: str, chosen: LayerChoice, spatial: dict) -> LayerChoice:
    """The stage before ``chosen``: a finer grid (timm's ``feature_info`` stages; histoscan's previous block)."""
    candidates: list[str] = []
    info = getattr(model, "feature_info", None)
    if info:
        candidates = [str(entry["module"]) for entry in info]
    features = getattr(model, "features", None)
    if isinstance(getattr(model, "feature_layer", None), nn.Module) and isinstance(features, nn.Sequential):
        for i, block in enumerate(features):
            convs = [
                j for j, m in enumerate(block.children()) if not isinstance(m, (nn.MaxPool2d, nn.Dropout, nn.Conv2d))
            ]
            if convs:
                candidates.append(f"features.{i}.{convs[-1]}")
    finer = [n for n in candidates if n in spatial and spatial[n][1][0] > chosen.grid[0]]
    if not finer:
        raise ConfigError(
            f"--finer: model {architecture!r} has no stage finer than {chosen.name!r} ({chosen.grid[0]} x "
            f"{chosen.grid[1]}); name a layer with --layer instead"
        )
    return _choice(model, spatial, finer[-1])
