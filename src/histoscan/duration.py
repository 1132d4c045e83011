"""Durations with explicit units (``90s``, ``20m``, ``1h30m``): a bare number is refused, never guessed."""

from __future__ import annotations

import re

from histoscan.errors import ConfigError

UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
DURATION_HELP = "with a unit: 90s, 20m, 1h, 1h30m"
# Written by hand: the few duration parsers on PyPI (pytimeparse, ...) accept bare numbers as seconds, which is the
# ambiguity this module exists to refuse; the grammar is one regular expression.
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])")


def parse_duration(value: str, name: str = "duration") -> float:
    """Seconds in a duration such as ``"90s"``, ``"20m"``, ``"1h30m"`` or ``"1.5h"``.

    Raises:
        ConfigError: naming ``name`` when the text is empty, has no unit, or is not a duration.
    """
    text = str(value).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        raise ConfigError(f"{name}: {value!r} has no unit; write it {DURATION_HELP}")
    parts = _PART.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ConfigError(f"{name}: {value!r} is not a duration; write it {DURATION_HELP}")
    seconds = sum(float(n) * UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"{name}: {value!r} must be longer than zero")
    return seconds
