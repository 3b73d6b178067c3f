"""Parsing of the small value formats the CLI, the admin socket and policy files share."""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["MAX_DURATION", "check_seconds", "parse_duration"]

#: The longest duration anything accepts (`--for`, `since`, TTLs, `aggregate_timeout`): a
#: year. Every time the controller derives from one stays a representable date.
MAX_DURATION = 365 * 86400.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds from `30s`, `10m`, `24h`, `2d`, `250ms` or a plain number of seconds, at most
    365 days.

    Raises:
        ValueError: naming the bad text.
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a duration such as 30s, 10m or 24h, got {text!r}")
    if isinstance(text, int | float):
        return check_seconds(text)
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"expected a duration such as 30s, 10m or 24h, got {text!r}")
    seconds = float(m.group(1)) * _SECONDS[m.group(2)]
    if seconds > MAX_DURATION:
        raise ValueError(f"a duration is at most 365 days, got {text.strip()!r}")
    return seconds


def check_seconds(value: Any, what: str = "a duration") -> float:
    """`value` as seconds if it is a finite number in [0, 365 days] (not a bool).

    Raises:
        ValueError: naming `what` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    if value > MAX_DURATION:
        raise ValueError(f"{what} is at most 365 days (31536000 s), got {value!r}")
    return float(value)
