"""Grad-CAM explanations of a run's predictions (built on pytorch-grad-cam)."""

from histoscan.explain.explainer import Explainer, Explanation

__all__ = ["Explainer", "Explanation"]
