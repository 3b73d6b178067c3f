"""Piecewise constant (`type: piecewise`), as Keras' PiecewiseConstantDecay.

`values[0]` up to and including t = boundaries[0], `values[i+1]` from
t = boundaries[i] + 1 (Keras compares `t > boundary`). LRs are absolute.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from lrpilot.client.vocabulary import LR_RANGE, lr_problem

from .fields import param
from .schedule import Schedule

__all__ = ["Piecewise"]


def _increasing(v: list[int]) -> str | None:
    if not v or any(x < 0 for x in v):
        return "must be a non-empty list of integers >= 0"
    if any(a >= b for a, b in itertools.pairwise(v)):
        return "must be strictly increasing"
    return None


def _lrs(v: list[Any]) -> str | None:
    if not v or any(lr_problem(x) for x in v):
        return f"must be a non-empty list of LRs in {LR_RANGE}"
    return None


@dataclass(frozen=True, kw_only=True)
class Piecewise(Schedule):
    """A fixed LR per interval of t (Keras PiecewiseConstantDecay)."""

    type = "piecewise"
    equivalents = (
        "Keras `PiecewiseConstantDecay`",
        "torch `MultiStepLR` when each value is the previous one times a constant factor",
    )

    boundaries: list[int] = param(check=_increasing, doc="last t of each interval but the last")
    values: list[float] = param(
        check=_lrs, doc="the LR of each interval (one more than boundaries)"
    )

    def problems(self) -> list[tuple[str | None, str]]:
        if len(self.values) != len(self.boundaries) + 1:
            n = len(self.boundaries) + 1
            return [
                ("values", f"values needs {n} entries (boundaries + 1), got {len(self.values)}")
            ]
        return []
