"""Load a local weights file (.safetensors, .pth, .pt) into a model, dropping a mismatched classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoscan.errors import ConfigError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file; ``.pth``/``.pt`` are read with ``weights_only=True`` (no pickled code)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: weights file not found")
    state: Any
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        elif p.suffix in (".pth", ".pt", ".bin", ".ckpt"):
            state = torch.load(p, map_location="cpu", weights_only=True)
        else:
            raise ConfigError(f"{p}: unsupported weights format {p.suffix!r}; use .safetensors, .pth or .pt")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{p}: not a readable weights file ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{p}: does not hold a state dict of tensors")
    return {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load ``path`` into ``model``; a classifier of another shape (ImageNet's 1000 classes) is left as built.

    Returns the names of the parameters that were not loaded. Any other mismatch is a ConfigError.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    head_names: set[str] = set()
    get_classifier = getattr(model, "get_classifier", None)  # timm models name their head
    if callable(get_classifier):
        head = get_classifier()
        if isinstance(head, nn.Module):
            ids = {id(p) for p in head.parameters()} | {id(b) for b in head.buffers()}
            head_names = {n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if id(t) in ids}
    skipped = [k for k in own if k in head_names and (k not in state or state[k].shape != own[k].shape)]
    usable = {k: v for k, v in state.items() if k in own and k not in skipped}
    missing = [k for k in own if k not in usable and k not in skipped and not k.endswith("num_batches_tracked")]
    wrong = [k for k, v in state.items() if k in own and k not in skipped and v.shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise ConfigError(
            f"{path}: weights do not fit {type(model).__name__}: {k} has shape "
            f"{tuple(state[k].shape)}, the model expects {tuple(own[k].shape)}"
        )
    if missing:
        raise ConfigError(
            f"{path}: weights do not fit {type(model).__name__}: {len(missing)} tensors missing "
            f"(e.g. {', '.join(missing[:3])})"
        )
    model.load_state_dict(usable, strict=False)
    return skipped
