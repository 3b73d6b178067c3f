"""Cyclical LR (`type: cyclic`), as torch's CyclicLR: a triangle between base_lr and max_lr.

One cycle is `step_size_up` units up and `step_size_down` (default: up) units
down. `triangular` keeps the amplitude, `triangular2` halves it every cycle,
`exp_range` scales it by gamma^t. LRs are absolute: lr0 is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import lrpilot.client.plans as plans

from .fields import an_lr, between, one_of, param, positive, positive_int
from .schedule import Schedule

__all__ = ["Cyclic"]


@dataclass(frozen=True, kw_only=True)
class Cyclic(Schedule):
    """Cycle the LR (and momentum) between two bounds (torch CyclicLR)."""

    type = "cyclic"
    equivalents = ("torch `CyclicLR`",)

    base_lr: float = param(check=an_lr, doc="lower LR of the cycle")
    max_lr: float = param(check=an_lr, doc="upper LR of the cycle")
    step_size_up: int = param(2000, positive_int, "units from base_lr up to max_lr")
    step_size_down: int | None = param(None, positive_int, "units back down (default: up)")
    mode: str = param(
        "triangular", one_of("triangular", "triangular2", "exp_range"), "amplitude policy"
    )
    gamma: float = param(1.0, positive, "exp_range: amplitude × gamma^t")
    cycle_momentum: bool = param(False, doc="also cycle momentum inversely to the LR")
    base_momentum: float = param(0.8, between(0, 1, hi_open=False), "momentum at max_lr")
    max_momentum: float = param(0.9, between(0, 1, hi_open=False), "momentum at base_lr")

    def problems(self) -> list[tuple[str | None, str]]:
        if self.max_lr < self.base_lr:
            return [("max_lr", "max_lr must be >= base_lr")]
        if self.base_momentum > self.max_momentum:
            return [("base_momentum", "base_momentum must be <= max_momentum")]
        return []

    def momentum(self, lr0: float, t: int) -> float | None:
        """The momentum at `t` when `cycle_momentum` is on, else None."""
        plan = {"kind": self.type, "params": self.plan_params(), "from": 0, "lr0": lr0}
        return plans.momentum(plan, t)
