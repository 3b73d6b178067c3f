"""A chain of policies (`phases:`), each lasting `until` epochs (or steps).

Local time `t` restarts at 0 in each phase. A phase ends after `until`, or when
its policy has `finished` (a range test that stopped). The next one starts from
the LR the previous left (`lr: previous`, the default), from a fixed
`lr: <float>`, or from the last range test's suggestion (`lr: suggested`). The
LR a phase leaves is the one it decided for its last report, i.e. its value at
local time `until`: a warmup of 3 epochs leaves exactly `to_lr`.

The decision that changes phase carries the ending phase's action and detail (a
range test's `restore` and its curve), or else the action the next phase starts
with (`snapshot` when entering a range test).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lrpilot.client.plans as plans
from lrpilot.client.vocabulary import clamp_lr

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
    suggested: float | None = None  # the last range test's suggestion: `lr: suggested`
    range_test: dict[str, Any] | None = None  # that test's report, kept after its phase


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

    def monitors(self) -> tuple[str, ...]:
        return tuple(m for p in self.phases for m in p.policy.monitors())

    def current(self, state: State) -> Policy:
        assert isinstance(state, PhasesState)
        return self.phases[state.index].policy.current(self.inner_state(state))

    def transfer(self, state: State, new: Policy, t: int) -> State:
        """A chain stays in the phase of the same index and type (that phase's state carried
        over as its policy says); otherwise `new` starts from the current LR."""
        assert isinstance(state, PhasesState)
        i = state.index
        if (
            isinstance(new, Phases)
            and i < len(new.phases)
            and i < len(self.phases)
            and type(new.phases[i].policy) is type(self.phases[i].policy)
        ):
            old_inner = self.phases[i].policy
            inner = old_inner.transfer(
                old_inner.load_state(state.inner), new.phases[i].policy, t - state.start
            )
            return state.replace(lr=inner.lr, inner=inner.to_dict())
        return super().transfer(state, new, t)

    def step(
        self, state: State, t: int, metrics: Mapping[str, float], directions: Mapping[str, str]
    ) -> tuple[State, Decision]:
        assert isinstance(state, PhasesState)
        phase = self.phases[state.index]
        before = self.inner_state(state)
        inner, decision = phase.policy.step(before, t - state.start, metrics, directions)
        return self._next(state, t, before, inner, decision)

    def counts(self, state: State, lr: float) -> bool:
        assert isinstance(state, PhasesState)
        return self.phases[state.index].policy.counts(self.inner_state(state), lr)

    def admit(
        self, state: State, t: int, lrs: Sequence[float], ahead: bool = False
    ) -> State | None:
        """The phase in force admits the report. Right after a range test, a report trained
        above the sweep's last point is no input: the trainer ran the sweep on (a plan) until
        the restore reached it, on weights the restore took back."""
        assert isinstance(state, PhasesState)
        if self._past_sweep(state, lrs):
            return None
        before = self.inner_state(state)
        inner = self.phases[state.index].policy.admit(before, t - state.start, lrs, ahead)
        if inner is None or inner is before:
            return None if inner is None else state
        return state.replace(lr=inner.lr, inner=inner.to_dict())

    def _past_sweep(self, state: PhasesState, lrs: Sequence[float]) -> bool:
        report = state.range_test
        if state.index == 0 or report is None or not report.get("points"):
            return False
        if self.phases[state.index - 1].policy.type != "range_test":
            return False
        last = max(p[0] for p in report["points"])
        return any(lr > last * (1 + 1e-6) for lr in lrs)

    def missed(self, state: State, t: int) -> State:
        assert isinstance(state, PhasesState)
        before = self.inner_state(state)
        inner = self.phases[state.index].policy.missed(before, t - state.start)
        return state if inner is before else state.replace(lr=inner.lr, inner=inner.to_dict())

    def abandon(self, state: State, t: int) -> tuple[State, Decision] | None:
        """The phase in force abandons its sweep; the chain moves on as when it finishes."""
        assert isinstance(state, PhasesState)
        before = self.inner_state(state)
        ended = self.phases[state.index].policy.abandon(before, t - state.start)
        if ended is None:
            return None
        return self._next(state, t, before, *ended)

    def _next(
        self, state: PhasesState, t: int, before: State, inner: State, decision: Decision
    ) -> tuple[State, Decision]:
        """The chain after the phase in force went from `before` to `inner` at time t."""
        phase = self.phases[state.index]
        new = state.replace(lr=inner.lr, inner=inner.to_dict())
        finished = phase.policy.finished(inner) and not phase.policy.finished(before)
        if finished:
            report = phase.policy.range_test_report(inner)
            if report is not None:
                new = new.replace(suggested=report["suggested_lr"], range_test=report)
        last = state.index == len(self.phases) - 1
        timed_out = phase.until is not None and t + 1 - state.start >= phase.until
        if last or not (finished or timed_out):
            return new, decision
        # The phase ends with this report: the next one owns the LR from t+1.
        index = state.index + 1
        begin = state.start + phase.until if timed_out and phase.until is not None else t + 1
        nxt = self.phases[index]
        inner = nxt.policy.start(self._phase_lr(nxt, inner.lr, new.suggested), t + 1 - begin)
        new = new.replace(lr=inner.lr, index=index, start=begin, inner=inner.to_dict())
        # A policy that ended itself names the change (range_test); otherwise it is `phase`.
        kind = decision.event.kind if finished and decision.event is not None else "phase"
        return new, Decision(
            inner.lr,
            Event(kind, state.lr, inner.lr),
            decision.action or nxt.policy.start_action(inner),
            decision.warning,
            nxt.policy.apply,
            detail=decision.detail,
            notice=decision.notice,
        )

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
        if state.suggested is not None:
            info.setdefault("suggested_lr", state.suggested)
        return info

    def plan(
        self, state: State, origin: int = 0, until: int | None = None
    ) -> dict[str, Any] | None:
        """The plan of the phase in force, from its start to its end, with the plans of the
        schedule phases after it sent ahead (`next`), so that every rank switches at the
        boundary itself, with no message. The chain ahead stops before a phase that needs
        the controller (plateau, range test), which starts from the reports as before."""
        assert isinstance(state, PhasesState)
        phase = self.phases[state.index]
        last = state.index == len(self.phases) - 1
        end = None if last or phase.until is None else origin + state.start + phase.until
        plan = phase.policy.plan(self.inner_state(state), origin + state.start, end)
        if plan is None or plan["kind"] == "range_test":
            return plan  # a sweep ends from the reports: nothing after it is known ahead
        chain = [plan]
        index = state.index + 1
        while index < len(self.phases) and len(chain) <= plans.MAX_AHEAD:
            ahead = self._ahead(chain[-1], index, state.suggested)
            if ahead is None:
                break
            chain.append(ahead)
            index += 1
        for before, after in zip(reversed(chain[:-1]), reversed(chain[1:]), strict=True):
            before["next"] = after
        return chain[0]

    def _ahead(
        self, before: Mapping[str, Any], index: int, suggested: float | None
    ) -> dict[str, Any] | None:
        """The plan of phase `index` as `_next` will start it at `before`'s end (from the LR
        `before` leaves there), or None when it cannot be known ahead."""
        begin = before["until"]
        if begin is None:
            return None
        left = before["scale"] * plans.value(
            before["kind"], before["params"], before["lr0"], begin - before["from"]
        )
        if not math.isfinite(left):
            return None  # a formula that gives no LR there: the controller keeps the one in force
        phase = self.phases[index]
        inner = phase.policy.start(self._phase_lr(phase, clamp_lr(left), suggested), 0)
        if phase.policy.start_action(inner) is not None:
            return None
        last = index == len(self.phases) - 1
        end = None if last or phase.until is None else begin + phase.until
        plan = phase.policy.plan(inner, begin, end)
        if plan is None or plan["unit"] != before["unit"]:
            return None
        return plan

    # The hooks ask the phase in force; a finished range test's report outlives its phase.

    def finished(self, state: State) -> bool:
        assert isinstance(state, PhasesState)
        return self.phases[state.index].policy.finished(self.inner_state(state))

    def start_action(self, state: State) -> str | None:
        assert isinstance(state, PhasesState)
        return self.phases[state.index].policy.start_action(self.inner_state(state))

    def range_test_report(self, state: State) -> dict[str, Any] | None:
        assert isinstance(state, PhasesState)
        report = self.phases[state.index].policy.range_test_report(self.inner_state(state))
        return report if report is not None else state.range_test
