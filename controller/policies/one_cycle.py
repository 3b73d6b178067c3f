"""One-cycle (`type: one_cycle`), as torch's OneCycleLR: up to max_lr, then down far below.

The LR rises from max_lr / div_factor to max_lr over the first `pct_start` of
`total_steps`, then anneals to max_lr / div_factor / final_div_factor (with
`three_phase`: back to the start first, then down). Fastai's `fit_one_cycle`
is this schedule; after a range test, `lr: suggested` makes the suggestion its
max_lr. Unlike torch, which raises past total_steps, the last LR is held.
"""

from __future__ import annotations

from dataclasses import dataclass

import lrpilot.client.plans as plans
from lrpilot.client.plans import anneal

from .fields import an_lr, between, one_of, param, positive
from .schedule import Schedule

__all__ = ["OneCycle", "anneal"]


@dataclass(frozen=True, kw_only=True)
class OneCycle(Schedule):
    """One cycle of LR (and momentum) per run (torch OneCycleLR; fastai fit_one_cycle)."""

    type = "one_cycle"
    equivalents = (
        "torch `OneCycleLR`",
        "fastai `fit_one_cycle`",
    )

    max_lr: float | None = param(None, an_lr, "peak LR (default: lr0, e.g. `lr: suggested`)")
    total_steps: int = param(check=lambda v: None if v >= 2 else "must be >= 2", doc="cycle length")
    pct_start: float = param(0.3, between(0, 1), "share of the cycle spent rising")
    anneal: str = param("cos", one_of("cos", "linear"), "annealing shape (torch anneal_strategy)")
    div_factor: float = param(25.0, positive, "initial LR = max_lr / div_factor")
    final_div_factor: float = param(1e4, positive, "final LR = initial LR / final_div_factor")
    three_phase: bool = param(False, doc="rise, fall back to the initial LR, then anneal down")
    cycle_momentum: bool = param(False, doc="also cycle momentum inversely to the LR")
    base_momentum: float = param(0.85, between(0, 1, hi_open=False), "momentum at max_lr")
    max_momentum: float = param(0.95, between(0, 1, hi_open=False), "momentum at the ends")

    def problems(self) -> list[tuple[str | None, str]]:
        rise = self.pct_start * self.total_steps - 1
        if rise <= 0:
            return [("pct_start", "pct_start * total_steps must be > 1 (a rise of >= 1 step)")]
        if self.three_phase and self.total_steps - 1 <= 2 * rise:
            return [
                ("pct_start", "three_phase needs pct_start * total_steps < (total_steps + 1) / 2")
            ]
        if self.base_momentum > self.max_momentum:
            return [("base_momentum", "base_momentum must be <= max_momentum")]
        return []

    def momentum(self, lr0: float, t: int) -> float | None:
        """The momentum at `t` when `cycle_momentum` is on, else None."""
        plan = {"kind": self.type, "params": self.plan_params(), "from": 0, "lr0": lr0}
        return plans.momentum(plan, t)
