"""Model factory: histoscan's own CNNs and every timm backbone, by name."""

from histoscan.models.registry import create_model, is_model, list_models, num_outputs_for, register_model

__all__ = ["create_model", "is_model", "list_models", "num_outputs_for", "register_model"]
