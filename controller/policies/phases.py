"""A chain of policies (`phases:`), each lasting `until` epochs (or steps).

Local time `t` restarts at 0 in each phase. When a phase ends, the next one
starts from the LR the previous left (`lr: previous`, the default), from a
fixed `lr: <float>`, or from a range test's suggestion (`lr: suggested`). The
LR a phase leaves is the one it decided for its last report, i.e. its value at
local time `until`: a warmup of 3 epochs leaves exactly `to_lr`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .base import Decision, Event, Policy, State

__all__ = ["Phase", "Phases", "PhasesState"]


@dataclass(frozen=True)
class Phase:
    """One link of the chain: a policy, how long it lasts, and the LR it starts from."""

    policy: Policy
    until: int | None = None
    lr: float | str = "previous"


@dataclass(frozen=True, kw_only=True)
class PhasesState(State):
    index: int = 0
    start: int = 0
    inner: dict[str, Any] = field(default_factory=dict)
    suggested: float | None = None


@dataclass(frozen=True, kw_only=True)
class Phases(Policy):
    """Run `phases` one after another; the job's state records which one is current."""

    type = "phases"
    state_class = PhasesState

    phases: tuple[Phase, ...] = ()

    def _phase_lr(self, phase: Phase, left: float, suggested: float | None) -> float:
        if isinstance(phase.lr, float):
            return phase.lr
        if phase.lr == "suggested" and suggested is not None:
            return suggested
        return left

    def start(self, lr0: float, t: int) -> PhasesState:
        """Fast-forward through phases that ended before `t` (a job first seen mid-run)."""
        begin, left = 0, lr0
        for index, phase in enumerate(self.phases):
            phase_lr0 = self._phase_lr(phase, left, None)
            last = index == len(self.phases) - 1
            if phase.until is not None and not last and t >= begin + phase.until:
                left = phase.policy.start(phase_lr0, phase.until).lr
                begin += phase.until
                continue
            inner = phase.policy.start(phase_lr0, t - begin)
            return PhasesState(lr=inner.lr, index=index, start=begin, inner=inner.to_dict())
        raise AssertionError("phases is never empty")  # pragma: no cover

    def for_framework(self, framework: str) -> Policy:
        phases = tuple(
            dataclasses.replace(p, policy=p.policy.for_framework(framework)) for p in self.phases
        )
        return self if phases == self.phases else dataclasses.replace(self, phases=phases)

    def inner_state(self, state: PhasesState) -> State:
        return self.phases[state.index].policy.load_state(state.inner)

    def step(
        self, state: State, t: int, metrics: Mapping[str, float], directions: Mapping[str, str]
    ) -> tuple[State, Decision]:
        assert isinstance(state, PhasesState)
        phase = self.phases[state.index]
        inner, decision = phase.policy.step(
            self.inner_state(state), t - state.start, metrics, directions
        )
        new = state.replace(lr=inner.lr, inner=inner.to_dict())
        last = state.index == len(self.phases) - 1
        if phase.until is None or last or t + 1 - state.start < phase.until:
            return new, decision
        # The phase ends with this report: the next one owns the LR from t+1.
        index = state.index + 1
        begin = state.start + phase.until
        nxt = self.phases[index]
        inner = nxt.policy.start(self._phase_lr(nxt, inner.lr, state.suggested), t + 1 - begin)
        new = new.replace(lr=inner.lr, index=index, start=begin, inner=inner.to_dict())
        event = Event("phase", state.lr, inner.lr)
        return new, Decision(inner.lr, event, decision.action, decision.warning, nxt.policy.apply)

    def rebase(self, state: State, lr: float, t: int) -> State:
        assert isinstance(state, PhasesState)
        policy = self.phases[state.index].policy
        inner = policy.rebase(self.inner_state(state), lr, t - state.start)
        return state.replace(lr=inner.lr, inner=inner.to_dict())

    def describe(self, state: State) -> dict[str, Any]:
        assert isinstance(state, PhasesState)
        policy = self.phases[state.index].policy
        info = policy.describe(self.inner_state(state))
        info["phase"] = f"{state.index + 1}/{len(self.phases)} {policy.type}"
        return info
