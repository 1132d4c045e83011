"""Hyperparameter and architecture search with Optuna: pruned, resumable, shared by many workers."""
