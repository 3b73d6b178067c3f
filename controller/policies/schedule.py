"""Schedules: the LR is a function of time alone, `lr(t) = scale · value(lr0, t)`.

`scale` starts at 1 and is what an operator override changes
(`scale = new_lr / value(lr0, t+1)`), so later LRs keep the schedule's shape.

Every schedule is also a plan (`plan(state, origin, until)`): the function sent to clients
that say `plans: true`, which evaluate it at every boundary themselves. `value` is computed
by the same evaluator the client uses (`lrpilot.client.plans`), so the two agree by
construction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lrpilot.client.plans as plans
from lrpilot.client.vocabulary import LR_RANGE, clamp_lr

from .base import Decision, Policy, State

__all__ = ["Schedule", "ScheduleState"]

#: The fields every policy has; the rest of a schedule's fields are its plan's params.
_BASE_FIELDS = frozenset({"unit", "initial_lr", "apply"})


@dataclass(frozen=True, kw_only=True)
class ScheduleState(State):
    lr0: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True, kw_only=True)
class Schedule(Policy):
    """Base of time-only policies; subclasses declare their parameters, and the plan
    evaluator of their `type` (`lrpilot.client.plans.KINDS`) computes their values."""

    state_class = ScheduleState

    def plan_params(self) -> dict[str, Any]:
        """The schedule's own parameters (not unit, initial_lr, apply), as the plan sends them."""
        cached = self.__dict__.get("_plan_params")
        if cached is None:
            cached = {
                f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)
                if f.name not in _BASE_FIELDS
            }
            object.__setattr__(self, "_plan_params", cached)
        return cached

    def value(self, lr0: float, t: int) -> float:
        """The schedule's LR at local time `t` when it starts from `lr0`."""
        return plans.value(self.type, self.plan_params(), lr0, t)

    def plan(
        self, state: State, origin: int = 0, until: int | None = None
    ) -> dict[str, Any] | None:
        """This schedule in `state` as a plan whose local time 0 is boundary `origin`,
        in force until `until` (exclusive; None: for good). None in shadow mode."""
        assert isinstance(state, ScheduleState)
        if not self.apply:
            return None
        return {
            "kind": self.type,
            "params": self.plan_params(),
            "unit": self.unit,
            "from": origin,
            "until": until,
            "lr0": state.lr0,
            "scale": state.scale,
        }

    def lr_at(self, state: ScheduleState, t: int) -> float:
        # A growing schedule (factor > 1) stops at the ceiling rather than overflow; one that
        # ends at 0 (cosine with alpha 0) stays at the floor, 1e-12: no job runs at LR 0.
        return clamp_lr(state.scale * self.value(state.lr0, t))

    def start(self, lr0: float, t: int) -> ScheduleState:
        base = self.initial_lr if self.initial_lr is not None else lr0
        state = ScheduleState(lr=0.0, lr0=base)
        return state.replace(lr=self.lr_at(state, t))

    def step(
        self, state: State, t: int, metrics: Mapping[str, float], directions: Mapping[str, str]
    ) -> tuple[State, Decision]:
        assert isinstance(state, ScheduleState)
        value = state.scale * self.value(state.lr0, t + 1)
        new_lr = clamp_lr(value)
        decision = self.decision(state, new_lr, "schedule")
        if new_lr != value and new_lr != state.lr:  # said once, when the LR reaches the bound
            warning = f"{self.type} computed lr {value:.6g}, outside {LR_RANGE}; it is {new_lr:g}"
            decision = dataclasses.replace(decision, warning=warning, notice="clamped")
        return state.replace(lr=new_lr), decision

    def rebase(self, state: State, lr: float, t: int) -> State:
        assert isinstance(state, ScheduleState)
        base = self.value(state.lr0, t + 1)
        scale = lr / base if base > 0 else state.scale
        return state.replace(lr=lr, scale=scale)
