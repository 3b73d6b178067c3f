"""Cosine decay with warm restarts (`type: cosine_restarts`), as Keras' CosineDecayRestarts.

SGDR: a cosine from lr0 down to alpha · lr0 over `first_decay_steps`, then a
restart; each cycle lasts `t_mul` times the previous one and its cosine part is
`m_mul` times smaller (the alpha floor is not scaled). With m_mul 1 and an
integer t_mul this is torch's CosineAnnealingWarmRestarts(T_0, T_mult,
eta_min = alpha · lr0). Computed in float64 (Keras: float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .fields import at_least, between, param
from .schedule import Schedule

__all__ = ["CosineRestarts"]


@dataclass(frozen=True, kw_only=True)
class CosineRestarts(Schedule):
    """Cosine annealing with warm restarts (Keras CosineDecayRestarts, torch SGDR)."""

    type = "cosine_restarts"
    equivalents = (
        "Keras `CosineDecayRestarts`",
        (
            "torch `CosineAnnealingWarmRestarts(T_0=first_decay_steps, "
            "T_mult=t_mul, eta_min=alpha * lr0)` (m_mul 1, integer t_mul)"
        ),
    )

    first_decay_steps: int = param(
        check=lambda v: None if v >= 1 else "must be >= 1", doc="length of the first cycle"
    )
    t_mul: float = param(2.0, at_least(1), "each cycle is t_mul times longer (torch T_mult)")
    m_mul: float = param(1.0, between(0, 1, hi_open=False), "each cycle's cosine part × m_mul")
    alpha: float = param(0.0, between(0, 1, lo_open=False, hi_open=False), "floor LR / lr0")

    def cycle(self, t: int) -> tuple[int, float]:
        """(index of the cycle `t` falls in, fraction of that cycle done)."""
        done = t / self.first_decay_steps
        if self.t_mul == 1.0:
            i = math.floor(done)
            return i, done - i
        i = math.floor(math.log(1.0 - done * (1.0 - self.t_mul)) / math.log(self.t_mul))

        def fraction(i: int) -> float:
            before = (1.0 - self.t_mul**i) / (1.0 - self.t_mul)
            return (done - before) / self.t_mul**i

        # The logarithm can land one cycle off at an exact restart: settle it exactly.
        while i > 0 and fraction(i) < 0:
            i -= 1
        while fraction(i) >= 1:
            i += 1
        return i, fraction(i)

    def value(self, lr0: float, t: int) -> float:
        i, frac = self.cycle(t)
        cosine = 0.5 * self.m_mul**i * (1.0 + math.cos(math.pi * frac))
        return lr0 * ((1.0 - self.alpha) * cosine + self.alpha)
