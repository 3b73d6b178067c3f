"""Parsing of the small value formats the CLI and policy files share."""

from __future__ import annotations

import math
import re

__all__ = ["parse_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds from `30s`, `10m`, `24h`, `2d`, `250ms` or a plain number of seconds.

    Raises:
        ValueError: naming the bad text.
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a duration such as 30s, 10m or 24h, got {text!r}")
    if isinstance(text, int | float):
        if not (math.isfinite(text) and text >= 0):
            raise ValueError(f"a duration must be a finite number >= 0, got {text!r}")
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"expected a duration such as 30s, 10m or 24h, got {text!r}")
    return float(m.group(1)) * _SECONDS[m.group(2)]
