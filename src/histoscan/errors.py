"""Errors that reach the user: each names the file or field and the problem."""

from __future__ import annotations


class HistoscanError(Exception):
    """A problem the user can fix (bad input, bad option); the CLI prints it without a traceback."""


class DataError(HistoscanError):
    """A data source, file or store is missing, malformed or inconsistent."""


class ConfigError(HistoscanError):
    """An option or configuration value is invalid."""
