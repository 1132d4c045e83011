"""Evaluation: metrics from probabilities, thresholds, figures, per-run reports and a leaderboard across runs."""
