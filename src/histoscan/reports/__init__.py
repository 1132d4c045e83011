"""Figures (PNG) and self-contained HTML reports shared by eda, evaluation, baselines and tuning."""
