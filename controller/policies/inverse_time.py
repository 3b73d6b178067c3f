"""Time-based decay (`type: inverse_time`): lr0 / (1 + decay_rate · t / decay_steps).

Equal to Keras' InverseTimeDecay; with decay_steps 1 it is the classic
time-based decay lr0 / (1 + k·t).
"""

from __future__ import annotations

from dataclasses import dataclass

from .fields import at_least, param, positive_int
from .schedule import Schedule

__all__ = ["InverseTimeDecay"]


@dataclass(frozen=True, kw_only=True)
class InverseTimeDecay(Schedule):
    """Time-based decay per epoch (or step)."""

    type = "inverse_time"
    equivalents = ("Keras `InverseTimeDecay(lr0, decay_steps, decay_rate, staircase)`",)

    decay_rate: float = param(check=at_least(0), doc="k in lr0 / (1 + k * t / decay_steps)")
    decay_steps: int = param(1, positive_int, "period of t")
    staircase: bool = param(False, doc="use floor(t / decay_steps)")
