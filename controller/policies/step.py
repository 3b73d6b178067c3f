"""Step decay (`type: step`): lr = lr0 · factor^floor(t / step_size)."""

from __future__ import annotations

from dataclasses import dataclass

from .fields import param, positive, positive_int
from .schedule import Schedule

__all__ = ["StepDecay"]


@dataclass(frozen=True, kw_only=True)
class StepDecay(Schedule):
    """Multiply the LR by `factor` every `step_size` epochs (torch StepLR, Keras step decay)."""

    type = "step"
    equivalents = (
        "torch `StepLR(step_size, gamma=factor)`",
        "Keras `ExponentialDecay(lr0, decay_steps=step_size, decay_rate=factor, staircase=True)`",
    )

    factor: float = param(0.5, positive, "multiplier applied every step_size (torch: gamma)")
    step_size: int = param(10, positive_int, "epochs (or steps) between drops")
