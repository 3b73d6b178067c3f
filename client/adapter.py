"""What every framework adapter does the same way, written once: the shared arguments, the
client's construction, the unit (report each epoch, or every `report_every` optimizer steps
without waiting), the range test's snapshot / restore, and `action: stop`.

The Keras callback, the torch scheduler and the Lightning and Hugging Face callbacks are
thin: each reads its framework's state (LR, step, metrics), hands it to an `AdapterCore`
and writes back the LR it returns. A new action (a guard's restore, plans) is added here,
once. Importing this module imports no framework.

Example (the skeleton of an adapter):

    core = AdapterCore(job="resnet-a", framework="torch", unit="step", report_every=10)
    core.connect(initial_lr=0.1, start_epoch=0, start_step=0,
                 copy=lambda: StateSnapshot(model, [optimizer]))
    for step in range(1000):
        train_step()
        set_lr(optimizer, core.step_end(epoch=0, done=step, before=step,
                                        metrics=lambda: {"loss": loss.item()}))
        if core.stop_requested:
            break
    core.close()
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .core import Client, check_adapter_args, takes_unit
from .env import resolve_job

__all__ = ["AdapterCore", "Restorable"]

logger = logging.getLogger("lrpilot.client")

#: A range test's sweep run as a plan in a job of several ranks streams its reports and
#: waits for an answer before every step that is a multiple of this (and at the sweep's
#: end); the decisions that came since apply there (see `Decisions`), on every rank at once.
SWEEP_SYNC_EVERY = 16


class Restorable(Protocol):
    """An in-memory copy of a model's and optimizer's state, taken when a range test starts."""

    def restore(self) -> None: ...


def _sweep_until(plan: Mapping[str, Any] | None) -> int | None:
    """The end (`until`) of a range test's sweep run as a plan, or None for no such plan."""
    if plan is None or plan["kind"] != "range_test":
        return None
    until: int | None = plan["until"]
    return until


