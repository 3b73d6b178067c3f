"""The loss-spike guard: judge each unit of the job-wide monitor, and say when to roll back.

    guard: {monitor: loss, unit: step, spike: 3.0, window: 50, warmup: 100,
            snapshot_every: 200, lr_factor: 0.5, cooldown: 100,
            max_rollbacks: 3, on_exhausted: continue}

Pure: `observe(guard, state, t, value, minimize)` folds one aggregated value into a
`GuardState` and returns the verdict, with no clock, socket or file, so the daemon, `lrpilot
simulate` and the tests run the same code. The reducer (`transitions.decide`) turns a
`Spike` into `action: restore` with the LR × `lr_factor` for every rank.

The EMA is bias-corrected (Adam's correction): with β = 1 − 2 / (window + 1),
acc ← β·acc + (1 − β)·x, w ← β·w + (1 − β), ema = acc / w, which equals
Σ βⁱ·x₍ₜ₋ᵢ₎ / Σ βⁱ over the values folded so far (pandas' `ewm(span=window, adjust=True)`).
A value is folded only when it is finite and judged healthy (or in the warmup): a spike
never raises the level it is measured against. The window counts reports (with
`report_every` N, one value per N steps).

Example:

    g = Guard(spike=3.0, window=10, warmup=5, snapshot_every=20)
    s = GuardState()
    for t, loss in enumerate(losses):
        s, spike = observe(g, s, t, loss, minimize=True)
        if spike is not None and spike.rollback:
            ...  # restore snapshot spike.snapshot_unit, LR × g.lr_factor
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from .policies.fields import at_least, between, one_of, param, positive_int

__all__ = ["Guard", "GuardState", "Spike", "observe"]


@dataclass(frozen=True, kw_only=True)
class Guard:
    """A rule's, phase's or the defaults' `guard`: what counts as a loss spike, and what a
    rollback does."""

    monitor: str = param("loss", doc="the job-wide (aggregated) metric watched")
    mode: Literal["auto", "min", "max"] = param(
        "auto",
        one_of("auto", "min", "max"),
        "min: a spike is a jump up; max: a drop (below EMA / spike); auto as plateau's mode",
    )
    unit: Literal["epoch", "step"] | None = param(
        None, one_of("epoch", "step"), "the policy's unit (the default); must equal it"
    )
    spike: float = param(3.0, between(1.0, math.inf), "a value above spike × EMA is a spike")
    window: int = param(50, positive_int, "the EMA spans this many reports")
    warmup: int = param(100, at_least(0), "no spike is judged in the first warmup units")
    snapshot_every: int = param(
        200, positive_int, "the trainer copies its state at every multiple of this unit"
    )
    lr_factor: float = param(
        0.5, between(0.0, 1.0, hi_open=False), "the LR after a rollback is the LR × lr_factor"
    )
    cooldown: int = param(100, at_least(0), "no spike is judged for this many units after one")
    max_rollbacks: int = param(3, at_least(0), "rollbacks per run; then on_exhausted")
    on_exhausted: Literal["continue", "stop"] = param(
        "continue", one_of("continue", "stop"), "continue: notice only; stop: action stop"
    )

    @property
    def beta(self) -> float:
        return 1.0 - 2.0 / (self.window + 1)


@dataclass(frozen=True)
class GuardState:
    """What the guard remembers of a run (stored with the job).

    Args:
        acc, weight: the EMA's accumulator and its bias-correction weight (ema = acc/weight).
        first: the first unit seen (warmup counts from it).
        last: the last unit judged (a later report of an earlier unit changes nothing).
        healthy_until: the last unit of a report judged healthy (or of the warmup).
        quiet_until: no spike is judged up to this unit (the cooldown after a spike).
        rollbacks: rollbacks in this run.
        restore_version: the job's version that carries the last rollback's restore (so a
            replayed report or a hello after a controller restart gets it once more).
        restore_unit: that rollback's snapshot unit.
    """

    acc: float = 0.0
    weight: float = 0.0
    first: int | None = None
    last: int | None = None
    healthy_until: int | None = None
    quiet_until: int = -1
    rollbacks: int = 0
    restore_version: int | None = None
    restore_unit: int | None = None

    @property
    def ema(self) -> float | None:
        return self.acc / self.weight if self.weight > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "acc": self.acc,
            "weight": self.weight,
            "first": self.first,
            "last": self.last,
            "healthy_until": self.healthy_until,
            "quiet_until": self.quiet_until,
            "rollbacks": self.rollbacks,
            "restore_version": self.restore_version,
            "restore_unit": self.restore_unit,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuardState:
        def opt(key: str) -> int | None:
            v = data.get(key)
            return None if v is None else int(v)

        return cls(
            acc=float(data.get("acc", 0.0)),
            weight=float(data.get("weight", 0.0)),
            first=opt("first"),
            last=opt("last"),
            healthy_until=opt("healthy_until"),
            quiet_until=int(data.get("quiet_until", -1)),
            rollbacks=int(data.get("rollbacks", 0)),
            restore_version=opt("restore_version"),
            restore_unit=opt("restore_unit"),
        )


@dataclass(frozen=True)
class Spike:
    """A unit judged a spike.

    Args:
        unit: the unit (epoch or step) of the report.
        value: its value (NaN/inf for a non-finite one).
        ema: the EMA it was judged against (None: a non-finite value before any EMA).
        snapshot_unit: the newest multiple of snapshot_every all of whose earlier units
            were judged healthy: the snapshot every rank restores.
        rollback: False when max_rollbacks were spent (then on_exhausted applies).
    """

    unit: int
    value: float
    ema: float | None
    snapshot_unit: int
    rollback: bool

    def detail(self) -> str:
        """The audit row's detail: `unit=… value=… ema=… snapshot_unit=…`."""
        ema = "none" if self.ema is None else f"{self.ema:.6g}"
        text = (
            f"unit={self.unit} value={self.value:.6g} ema={ema} snapshot_unit={self.snapshot_unit}"
        )
        return text if self.rollback else text + " max_rollbacks spent"


