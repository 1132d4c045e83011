"""The registry histoscan's own architectures register into (timm's pattern): ``@register_model``.

It is the bottom of ``histoscan.models``: the architectures (``cnn``) import it to register, and the
factory (``histoscan.models.factory``) imports them and it; the registry imports neither.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from histoscan.errors import ConfigError

ModelFn = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFn] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Decorator: register a builder under its function name.

    Raises:
        ConfigError: when another builder already has that name (a second one would silently replace it).
    """
    name = fn.__name__
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        known = _REGISTRY[name]
        raise ConfigError(
            f"model {name!r} is already registered by {known.__module__}.{known.__qualname__}; "
            f"rename {fn.__module__}.{fn.__qualname__}"
        )
    _REGISTRY[name] = fn
    return fn


def registered(name: str) -> ModelFn | None:
    """The builder registered under ``name`` (None when there is none)."""
    return _REGISTRY.get(name)


def registered_names() -> list[str]:
    """Names of the registered builders, sorted."""
    return sorted(_REGISTRY)
