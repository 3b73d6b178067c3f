"""Milestone decay (`type: multistep`): lr = lr0 · factor^(number of milestones <= t)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .fields import param, positive
from .schedule import Schedule

__all__ = ["MultiStep"]


def _ascending(v: list[int]) -> str | None:
    if not v or any(not isinstance(x, int) or x < 1 for x in v):
        return "must be a non-empty list of epochs >= 1"
    if any(a >= b for a, b in itertools.pairwise(v)):
        return "must be strictly increasing"
    return None


@dataclass(frozen=True, kw_only=True)
class MultiStep(Schedule):
    """Multiply the LR by `factor` at each milestone (torch MultiStepLR)."""

    type = "multistep"
    equivalents = ("torch `MultiStepLR(milestones, gamma=factor)`",)

    milestones: list[int] = param(check=_ascending, doc="epochs (or steps) where the LR drops")
    factor: float = param(0.1, positive, "multiplier at each milestone (torch: gamma)")