def observe(
    guard: Guard, state: GuardState, t: int, value: float | None, minimize: bool
) -> tuple[GuardState, Spike | None]:
    """Judge unit t's aggregated monitor `value` (None: not reported: nothing changes).

    Returns:
        The new state, and the spike when unit t is one (after `warmup` units since the
        first one seen, outside a cooldown: a non-finite value, or one above spike × EMA;
        for a max monitor below EMA ÷ spike).
    """
    if value is None or (state.last is not None and t <= state.last):
        return state, None
    first = t if state.first is None else state.first
    state = replace(state, first=first, last=t)
    if t <= state.quiet_until:
        return state, None
    finite = math.isfinite(value)
    ema = state.ema
    judged = t - first >= guard.warmup
    if judged:
        if not finite:
            spiked = True
        elif ema is None:
            spiked = False
        elif minimize:
            spiked = value > guard.spike * ema
        else:
            spiked = value < ema / guard.spike
        if spiked:
            return _spiked(guard, state, t, value, ema)
    if not finite:  # in the warmup: neither folded nor healthy, and never a spike
        return state, None
    b = guard.beta
    state = replace(
        state,
        acc=b * state.acc + (1.0 - b) * value,
        weight=b * state.weight + (1.0 - b),
        healthy_until=t,
    )
    return state, None


def _spiked(
    guard: Guard, state: GuardState, t: int, value: float, ema: float | None
) -> tuple[GuardState, Spike]:
    every = guard.snapshot_every
    healthy = state.healthy_until
    # The snapshot of unit s is taken before s's step: units < s made it; they must all
    # have been judged healthy, so s <= healthy_until + 1.
    frontier = (healthy + 1) if healthy is not None else (state.first or 0)
    snapshot_unit = (frontier // every) * every
    rollback = state.rollbacks < guard.max_rollbacks
    state = replace(
        state,
        quiet_until=t + guard.cooldown,
        rollbacks=state.rollbacks + (1 if rollback else 0),
    )
    return state, Spike(t, value, ema, snapshot_unit, rollback)
