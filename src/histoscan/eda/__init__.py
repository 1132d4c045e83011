"""Exploratory data analysis of a packed store: statistics, figures and one HTML report."""
