"""Cosine decay with warm restarts (`type: cosine_restarts`), as Keras' CosineDecayRestarts.

SGDR: a cosine from lr0 down to alpha · lr0 over `first_decay_steps`, then a
restart; each cycle lasts `t_mul` times the previous one and its cosine part is
`m_mul` times smaller (the alpha floor is not scaled). With m_mul 1 and an
integer t_mul this is torch's CosineAnnealingWarmRestarts(T_0, T_mult,
eta_min = alpha · lr0). Computed in float64 (Keras: float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import lrpilot.client.plans as plans

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
        return plans.restarts_cycle(self.plan_params(), t)