class AdapterCore:
    """The client of one `fit` / training run, and the decisions every adapter applies alike.

    Args:
        job: the job name; default `LRPILOT_JOB`.
        endpoint: the controller(s): one endpoint, or several comma-separated; default
            `LRPILOT_ENDPOINT`.
        timeout: the longest, in seconds, a report waits for the controller.
        strict: True raises `ControllerUnavailable` when the hello gets no answer.
        unit: `"epoch"`, or `"step"` for policies with `unit: step`.
        report_every: with `unit="step"`, report every this many optimizer steps.
        framework: told to the controller (`keras`, `torch`, `lightning`, `hf`).
        snapshot_fn, restore_fn: the user's replacement of the in-memory copy for models
            too large to copy; both or neither. A range test calls them with no argument;
            a guard, if they take one (`def snapshot_fn(unit=None)`), with the unit of the
            snapshot to take or put back (else the guard uses the in-memory copies).

    Raises:
        ValueError: no job name or a bad argument, naming the fix.
    """

    def __init__(
        self,
        *,
        job: str | None,
        endpoint: str | None,
        timeout: float,
        strict: bool,
        unit: str,
        report_every: int,
        framework: str,
        snapshot_fn: Callable[..., None] | None = None,
        restore_fn: Callable[..., None] | None = None,
    ) -> None:
        check_adapter_args(unit, report_every, snapshot_fn, restore_fn)
        self.job = resolve_job(job)
        self.endpoint = endpoint
        self.timeout = timeout
        self.strict = bool(strict)
        self.unit = unit
        self.report_every = report_every
        self.framework = framework
        self.snapshot_fn, self.restore_fn = snapshot_fn, restore_fn
        #: Ask for schedules as plans (see `lrpilot.client.plans`); False: one LR per report.
        self.plans = True
        #: The client of the running fit; None outside of one.
        self.client: Client | None = None
        #: A range test runs: from its snapshot to its restore (step reports then wait).
        self.testing = False
        #: A restore just put the optimizer's own LR back: set the LR even if unchanged.
        self.restored = False
        self.snapshot: Restorable | None = None
        self._copy: Callable[[], Restorable] | None = None
        self._after_snapshot: Callable[[], None] | None = None
        self._before_restore: Callable[[], None] | None = None
        self._after_restore: Callable[[], None] | None = None
        #: A guard's snapshots (unit -> copy), the newest two, taken at every multiple of the
        #: job's `snapshot_every` by the trainer itself.
        self.kept: dict[int, Restorable] = {}
        self._keep: Callable[[], Restorable] | None = None
        #: The user's snapshot_fn(unit) / restore_fn(unit), used by the guard instead of
        #: in-memory copies; None when they take no unit (or there are none).
        self._unit_fns: tuple[Callable[..., None], Callable[..., None]] | None = None
        #: The guard's rollbacks applied here: (snapshot unit asked, unit restored or None).
        self.rollbacks: list[tuple[int, int | None]] = []

    # -- a run -----------------------------------------------------------------------------

    def connect(
        self,
        *,
        initial_lr: float,
        start_epoch: int,
        start_step: int = 0,
        rank: int | None = None,
        world: int | None = None,
        directions: Mapping[str, str] | None = None,
        copy: Callable[[], Restorable] | None = None,
        after_snapshot: Callable[[], None] | None = None,
        before_restore: Callable[[], None] | None = None,
        after_restore: Callable[[], None] | None = None,
        keep: Callable[[], Restorable] | None = None,
        unit_fns: tuple[Callable[..., None], Callable[..., None]] | None = None,
    ) -> Client:
        """Says hello (closing a client left from an earlier run) and returns the client.

        Args:
            copy: makes the in-memory copy when a range test starts; without it and without
                `snapshot_fn` the hello says this process cannot restore.
            after_snapshot, before_restore, after_restore: what the adapter does besides
                (e.g. Keras starts its loss sums, counts the optimizer steps a restore
                takes back).
            keep: makes a guard's snapshot (default `copy`): a copy that may be restored
                more than once, taken off the step's critical path where it can be.
            unit_fns: the user's (snapshot_fn, restore_fn) when the adapter keeps them itself
                (default: this core's); if they take a unit the guard calls them instead of
                `keep`.
        """
        self.close()
        self._copy = copy
        self._keep = keep or copy
        self.kept = {}
        fns = unit_fns
        if fns is None and self.snapshot_fn is not None and self.restore_fn is not None:
            fns = (self.snapshot_fn, self.restore_fn)
        self._unit_fns = fns if fns is not None and all(map(takes_unit, fns)) else None
        self._after_snapshot = after_snapshot
        self._before_restore, self._after_restore = before_restore, after_restore
        restorable = self.snapshot_fn is not None or copy is not None
        self.client = Client(
            self.endpoint,
            self.job,
            initial_lr=initial_lr,
            start_epoch=start_epoch,
            timeout=self.timeout,
            rank=rank,
            world=world,
            start_step=start_step,
            framework=self.framework,
            directions=directions,
            strict=self.strict,
            snapshot_fn=self._snapshot if restorable else None,
            restore_fn=self._restore if restorable else None,
            plans=self.plans,
            rollback_fn=self._rollback if self._guarded() else None,
        )
        return self.client

    def close(self) -> None:
        """Says bye and closes the client of the run; safe to call twice."""
        if self.client is not None:
            self.client.close()
            self.client = None

    @property
    def lr(self) -> float:
        """The LR in force (the client's); call during a run only."""
        assert self.client is not None, "connect() first"
        return self.client.lr

    @property
    def stop_requested(self) -> bool:
        """The controller sent `action: stop`: the adapter stops training."""
        return self.client is not None and self.client.stop_requested

    # -- boundaries ------------------------------------------------------------------------

    def begin(self, epoch: int | None = None, step: int | None = None) -> float:
        """An epoch (or step) is about to start: decisions due there apply."""
        assert self.client is not None, "connect() first"
        lr = self.client.lr_at(epoch=epoch, step=step)
        at = step if self.unit == "step" else epoch
        if at is not None:
            self._guard_boundary(at, at)
        return lr

    def epoch_end(
        self, epoch: int, metrics: Mapping[str, Any], trained_lr: float | None = None
    ) -> float:
        """`unit="epoch"`: reports the epoch just finished; the LR for the next one.
        `trained_lr`: the LR it trained at, when not the client's (see `Client.report`)."""
        assert self.client is not None, "connect() first"
        lr = self.client.report(epoch, metrics, trained_lr=trained_lr)
        self._guard_boundary(epoch + 1, epoch + 1)
        return lr

    def step_end(
        self,
        epoch: int,
        done: int,
        before: int,
        metrics: Callable[[], Mapping[str, Any] | None] | None,
        wait: bool | None = None,
        trained_lr: float | None = None,
    ) -> float:
        """`unit="step"`: optimizer steps `before`..`done` (0-based) have run. Reports every
        `report_every` steps (`metrics()` is read only then: a host read of the loss happens
        only at a report) without waiting (a range test's sweep run as a plan: every step,
        see `wait`); else only looks for decisions. The LR for step `done + 1`.

        Args:
            epoch: the epoch the steps belong to.
            done: the last optimizer step that ran.
            before: the first step of this call (the step count at the previous call);
                several at once when a framework runs steps per execution.
            metrics: returns the metrics to report (None or empty: none ready; per-step
                adapters hand the means of the previous report's steps, read one report
                late, see `lrpilot.client.step_means`); None: nothing to report.
            wait: whether the report waits for its answer; default: during a range test
                only at the sweep's last step when the sweep runs as a plan (every step is
                then reported, streamed) and, in a job of several ranks, at every sync step
                of it (see `_waits`), at every report with an older controller's sweep (so
                that all ranks restore at the same step), and with a guard in a job of
                several ranks.
            trained_lr: the LR the steps trained at, when not the client's (a hello that
                came after them; see `Client.report`).
        """
        client = self.client
        assert client is not None, "connect() first"
        sweep = _sweep_until(client.plan) if self.testing else None
        every = self.report_every if sweep is None else 1
        if (done + 1) // every > before // every:
            report = None if metrics is None else metrics()
            if report or client.plan is None or self.testing or client.liveness_due():
                if wait is not None:
                    waits = wait
                elif sweep is not None and trained_lr is not None:
                    waits = True  # trained before the sweep's plan came: the sweep starts after
                else:
                    waits = self._waits(client, sweep, done)
                lr = client.report(
                    epoch, report or {}, step=done, wait=waits, trained_lr=trained_lr
                )
                self._guard_boundary(before + 1, done + 1)
                return lr
        lr = client.lr_at(step=done + 1)
        self._guard_boundary(before + 1, done + 1)
        return lr

    def _waits(self, client: Client, sweep: int | None, done: int) -> bool:
        """Whether the report of step `done` waits for its answer. A range test run as a plan
        (`sweep`: its end) streams its reports and waits once, at its last step, for the
        controller's end of it; a job of several ranks also waits before every step that is
        a multiple of `SWEEP_SYNC_EVERY`, where the decisions that came meanwhile apply
        (the client holds them until a report that waited): every rank has them there, and
        restores at the same step. With an older controller's sweep every report waits, so
        does a guarded job of several ranks."""
        if sweep is not None:
            return done + 1 >= sweep or (client.world > 1 and (done + 1) % SWEEP_SYNC_EVERY == 0)
        if self.testing:
            return True
        return client.snapshot_every is not None and client.world > 1

    @property
    def reads_at_once(self) -> bool:
        """Whether per-step means are read at their own report rather than one report late
        (see `lrpilot.client.step_means`): during a range test (each loss belongs to its LR)
        and under a guard (a spike must be judged at the step it happened, or the controller
        could name a snapshot taken after it)."""
        client = self.client
        return self.testing or (client is not None and client.snapshot_every is not None)

    # -- the loss-spike guard ----------------------------------------------------------------

    def _guarded(self) -> bool:
        """Whether this adapter can take a guard's snapshots (a copy, or the user's pair)."""
        return self._keep is not None or self._unit_fns is not None

    def _guard_boundary(self, first: int, unit: int) -> None:
        """Training stands at `unit` (having crossed units `first`..`unit`): with a guard,
        the state is copied when a multiple of `snapshot_every` was crossed, labelled with
        the unit it is the state of (or the user's `snapshot_fn(unit)` is called); the
        newest two are kept. No message is needed."""
        client = self.client
        every = client.snapshot_every if client is not None else None
        if every is None or not self._guarded() or self.testing or unit in self.kept:
            return
        if unit // every * every < first:  # no multiple in first..unit
            return
        if self._unit_fns is not None:
            self._unit_fns[0](unit)
            self.kept[unit] = _UserSnapshot(self._unit_fns[1], unit)
        else:
            assert self._keep is not None
            self.kept[unit] = self._keep()
        while len(self.kept) > 2:
            del self.kept[min(self.kept)]

    def _rollback(self, snapshot_unit: int) -> None:
        """A guard's `action: restore`: put back the newest snapshot taken at or before
        `snapshot_unit` (the newest all of whose earlier units were healthy); newer ones are
        of the spiked weights and are dropped. The LR of the same message is set after."""
        held = [u for u in self.kept if u <= snapshot_unit]
        if not held:
            self.rollbacks.append((snapshot_unit, None))
            logger.warning(
                "lrpilot: the guard of job %s rolls back to the snapshot of %s %d, but this %s "
                "adapter holds none that old (it keeps the newest two; held: %s); training "
                "goes on from the weights as they are, at the lowered LR",
                self.job,
                self.unit,
                snapshot_unit,
                self.framework,
                sorted(self.kept) or "none",
            )
            return
        unit = max(held)
        for newer in [u for u in self.kept if u > unit]:
            del self.kept[newer]
        if self._before_restore is not None:
            self._before_restore()
        self.kept[unit].restore()
        self.rollbacks.append((snapshot_unit, unit))
        self.restored = True
        if self._after_restore is not None:
            self._after_restore()

    # -- range tests -----------------------------------------------------------------------

    def _snapshot(self) -> None:
        """`action: snapshot`: keep the state from before the range test."""
        if self.snapshot_fn is not None:
            self.snapshot_fn()
        elif self._copy is not None:
            self.snapshot = self._copy()
        self.testing = True
        if self._after_snapshot is not None:
            self._after_snapshot()

    def _restore(self) -> None:
        """`action: restore`: put the state from before the test back; the client then
        hands over the suggested LR, which the adapter sets (`restored` says it must)."""
        self.testing = False
        if self._before_restore is not None and (self.restore_fn or self.snapshot):
            self._before_restore()
        if self.restore_fn is not None:
            self.restore_fn()
        elif self.snapshot is not None:
            self.snapshot.restore()
            self.snapshot = None  # one test, one restore: free the copy
        else:
            logger.warning(
                "lrpilot: the range test of job %s ended, but this %s adapter kept no copy of "
                "the state from its start (it joined later); training goes on from the "
                "weights as they are",
                self.job,
                self.framework,
            )
            return
        self.restored = True
        if self._after_restore is not None:
            self._after_restore()


class _UserSnapshot:
    """A guard's snapshot taken by the user's `snapshot_fn(unit)`: restoring it calls
    `restore_fn(unit)`."""

    __slots__ = ("restore_fn", "unit")

    def __init__(self, restore_fn: Callable[..., None], unit: int) -> None:
        self.restore_fn, self.unit = restore_fn, unit

    def restore(self) -> None:
        self.restore_fn(self.unit)
