"""Model factory: histoscan's own CNNs and every timm backbone, by name.

Importing any part of ``histoscan.models`` runs this file, which imports the factory, which imports the
architectures: so the registry is full before anyone looks a name up.
"""

from histoscan.models.factory import create_model, is_model, list_models, num_outputs_for
from histoscan.models.registry import register_model

__all__ = ["create_model", "is_model", "list_models", "num_outputs_for", "register_model"]
