"""Whole-slide images: read at a physical resolution, mask tissue, tile, scan through the Predictor, write maps."""
