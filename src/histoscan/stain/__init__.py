"""Stain handling: normalisation stored in the bundle, stain augmentation, stain-shift robustness."""
