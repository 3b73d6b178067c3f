"""The LR range test (`type: range_test`): sweep the LR up exponentially, watch the loss, pick.

lr(t) = start_lr · 10^(t / steps_per_decade), computed as `10 ** (t / steps_per_decade) *
start_lr` so that `{type: range_test, unit: epoch}` hands out, to the float, what the seeds'
`LearningRateScheduler(lambda epoch: 1e-8 * 10**(epoch / 20))` sets. Every report trained
at the sweep's LR adds a point (that LR, loss, smoothed loss); the smoothed loss is fastai's
bias-corrected EMA (`beta` 0.98: about 50 points of memory, meant for per-step losses; with
`unit: epoch` a smaller beta reacts sooner). The sweep stops on divergence — the smoothed
loss above 4× its best, or a non-finite loss — or when the next LR would pass end_lr. Then
the three suggestions of `suggest.py` are computed, the chosen one (`suggest:`) becomes the
LR and the decision asks the trainer to restore the weights and optimizer state it had
before the test (`action: restore`; the test's first LR went out with `action: snapshot`).
A range test with no phase after it keeps the suggested LR.

A point is what was trained: the LR a report says its step ran at, and its loss. A report
trained at another LR than the sweep's current one (the trainer went on at its last LR while
the controller was away, then sent what it kept) is no point, and the sweep's index counts
the LRs tried, not the steps: after an outage the sweep resumes with its next untried LR and
its curve equals an uninterrupted run's. A worker that cannot restore its weights saying
hello mid-sweep ends it with no suggestion (stop reason `abandoned`) and the LR from before
the test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .base import Decision, Event, Policy, State, Unit
from .fields import an_lr, between, one_of, param, positive
from .suggest import METHODS, SKIP_END, suggest

__all__ = ["BETA", "DIVERGENCE", "RangeTest", "RangeTestState"]

BETA = 0.98  # fastai's AvgSmoothLoss
DIVERGENCE = 4.0  # fastai's LRFinder: stop when the smoothed loss passes 4x its best
_ROUNDING = 1e-9  # 1e-8 * 10**(180/20) is 10.000000000000002: still end_lr 10
_SAME_LR = 1e-6  # a reported LR this close (relative) is the sweep's: float32 in a trainer

Point = tuple[float, float, float]


@dataclass(frozen=True, kw_only=True)
class RangeTestState(State):
    """`points` (lr, loss, smoothed) so far; `smoothed`/`count` carry the EMA; `best` its low."""

    lr_before: float = 0.0  # the LR before the test: restored when nothing can be suggested
    seen: int = 0  # reports fed so far (0: the test has not started)
    index: int = -1  # the sweep's index of `lr`: LRs tried so far (-1: a 0.2 state, see seen)
    at: int = -1  # the local step the next LR (`index`) trains at, for the plan (-1: index)
    points: tuple[Point, ...] = ()
    smoothed: float = 0.0
    count: int = 0
    best: float | None = None
    done: bool = False
    stop_reason: str | None = None
    valley: float | None = None
    steep: float | None = None
    minimum: float | None = None
    suggested_lr: float | None = None  # the LR the test ended with: the chosen suggestion

    def to_dict(self) -> dict[str, Any]:
        # Lists, as msgpack and JSON give them back, so a stored state compares equal.
        out = dict(self.__dict__)
        out["points"] = [list(p) for p in self.points]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RangeTestState:
        state = super().from_dict(data)
        points = tuple((_float(a), _float(b), _float(c)) for a, b, c in state.points)
        # lrpilot 0.2 stored no index: its sweep counted reports, from t = 0.
        index = state.index if state.index >= 0 else state.seen
        return state.replace(points=points, index=index, at=max(state.at, index))


@dataclass(frozen=True, kw_only=True)
class RangeTest(Policy):
    """Sweep the LR from start_lr up by a decade every steps_per_decade steps; suggest one.

    Example:
        >>> policy = RangeTest(unit="epoch")
        >>> policy.lr_at(20) == 10 ** (20 / 20) * 1e-8
        True
    """

    type = "range_test"
    equivalents = (
        "fastai `Learner.lr_find`",
        (
            "the seeds' Keras `LearningRateScheduler(lambda epoch: 1e-8 * "
            "10**(epoch / 20))` (`unit: epoch`)"
        ),
    )
    state_class = RangeTestState

    unit: Unit = param("step", one_of("epoch", "step"), "count t in steps (default) or epochs")
    start_lr: float = param(1e-8, an_lr, "the first LR of the sweep")
    end_lr: float = param(10.0, an_lr, "the sweep stops before passing it")
    steps_per_decade: float = param(20.0, positive, "steps (epochs) for each tenfold LR increase")
    monitor: str = param("loss", doc="the training loss, as the client reports it")
    beta: float = param(
        BETA, between(0, 1, lo_open=False), "EMA factor of the smoothed loss (0: no smoothing)"
    )
    suggest: str = param("valley", one_of(*METHODS), "valley, steep or minimum: the LR picked")

    def problems(self) -> list[tuple[str | None, str]]:
        out: list[tuple[str | None, str]] = []
        if self.start_lr >= self.end_lr:
            out.append(("end_lr", f"end_lr must be > start_lr {self.start_lr:g}"))
        if not self.apply:
            out.append(("apply", "a range test cannot run in shadow mode: it must set the LR"))
        return out

    # -- the sweep ------------------------------------------------------------

    def lr_at(self, t: int) -> float:
        """The sweep's LR at local time t, exactly as the seeds' lambda computes it (the
        plan's evaluator: the trainer computes the same number)."""
        return 10 ** (t / self.steps_per_decade) * self.start_lr

    def sweep_params(self) -> dict[str, Any]:
        """The sweep as a plan's params (see `lrpilot.client.plans`, kind `range_test`)."""
        return {
            "start_lr": self.start_lr,
            "end_lr": self.end_lr,
            "steps_per_decade": self.steps_per_decade,
        }

    def index_of(self, lr: float) -> int | None:
        """The sweep's index whose LR `lr` is (float32 rounding allowed), or None for an LR
        that is none of the sweep's."""
        if not (lr > 0 and math.isfinite(lr)):
            return None
        j = round(self.steps_per_decade * math.log10(lr / self.start_lr))
        if not 0 <= j < self.planned:
            return None
        swept = min(self.lr_at(j), self.end_lr)
        return j if abs(lr - swept) <= _SAME_LR * swept else None

    @property
    def planned(self) -> int:
        """Points in a full sweep from start_lr to end_lr."""
        decades = math.log10(self.end_lr / self.start_lr)
        return math.floor(decades * self.steps_per_decade + _ROUNDING) + 1

    def _next_lr(self, t: int) -> float | None:
        """The sweep's LR at t, or None once it would pass end_lr."""
        lr = self.lr_at(t)
        if lr > self.end_lr * (1 + _ROUNDING):
            return None
        return min(lr, self.end_lr)

    def start(self, lr0: float, t: int) -> RangeTestState:
        index = max(t, 0)  # a job first seen mid-sweep picks it up where the formula is
        lr = self._next_lr(index)
        return RangeTestState(
            lr=self.end_lr if lr is None else lr, lr_before=lr0, index=index, at=index
        )

    def counts(self, state: State, lr: float) -> bool:
        """Only a report trained at the sweep's LR is a point (float32 rounding allowed)."""
        assert isinstance(state, RangeTestState)
        return state.done or abs(lr - state.lr) <= _SAME_LR * state.lr

    def admit(
        self, state: State, t: int, lrs: Sequence[float], ahead: bool = False
    ) -> State | None:
        """A point is what was trained: the state whose LR is the one the report trained at
        (every rank's), or None when that is no untried LR of the sweep. With `ahead` (the
        ranks run the sweep as a plan) a later untried LR than the current one counts too:
        the trainer reached it before this controller heard of it."""
        assert isinstance(state, RangeTestState)
        if all(self.counts(state, lr) for lr in lrs):
            return state
        if not ahead:
            return None
        before = state.lr_before
        if any(abs(lr - before) <= _SAME_LR * before for lr in lrs):
            return None  # the LR from before the test: a trainer that had no plan yet
        found = {self.index_of(lr) for lr in lrs}
        if len(found) != 1:
            return None
        (j,) = found
        # A plan starts its sweep at local step 0 or later: step t runs index t at most.
        if j is None or not state.index <= j <= t:
            return None
        if j == state.index:
            return state
        return state.replace(index=j, lr=min(self.lr_at(j), self.end_lr))

    def missed(self, state: State, t: int) -> State:
        """A report of local time t that is no point: before the first point the sweep (its
        plan) starts over at t+1, so no LR of it is skipped; later it changes nothing (the
        trainer runs the plan, and an older trainer is told the next untried LR again)."""
        assert isinstance(state, RangeTestState)
        if state.done or state.points:
            return state
        return state.replace(at=t + 1)

    def plan(
        self, state: State, origin: int = 0, until: int | None = None
    ) -> dict[str, Any] | None:
        """The sweep as a plan (kind `range_test`): the trainer runs it step by step with no
        wait, index `index` at local step `at`, until the sweep's last planned LR; None
        once the test is done (the next phase, or the suggestion, takes over)."""
        assert isinstance(state, RangeTestState)
        if state.done or not self.apply:
            return None
        start = origin + max(state.at, state.index) - state.index
        if start < 0:
            return None
        end = start + self.planned
        return {
            "kind": "range_test",
            "params": self.sweep_params(),
            "unit": self.unit,
            "from": start,
            "until": end if until is None else min(end, until),
            "lr0": self.start_lr,
            "scale": 1.0,
        }

    def step(
        self, state: State, t: int, metrics: Mapping[str, float], directions: Mapping[str, str]
    ) -> tuple[State, Decision]:
        assert isinstance(state, RangeTestState)
        if state.done:
            return state, Decision(state.lr, apply=self.apply)
        state = state.replace(seen=state.seen + 1, at=t + 1)
        raw = metrics.get(self.monitor)
        if raw is None:
            available = ",".join(sorted(metrics)) or "none"
            warning = (
                f"range_test records metric `{self.monitor}` which is not available; "
                f"available metrics are: {available}"
            )
            return self._advance(state, warning)
        loss = float(raw)
        if not math.isfinite(loss):
            point = (state.lr, loss, math.nan)
            return self._stop(state.replace(points=(*state.points, point)), "divergence")
        # fastai's bias-corrected EMA, written as s += w·(x − s) with w = (1−β)/(1−β^n): the
        # same value, and exactly flat where the loss is (no rounding noise to read as a valley).
        count = state.count + 1
        weight = (1 - self.beta) / (1 - self.beta**count)
        smoothed = state.smoothed + weight * (loss - state.smoothed)
        best = smoothed if state.best is None else min(state.best, smoothed)
        state = state.replace(
            points=(*state.points, (state.lr, loss, smoothed)),
            smoothed=smoothed,
            count=count,
            best=best,
        )
        if smoothed > DIVERGENCE * best:
            return self._stop(state, "divergence")
        return self._advance(state, None)

    def _advance(self, state: RangeTestState, warning: str | None) -> tuple[State, Decision]:
        """The next untried LR of the sweep (its index counts LRs tried, not steps)."""
        index = state.index + 1
        lr = self._next_lr(index)
        if lr is None:
            return self._stop(state, "end_lr", warning)
        decision = self.decision(state, lr, "range_test", warning=warning)
        return state.replace(lr=lr, index=index), decision

    def suggestions(self, points: Sequence[Point]) -> dict[str, float | None]:
        """The three suggestions on `points`, trimmed as fastai's lr_find trims its curve.

        lr_find leaves out the first tenth of the planned sweep and its last 5 steps; with
        a report every step those are points, with sparser reports the points whose LRs
        lie in those stretches of the sweep.
        """
        lrs = [p[0] for p in points]
        if not lrs:
            return suggest([], [], 0)
        first = self.lr_at(self.planned // 10) * (1 - _ROUNDING)
        last = lrs[-1] * 10 ** (-SKIP_END / self.steps_per_decade) * (1 + _ROUNDING)
        skip_start = sum(1 for lr in lrs if lr < first)
        skip_end = sum(1 for lr in lrs if lr > last)
        return suggest(lrs, [p[2] for p in points], skip_start, skip_end)

    def _stop(
        self, state: RangeTestState, reason: str, warning: str | None = None
    ) -> tuple[State, Decision]:
        found = self.suggestions(state.points)
        chosen = found[self.suggest]
        if chosen is None:
            chosen = state.lr_before
            warning = (
                "the range test stopped before it had enough finite losses to suggest an LR; "
                f"restoring with the LR from before the test, {chosen:.6g}"
            )
        done = state.replace(
            lr=chosen,
            suggested_lr=chosen,
            done=True,
            stop_reason=reason,
            valley=found["valley"],
            steep=found["steep"],
            minimum=found["minimum"],
        )
        report = self.range_test_report(done)
        assert report is not None
        return done, Decision(
            chosen,
            Event("range_test", state.lr, chosen),
            action="restore",
            warning=warning,
            apply=self.apply,
            detail=json.dumps(report, separators=(",", ":"), allow_nan=False),
        )

    def abandon(self, state: State, t: int) -> tuple[State, Decision] | None:
        """A sweep under way ends with no suggestion: back to the LR from before the test,
        and every rank that can restores its weights."""
        assert isinstance(state, RangeTestState)
        if state.seen == 0 or state.done:
            return None
        lr = state.lr_before
        done = state.replace(lr=lr, done=True, stop_reason="abandoned", suggested_lr=None)
        report = self.range_test_report(done)
        return done, Decision(
            lr,
            Event("range_test", state.lr, lr),
            action="restore",
            apply=self.apply,
            detail=json.dumps(report, separators=(",", ":"), allow_nan=False),
        )

    def rebase(self, state: State, lr: float, t: int) -> State:
        # An operator's LR is used as it is; the sweep goes on by its formula from the step
        # after, and the points record the LR that was really in force.
        return state.replace(lr=lr)

    # -- hooks -----------------------------------------------------------------

    def load_state(self, data: Mapping[str, Any]) -> State:
        return RangeTestState.from_dict(data)

    def finished(self, state: State) -> bool:
        assert isinstance(state, RangeTestState)
        return state.done

    def start_action(self, state: State) -> str | None:
        assert isinstance(state, RangeTestState)
        return "snapshot" if state.seen == 0 and not state.done else None

    def range_test_report(self, state: State) -> dict[str, Any] | None:
        assert isinstance(state, RangeTestState)
        if state.done:
            found = {"valley": state.valley, "steep": state.steep, "minimum": state.minimum}
        else:  # provisional: what the curve so far would suggest
            found = self.suggestions(state.points)
        return {
            "points": [[_finite(v) for v in p] for p in state.points],
            "suggestions": found,
            "suggest": self.suggest,
            "suggested_lr": state.suggested_lr if state.done else found[self.suggest],
            "stop_reason": state.stop_reason,
            "done": state.done,
        }

    def monitors(self) -> tuple[str, ...]:
        return (self.monitor,)

    def describe(self, state: State) -> dict[str, Any]:
        assert isinstance(state, RangeTestState)
        info: dict[str, Any] = {
            "policy": self.type,
            "phase": None,
            "monitor": self.monitor,
            "value": self._shown(state),
            "best": state.best,
        }
        if state.done:
            info["suggested_lr"] = state.suggested_lr
            info["stop_reason"] = state.stop_reason
        return info

    def _shown(self, state: RangeTestState) -> float | None:
        """The smoothed loss `status` shows: the last finite point's during the sweep (a
        diverged loss is no value to show), the suggestion's once it ended."""
        finite = [p for p in state.points if math.isfinite(p[2])]
        if not finite:
            return None
        if state.done and state.suggested_lr is not None:
            chosen = state.suggested_lr
            return min(finite, key=lambda p: abs(math.log(p[0] / chosen)))[2]
        return finite[-1][2]


def _float(x: Any) -> float:
    return math.nan if x is None else float(x)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
