"""Schedules: the LR is a function of time alone, `lr(t) = scale · value(lr0, t)`.

`scale` starts at 1 and is what an operator override changes
(`scale = new_lr / value(lr0, t+1)`), so later LRs keep the schedule's shape.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

from lrpilot.client.vocabulary import LR_RANGE, clamp_lr

from .base import Decision, Policy, State

__all__ = ["Schedule", "ScheduleState"]


@dataclass(frozen=True, kw_only=True)
class ScheduleState(State):
    lr0: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True, kw_only=True)
class Schedule(Policy):
    """Base of time-only policies; subclasses define `value(lr0, t)`."""

    state_class = ScheduleState

    @abstractmethod
    def value(self, lr0: float, t: int) -> float:
        """The schedule's LR at local time `t` when it starts from `lr0`."""

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
