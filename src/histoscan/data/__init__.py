"""Data layer: source readers, validation, the packed store, splits, transforms, synthetic patches."""
