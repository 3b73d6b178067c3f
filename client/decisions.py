"""The controller's decisions on the client side: accepted, pending, applied when due.

Pure state, no sockets and no clock: `Client` feeds it every `lr` message it receives and
tells it where training is (the next epoch and step to run); a decision applies at the first
boundary at or after its `apply_from_epoch` / `apply_from_step`. A decision of another run
replaces the pending ones; one of the same run applies only if its `version` is newer.

Example:

    d = Decisions(lr=0.1, epoch=0, step=0)
    d.accept(lr_message)            # e.g. 0.05 from epoch 3
    d.at(epoch=3)
    for decision in d.due():        # the shell runs snapshot / restore here, then
        d.settle(decision)          # the LR changes
    d.lr                            # 0.05

Plans: a decision that carries a `plan` (a schedule as a function of time, see
`lrpilot.client.plans`) puts it in force; from then on `at()` sets `lr` to the plan's value
at every boundary in the plan's span, with no message. A decision without a plan ends it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .plans import compiled, compiled_momentum
from .protocol import LrMessage

__all__ = ["Decision", "Decisions"]


@dataclass(frozen=True)
class Decision:
    """An accepted decision, numbered in the order received."""

    number: int
    message: LrMessage

    @property
    def action(self) -> str | None:
        return self.message.action


class Decisions:
    """The LR in force, the decisions waiting for their boundary, and the actions applied.

    Args:
        lr: the LR in force before any decision (the optimizer's).
        epoch: the next epoch training runs.
        step: the next optimizer step training runs.
        world: the job's number of ranks; with several, while a range test's sweep runs as
            a plan (its reports streamed), a decision due applies only at a boundary
            `synced` (after a report that waited for its answer, as every rank's report of
            that step did): every rank applies it at that same step.
    """

    def __init__(self, lr: float, epoch: int, step: int, world: int = 1) -> None:
        self.lr = lr
        self.world = world
        self.epoch = epoch
        self.step = step
        self.run: int | None = None
        self.version = -1
        self.pending: list[Decision] = []
        self.received = 0  # decisions accepted so far
        self.applied = 0  # the number of the decision in force
        #: True once a decision said `action: stop`.
        self.stop_requested = False
        #: The last `snapshot` / `restore` action applied.
        self.last_action: str | None = None
        #: The plan in force (from the decision applied last), or None.
        self.plan: dict[str, Any] | None = None
        self._plan_at: Callable[[int], float | None] | None = None
        self._by_step = False
        #: The momentum a plan with `cycle_momentum` sets now (torch: momentum or betas[0]),
        #: or None.
        self.momentum: float | None = None
        #: A guarded job's snapshot period (units), from the newest decision received.
        self.snapshot_every: int | None = None
        self._momentum_at: Callable[[int], float | None] | None = None

    def accept(self, message: LrMessage) -> bool:
        """Takes a decision that is newer than the last one (or of another run)."""
        if message.run == self.run and message.version <= self.version:
            return False  # an older or repeated decision
        if message.run != self.run:
            self.pending.clear()  # decisions of another run are void
        self.run, self.version = message.run, message.version
        self.snapshot_every = (message.detail or {}).get("snapshot_every")
        self.received += 1
        self.pending.append(Decision(self.received, message))
        return True

    def at(self, epoch: int | None = None, step: int | None = None) -> None:
        """Training is about to run `epoch` (and/or `step`)."""
        if epoch is not None:
            self.epoch = epoch
        if step is not None:
            self.step = step
        if self._plan_at is not None:
            self._follow(self._plan_at)

    def _follow(self, plan_at: Callable[[int], float | None]) -> None:
        """The plan's LR at the current boundary, inside its span; outside, the last one."""
        t = self.step if self._by_step else self.epoch
        lr = plan_at(t)
        if lr is not None:
            self.lr = lr
        if self._momentum_at is not None:
            momentum = self._momentum_at(t)
            if momentum is not None:
                self.momentum = momentum

    def due(self, everything: bool = False, synced: bool = False) -> list[Decision]:
        """Takes the decisions due at the current boundary (all of them with `everything`)
        off the pending list, oldest first; `settle` each after running its action.
        `synced`: the boundary follows a report that waited for its answer."""
        if not self.pending:
            return []
        due = [d for d in self.pending if everything or self._is_due(d.message, synced)]
        if due:
            taken = {d.number for d in due}
            self.pending = [d for d in self.pending if d.number not in taken]
        return due

    def settle(self, decision: Decision) -> None:
        """The decision applies: its LR (unless a later-received one is in force already,
        e.g. a plateau step for epoch 5 after an override for epoch 3) and its action."""
        if decision.number > self.applied:
            self.lr, self.applied = decision.message.lr, decision.number
            plan = decision.message.plan
            if plan is None or plan != self.plan:  # every reply repeats the plan in force
                self._plan_at = None if plan is None else compiled(plan)
                self._momentum_at = None if plan is None else compiled_momentum(plan)
            self.plan = plan
            if self._momentum_at is None:
                self.momentum = None
            self._by_step = plan is not None and plan["unit"] == "step"
            if self._plan_at is not None:
                self._follow(self._plan_at)
        if decision.action == "stop":
            self.stop_requested = True
        elif decision.action is not None:
            self.last_action = decision.action

    def _is_due(self, message: LrMessage, synced: bool) -> bool:
        if message.apply_from_epoch is not None:
            return message.apply_from_epoch <= self.epoch
        if message.apply_from_step is None or message.apply_from_step > self.step:
            return False
        return synced or not self.syncing()

    def syncing(self) -> bool:
        """Whether a sweep of several ranks streams here (decisions then wait for a synced
        boundary): a range test's plan in force, at a step before its end, in a job of
        more than one rank."""
        plan = self.plan
        if self.world <= 1 or plan is None or plan["kind"] != "range_test":
            return False
        until = plan["until"]
        return until is None or self.step < until
