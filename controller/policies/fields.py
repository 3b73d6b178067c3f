"""Declaring policy parameters: a default, a range check, and a line of documentation.

The policy file loader reads these declarations to validate YAML, and the
README's policy reference is written from the same words.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from lrpilot.client.vocabulary import lr_problem

__all__ = ["an_lr", "at_least", "between", "one_of", "param", "positive", "positive_int"]

Check = Callable[[Any], "str | None"]


def param(default: Any = dataclasses.MISSING, check: Check | None = None, doc: str = "") -> Any:
    """A dataclass field with a validation `check` (value -> message or None) and `doc`."""
    metadata = {"check": check, "doc": doc}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def between(lo: float, hi: float, *, lo_open: bool = True, hi_open: bool = True) -> Check:
    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")

    def check(v: Any) -> str | None:
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = v < hi if hi_open else v <= hi
        if not (math.isfinite(v) and ok_lo and ok_hi):
            return f"must be in {left}{lo:g}, {hi:g}{right}"
        return None

    return check


def an_lr(v: Any) -> str | None:
    """An LR: finite and in [1e-12, 10] (the vocabulary's bounds)."""
    return lr_problem(v)


def at_least(lo: float) -> Check:
    def check(v: Any) -> str | None:
        if not (math.isfinite(v) and v >= lo):
            return f"must be >= {lo:g}"
        return None

    return check


def positive(v: Any) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be > 0"


def positive_int(v: Any) -> str | None:
    return None if v >= 1 else "must be >= 1"


def one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else "must be one of " + ", ".join(choices)

    return check
