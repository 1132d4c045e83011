"""Inference: the one path that runs a trained model for prediction."""
